"""The upstream connection pool: reuse, stale connections, parser state, upstreams out of turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import pytest

from proxy import upstream as upstream_pool
from proxy.errors import ERROR_HEADER
from proxy.standins import StandInTokenServer

from .rawhttp import RawRequest, RawResponse, Responder, canned, exchange, read_response
from .support import proxy_before, proxy_in_front_of, spy_on_bypass, wait_for

GET = b"GET /items HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
POST = b"POST /items HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 2\r\n\r\nhi"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_connections_are_reused(token_server: StandInTokenServer) -> None:
    """Sequential requests travel on one upstream connection."""
    async with proxy_in_front_of(token_server) as (raw, proxy):
        statuses = [(await exchange(proxy.port, GET)).status for _ in range(5)]
    assert statuses == [200] * 5
    assert len(raw.requests) == 5
    assert raw.connections == 1


def closes_every_second_request() -> Responder:
    """A responder that answers the first request on each connection and closes on the next,
    as an upstream does when its keep-alive timeout ends just as a request arrives."""
    seen: dict[tuple[str, int], int] = {}

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")  # one per connection (an id() could recur)
        count = seen[peer] = seen.get(peer, 0) + 1
        if count == 1:
            writer.write(OK)
            await writer.drain()
        else:
            writer.close()

    return respond


@pytest.mark.parametrize(
    ("request_bytes", "second_status", "sent", "connections"),
    [(GET, 200, 3, 2), (POST, 502, 2, 1)],
    ids=["GET-is-sent-again", "POST-is-never-sent-twice"],
)
async def test_a_stale_pooled_connection(
    token_server: StandInTokenServer,
    request_bytes: bytes,
    second_status: int,
    sent: int,
    connections: int,
) -> None:
    """A request that finds its pooled connection closed: a GET is sent again on a new
    connection, once; a POST never twice (its 502 is in the proxy's words)."""
    async with proxy_in_front_of(token_server, closes_every_second_request()) as (raw, proxy):
        first = await exchange(proxy.port, request_bytes)
        second = await exchange(proxy.port, request_bytes)
    assert (first.status, second.status) == (200, second_status)
    if second_status == 200:
        assert second.body == b"ok"
    else:
        assert second.header(ERROR_HEADER) == ["bad_upstream_response"]
    assert len(raw.requests) == sent
    assert raw.connections == connections


async def test_head_then_get_on_one_connection(token_server: StandInTokenServer) -> None:
    """A HEAD answer's Content-Length announces no body; the next answer is read right."""

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.start_line.startswith("HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        await writer.drain()

    head = b"HEAD /items HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    async with proxy_in_front_of(token_server, respond) as (raw, proxy):
        first = await exchange(proxy.port, head, method="HEAD")
        second = await exchange(proxy.port, GET)
        third = await exchange(proxy.port, head, method="HEAD")
    assert (first.status, first.header("Content-Length"), first.body) == (200, ["10"], b"")
    assert (second.status, second.body) == (200, b"0123456789")
    assert (third.status, third.body) == (200, b"")
    assert raw.connections == 1


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 204 Sneaky\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nSec-WebSocket-Key1: x\r\n",
    ],
    ids=["whole", "begun", "begun-badly"],
)
async def test_an_upstream_that_talks_out_of_turn_is_not_reused(
    token_server: StandInTokenServer, extra: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes after a complete answer (a whole extra answer, or one just begun) are never read
    as the next request's answer: that connection is not used again."""
    async with proxy_in_front_of(token_server, canned(OK + extra)) as (raw, proxy):
        first = await exchange(proxy.port, GET)
        second = await exchange(proxy.port, GET)
    assert (first.status, first.body) == (200, b"ok")
    assert (second.status, second.body) == (200, b"ok")
    assert raw.connections == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def in_pieces(answer: bytes, cuts: list[int]) -> Responder:
    """A responder that writes ``answer`` in pieces ending at ``cuts``, a pause between each."""

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        start = 0
        for end in [*cuts, len(answer)]:
            writer.write(answer[start:end])
            await writer.drain()
            await asyncio.sleep(0.02)  # each piece its own read on the proxy's side
            start = end

    return respond


def in_turn(*responders: Responder) -> Responder:
    """A responder that answers the n-th request with the n-th of ``responders``."""
    queue = list(responders)

    async def respond(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        await queue.pop(0)(request, writer)

    return respond


@pytest.fixture
def bypassed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(bytes read, body bytes still due) for each read that went around the answer parser."""
    return spy_on_bypass(monkeypatch, upstream_pool.UpstreamConnection)


async def two_gets(port: int) -> tuple[RawResponse, RawResponse]:
    """Two GETs one after the other on one client connection: a byte too many in the first
    answer would be read as the start of the second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        answers = []
        for _ in range(2):
            writer.write(GET)
            async with asyncio.timeout(5):
                answers.append(await read_response(reader))
        return answers[0], answers[1]
    finally:
        writer.close()


async def test_a_large_body_in_pieces_then_the_next_answer(
    token_server: StandInTokenServer, bypassed: list[tuple[int, int]]
) -> None:
    """A body of known length that arrives over many reads, more than the proxy buffers at
    once, comes through byte for byte; the next answer on that connection is read right."""
    body = os.urandom(1024) * 1024  # 1 MiB: reading pauses and resumes along the way
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    cuts = [10, len(head) + 300_000, len(head) + 300_001, len(head) + 700_000]
    respond = in_turn(in_pieces(head + body, cuts), canned(OK))
    async with proxy_in_front_of(token_server, respond) as (raw, proxy):
        big, small = await two_gets(proxy.port)
    assert (big.status, big.header("Content-Length")) == (200, [str(len(body))])
    assert big.body == body
    assert (small.status, small.body) == (200, b"ok")
    assert raw.connections == 1
    assert len(bypassed) >= 3
    assert bypassed[-1][0] == bypassed[-1][1]  # the last read ends the body exactly


@pytest.mark.parametrize(
    ("extra", "connections"),
    [
        (b"", 1),
        (b"HTTP/1.1 204 Sneaky\r\n\r\n", 2),
        (b"HTTP/1.1 200 OK\r\n", 2),
        (b"\x00garbage\r\n\r\n", 2),
    ],
    ids=["clean", "whole", "begun", "garbage"],
)
async def test_bytes_after_a_body_that_came_in_pieces(
    token_server: StandInTokenServer,
    bypassed: list[tuple[int, int]],
    extra: bytes,
    connections: int,
) -> None:
    """The end of a body read in pieces is where the answer ends: what follows it, in the same
    read, is an upstream out of step (that connection is not used again), never body."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789" + extra
    async with proxy_in_front_of(token_server, in_pieces(answer, [43, 47])) as (raw, proxy):
        first, second = await two_gets(proxy.port)
    assert (first.status, first.body) == (200, b"0123456789")
    assert (second.status, second.body) == (200, b"0123456789")
    assert raw.connections == connections
    ends = [read - due for read, due in bypassed if read >= due]  # reads that ended a body
    assert ends[0] == len(extra)  # what followed the body in that read was not taken as body


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
MANY_CHUNKS = b"1\r\nx\r\n" * 4097  # past the 4,096 unread chunks a body reader holds


@pytest.mark.parametrize(
    ("rest", "cuts", "body"),
    [
        (b"0\r\n\r\n", [], b"x" * 4097),
        (b"4\r\nlast\r\n0\r\n\r\n", [len(CHUNKED) + len(MANY_CHUNKS)], b"x" * 4097 + b"last"),
    ],
    ids=["all-in-one-read", "the-rest-in-a-later-read"],
)
async def test_an_answer_in_more_chunks_than_a_reader_holds(
    token_server: StandInTokenServer, rest: bytes, cuts: list[int], body: bytes
) -> None:
    """So many small chunks pause reading. Once the client has taken them, the rest of that
    answer and the next answer on the same connection come through: aiohttp's parser keeps a
    pause of its own, which outlasts the reader's and is undone only by resuming through it."""
    respond = in_turn(in_pieces(CHUNKED + MANY_CHUNKS + rest, cuts), canned(OK))
    async with proxy_in_front_of(token_server, respond) as (raw, proxy):
        many, after = await two_gets(proxy.port)
    assert (many.status, many.body) == (200, body)
    assert (after.status, after.body) == (200, b"ok")
    assert raw.connections == 1


async def test_bytes_after_a_body_in_a_later_read(token_server: StandInTokenServer) -> None:
    """Bytes that come after the body has ended, in a read of their own while the connection
    is idle, close it (nothing was asked); the next request goes on a new one."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789HTTP/1.1 200 OK\r\n\r\n"
    respond = in_turn(in_pieces(answer, [43, 49]), canned(OK))
    async with proxy_in_front_of(token_server, respond) as (raw, proxy):
        first = await exchange(proxy.port, GET)
        await asyncio.sleep(0.1)  # the extra bytes arrive before the next request
        second = await exchange(proxy.port, GET)
    assert (first.status, first.body) == (200, b"0123456789")
    assert (second.status, second.body) == (200, b"ok")
    assert raw.connections == 2


async def test_an_upstream_gone_in_the_middle_of_a_body_in_pieces(
    token_server: StandInTokenServer, bypassed: list[tuple[int, int]]
) -> None:
    """Cut short after the parser was left behind: a 502 (a small answer is read whole before
    anything is sent), and the next request gets a new connection."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n012345"

    async def cut(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        await in_pieces(answer, [41, 43])(request, writer)
        writer.close()

    async with proxy_in_front_of(token_server, in_turn(cut, canned(OK))) as (raw, proxy):
        first = await exchange(proxy.port, GET)
        after = await exchange(proxy.port, GET)
    assert bypassed
    assert bypassed[-1][0] < bypassed[-1][1]  # the body was still due when the upstream left
    assert (first.status, first.header(ERROR_HEADER)) == (502, ["bad_upstream_response"])
    assert (after.status, after.body) == (200, b"ok")
    assert raw.connections == 2


async def test_head_between_bodies_in_pieces(
    token_server: StandInTokenServer, bypassed: list[tuple[int, int]]
) -> None:
    """GET, HEAD, GET on one upstream connection, the GET bodies in pieces: each answer is
    read with the parser its request needs."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    head = b"HEAD /items HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    respond = in_turn(in_pieces(answer, [43, 45]), canned(answer[:39]), in_pieces(answer, [43, 45]))
    async with proxy_in_front_of(token_server, respond) as (raw, proxy):
        first = await exchange(proxy.port, GET)
        second = await exchange(proxy.port, head, method="HEAD")
        third = await exchange(proxy.port, GET)
    assert (first.status, first.body) == (200, b"0123456789")
    assert (second.status, second.header("Content-Length"), second.body) == (200, ["10"], b"")
    assert (third.status, third.body) == (200, b"0123456789")
    assert raw.connections == 1
    assert len([read for read, due in bypassed if read == due]) == 2  # each GET body's end


@pytest.mark.parametrize(
    ("interim", "status"),
    [
        (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", 200),
        (b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n", 200),
        (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n", 200),
        (b"HTTP/1.1 102 Processing\r\n\r\n", 200),
        (b"HTTP/1.1 150 Odd\r\nContent-Length: 5\r\n\r\nhello", 502),
        (b"HTTP/1.1 104 Odd\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300_000, 502),
    ],
    ids=[
        "early-hints",
        "early-hints-length",
        "continue-length",
        "processing",
        "with-body",
        "with-large-body",
    ],
)
async def test_interim_answers(
    token_server: StandInTokenServer, interim: bytes, status: int
) -> None:
    """Interim answers are not relayed; the final answer is. One that comes with a body (the
    parser reads one for 104-199 with a length) is framed two ways: a 502 at once, never a
    wait on a body nobody reads."""
    async with proxy_in_front_of(token_server, canned(interim + OK)) as (_raw, proxy):
        answer = await exchange(proxy.port, GET)
    assert answer.status == status
    if status == 200:
        assert answer.body == b"ok"  # the first head read is the final answer's
    else:
        assert answer.header(ERROR_HEADER) == ["bad_upstream_response"]


async def test_a_connection_idle_too_long_is_not_used_again(
    token_server: StandInTokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection unused for IDLE_LIFETIME is closed rather than risked."""
    monkeypatch.setattr(upstream_pool, "IDLE_LIFETIME", 1.0)
    async with proxy_in_front_of(token_server) as (raw, proxy):
        await exchange(proxy.port, GET)
        await exchange(proxy.port, GET)  # within the lifetime: same connection
        await asyncio.sleep(1.2)
        late = await exchange(proxy.port, GET)
    assert late.status == 200
    assert raw.connections == 2


async def test_the_upstreams_keep_alive_timeout_is_respected(
    token_server: StandInTokenServer,
) -> None:
    """``Keep-Alive: timeout=N`` from the upstream: a connection is not reused in the last
    second before the upstream would close it."""
    answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=3\r\nContent-Length: 2\r\n\r\nok"
    async with proxy_in_front_of(token_server, canned(answer)) as (raw, proxy):
        await exchange(proxy.port, GET)
        await exchange(proxy.port, GET)  # at once: the same connection
        await asyncio.sleep(2.2)
        late = await exchange(proxy.port, GET)
    assert (late.status, late.body) == (200, b"ok")
    assert raw.connections == 2


def sockets_to(port: int) -> int:
    """How many of this process's open sockets are connected to 127.0.0.1:``port``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[2] == wanted and row[9] in inodes)


async def start_upload(port: int, size: int) -> tuple[asyncio.StreamReader, asyncio.Task[None]]:
    """Send a PUT of ``size`` bytes through the proxy in the background; (reader, sender)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /big HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % size)

    async def send_body() -> None:
        try:
            with contextlib.suppress(ConnectionError):
                for _ in range(size // 65536):
                    writer.write(b"x" * 65536)
                    await writer.drain()
        finally:
            writer.transport.abort()

    return reader, asyncio.create_task(send_body())


async def test_an_upload_the_upstream_stops_reading_does_not_hold_a_socket(
    token_server: StandInTokenServer,
) -> None:
    """The upstream answers an upload early and reads no more of it: the proxy relays the
    answer and lets go of that connection at once, rather than wait for ever to send the rest."""
    done = asyncio.Event()

    async def refuse_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)  # reads nothing: the proxy's sends pile up, unsent
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await done.wait()  # and still reads nothing
        writer.close()

    try:
        async with proxy_before(token_server, refuse_then_stall) as (proxy, port):
            reader, sender = await start_upload(proxy.port, 32 * 1024 * 1024)
            async with asyncio.timeout(5):
                response = await read_response(reader)
            await wait_for(lambda: sockets_to(port) == 0, timeout=2)
            sender.cancel()
    finally:
        done.set()
    assert response.status == 413


async def test_an_upstream_that_stops_taking_an_upload_is_a_504(
    token_server: StandInTokenServer,
) -> None:
    """A stall is a stall in either direction: an upload the upstream stops reading ends in a
    504 after upstream.read_timeout, not in a request that hangs."""
    stalled: list[bytes] = []
    done = asyncio.Event()

    async def swallow_head_then_stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stalled.append(await reader.readuntil(b"\r\n\r\n"))
        await done.wait()  # never reads the body, never answers
        writer.close()

    try:
        async with proxy_before(
            token_server, swallow_head_then_stall, upstream={"read_timeout": 0.5}
        ) as (proxy, _):
            # More than loopback socket buffers hold.
            reader, sender = await start_upload(proxy.port, 64 * 1024 * 1024)
            started = time.monotonic()
            async with asyncio.timeout(10):
                response = await read_response(reader)
            waited = time.monotonic() - started
            sender.cancel()
    finally:
        done.set()
    assert response.status == 504
    assert response.header(ERROR_HEADER) == ["upstream_timeout"]
    assert len(stalled) == 1
    assert waited < 5


async def test_a_client_that_hangs_up_frees_the_upstream_connection(
    token_server: StandInTokenServer,
) -> None:
    """A request abandoned while the upstream thinks closes that upstream connection: it
    cannot carry the late answer to someone else, and it does not linger open."""
    asked, closed = asyncio.Event(), asyncio.Event()

    async def think_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        await reader.read()  # returns at EOF: when the proxy closes its side
        closed.set()
        writer.close()

    async with proxy_before(token_server, think_forever) as (proxy, _):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(GET)
        await writer.drain()
        async with asyncio.timeout(5):
            await asked.wait()
        writer.close()
        async with asyncio.timeout(5):
            await closed.wait()
