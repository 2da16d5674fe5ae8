"""The catch-all handler: stream the request upstream with the proxy's token, and the answer back.

Per request: take the raw target (never re-encoded), build upstream headers, get the held token
(no wait while one is valid), send, and on a 401 retry once with a new token when the body can
be replayed. Small answers are read whole and written in one go; larger ones stream with
bounded memory. Compressed bodies pass through untouched in both directions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import hdrs
from aiohttp.http_parser import RawResponseMessage

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
from .upstream import Body, Sent, UpstreamPool, UpstreamResponse

log = logging.getLogger("sparks_proxy.forward")

SMALL_ANSWER = 64 * 1024
"""Answers with a Content-Length up to this are read whole and written with one call."""


@dataclass(slots=True)
class Started:
    """A bodiless request sent upstream without a task (see :meth:`Forwarder.start`)."""

    request: Request
    target: str
    """The upstream's target (with the upstream URL's base path)."""
    token: Token
    sent: Sent
    received: float
    """When the request was taken up (monotonic), for its duration."""
    sent_at: float

    def when_answered(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the upstream's answer (or the exchange's failure) is in."""

        def answered(answer: asyncio.Future[UpstreamResponse]) -> None:
            if not answer.cancelled():
                answer.exception()  # seen: a failure is raised to whoever takes up the answer
            callback()

        self.sent.answer.add_done_callback(answered)


class Slots:
    """The upstream.pool_size exchange slots: taken at once when free, else awaited in turn."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting in turn for one to be given back."""
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:  # cancelled (a timeout, a client that left)
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as the wait ended: pass it on
            else:
                with contextlib.suppress(ValueError):  # give() may have dropped it already
                    self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        """Give a slot back: to the longest waiter, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Forwarder:
    """Forwards requests to the configured upstream and relays the answers."""

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
        self._slots = Slots(upstream.pool_size)
        self._location = LocationRewriter(upstream.url)
        self._request_blocks: HeaderMemo[str] = HeaderMemo()
        self.in_flight = 0
        """Requests being forwarded now (read by the in-flight gauge at each scrape)."""
        metrics.in_flight.set_function(lambda: self.in_flight)

    def start(self, request: Request, target: str, received: float) -> Started | None:
        """Send a bodiless request now if nothing needs waiting for; else None (use the call).

        Nothing needs waiting for when a token is held, a slot is free and a pooled upstream
        connection is idle: then no task is needed until the answer is in (see :meth:`finish`).
        None means nothing was done.
        """
        # A declared length, even 0, goes the full way: it is sent on with the request.
        if request.body_exists or hdrs.CONTENT_LENGTH in request.headers:
            return None
        token = self._tokens.current()
        if token is None:
            return None
        target = self._base_path + target
        block = f"Authorization: {token.authorization}\r\n{self._request_block(request)}"
        if not self._slots.take_now():
            return None
        sent = self._pool.send_now(request.method, target, block)
        if sent is None:
            self._slots.give()
            return None
        self.in_flight += 1
        return Started(request, target, token, sent, received, time.monotonic())

    def finish(self, started: Started) -> float | None:
        """Relay the answer to a started request if it is all in: the upstream's seconds.

        None when it needs waiting for or an error answer (a failure, a 401 to retry, a large
        or unfinished body): the call with ``started`` then takes over from the answer.
        """
        upstream = started.sent.response()
        if upstream is None or upstream.status == 401:
            return None
        upstream_seconds = time.monotonic() - started.sent_at
        try:
            if not self._relay_now(started.request, upstream):
                return None
        except ConnectionResetError:  # the client left; the answer was read all the same
            self._end(upstream)
            raise
        self._end(upstream)
        return upstream_seconds

    def abandon(self, started: Started) -> None:
        """The client left before the answer: the exchange ends, its connection closes."""
        started.sent.connection.close()
        self._end(None)

    async def __call__(
        self, request: Request, target: str, started: Started | None = None
    ) -> float:
        """Forward ``request`` to ``target`` (origin-form) on the upstream and relay the answer.

        With ``started``, the request went out already (:meth:`start`) and its answer is taken
        up from there. Returns the upstream's time to headers; raises
        :class:`~proxy.errors.ProxyError` for every answer the proxy makes itself.
        """
        if started is not None:
            try:
                return await self._exchange(
                    request, started.target, None, True, None, started.token, started
                )
            finally:
                self._end(None)
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
                self._slots.give()
        finally:
            self.in_flight -= 1

    def _end(self, upstream: UpstreamResponse | None) -> None:
        """A started request is over: its connection back to the pool (if given), its slot."""
        if upstream is not None:
            upstream.release_now()  # a bodiless request has no body writer to wait for
        self._slots.give()
        self.in_flight -= 1

    async def _take_slot(self) -> None:
        """Wait up to pool_timeout for one of the pool_size upstream slots."""
        if self._slots.take_now():
            return  # free now: no timer needed on the common path
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.take()
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
        started: Started | None = None,
    ) -> float:
        """Send, retry once on 401 with a new token when the body allows, relay the answer."""
        length = request.content_length  # a streamed body of unknown length goes chunked
        fields = self._request_block(request)
        while True:
            try:
                if started is not None:
                    sent_at = started.sent_at
                    upstream = await self._pool.answer(started.sent)
                    started = None  # a retry after a 401 is sent anew
                else:
                    sent_at = time.monotonic()
                    block = f"Authorization: {token.authorization}\r\n{fields}"
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
        upstream_seconds = time.monotonic() - sent_at
        try:
            await self._relay(request, upstream)
        finally:
            await upstream.release()
        return upstream_seconds

    def _request_block(self, request: Request) -> str:
        """The header block for the upstream (all but Authorization), worked out once per list."""
        key = (request.raw_headers, request.remote, request.scheme)
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

    def _relay_now(self, request: Request, upstream: UpstreamResponse) -> bool:
        """Relay a small answer that is all in, in one write; False if it is not, or is bad."""
        message = upstream.message
        length = upstream.content_length
        if (
            length is None
            or length > SMALL_ANSWER
            or not upstream.content.is_eof()
            or _unrelayable(message) is not None
        ):
            return False
        block = self._client_block(request, message)
        request.reply.whole(
            message.code, message.reason, block, upstream.content.read_nowait(), length
        )
        return True

    def _client_block(self, request: Request, message: RawResponseMessage) -> bytes:
        """The answer's header block for the client."""
        host = request.headers.get(hdrs.HOST)
        block = downstream_response_headers(
            message.headers,
            message.raw_headers,
            location=self._location,
            proxy_origin=f"{request.scheme}://{host}" if host else None,
        )
        if hdrs.DATE not in message.headers:
            block += b"Date: %s\r\n" % http_date().encode()  # RFC 9110 6.6.1: a recipient adds it
        return block

    async def _relay(self, request: Request, upstream: UpstreamResponse) -> None:
        message = upstream.message
        problem = _unrelayable(message)
        if problem is not None:
            raise BadUpstreamResponse(problem)
        block = self._client_block(request, message)
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


def _unrelayable(message: RawResponseMessage) -> str | None:
    """Why an upstream answer cannot be relayed as it is, if it cannot."""
    if message.code < 200:
        # A 101 (or other interim answer) would switch protocols: no tunnels, ever.
        return f"the upstream answered {message.code}, not relayed"
    reason = message.reason
    if not passes_unchanged(message.raw_headers) or not (reason.isascii() and reason.isprintable()):
        return "the upstream sent a header or reason phrase the proxy cannot pass on unchanged"
    return None
