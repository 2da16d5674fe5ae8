"""create_app(settings): state, the resources' single owner, and the request dispatcher.

The :class:`aiohttp.web.Application` holds the app's state under typed keys and owns the async
resources in one cleanup context: the upstream connection pool, the token endpoint's
``ClientSession`` and the ``TokenManager`` are made at start-up and closed at shutdown, in
reverse order, and only if they were made. Requests are dispatched by :func:`dispatcher`:
``/-/`` paths to the admin routes, all others forwarded.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from .access_log import ABORTED, AccessLog
from .admin import Admin, Lifecycle
from .config import Settings, read_encryption_key
from .errors import ProxyError, error_answer, json_error
from .forward import Forwarder
from .listener import Handler
from .messages import Answer, Request
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

    async def handle(request: Request) -> None:
        started = time.monotonic()
        upstream_seconds: float | None = None
        status = ABORTED  # what is logged when no answer completes: a hang-up
        try:
            target = policy.check(request)
            if target.startswith("/-/"):
                request.reply.send(await admin(request, target))
            else:
                upstream_seconds = await forward(request, target)
            status = request.reply.status or ABORTED
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
            _answer(request, error_answer(error))
            status = error.status
        except Exception as exc:
            # A bug: answered 500 (or cut, if the answer had begun), logged with its traceback.
            log.error(
                "unexpected error while handling a request (%s)",
                type(exc).__name__,
                exc_info=exc,
            )
            _answer(request, INTERNAL_ERROR)
            status = 500
        finally:
            access_log.record(request, status, started, upstream_seconds)

    return handle


def _answer(request: Request, answer: Answer) -> None:
    """Send ``answer``, or cut the connection if another answer had already begun."""
    if request.reply.started:
        request.abort()
    else:
        request.reply.send(answer)


INTERNAL_ERROR = json_error(
    500,
    "internal_error",
    "the proxy failed to handle the request; see its log",
    close=True,
)
