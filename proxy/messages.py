"""What a handler gets and how it answers: :class:`Request`, :class:`Reply` and :class:`Answer`.

The listener makes one :class:`Request` per parsed request; the handler answers through
``request.reply``, either whole (head and body in one write) or streamed. Framing is decided
here, in one place, by RFC 9112 section 6: a known length is sent as ``Content-Length``, an
unknown one chunked to HTTP/1.1 clients and delimited by the close to HTTP/1.0 clients, and
answers to HEAD and 204/304 carry no body.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import hdrs
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from .headers import declared_length, field_block

if TYPE_CHECKING:
    from .listener import ClientConnection


_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class Answer:
    """An answer the proxy makes itself (admin routes, errors): small, whole, never streamed."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    """Close the connection after this answer (the request's framing cannot be trusted)."""


class Request:
    """One client request as parsed: method, target, headers, and the body as a stream."""

    __slots__ = (
        "_connection",
        "body_exists",
        "content",
        "headers",
        "method",
        "raw_headers",
        "raw_path",
        "remote",
        "reply",
        "version",
    )

    scheme = "http"
    """The listener speaks plain HTTP on loopback (or in the pod); TLS ends before it."""

    def __init__(
        self,
        connection: ClientConnection,
        message: RawRequestMessage,
        content: StreamReader,
        remote: str | None,
    ) -> None:
        self._connection = connection
        # Plain attributes, not properties over the message: each is read several times per
        # request on the hot path, and a property costs a call each time.
        self.method: str = message.method
        """The method, as sent."""
        self.version: tuple[int, int] = message.version
        """The HTTP version, e.g. ``(1, 1)``."""
        self.raw_path: str = message.path
        """The request target exactly as sent (origin form, or absolute form)."""
        self.headers: CIMultiDictProxy[str] = message.headers
        """The header fields, repeats kept, in order."""
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        """The header fields as bytes, as received."""
        self.content = content
        """The body, as the parser de-frames it (Content-Length or chunked)."""
        self.body_exists = content is not EMPTY_PAYLOAD
        """Whether the request has a body (a Content-Length or chunked framing)."""
        self.remote = remote
        """The client's address."""
        self.reply = Reply(connection, message)

    @property
    def content_length(self) -> int | None:
        """The declared body length, if any (the parser has checked it is a number)."""
        return declared_length(self.headers)

    @property
    def content_type(self) -> str:
        """The media type of the body, lower-cased, without parameters."""
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    def send_continue(self) -> None:
        """Tell a client that sent ``Expect: 100-continue`` to send its body."""
        if not self.reply.started:
            self._connection.write(_CONTINUE)

    def abort(self) -> None:
        """Cut the client connection: the only honest signal once an answer is half sent."""
        self._connection.abort()


class Reply:
    """The answer to one request, written to the client connection."""

    __slots__ = ("_chunked", "_connection", "_empty", "_message", "body_bytes", "close", "status")

    def __init__(self, connection: ClientConnection, message: RawRequestMessage) -> None:
        self._connection = connection
        self._message = message  # not the Request: no reference cycle, freed without the GC
        self._chunked = False
        self._empty = False
        self.status: int | None = None
        """The status sent, once the head is out."""
        self.body_bytes = 0
        """Body bytes sent so far."""
        self.close = False
        """Whether the connection closes after this answer."""

    @property
    def started(self) -> bool:
        """Whether the head has been sent (from then on only the body, or a cut, can follow)."""
        return self.status is not None

    def send(self, answer: Answer) -> None:
        """Send an answer the proxy made, with a Date and its length."""
        if answer.close:
            self.close = True
        block = f"{field_block(answer.headers)}Date: {http_date()}\r\n".encode()
        self.whole(answer.status, HTTPStatus(answer.status).phrase, block, answer.body)

    def whole(
        self, status: int, reason: str, block: bytes, body: bytes, length: int | None = None
    ) -> None:
        """Send head and body in one write; ``block`` holds the header fields (no framing).

        ``length`` is the Content-Length to announce when it is not ``len(body)``: an answer
        to HEAD announces the length a GET would have had.
        """
        head = self._head(status, reason, block, len(body) if length is None else length)
        if self._empty or not body:
            self._connection.write(head)
            return
        self.body_bytes = len(body)
        self._connection.write(head + body)

    def start(self, status: int, reason: str, block: bytes, length: int | None) -> None:
        """Send the head of an answer whose body follows in :meth:`write` calls."""
        self._connection.write(self._head(status, reason, block, length))

    async def write(self, chunk: bytes) -> None:
        """Send part of the body; waits while the client is slow to take it."""
        if self._empty or not chunk:
            return
        self.body_bytes += len(chunk)
        if self._chunked:
            self._connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._connection.write(chunk)
        await self._connection.drain()

    def end(self) -> None:
        """Finish the body."""
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")

    def _head(self, status: int, reason: str, block: bytes, length: int | None) -> bytes:
        message = self._message
        version = message.version
        self.status = status
        self._empty = message.method == "HEAD" or status in _NO_BODY_STATUS
        # After an Upgrade request, what follows could be another protocol's bytes: start afresh.
        keep_alive = (
            not message.should_close
            and not self.close
            and not self._connection.closing
            and hdrs.UPGRADE not in message.headers
        )
        # HTTP/1.1 whatever the request said (RFC 9112 2.5), as nginx answers. The reason was
        # checked to be printable ASCII; the block holds the bytes the fields arrived as.
        lines = [_status_line(status, reason), block]
        if status in _NO_BODY_STATUS:
            pass  # these never carry a length (RFC 9110 8.6)
        elif length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
        elif not self._empty:
            if version >= (1, 1):
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep_alive = False  # the close is what ends the body
        if keep_alive:
            if version == (1, 0):
                lines.append(b"Connection: keep-alive\r\n")
        else:
            self.close = True
            if version >= (1, 1):
                lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


@functools.lru_cache(maxsize=64)
def _status_line(status: int, reason: str) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())


def http_date() -> str:
    """The current time as an HTTP date (formatted at most once a second)."""
    return _http_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    return formatdate(second, usegmt=True)
