"""The catch-all handler: stream the request upstream with the proxy's token, and the answer back.

Per request: take the raw target (never re-encoded), build upstream headers, get the held token
(no wait while one is valid), send, and on a 401 retry once with a new token when the body can
be replayed. Small answers are read whole and written in one go; larger ones stream with
bounded memory. Compressed bodies pass through untouched in both directions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Settings
from .errors import (
    BadRequest,
    BadUpstreamResponse,
    ExpectationFailed,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .headers import LocationRewriter, downstream_response_headers, upstream_request_headers
from .metrics import Metrics
from .token_endpoint import Token
from .tokens import TokenManager

log = logging.getLogger("sparks_proxy.forward")

SMALL_ANSWER = 64 * 1024
"""Answers with a Content-Length up to this are read whole and written with one call."""


class Forwarder:
    """Forwards requests to the configured upstream; an aiohttp handler."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        tokens: TokenManager,
        metrics: Metrics,
    ) -> None:
        upstream = settings.upstream
        self._base = upstream.url  # origin plus optional base path, no trailing slash
        self._session = session
        self._tokens = tokens
        self._metrics = metrics
        self._replay_limit = upstream.replay_body_limit
        self._max_body = settings.server.max_body_size
        self._body_timeout = settings.server.body_timeout
        self._pool_timeout = upstream.pool_timeout
        # The pool's size is enforced here, not in aiohttp's connector: a wait for a slot
        # is then told apart from a slow connect, and token requests never queue behind it.
        self._slots = asyncio.Semaphore(upstream.pool_size)
        self._location = LocationRewriter(upstream.url)

    async def __call__(self, request: web.BaseRequest) -> tuple[web.StreamResponse, float]:
        """Forward ``request``; return the answer and the upstream's time to headers.

        Raises :class:`~proxy.errors.ProxyError` for every answer the proxy makes itself.
        """
        if request.method == "CONNECT":
            raise MethodNotAllowed("CONNECT is not supported: the proxy never opens a tunnel")
        in_flight = self._metrics.in_flight
        in_flight.inc()
        try:
            return await self._forward(request)
        finally:
            in_flight.dec()

    async def _forward(self, request: web.BaseRequest) -> tuple[web.StreamResponse, float]:
        url = URL(self._base + _origin_form(request.raw_path), encoded=True)
        body, replayable, guard = await self._body(request)
        token = await self._tokens.get()
        await self._take_slot()
        try:
            return await self._exchange(request, url, body, replayable, guard, token)
        finally:
            self._slots.release()

    async def _take_slot(self) -> None:
        """Wait up to pool_timeout for one of the pool_size upstream slots."""
        if not self._slots.locked():
            await self._slots.acquire()  # free now: no timer needed on the common path
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamBusy(
                "every upstream connection stayed busy for upstream.pool_timeout; "
                "retry, or raise upstream.pool_size",
                retry_after=1,
            ) from None

    async def _exchange(
        self,
        request: web.BaseRequest,
        url: URL,
        body: bytes | AsyncIterator[bytes] | None,
        replayable: bool,
        guard: _BodyGuard | None,
        token: Token,
    ) -> tuple[web.StreamResponse, float]:
        """Send, retry once on 401 with a new token when the body allows, relay the answer."""
        while True:
            headers = upstream_request_headers(
                request.headers,
                authorization=token.authorization,
                client_ip=request.remote,
                proto=request.scheme,
            )
            sent = time.monotonic()
            upstream = await self._send(request.method, url, headers, body, guard)
            if upstream.status != 401 or not replayable or not self._tokens.invalidate(token):
                break
            upstream.release()
            self._metrics.upstream_401_retries.inc()
            token = await self._tokens.get()
            replayable = False  # exactly one retry
        upstream_seconds = time.monotonic() - sent
        try:
            return await self._relay(request, upstream), upstream_seconds
        finally:
            upstream.release()

    async def _body(
        self, request: web.BaseRequest
    ) -> tuple[bytes | AsyncIterator[bytes] | None, bool, _BodyGuard | None]:
        """The body to send upstream, whether it can be sent twice, and its size guard."""
        length = request.content_length
        if length is None and not request.body_exists:
            return None, True, None
        if self._max_body and length is not None and length > self._max_body:
            raise PayloadTooLarge(
                f"request body of {length} bytes is over server.max_body_size ({self._max_body})"
            )
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            # The proxy answers the client's 100-continue itself (and only once the body is
            # acceptable); the upstream gets the body without being asked.
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None and length <= self._replay_limit:
            try:
                async with asyncio.timeout(self._body_timeout):
                    return await request.read(), True, None
            except TimeoutError:
                raise RequestTimeout(_BODY_TIMEOUT) from None
            except (aiohttp.ClientPayloadError, ConnectionError):
                raise BadRequest("the request body ended before its declared length") from None
        guard = _BodyGuard(request.content, self._max_body, self._body_timeout)
        return guard.chunks(), False, guard

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        guard: _BodyGuard | None,
    ) -> aiohttp.ClientResponse:
        try:
            return await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnreachable(
                "could not connect to the upstream within upstream.connect_timeout"
            ) from None
        except aiohttp.SocketTimeoutError:
            raise UpstreamTimeout(
                "the upstream sent no answer within upstream.read_timeout"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(
                f"could not connect to the upstream ({_reason(exc)})"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if guard is not None and guard.failure is not None:
                raise guard.failure from None
            raise BadUpstreamResponse(
                f"the upstream connection failed ({type(exc).__name__})"
            ) from None

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=downstream_response_headers(
                upstream.headers,
                location=self._location,
                proxy_origin=f"{request.scheme}://{host}" if host else None,
            ),
        )
        length = upstream.content_length
        try:
            if length is not None and length <= SMALL_ANSWER:
                body = await upstream.read()
                await response.prepare(request)
                await response.write_eof(body)
                return response
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not response.prepared:
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(
                        "the upstream stopped sending within upstream.read_timeout"
                    ) from None
                raise BadUpstreamResponse(
                    f"the upstream answer was cut short ({type(exc).__name__})"
                ) from None
            # Headers are out: the only honest signal left is to cut the connection, so the
            # client never takes a truncated body for a complete one.
            log.warning(
                "%s %s: upstream answer cut short (%s); aborting the client connection",
                request.method,
                request.path,
                type(exc).__name__,
            )
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        await response.write_eof()
        return response


class _BodyGuard:
    """Streams a request body upstream, enforcing ``server.max_body_size`` and ``body_timeout``.

    When the body fails, ``failure`` says why: the upstream request then fails too, and the
    client is answered with this error instead of a misleading upstream one.
    """

    def __init__(self, content: aiohttp.StreamReader, limit: int, timeout: float) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout
        self.failure: ProxyError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        size = 0
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.failure = RequestTimeout(_BODY_TIMEOUT)
                raise self.failure from None
            except (aiohttp.ClientPayloadError, ConnectionError):
                self.failure = BadRequest("the request body ended early or was malformed")
                raise self.failure from None
            if not chunk:
                return
            size += len(chunk)
            if self._limit and size > self._limit:
                self.failure = PayloadTooLarge(
                    f"request body is over server.max_body_size ({self._limit})"
                )
                raise self.failure
            yield chunk


_BODY_TIMEOUT = "the client sent no body bytes within server.body_timeout"


def _origin_form(target: str) -> str:
    """The path and query of a request target, byte for byte.

    An absolute-form target (``http://other.example/x``) keeps only its path and query: the
    destination is always the configured upstream, whatever the client wrote.
    """
    if target.startswith("/"):
        return target
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha():
        raise BadRequest("the request target must be a path such as /projects")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path.startswith("/") else "/" + path


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    return exc.os_error.strerror or type(exc.os_error).__name__
