"""HTTP/1.1 over plain sockets, for tests that must see or send exact bytes.

An HTTP client library would tidy requests up (re-encode paths, add or merge headers); these
helpers write and read bytes as they are, so tests observe what really crosses the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType


@dataclass
class RawResponse:
    """A response as read off the socket."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Bytes up to and including the blank line that ends a header block."""
    return await reader.readuntil(b"\r\n\r\n")


def parse_headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the (name, value) pairs of a header block."""
    lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            pairs.append((name, value.strip()))
    return lines[0], pairs


async def read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]]
) -> tuple[bytes, str]:
    """The body framed by ``headers``: (bytes, framing) with framing length/chunked/close."""
    values = {k.lower(): v for k, v in headers}
    if "chunked" in values.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body, "chunked"
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in values:
        return await reader.readexactly(int(values["content-length"])), "length"
    return b"", "none"


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> RawResponse:
    """One response; reads to EOF when it is framed by connection close."""
    head = await read_head(reader)
    start, headers = parse_headers(head)
    status = int(start.split()[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, headers, b"", head)
    values = {k.lower() for k, _ in headers}
    if "content-length" in values or "transfer-encoding" in values:
        body, _ = await read_body(reader, headers)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body, head)


async def exchange(
    port: int, data: bytes, *, method: str = "GET", timeout: float = 5.0
) -> RawResponse:
    """Send ``data`` on a new connection to 127.0.0.1:``port`` and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await read_response(reader, method=method)
    finally:
        writer.close()


@dataclass
class RawRequest:
    """A request as the raw upstream received it."""

    head: bytes
    body: bytes
    framing: str

    @property
    def start_line(self) -> str:
        """``METHOD target HTTP/1.1``."""
        return parse_headers(self.head)[0]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Header pairs in the order received."""
        return parse_headers(self.head)[1]

    def header(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


Responder = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A loopback upstream that records raw requests and answers with scripted bytes.

    ``respond`` gets each request and the writer; it writes whatever bytes the test needs
    (a broken header, a short body, a stall) and may close the connection.
    """

    def __init__(self, respond: Responder | None = None) -> None:
        self.respond: Responder = respond or ok_response
        self.requests: list[RawRequest] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await read_head(reader)
                body, framing = await read_body(reader, parse_headers(head)[1])
                request = RawRequest(head, body, framing)
                self.requests.append(request)
                await self.respond(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Do not wait for handlers stuck in scripted stalls; closing the listener is enough.


async def ok_response(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    """``200 OK`` with a two-byte body."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


def canned(data: bytes, *, close: bool = False) -> Responder:
    """A responder that writes ``data`` (and closes the connection when ``close``)."""

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return respond
