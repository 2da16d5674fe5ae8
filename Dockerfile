# sparks-proxy container image.
#
#   docker build -t sparks-proxy .
#   docker run --rm -p 8080:8080 \
#     -e SPARKS_PROXY_AUTH_CLIENT_ID=... \
#     -e SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE=/run/secrets/sparks/client-secret \
#     -v "$PWD/client-secret:/run/secrets/sparks/client-secret:ro" \
#     sparks-proxy
#
# Configure through SPARKS_PROXY_<SECTION>_<KEY> variables or mount a TOML file and set
# SPARKS_PROXY_CONFIG (see config.example.toml). No credentials are baked into the image.
# Try it without credentials: docker run --rm -p 8080:8080 sparks-proxy demo

# ---- builder: build the wheel and install it with its dependencies into a venv ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/

# The only thing installed by name is the wheel built from this source tree; its
# dependencies are constrained by pyproject.toml.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# ---- runtime: the venv on a slim Python, run as an unprivileged user ----
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPARKS_PROXY_SERVER_HOST=0.0.0.0

RUN groupadd --system --gid 10001 sparks \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sparks

COPY --from=builder /opt/venv /opt/venv

# An empty working directory: no ./config.toml unless one is mounted here.
WORKDIR /app
USER 10001:10001

EXPOSE 8080

# Liveness only (/-/readyz also needs a valid token). Bypasses any HTTP(S)_PROXY variables
# and follows SPARKS_PROXY_SERVER_PORT when the port is changed through the environment.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('SPARKS_PROXY_SERVER_PORT') or '8080'; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/-/healthz', timeout=4)"]

ENTRYPOINT ["sparks-proxy"]
CMD ["serve"]
