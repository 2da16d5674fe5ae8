"""The upstream side: a pool of keep-alive HTTP/1.1 connections to the one upstream origin.

A general-purpose client does per request what a proxy to a single origin can do once: resolve
the URL, merge default headers, pick a pool by key, build a request object and a new response
parser, and re-arm a read timer on every packet. Here the request head is one string written
with the body in one call, and each connection keeps one parser (aiohttp's compiled llhttp
parser) and one read timer for its whole life; the timer is re-armed only when it fires.

Every failure is a :class:`~proxy.errors.ProxyError` (502, 504) carrying the proxy's own words:
nothing the upstream or the client sent is quoted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from aiohttp import hdrs
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from .bodies import feed_counted
from .config import UpstreamSettings
from .errors import (
    BadUpstreamResponse,
    ConfigError,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .headers import declared_length

READ_BUFFER = 64 * 1024
"""Body bytes buffered per response before reading from the upstream pauses."""
IDLE_LIFETIME = 15.0
"""Seconds a pooled connection may sit unused and still be used: upstreams and load balancers
close idle connections after their own timeouts (often 60 s), and a request sent on one just
as it closes is lost (a POST cannot be sent again)."""

NO_ANSWER = "the upstream sent no answer within upstream.read_timeout"
STALLED = "the upstream stopped sending within upstream.read_timeout"
CUT_SHORT = "the upstream answer was cut short"
CLOSED = "the upstream closed the connection without answering"
MALFORMED = "the upstream sent a malformed answer"

# Methods a client may repeat without changing the outcome (RFC 9110 9.2.2): sent again on a
# fresh connection when a pooled one turns out to have been closed by the upstream.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

Body = bytes | AsyncIterator[bytes] | None


@dataclass(frozen=True)
class Route:
    """Where connections go and how requests are addressed: direct or via an egress proxy."""

    host: str
    """Host to connect to (the upstream's, or the egress proxy's)."""
    port: int
    tls: ssl.SSLContext | None
    """TLS to the upstream (end to end, also through a CONNECT tunnel)."""
    server_hostname: str
    authority: str
    """The upstream's ``Host`` header value."""
    absolute_prefix: str = ""
    """``http://host:port`` when requests go to a plain-HTTP egress proxy in absolute form."""
    tunnel: bytes = field(default=b"", repr=False)  # may hold the egress proxy's credentials
    """The CONNECT request that opens a tunnel through an egress proxy, if any."""
    proxy_authorization: str = field(default="", repr=False)

    @classmethod
    def of(cls, settings: UpstreamSettings) -> Route:
        """The route to ``settings.url``; HTTP(S)_PROXY and NO_PROXY apply with ``trust_env``."""
        url = urlsplit(settings.url)
        scheme, host = url.scheme, url.hostname or ""
        port = url.port or (443 if scheme == "https" else 80)
        default_port = port == (443 if scheme == "https" else 80)
        name = f"[{host}]" if ":" in host else host
        authority = name if default_port else f"{name}:{port}"
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = ssl.create_default_context(cafile=settings.ca_file or None)
        route = cls(host, port, tls, host, authority)
        proxy_url = _egress_proxy(scheme, host) if settings.trust_env else None
        if proxy_url is None:
            return route
        proxy = urlsplit(proxy_url)
        if proxy.scheme != "http":
            raise ConfigError(
                f"upstream.trust_env: the egress proxy for {scheme} must be an http:// URL "
                "(the proxy tunnels TLS to the upstream through it); fix HTTP(S)_PROXY"
            )
        credentials = ""
        if proxy.username is not None:
            pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
            credentials = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        proxy_host, proxy_port = proxy.hostname or "", proxy.port or 80
        if tls is None:
            return cls(
                proxy_host,
                proxy_port,
                None,
                host,
                authority,
                absolute_prefix=f"{scheme}://{authority}",
                proxy_authorization=credentials,
            )
        connect = f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n"
        if credentials:
            connect += f"Proxy-Authorization: {credentials}\r\n"
        return cls(proxy_host, proxy_port, tls, host, authority, tunnel=(connect + "\r\n").encode())


def _keep_alive_timeout(message: RawResponseMessage) -> float | None:
    """The idle timeout in an answer's ``Keep-Alive: timeout=N``, if any."""
    value = message.headers.get(hdrs.KEEP_ALIVE)
    if value is None:
        return None
    for part in value.split(","):
        name, _, number = part.strip().partition("=")
        if name.strip().lower() == "timeout":
            try:
                return float(number.strip())
            except ValueError:
                return None
    return None


def _egress_proxy(scheme: str, host: str) -> str | None:
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass(host):  # NO_PROXY (the environment's, on POSIX)
        return None
    return proxies.get(scheme)


class UpstreamResponse:
    """An upstream answer: status line and headers as parsed, the body as a stream.

    ``release()`` must be called once the body has been read (or abandoned): a connection whose
    answer was read to its end goes back to the pool, any other is closed.
    """

    __slots__ = ("_connection", "content", "content_length", "message", "status")

    def __init__(
        self,
        connection: UpstreamConnection,
        message: RawResponseMessage,
        content: StreamReader,
        content_length: int | None,
    ) -> None:
        self._connection = connection
        self.message = message
        self.status: int = message.code
        """The status code."""
        self.content = content
        self.content_length = content_length
        """The announced ``Content-Length``, if any."""

    async def read(self) -> bytes:
        """The whole body (for answers known to be small)."""
        content = self.content
        if content.is_eof():  # usually: a small answer arrives with its head
            return content.read_nowait()
        return await content.read()

    async def release(self) -> None:
        """Hand the connection back: to the pool when reusable, else closed.

        A request body still being sent (the upstream answered early) is stopped first, so
        nothing else reads the client's body while it is being abandoned.
        """
        writer = self.release_now()
        if writer is not None:
            await asyncio.wait([writer])

    def release_now(self) -> asyncio.Task[None] | None:
        """:meth:`release` without waiting: the body writer it stopped, if any, to wait for."""
        return self._connection.finish()


@dataclass(slots=True)
class Sent:
    """A bodiless request written on a pooled connection, its answer not yet taken."""

    connection: UpstreamConnection
    answer: asyncio.Future[UpstreamResponse]
    """Done when the answer's head has arrived, or the exchange failed."""
    head: bytes
    method: str

    def response(self) -> UpstreamResponse | None:
        """The answer if it arrived; None if it failed or is still due (see UpstreamPool.answer)."""
        answer = self.answer
        if not answer.done() or answer.cancelled() or answer.exception() is not None:
            return None
        return answer.result()


class UpstreamPool:
    """Connections to the upstream origin, reused most-recent-first.

    The pool does not bound how many connections are open: the forwarder holds one of
    ``upstream.pool_size`` slots per exchange, so at most that many are ever busy or idle.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self._route = Route.of(settings)
        self._connect_timeout = settings.connect_timeout
        self._read_timeout = settings.read_timeout
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()
        self._closed = False
        prefix = self._route.absolute_prefix
        host = f"Host: {self._route.authority}\r\n"
        if self._route.proxy_authorization:
            host += f"Proxy-Authorization: {self._route.proxy_authorization}\r\n"
        self._line_end = " HTTP/1.1\r\n" + host  # after "<method> <prefix><target>"
        self._target_prefix = prefix

    async def request(
        self,
        method: str,
        target: str,
        block: str,
        body: Body,
        *,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request and wait for the answer's head.

        ``block`` holds the header fields (``Name: value`` lines), sent after ``Host``; it must
        hold no framing: the pool frames the body itself, ``Content-Length`` for bytes or a
        streamed body of known ``length``, chunked for a streamed body of unknown length,
        nothing when there is no body.
        """
        chunked = False
        if isinstance(body, bytes):
            length = len(body)
        elif body is None:
            length = None
        elif length is None:
            chunked = True
        head = self._head(method, target, block, length, chunked)
        connection = self._take_idle()
        if connection is None:
            return await self._exchange_anew(head, method, body, chunked)
        answer = connection.send(head, method, body, chunked)
        return await self._answer(connection, answer, head, method, body, chunked)

    def send_now(self, method: str, target: str, block: str) -> Sent | None:
        """Send a bodiless request on an idle connection, without waiting; None if none is idle.

        Its answer is then taken with :meth:`answer`, or from :meth:`Sent.response` once done.
        """
        connection = self._take_idle()
        if connection is None:
            return None
        head = self._head(method, target, block, None, False)
        return Sent(connection, connection.send(head, method, None, False), head, method)

    async def answer(self, sent: Sent) -> UpstreamResponse:
        """Wait for the answer to a request sent with :meth:`send_now`, as :meth:`request` does."""
        return await self._answer(sent.connection, sent.answer, sent.head, sent.method, None, False)

    async def _answer(
        self,
        connection: UpstreamConnection,
        answer: asyncio.Future[UpstreamResponse],
        head: bytes,
        method: str,
        body: Body,
        chunked: bool,
    ) -> UpstreamResponse:
        try:
            return await connection.wait(answer)
        except _StaleConnection:
            if not (method in IDEMPOTENT and (body is None or isinstance(body, bytes))):
                raise BadUpstreamResponse(CLOSED) from None
        return await self._exchange_anew(head, method, body, chunked)

    async def _exchange_anew(
        self, head: bytes, method: str, body: Body, chunked: bool
    ) -> UpstreamResponse:
        connection = await self._connect()
        try:
            return await connection.wait(connection.send(head, method, body, chunked))
        except _StaleConnection:
            raise BadUpstreamResponse(CLOSED) from None

    def _head(
        self, method: str, target: str, block: str, length: int | None, chunked: bool
    ) -> bytes:
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        head = f"{method} {self._target_prefix}{target}{self._line_end}{block}{framing}\r\n"
        # Header values were checked to be ASCII or UTF-8, as received.
        return head.encode("utf-8", "surrogateescape")

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable_until > now and connection.usable():
                return connection
            connection.close()
        return None

    def park(self, connection: UpstreamConnection, upstream_timeout: float | None) -> None:
        """Keep a connection whose exchange ended cleanly for the next request.

        It is used again for IDLE_LIFETIME at most, and never beyond a second before the
        idle timeout the upstream announced (``Keep-Alive: timeout=N``).
        """
        if self._closed:
            connection.close()
            return
        lifetime = IDLE_LIFETIME
        if upstream_timeout is not None:
            lifetime = min(lifetime, upstream_timeout - 1)
        connection.usable_until = time.monotonic() + lifetime
        self._idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """Drop a connection that closed."""
        self._open.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    async def _connect(self) -> UpstreamConnection:
        route = self._route
        loop = asyncio.get_running_loop()
        opened: list[UpstreamConnection] = []

        def new_connection() -> UpstreamConnection:
            connection = UpstreamConnection(loop, self, self._read_timeout)
            opened.append(connection)
            return connection

        try:
            async with asyncio.timeout(self._connect_timeout):
                direct_tls = route.tls if not route.tunnel else None
                _, connection = await loop.create_connection(
                    new_connection,
                    route.host,
                    route.port,
                    ssl=direct_tls,
                    server_hostname=route.server_hostname if direct_tls else None,
                )
                self._open.add(connection)
                if route.tunnel:
                    assert route.tls is not None
                    await connection.open_tunnel(route.tunnel, route.tls, route.server_hostname)
        except BaseException as exc:
            for half_made in opened:  # a refused tunnel, a TLS failure, a timeout, a hang-up
                half_made.close()
            raise _connect_error(exc) from None
        return connection

    def close(self) -> None:
        """Close every connection, idle or busy; later releases close theirs too."""
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._idle.clear()


def _connect_error(exc: BaseException) -> BaseException:
    """What a failed connect is reported as; anything but a network failure as itself."""
    if isinstance(exc, TimeoutError):
        return UpstreamUnreachable(
            "could not connect to the upstream within upstream.connect_timeout"
        )
    if isinstance(exc, ssl.SSLError):
        return UpstreamUnreachable(
            f"could not connect to the upstream (TLS: {exc.reason or type(exc).__name__})"
        )
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        return UpstreamUnreachable(f"could not connect to the upstream ({reason})")
    return exc


class _BodyFailed(BadUpstreamResponse):
    """A body the parser could not complete; its own message may quote the upstream."""

    def __init__(self, *_: object) -> None:
        super().__init__(CUT_SHORT)


class _StaleConnection(Exception):
    """A reused connection was closed by the upstream before any answer byte: send again."""


class UpstreamConnection(BaseProtocol):
    """One connection to the upstream: one exchange at a time, one parser for its lifetime."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, read_timeout: float
    ) -> None:
        super().__init__(loop)
        self._pool = pool
        self._read_timeout = read_timeout
        self._use_new_parser(with_body=True)
        self._head_parser = False  # whether the parser skips bodies (after a HEAD request)
        self._answer: asyncio.Future[UpstreamResponse] | None = None
        self._body: StreamReader | None = None
        self._message: RawResponseMessage | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False  # whether an exchange is waiting on the upstream
        self._last_read = 0.0  # when the upstream last made progress (sent or took bytes)
        self._client_turn = False  # a streamed request body waits for the client's bytes
        self._received = False  # any byte of the current exchange's answer
        self._exchanges = 0
        self.usable_until = 0.0
        """Until when the pooled connection may carry another request."""
        self._tunnel: asyncio.Future[None] | None = None
        self._tunnel_head = b""
        self._body_length = 0  # of the body being read, when it bypasses the parser

    def _use_new_parser(self, *, with_body: bool) -> None:
        self._reader = self._parser = HttpResponseParser(
            self,
            self._loop,
            READ_BUFFER,
            payload_exception=_BodyFailed,
            response_with_body=with_body,
            read_until_eof=True,
            auto_decompress=False,  # bodies pass through as sent
        )
        self._parser_paused = False  # see resume_reading

    def usable(self) -> bool:
        """Whether an idle connection can carry another exchange."""
        transport = self.transport
        return transport is not None and not transport.is_closing()

    def send(
        self, head: bytes, method: str, body: Body, chunked: bool
    ) -> asyncio.Future[UpstreamResponse]:
        """Write the request; the future gets the answer's head (interim 1xx answers skipped).

        The answer is taken with :meth:`wait`, which also cleans up after a failure.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise _StaleConnection
        self._exchanges += 1
        self._received = False
        if (method == "HEAD") != self._head_parser:
            self._head_parser = method == "HEAD"
            self._use_new_parser(with_body=not self._head_parser)
        answer: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._answer = answer
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            self._writer = self._loop.create_task(self._write_body(transport, body, chunked))
            self._writer.add_done_callback(self._body_written)
        self._start_timer()
        return answer

    async def wait(self, answer: asyncio.Future[UpstreamResponse]) -> UpstreamResponse:
        """The answer :meth:`send` promised; raises _StaleConnection if it can be sent again."""
        try:
            return await answer
        except BaseException as exc:
            # Failed, timed out, or the client hung up (cancelled): nothing else may read an
            # answer meant for this request, so the connection goes.
            self.close()
            stale = self._exchanges > 1 and not self._received
            if stale and isinstance(exc, BadUpstreamResponse) and exc.detail == CLOSED:
                raise _StaleConnection from None
            raise
        finally:
            self._answer = None

    async def _write_body(
        self, transport: asyncio.Transport, body: AsyncIterator[bytes], chunked: bool
    ) -> None:
        # While waiting for the client's next bytes the read timer must not blame the upstream
        # (server.body_timeout covers the client); every chunk the upstream takes is progress.
        self._client_turn = True
        async for chunk in body:
            self._client_turn = False
            if transport.is_closing():
                return  # the answer (or its failure) says what happened
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._paused:
                await self._drain_helper()
            self._last_read = self._loop.time()
            self._client_turn = True
        self._client_turn = False
        if chunked and not transport.is_closing():
            transport.write(b"0\r\n\r\n")

    def _body_written(self, writer: asyncio.Task[None]) -> None:
        if writer.cancelled():
            return
        failure = writer.exception()
        if failure is None:
            return
        # The client's body failed (or the upstream went away): this exchange is over.
        answer = self._answer
        if answer is not None and not answer.done():
            error = failure if isinstance(failure, ProxyError) else BadUpstreamResponse(CLOSED)
            answer.set_exception(error)
        self.close()

    # -- the read timer: armed once, pushed back only when it fires ------------------------
    # Exchanges come and go far faster than read_timeout: instead of a new timer for each,
    # the one armed handle checks, when it fires, whether an exchange is still being timed.

    def _start_timer(self) -> None:
        if not self._read_timeout:
            return
        self._timing = True
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._last_read + self._read_timeout, self._timer_fired
            )

    def _stop_timer(self) -> None:
        self._timing = False

    def _timer_fired(self) -> None:
        self._timer = None
        if not self._timing:
            return
        now = self._loop.time()
        if self._reading_paused or self._client_turn:
            self._last_read = now  # waiting for the client, not for the upstream
        due = self._last_read + self._read_timeout
        if due > now:  # bytes came meanwhile
            self._timer = self._loop.call_at(due, self._timer_fired)
            return
        self._fail(UpstreamTimeout(NO_ANSWER if self._body is None else STALLED))

    # -- protocol callbacks ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse the answer; hand its head to the waiting exchange and feed its body."""
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        if data:
            if self._answer is None and self._body is None:
                # Nothing was asked: an upstream that talks out of turn is not trusted again.
                self.close()
                return
            self._received = True
            self._last_read = self._loop.time()
            if self._body_length:
                self._pass_body(data)
                return
        try:
            messages, upgraded, _ = self._reader.feed_data(data)
        except HttpProcessingError:
            self._fail(BadUpstreamResponse(MALFORMED))
            return
        for message, payload in messages:
            code = message.code
            if 100 <= code < 200 and code != 101:
                if payload is not EMPTY_PAYLOAD and (payload.total_bytes or not payload.is_eof()):
                    # An interim answer ends with its head (RFC 9110 15.2). One the parser
                    # gives a body (104-199 with a length) is framed two ways, and its body
                    # would be read by no one: past 128 KiB, reading would pause for good.
                    self._fail(BadUpstreamResponse(MALFORMED))
                    return
                continue  # interim answers (100, 103) are not relayed
            if self._message is not None:
                self.close()  # a second answer to one request: the upstream is out of step
                return
            self._message = message
            length = declared_length(message.headers)
            content = payload
            if self._head_parser or code in (101, 204, 304):
                content = EMPTY_PAYLOAD
            else:
                self._body = payload
                payload.on_eof(self._body_done)
                # Unless the parser has had the whole body: it stops just before a body's end
                # when the body's buffer fills, and ends the body itself when reading resumes.
                if length and not message.chunked and length > payload.total_bytes:
                    self._body_length = length
            answer = self._answer
            if answer is not None and not answer.done():
                answer.set_result(UpstreamResponse(self, message, content, length))
            if content is EMPTY_PAYLOAD:
                self._stop_timer()
        if upgraded:
            self.close()  # only a 101 does this; the forwarder refuses it

    def _pass_body(self, data: bytes) -> None:
        """Feed the rest of a body of known length to its reader without the parser.

        At the body's end the parser, left mid-body, is replaced; bytes after the body go to
        the new one (a second answer: the connection closes).
        """
        assert self._body is not None
        after = feed_counted(self._body, self._body_length, data)
        if after is None:
            return
        self._body_length = 0  # also when a failed body dropped its on_eof callbacks
        self._use_new_parser(with_body=True)
        if after:
            self.data_received(after)

    def _body_done(self) -> None:
        self._body_length = 0
        self._stop_timer()

    def pause_reading(self) -> None:
        """Pause reading while a body reader's buffer is full (noted for resume_reading)."""
        self._parser_paused = True
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """Undo a body reader's pause; nothing to do while this parser was never paused.

        aiohttp's body reader calls this after every read that leaves its buffer low and at
        every body's end, paused or not, and the base class then parses an empty read (all of
        ``data_received``) and resumes the transport: twice per small answer. Only a parser
        that was paused can need it. Such a parser keeps a pause of its own that outlasts the
        reader's (a body of more than 4,096 small chunks leaves it so), and holds back the
        bytes after its next body chunk until it is resumed through.
        """
        if self._parser_paused or self._reading_paused:
            super().resume_reading(resume_parser)

    def eof_received(self) -> bool:
        """Let the transport close: an upstream that half-closes is done."""
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        """Finish a body delimited by the close; fail whatever else was waiting."""
        self._stop_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._writer.cancel()
        self._pool.forget(self)
        with contextlib.suppress(Exception):  # an incomplete body: failed just below
            self._reader.feed_eof()  # ends a body delimited by the close
        body = self._body
        if body is not None and not body.is_eof():
            body.set_exception(BadUpstreamResponse(CUT_SHORT))
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(BadUpstreamResponse(CLOSED))
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ConnectionResetError("the egress proxy closed"))
        super().connection_lost(exc)

    def _fail(self, error: ProxyError) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(error)
        elif self._body is not None and not self._body.is_eof():
            self._body.set_exception(error)
        self.close()

    def finish(self) -> asyncio.Task[None] | None:
        """End the exchange: park the connection if it is clean, else close it.

        Clean: the answer was read to its end, the request was sent whole, and no byte of a
        further answer has arrived. Returns the request-body writer if it had to be stopped.
        """
        self._stop_timer()
        self._answer = None
        self._body_length = 0  # a body left unfinished: the connection closes below
        writer, self._writer = self._writer, None
        body, self._body = self._body, None
        message, self._message = self._message, None
        complete = (body is None or body.is_eof()) and (writer is None or writer.done())
        # feed_eof() returns a message (or fails) only when bytes after this answer began another.
        started_another = complete and self._another_answer_begun()
        reusable = message is not None and not message.should_close and self.usable()
        if complete and not started_another and reusable:
            assert message is not None
            self._pool.park(self, _keep_alive_timeout(message))
            return None
        self.close()
        if writer is not None and not writer.done():
            writer.cancel()
            return writer
        return None

    def _another_answer_begun(self) -> bool:
        try:
            return self._reader.feed_eof() is not None
        except Exception:  # it began, badly: all the same, never reuse this
            return True

    def close(self) -> None:
        """Close the connection (its pool forgets it once the close completes).

        Bytes still unsent (an upload the upstream stopped reading) are dropped: a close that
        waited for them would hold the socket for as long as the upstream keeps it open.
        """
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    # -- CONNECT tunnels through an egress proxy ------------------------------------------

    async def open_tunnel(self, request: bytes, tls: ssl.SSLContext, server_hostname: str) -> None:
        """Ask the egress proxy for a tunnel, then start TLS to the upstream inside it."""
        assert self.transport is not None
        self._tunnel = self._loop.create_future()
        self.transport.write(request)
        try:
            await self._tunnel
        finally:
            self._tunnel = None
        transport = await self._loop.start_tls(
            self.transport, self, tls, server_hostname=server_hostname
        )
        if transport is None:
            raise ConnectionResetError("the egress proxy closed the tunnel")
        self.transport = transport

    def _tunnel_data(self, data: bytes) -> None:
        assert self._tunnel is not None
        self._tunnel_head += data
        end = self._tunnel_head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._tunnel_head) > 8192 and not self._tunnel.done():
                self._tunnel.set_exception(ConnectionRefusedError("egress proxy answer too long"))
            return
        if self._tunnel.done():
            return
        status = self._tunnel_head.split(b" ", 2)[1:2]
        if status != [b"200"] or end + 4 != len(self._tunnel_head):
            self._tunnel.set_exception(ConnectionRefusedError("the egress proxy refused CONNECT"))
        else:
            self._tunnel.set_result(None)
