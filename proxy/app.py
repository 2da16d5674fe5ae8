"""create_app(settings): state, the resources' single owner, and the request dispatcher.

The :class:`aiohttp.web.Application` holds the app's state under typed keys and owns the async
resources in one cleanup context: the upstream ``ClientSession`` and the ``TokenManager`` are
made at start-up and closed at shutdown, in reverse order, and only if they were made. Requests
are dispatched by :func:`dispatcher`: ``/-/`` paths to the admin routes, all others forwarded.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from .access_log import ABORTED, AccessLog
from .admin import Admin, Lifecycle
from .config import Settings, read_encryption_key
from .errors import ProxyError, error_response
from .forward import Forwarder
from .metrics import Metrics
from .request_checks import RequestPolicy
from .token_endpoint import CredentialIdentity, TokenEndpoint
from .token_store import FileTokenStore, TokenStore
from .tokens import TokenManager
from .upstream import UpstreamPool

log = logging.getLogger("sparks_proxy.errors")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
TOKENS = web.AppKey("tokens", TokenManager)
FORWARDER = web.AppKey("forwarder", Forwarder)
ADMIN = web.AppKey("admin", Admin)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def create_app(settings: Settings) -> web.Application:
    """An application for ``settings``; its resources exist between startup and cleanup."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(upstream_client)
    return app


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The token endpoint's session, with a proxy's defaults, not a browser's."""
    upstream = settings.upstream
    # aiohttp's own verified context serves unless a private CA is added (one less CA-store
    # load at start-up).
    ssl_context: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=upstream.ca_file) if upstream.ca_file else True
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context),  # always verified; ca_file adds a CA
        # No cookie is kept from one token request to the next.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=upstream.connect_timeout,
            sock_read=upstream.read_timeout,
        ),
        trust_env=upstream.trust_env,
    )


async def upstream_client(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the upstream pool, the token session and the TokenManager.

    Started together and closed in reverse order.
    """
    settings = app[SETTINGS]
    metrics = app[METRICS]
    async with client_session(settings) as session:
        store = token_store(settings, metrics)
        tokens = TokenManager(
            settings.auth, TokenEndpoint(settings.auth, session), store=store, metrics=metrics
        )
        pool = UpstreamPool(settings.upstream)
        await tokens.start()
        try:
            app[TOKENS] = tokens
            app[FORWARDER] = Forwarder(settings, pool, tokens, metrics)
            app[ADMIN] = Admin(tokens, metrics, app[LIFECYCLE], settings.server)
            yield
        finally:
            pool.close()
            await tokens.close()
            if store is not None:
                await store.close()


def token_store(settings: Settings, metrics: Metrics) -> TokenStore | None:
    """The shared token store that ``auth.token_cache`` names (None: memory only)."""
    auth = settings.auth
    identity = CredentialIdentity.of(auth)
    if auth.token_cache == "file":
        return FileTokenStore(auth.token_cache_file, identity)
    if auth.token_cache == "redis":
        from .redis_store import RedisTokenStore  # only deployments that use Redis load it

        url = auth.redis_url or Path(auth.redis_url_file).read_text(encoding="utf-8").strip()
        key = auth.redis_encryption_key_file
        return RedisTokenStore(
            url,
            identity,
            prefix=auth.redis_key_prefix,
            lock_seconds=auth.timeout + 5,
            encryption_key=read_encryption_key(key) if key else None,
            metrics=metrics,
        )
    return None


def dispatcher(app: web.Application) -> Handler:
    """The listener's request handler for a started ``app``.

    Every request is checked (:class:`~proxy.request_checks.RequestPolicy`), then answered by
    the admin routes (``/-/`` paths) or forwarded. Every answer the proxy makes itself comes
    back here as a :class:`ProxyError`; every request gets one access-log line and metrics
    sample, including those cut short (logged as 499).
    """
    forward = app[FORWARDER]
    admin = app[ADMIN]
    metrics = app[METRICS]
    policy = RequestPolicy(app[SETTINGS].server)
    access_log = AccessLog(metrics)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        upstream_seconds: float | None = None
        response: web.StreamResponse | None = None
        unanswered = ABORTED  # the status logged when no response comes back: a hang-up
        try:
            target = policy.check(request)
            if target.startswith("/-/"):
                response = await admin(request, target)
            else:
                response, upstream_seconds = await forward(request, target)
        except ProxyError as error:
            metrics.proxy_errors.labels(error.code).inc()
            log.warning(
                "%s %s -> %d %s: %s",
                request.method,
                request.raw_path.partition("?")[0],
                error.status,
                error.code,
                error.detail,
            )
            response = error_response(error)
        except Exception:
            # A bug: aiohttp answers 500 (listener.handle_error logs it); count it as such.
            unanswered = 500
            raise
        finally:
            access_log.record(request, response, started, upstream_seconds, unanswered)
        if "Upgrade" in request.headers:
            # aiohttp may treat what follows an Upgrade request as tunnel bytes: start afresh.
            response.force_close()
        return response

    return handle
