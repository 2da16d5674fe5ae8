"""Message bodies: request bodies read with limits; known-length bodies fed past the parser.

A request body is read whole (small, replayable) or streamed (anything else). Every read waits
at most ``server.body_timeout`` for the next bytes and stops at a size limit, so a client can
neither hold a connection by trickling nor exhaust memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import hdrs
from aiohttp.streams import StreamReader

from .errors import BadRequest, PayloadTooLarge, ProxyError, RequestTimeout

if TYPE_CHECKING:
    from .messages import Request

BODY_TIMEOUT = "the client sent no body bytes within server.body_timeout"


class BrokenBody(Exception):
    """The client's body broke off: malformed framing, or the connection closed mid-body."""


def expects_continue(request: Request) -> bool:
    """Whether the client waits for ``100 Continue`` (the request checks refused, with 417,
    any other expectation)."""
    return request.version >= (1, 1) and any(
        "100-continue" in value.lower() for value in request.headers.getall(hdrs.EXPECT, ())
    )


TRUNCATED = "the request body ended early or was malformed"


def feed_counted(body: StreamReader, length: int, data: bytes) -> bytes | None:
    """Feed ``data`` to ``body``, of ``length`` bytes, without the parser that read its head.

    Returns None while the body goes on. When ``data`` completes it, the body is ended and what
    followed it is returned (maybe nothing): the parser, left mid-body, must be replaced before
    it reads those bytes.

    After the head, llhttp only counts a ``Content-Length`` body, copying each chunk to do it:
    about a tenth of the proxy's CPU on a large transfer. The reader's ``total_bytes`` counts
    what it has had, from the parser or from here, so it says how much is still due: the bytes
    as sent, since neither parser decompresses.
    """
    due = length - body.total_bytes
    if len(data) < due:
        body.feed_data(data)
        return None
    body.feed_data(data[:due] if len(data) > due else data)
    body.feed_eof()
    return data[due:]


async def read_whole(content: StreamReader, *, limit: int, read_timeout: float) -> bytes:
    """The whole body, at most ``limit`` bytes (413 above), each read within ``read_timeout``."""
    body = StreamedBody(content, limit, read_timeout)
    return b"".join([chunk async for chunk in body.chunks()])


class StreamedBody:
    """A body streamed upstream as it arrives: ``limit`` bytes at most, ``read_timeout`` per read.

    When the body fails, ``failure`` says why (it is also raised): the upstream request then
    fails too, and the client is answered with this error instead of a misleading upstream one.
    """

    def __init__(self, content: StreamReader, limit: int, read_timeout: float) -> None:
        self._content = content
        self._limit = limit
        self._read_timeout = read_timeout
        self.failure: ProxyError | None = None
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None  # when the read now waiting began
        self._timer: asyncio.TimerHandle | None = None
        self._reading_task: asyncio.Task[object] | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; ``limit`` 0 means no size limit."""
        content = self._content
        size = 0
        try:
            while True:
                self._read_begins()
                try:
                    chunk = await content.readany()
                except _Stalled:
                    self.failure = RequestTimeout(BODY_TIMEOUT)
                    raise self.failure from None
                except (BrokenBody, ConnectionError):
                    self.failure = BadRequest(TRUNCATED)
                    raise self.failure from None
                finally:
                    self._waiting_since = None
                if not chunk:
                    return
                size += len(chunk)
                if self._limit and size > self._limit:
                    self.failure = PayloadTooLarge(f"the request body is over {self._limit} bytes")
                    raise self.failure
                yield chunk
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # One timer for the whole body, pushed back only when it fires: an ``asyncio.timeout``
    # around each read made and cancelled a timer per chunk (8% of the CPU of an upload).

    def _read_begins(self) -> None:
        self._waiting_since = now = self._loop.time()
        if self._timer is None:
            self._reading_task = asyncio.current_task()
            self._timer = self._loop.call_at(now + self._read_timeout, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        task = self._reading_task
        if self._waiting_since is None or task is None or task.cancelling():
            # Not reading now (the upstream is taking a chunk), or the read is being cancelled
            # (the exchange ended): nothing to time, and the body's reader, which the connection
            # may still drain, is left alone. Armed again at the next read.
            return
        due = self._waiting_since + self._read_timeout
        if due > self._loop.time():
            self._timer = self._loop.call_at(due, self._timer_fired)
        else:
            self._content.set_exception(_Stalled())  # the waiting read raises it


class _Stalled(BrokenBody):
    """No body bytes within ``server.body_timeout`` (broken off, wherever else it is read)."""
