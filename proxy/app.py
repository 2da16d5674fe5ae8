"""create_app(settings): state, the resources' single owner, and the request dispatcher.

The :class:`aiohttp.web.Application` holds the app's state under typed keys and owns the async
resources in one cleanup context: the upstream connection pool, the token endpoint's
``ClientSession`` and the ``TokenManager`` are made at start-up and closed at shutdown, in
reverse order, and only if they were made. Requests are dispatched by :class:`Dispatcher`:
``/-/`` paths to the admin routes, all others forwarded.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .access_log import ABORTED, AccessLog
from .admin import Admin, Lifecycle
from .config import Settings, read_encryption_key, redis_url
from .errors import ProxyError, error_answer, json_error
from .forward import Forwarder, Started
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

        key = auth.redis_encryption_key_file
        return RedisTokenStore(
            redis_url(auth),
            identity,
            prefix=auth.redis_key_prefix,
            lock_seconds=auth.timeout + 5,
            encryption_key=read_encryption_key(key) if key else None,
            metrics=metrics,
        )
    return None


class Dispatcher:
    """The listener's request handler for a started app.

    Every request is checked (:class:`~proxy.request_checks.RequestPolicy`), then answered by
    the admin routes (``/-/`` paths) or forwarded. Every answer the proxy makes itself comes
    back here as a :class:`ProxyError`; every request gets one access-log line and metrics
    sample, including those cut short (logged as 499).

    A bodiless request that needs no waiting but for the upstream's answer is answered without
    a task: :meth:`start` sends it, :meth:`finish` relays the answer from the connection's
    callback, or hands over to the call when there is more to it (see :meth:`Forwarder.start`).
    """

    def __init__(self, app: web.Application) -> None:
        self._forward = app[FORWARDER]
        self._admin = app[ADMIN]
        self._metrics = app[METRICS]
        self._policy = RequestPolicy(app[SETTINGS].server)
        self._access_log = AccessLog(self._metrics)

    def start(self, request: Request) -> Started | None:
        """Send a request upstream now if nothing needs waiting for; None: await the call."""
        received = time.monotonic()
        try:
            target = self._policy.check(request)
        except ProxyError:
            return None  # the call checks again and answers
        if target.startswith("/-/"):
            return None
        return self._forward.start(request, target, received)

    def finish(self, started: Started) -> bool:
        """Relay the answer to a started request if it is all in; False: await the call."""
        request = started.request
        try:
            upstream_seconds = self._forward.finish(started)
        except ConnectionResetError:  # the client left as the answer was due
            self._access_log.record(request, ABORTED, started.received)
            return True
        except Exception as exc:
            self._forward.abandon(started)
            status = _failed(request, exc)
            self._access_log.record(request, status, started.received)
            return True
        if upstream_seconds is None:
            return False
        status = request.reply.status or ABORTED
        self._access_log.record(request, status, started.received, upstream_seconds)
        return True

    def abandon(self, started: Started) -> None:
        """The client left before the answer to a started request: end it, log a 499."""
        self._forward.abandon(started)
        self._access_log.record(started.request, ABORTED, started.received)

    async def __call__(self, request: Request, started: Started | None = None) -> None:
        """Answer ``request``; with ``started``, take up the answer :meth:`start` awaited."""
        received = time.monotonic() if started is None else started.received
        upstream_seconds: float | None = None
        status = ABORTED  # what is logged when no answer completes: a hang-up
        try:
            if started is not None:
                upstream_seconds = await self._forward(request, started.target, started)
            else:
                target = self._policy.check(request)
                if target.startswith("/-/"):
                    request.reply.send(await self._admin(request, target))
                else:
                    upstream_seconds = await self._forward(request, target)
            status = request.reply.status or ABORTED
        except ProxyError as error:
            self._metrics.proxy_errors.labels(error.code).inc()
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
            status = _failed(request, exc)
        finally:
            self._access_log.record(request, status, received, upstream_seconds)


def _failed(request: Request, exc: Exception) -> int:
    """A bug: answered 500 (or cut, if the answer had begun), logged with its traceback."""
    log.error("unexpected error while handling a request (%s)", type(exc).__name__, exc_info=exc)
    _answer(request, INTERNAL_ERROR)
    return 500


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
