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
from urllib.parse import urlsplit

from .bodies import StreamedBody, expects_continue, read_whole
from .config import Settings
from .errors import BadUpstreamResponse, PayloadTooLarge, ProxyError, UpstreamBusy
from .headers import (
    HeaderMemo,
    LocationRewriter,
    downstream_response_headers,
    passes_unchanged,
    upstream_request_headers,
)
from .messages import Request, http_date
from .metrics import Metrics
from .token_endpoint import Token
from .tokens import TokenManager
from .upstream import Body, UpstreamPool, UpstreamResponse

log = logging.getLogger("sparks_proxy.forward")

SMALL_ANSWER = 64 * 1024
"""Answers with a Content-Length up to this are read whole and written with one call."""


class Forwarder:
    """Forwards requests to the configured upstream; an aiohttp handler."""

    def __init__(
        self,
        settings: Settings,
        pool: UpstreamPool,
        tokens: TokenManager,
        metrics: Metrics,
    ) -> None:
        upstream = settings.upstream
        self._pool = pool
        self._base_path = urlsplit(upstream.url).path  # "" or "/v1": no trailing slash
        self._tokens = tokens
        self._metrics = metrics
        self._replay_limit = upstream.replay_body_limit
        self._max_body = settings.server.max_body_size
        self._body_timeout = settings.server.body_timeout
        self._pool_timeout = upstream.pool_timeout
        # The pool's size is enforced here: a wait for a slot is then told apart from a slow
        # connect, and token requests never queue behind it.
        self._slots = asyncio.Semaphore(upstream.pool_size)
        self._location = LocationRewriter(upstream.url)
        self._request_blocks: HeaderMemo[str] = HeaderMemo()
        self.in_flight = 0
        """Requests being forwarded now (read by the in-flight gauge at each scrape)."""
        metrics.in_flight.set_function(lambda: self.in_flight)

    async def __call__(self, request: Request, target: str) -> float:
        """Forward ``request`` to ``target`` (origin-form) on the upstream and relay the answer.

        Returns the upstream's time to headers; raises :class:`~proxy.errors.ProxyError` for
        every answer the proxy makes itself.
        """
        self.in_flight += 1
        try:
            target = self._base_path + target
            body, replayable, streamed = await self._body(request)
            await self._take_slot()
            try:
                # Taken after the slot: a token must not expire while the request queues.
                token = await self._tokens.get()
                return await self._exchange(request, target, body, replayable, streamed, token)
            finally:
                self._slots.release()
        finally:
            self.in_flight -= 1

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
        request: Request,
        target: str,
        body: Body,
        replayable: bool,
        streamed: StreamedBody | None,
        token: Token,
    ) -> float:
        """Send, retry once on 401 with a new token when the body allows, relay the answer."""
        length = request.content_length  # a streamed body of unknown length goes chunked
        fields = self._request_block(request)
        while True:
            block = f"Authorization: {token.authorization}\r\n{fields}"
            sent = time.monotonic()
            try:
                upstream = await self._pool.request(
                    request.method, target, block, body, length=length
                )
            except ProxyError:
                if streamed is not None and streamed.failure is not None:
                    raise streamed.failure from None  # the client's body failed first
                raise
            if upstream.status != 401 or not replayable or not self._tokens.invalidate(token):
                break
            await upstream.release()
            self._metrics.upstream_401_retries.inc()
            token = await self._tokens.get()
            replayable = False  # exactly one retry
        upstream_seconds = time.monotonic() - sent
        try:
            await self._relay(request, upstream)
        finally:
            await upstream.release()
        return upstream_seconds

    def _request_block(self, request: Request) -> str:
        """The header block for the upstream (all but Authorization), worked out once per list."""
        key = (request.raw_headers, request.remote)
        block = self._request_blocks.get(key)
        if block is None:
            block = upstream_request_headers(
                request.headers, client_ip=request.remote, proto=request.scheme
            )
            self._request_blocks.remember(key, request.raw_headers, block)
        return block

    async def _body(self, request: Request) -> tuple[Body, bool, StreamedBody | None]:
        """The body to send upstream, whether it can be sent twice, and its stream if streamed."""
        expect_continue = expects_continue(request)
        length = request.content_length
        if length is None and not request.body_exists:
            return None, True, None
        if self._max_body and length is not None and length > self._max_body:
            raise PayloadTooLarge(
                f"request body of {length} bytes is over server.max_body_size ({self._max_body})"
            )
        if expect_continue:
            request.send_continue()
        if length is not None and length <= self._replay_limit:
            body = await read_whole(request.content, limit=length, read_timeout=self._body_timeout)
            return body, True, None
        streamed = StreamedBody(request.content, self._max_body, self._body_timeout)
        return streamed.chunks(), False, streamed

    async def _relay(self, request: Request, upstream: UpstreamResponse) -> None:
        message = upstream.message
        if message.code < 200:
            # A 101 (or other interim answer) would switch protocols: no tunnels, ever.
            raise BadUpstreamResponse(f"the upstream answered {message.code}, not relayed")
        if not passes_unchanged(message.raw_headers) or not _printable(message.reason):
            raise BadUpstreamResponse(
                "the upstream sent a header or reason phrase the proxy cannot pass on unchanged"
            )
        host = request.headers.get("Host")
        block = downstream_response_headers(
            message.headers,
            message.raw_headers,
            location=self._location,
            proxy_origin=f"{request.scheme}://{host}" if host else None,
        )
        if "Date" not in message.headers:
            block += b"Date: %s\r\n" % http_date().encode()  # RFC 9110 6.6.1: a recipient adds it
        reply = request.reply
        length = upstream.content_length
        try:
            if length is not None and length <= SMALL_ANSWER:
                # Read before anything is sent: a failure is still a clean 502 or 504.
                body = await upstream.read()
                reply.whole(message.code, message.reason, block, body, length)
                return
            reply.start(message.code, message.reason, block, length)
            async for chunk in upstream.content.iter_any():
                await reply.write(chunk)
            reply.end()
        except ConnectionResetError:
            raise asyncio.CancelledError from None  # the client hung up: logged as such
        except ProxyError as error:
            if not reply.started:
                raise
            # Headers are out: the only honest signal left is to cut the connection, so the
            # client never takes a truncated body for a complete one.
            log.warning(
                "%s %s: %s; aborting the client connection",
                request.method,
                request.raw_path.partition("?")[0],
                error.detail,
            )
            request.abort()
            raise asyncio.CancelledError from None


def _printable(reason: str | None) -> bool:
    return reason is None or (reason.isascii() and reason.isprintable())
