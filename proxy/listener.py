"""The HTTP listener: client connections, parsed by llhttp, answered one request at a time.

One :class:`ClientConnection` per client. aiohttp's compiled parser (llhttp, strict) reads the
requests (the rest of a body of known length, once its head is read, goes to the body's reader
around it); each becomes a :class:`~proxy.messages.Request` for the handler, and is answered
before the next one on the same connection (pipelined requests wait their turn). A general web
framework spends per request what a proxy does not need (a request object with lazily parsed
everything, a response object, a task per request); here a request costs one small object and
the answer one write.

The listener enforces the ``[server]`` limits: open connections, time to send a whole head,
idle time, head sizes. What cannot be parsed gets a short JSON answer in the proxy's own words
and a closed connection: a request line or header can hold a credential, so nothing the client
sent is ever echoed or logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol, TypeVar

from aiohttp import http_exceptions, http_parser
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from .bodies import BrokenBody, feed_counted
from .config import ServerSettings
from .errors import ConfigError, json_error
from .headers import declared_length, field_block
from .messages import Request

log = logging.getLogger("sparks_proxy.listener")


class Pending(Protocol):
    """A request whose answer is awaited in a callback, not a task."""

    request: Request

    def when_answered(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the answer can be finished."""


P = TypeVar("P", bound=Pending)


class Handler(Protocol[P]):
    """Answers requests (:class:`proxy.app.Dispatcher`).

    A request is offered to :meth:`start` first: a :class:`Pending` means it is under way
    without a task, to be completed by :meth:`finish` when answered (or, if :meth:`finish` says
    there is more to it, by the call with it); None means nothing was done: await the call.
    """

    def start(self, request: Request) -> P | None:
        """Begin answering without a task, if nothing needs waiting for."""

    def finish(self, pending: P) -> bool:
        """Complete a pending request; False: await the call with it."""

    def abandon(self, pending: P) -> None:
        """The client left before the answer to a pending request."""

    async def __call__(self, request: Request, pending: P | None = None, /) -> None:
        """Answer ``request`` (or take up a pending one)."""


READ_BUFFER = 64 * 1024
"""Request body bytes buffered before reading from the client pauses."""
MAX_QUEUED = 16
"""Pipelined requests parsed ahead of their answers before reading pauses."""
LINGER = 2.0
"""Seconds to read and drop the rest of an unread body after the answer, so the client sees
the answer before the close (closing with unread bytes would reset the connection)."""

# Why a request could not be parsed, in words that quote nothing the client sent.
_PARSE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.BadHttpMethod, "the request method is not a registered HTTP method"),
    (http_exceptions.TransferEncodingError, "the chunked request body is malformed"),
    (http_exceptions.ContentLengthError, "the request body does not match its Content-Length"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidURLError, "the request target is malformed"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP/1.1"),
)


class Listener:
    """The protocol factory for ``loop.create_server``: limits, open connections, shutdown."""

    def __init__(self, handler: Handler[Any], limits: ServerSettings) -> None:
        require_compiled_parser()
        self.handler = handler
        self.limits = limits
        self.connections: set[ClientConnection] = set()
        self.closing = False
        """Set at shutdown: no new request is started; connections close after their answer."""
        self._all_closed = asyncio.Event()

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now; give busy ones ``grace`` seconds, then cut them."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        busy = {c.task for c in self.connections if c.task is not None}
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for connection in list(self.connections):
            connection.close(cancel=True, linger=False)
        # Answers still on their way get the rest of the grace; then what is unsent stays so.
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._all_closed.wait()
        for connection in list(self.connections):
            connection.abort()

    def forget(self, connection: ClientConnection) -> None:
        """Drop a closed connection."""
        self.connections.discard(connection)
        if self.closing and not self.connections:
            self._all_closed.set()


class ClientConnection(BaseProtocol):
    """One client connection: parse, queue, answer in order, keep alive or close."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(asyncio.get_running_loop())
        self._listener = listener
        self._limits = listener.limits
        self._use_new_parser()
        self._queue: collections.deque[tuple[RawRequestMessage | Exception, StreamReader]] = (
            collections.deque()
        )
        self.task: asyncio.Task[None] | None = None
        """The task answering queued requests, while there are any (a request answered in
        callbacks has none: see ``_pending``)."""
        self._pending: Pending | None = None  # a request answered in callbacks, not the task
        self._handed: Pending | None = None  # a pending request given to a task not yet run
        self._body: StreamReader | None = None  # the body of the latest parsed request
        self._body_length = 0  # of that body, while its bytes bypass the parser
        self._remote: str | None = None
        self._done_reading = False  # after a parse error or an upgrade: no more requests
        self._lingering = False  # our side has ended; the close follows
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None

    def _use_new_parser(self) -> None:
        # BaseProtocol pauses the parser as _parser; _reader is the same one, with its type.
        limits = self._limits
        self._reader = self._parser = HttpRequestParser(
            self,
            self._loop,
            READ_BUFFER,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
            payload_exception=BrokenBody,
            auto_decompress=False,  # a proxy passes compressed bodies through
            max_msg_queue_size=MAX_QUEUED,  # parsing pauses when this many wait for answers
        )

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection; refuse it with 503 when over ``server.max_connections``."""
        super().connection_made(transport)
        listener = self._listener
        listener.connections.add(self)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        if listener.closing:
            transport.close()
        elif len(listener.connections) > self._limits.max_connections:
            log.warning(
                "over server.max_connections (%d); refusing a connection",
                self._limits.max_connections,
            )
            self._refuse(_TOO_MANY_CONNECTIONS)
        else:
            self._idle()

    def data_received(self, data: bytes) -> None:
        """Parse; queue whole requests; time a head that arrives in pieces; pass the rest of a
        body of known length around the parser."""
        if self._done_reading:
            return
        if self._body_length and data:
            self._pass_body(data)
            return
        try:
            messages, upgraded, _ = self._reader.feed_data(data)
        except http_exceptions.HttpProcessingError as exc:
            self._parse_failed(exc)
            return
        if messages:
            self._cancel_head_timer()
            self._idle_since = None
            queue = self._queue
            for message, body in messages:
                queue.append((message, body))
                self._body = body
            if upgraded:
                self._done_reading = True  # what follows would be another protocol's bytes
            elif body is not EMPTY_PAYLOAD and not body.is_eof():
                self._bypass(message, body)
            if self.task is None and self._pending is None:
                self._serve_next()
            # The parser stops at MAX_QUEUED requests not yet taken (one taken may not be
            # counted out yet): from one fewer here, reading pauses and _request_done resumes it.
            if len(queue) >= MAX_QUEUED - 1 and not self._buffer_paused:
                self._pause_reading_for_buffer()
        elif data and self._head_timer is None and self._between_requests():
            # Part of a head: the common case (a whole head in one read) never gets here.
            self._idle_since = None
            self._head_timer = self._loop.call_later(
                self._limits.header_timeout, self._head_timed_out
            )

    def _bypass(self, message: RawRequestMessage, body: StreamReader) -> None:
        """Let the rest of ``body`` go around the parser, if it is a plain body of known length.

        Not a chunked body (the parser de-frames it), nor one after an upgrade request or
        CONNECT (the parser decides what the next bytes are), nor one the parser has had whole:
        it stops just before a body's end when the body's buffer fills, holding what follows,
        and ends the body itself when reading resumes. The bypass ends with the body, whoever
        ends it.
        """
        if message.chunked or message.upgrade or message.method == "CONNECT":
            return
        length = declared_length(message.headers)
        if length is not None and length > body.total_bytes:
            self._body_length = length
            body.on_eof(self._bypass_ended)

    def _bypass_ended(self) -> None:
        self._body_length = 0

    def _pass_body(self, data: bytes) -> None:
        """Feed the rest of a body of known length to its reader without the parser.

        At the body's end the parser, left mid-body, is replaced, and the bytes after the body
        are parsed by the new one. The new parser has not counted the requests still queued,
        so it may parse up to MAX_QUEUED more before it pauses: the queue stays bounded (at
        about twice MAX_QUEUED), as reading pauses once it holds MAX_QUEUED - 1.
        """
        assert self._body is not None
        after = feed_counted(self._body, self._body_length, data)
        if after is None:
            return
        self._body_length = 0  # also when a failed body (a stall) dropped its on_eof callbacks
        self._use_new_parser()
        if after:
            self.data_received(after)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop everything the connection had going: timers, its handler, its body."""
        self._listener.forget(self)
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        body = self._body
        if body is not None and not body.is_eof():
            body.set_exception(ConnectionResetError("the client closed the connection"))
        if self.task is not None:
            self.task.cancel()  # the client is gone: the exchange (and its upstream) stops
        # A task cancelled before its first step never runs: what was handed to it ends here.
        for pending in (self._pending, self._handed):
            if pending is not None:
                self._listener.handler.abandon(pending)
        self._pending = self._handed = None
        super().connection_lost(exc)

    # -- answering --------------------------------------------------------------------------

    def _serve_next(self) -> None:
        """Answer the next queued request: in callbacks if it needs no waiting, else in a task."""
        message, body = self._queue[0]
        if (
            body is EMPTY_PAYLOAD  # no body to read: the request is whole
            and not isinstance(message, Exception)
            and not self._done_reading
            and not self._listener.closing
            and not self._paused
        ):
            request = Request(self, message, body, self._remote)
            try:
                pending = self._listener.handler.start(request)
            except Exception:
                log.exception("unexpected error starting a request; answering it in a task")
                pending = None
            if pending is not None:
                self._queue.popleft()
                self._pending = pending  # before _request_done, which may parse more requests
                pending.when_answered(lambda: self._answered(pending))
                self._request_done()
                return
        self.task = self._loop.create_task(self._serve())

    def _answered(self, pending: Pending) -> None:
        if pending is not self._pending:
            return  # abandoned, or handed to a task (shutdown)
        self._pending = None
        if not self._listener.handler.finish(pending):
            self._hand_to_task(pending)
            return
        if self._keep_serving(pending.request):
            if self._queue:
                self._serve_next()
            else:
                self._idle()

    def _hand_to_task(self, pending: Pending) -> None:
        """Go on answering ``pending`` in a task: its answer needs waiting for."""
        self._handed = pending
        self.task = self._loop.create_task(self._serve(pending))

    def _keep_serving(self, request: Request) -> bool:
        """After an answer: whether the connection serves on (else it is closing)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # cut while answering (or the client left): nothing more to serve
        if (
            request.reply.close
            or self._listener.closing
            or (self._done_reading and not self._queue)
        ):
            self.close()  # also after an upgrade request, or a parse error already answered
            return False
        return True

    async def _serve(self, pending: Pending | None = None) -> None:
        """Answer queued requests in order (from a pending one); then keep alive, or close."""
        queue = self._queue
        self._handed = None  # taken: from here on, cancelling this task ends it
        try:
            if pending is not None:
                await self._listener.handler(pending.request, pending)
                if not self._keep_serving(pending.request):
                    return
            while queue:
                # The next answer waits until this one is on its way: a client that pipelines
                # requests but reads no answers cannot make the proxy buffer them all.
                if self._paused:
                    await self.drain()
                message, body = queue.popleft()
                if isinstance(message, Exception):
                    self._answer_parse_error(message)
                    return
                if body.is_eof():
                    self._request_done()
                else:
                    body.on_eof(self._body_ended)
                request = Request(self, message, body, self._remote)
                await self._listener.handler(request)
                if not self._keep_serving(request):
                    return
                if not body.is_eof() and not await _drained(body):
                    self.close()  # the client is still sending a body nobody reads
                    return
        except ConnectionError:
            self.close(linger=False)  # the client went away, or stopped reading
            return
        except Exception:
            log.exception("unexpected error on a client connection; closing it")
            self.close(linger=False)
            return
        finally:
            self.task = None
        self._idle()

    def _body_ended(self) -> None:
        # llhttp counts a request once its body ends, just after this callback runs. (One whose
        # body went around it was not counted: its message_consumed() lowers the new parser's
        # count of later requests, which only lets that parser read further ahead.)
        self._loop.call_soon(self._request_done)

    def _request_done(self) -> None:
        """A request left the queue and its body ended: the parser may read one more ahead."""
        self._reader.message_consumed()
        if self._buffer_paused and len(self._queue) < MAX_QUEUED - 1:
            self.data_received(b"")  # parse requests the parser held back
            if len(self._queue) < MAX_QUEUED - 1:
                self._resume_reading_for_buffer()

    def write(self, data: bytes) -> None:
        """Send bytes to the client; raise ConnectionResetError if it is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written, up to server.send_timeout.

        A client that takes nothing for that long is cut off (ConnectionResetError), which
        frees the upstream connection its exchange holds.
        """
        if not self._paused:
            return
        try:
            async with asyncio.timeout(self._limits.send_timeout):
                await self._drain_helper()
        except TimeoutError:
            log.info("a client took no answer bytes for server.send_timeout; cutting it off")
            self.abort()
            raise ConnectionResetError("the client stopped reading") from None

    @property
    def closing(self) -> bool:
        """Whether the connection closes after the answer in progress (shutdown)."""
        return self._listener.closing

    def abort(self) -> None:
        """Cut the connection at once."""
        if self.transport is not None:
            self.transport.abort()

    def close(self, *, cancel: bool = False, linger: bool = True) -> None:
        """Close after what was written is sent; ``cancel`` also stops a running handler.

        With ``linger``, as nginx's lingering close: our side ends first (FIN after the
        answer), and what the client still sends is read and dropped for up to LINGER seconds,
        so a client that is still writing gets the answer rather than a connection reset.
        """
        self._done_reading = True
        if cancel and self.task is not None:
            self.task.cancel()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and not self._lingering and transport.can_write_eof():
            self._lingering = True
            transport.write_eof()
            self._loop.call_later(LINGER, self._close_now)
        else:
            self._close_now()

    def _close_now(self) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A client that takes nothing would hold the closing connection open for ever.
            self._loop.call_later(self._limits.send_timeout, transport.abort)

    def close_if_idle(self) -> None:
        """Close now if no request is being answered (shutdown).

        A request answered in callbacks is handed to a task, which shutdown waits for.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            self._hand_to_task(pending)
        elif self.task is None:
            self.close()

    # -- limits -------------------------------------------------------------------------------

    def _between_requests(self) -> bool:
        busy = self.task is not None or self._pending is not None
        return not busy and (self._body is None or self._body.is_eof())

    def _idle(self) -> None:
        """Start counting idle time; one timer serves many idle spells."""
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(
                self._idle_since + self._limits.keepalive_timeout, self._idle_check
            )

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._idle_since is None:
            return  # busy since; the next idle spell starts a timer again
        due = self._idle_since + self._limits.keepalive_timeout
        if self._loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self._loop.call_at(due, self._idle_check)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("a client took longer than server.header_timeout to send a request head")
        self._refuse(_HEADER_TIMEOUT)

    def _refuse(self, answer: bytes) -> None:
        # Written directly: there is no request to answer through the normal path.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
        self.close()

    def _parse_failed(self, exc: http_exceptions.HttpProcessingError) -> None:
        self._done_reading = True
        self._cancel_head_timer()
        body = self._body
        if body is not None and not body.is_eof():
            # The body of a request being answered is malformed: that request fails with it.
            body.set_exception(BrokenBody())
            return
        self._queue.append((exc, EMPTY_PAYLOAD))
        if self.task is None and self._pending is None:  # else answered in its turn
            self.task = self._loop.create_task(self._serve())

    def _answer_parse_error(self, exc: Exception) -> None:
        status, code, detail = _describe(exc, self._limits)
        log.info(
            "rejected a malformed request from %s: %s (%s)",
            self._remote,
            detail,
            type(exc).__name__,
        )
        self._refuse(_canned(status, code, detail + "; fix the request and send it again"))


async def _drained(body: StreamReader) -> bool:
    """Read and drop the rest of a body for up to LINGER seconds; whether it ended."""
    try:
        async with asyncio.timeout(LINGER):
            while not body.is_eof():
                await body.readany()
    except (TimeoutError, BrokenBody, ConnectionError):
        return False
    return True


def _describe(exc: Exception, limits: ServerSettings) -> tuple[int, str, str]:
    """Status, code and detail for a parse error, in words that quote nothing it saw."""
    if isinstance(exc, http_exceptions.LineTooLong):
        # The parser reports the limit it hit: max_line_size is the request line's.
        if exc.args[1] == limits.max_line_size != limits.max_field_size:
            return 414, "uri_too_long", "the request line is longer than server.max_line_size"
        return 431, "request_header_too_large", "a header is longer than server.max_field_size"
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "request_header_too_large", "the request has more than server.max_headers"
    for kind, detail in _PARSE_ERRORS:
        if isinstance(exc, kind):
            return 400, "bad_request", detail
    return 400, "bad_request", "the request is not valid HTTP/1.1"


def _canned(status: int, code: str, detail: str) -> bytes:
    """A whole error answer, as bytes, for connections with no request to answer through."""
    answer = json_error(status, code, detail)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{field_block(answer.headers)}"
        f"Content-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + answer.body


_TOO_MANY_CONNECTIONS = _canned(
    503,
    "too_many_connections",
    "the proxy is at server.max_connections; retry shortly or raise the limit",
)
_HEADER_TIMEOUT = _canned(
    408,
    "request_timeout",
    "the request head did not arrive within server.header_timeout",
)


def require_compiled_parser() -> None:
    """Refuse to run on aiohttp's pure-Python parser: the proxy relies on llhttp's strictness."""
    if http_parser.HttpRequestParser is not getattr(http_parser, "HttpRequestParserC", None):
        raise ConfigError(
            "aiohttp's compiled HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS is set, or "
            "aiohttp was installed without its binary extension); reinstall aiohttp from a wheel"
        )
