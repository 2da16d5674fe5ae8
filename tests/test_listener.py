"""The client side of the proxy: framing both ways, pipelining, slow readers, early answers."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import socket
import time

import pytest

from proxy import listener
from proxy.app import FORWARDER
from proxy.errors import ERROR_HEADER
from proxy.forward import Slots
from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream

from .rawhttp import RawRequest, canned, exchange, read_response
from .support import (
    LogCapture,
    ProxyFactory,
    proxy_before,
    proxy_in_front_of,
    spy_on_bypass,
    wait_for,
    wait_ready,
)

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: up\r\n\r\n"


async def download_nobody_reads(port: int) -> asyncio.StreamWriter:
    """Ask the proxy for 50 MB and read none of it; the writer, to abort later."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: p\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the answer is under way and the buffers are filling
    return writer


@pytest.mark.parametrize("padding", [0, 70_000], ids=["buffered", "streamed"])
async def test_connection_cannot_strip_the_request_framing(
    token_server: StandInTokenServer, padding: int
) -> None:
    """``Connection: Content-Length`` must not turn a body into a second upstream request."""
    body = SMUGGLED + b"x" * padding
    request = (
        b"POST /a HTTP/1.1\r\nHost: p\r\nConnection: Content-Length\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    async with proxy_in_front_of(token_server) as (raw, proxy):
        response = await exchange(proxy.port, request)
        await asyncio.sleep(0.1)
    assert response.status == 200
    assert [r.start_line for r in raw.requests] == ["POST /a HTTP/1.1"]
    assert raw.requests[0].header("Content-Length") == [str(len(body))]
    assert raw.requests[0].body == body


async def test_connection_cannot_strip_the_answer_framing(
    token_server: StandInTokenServer,
) -> None:
    """An upstream's ``Connection: Content-Length`` leaves the client's framing intact."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
    async with proxy_in_front_of(token_server, canned(answer)) as (_raw, proxy):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for _ in range(2):  # the second answer proves the first one's end was clear
                writer.write(b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
                async with asyncio.timeout(5):
                    response = await read_response(reader)
                assert response.header("Content-Length") == ["5"]
                assert response.body == b"hello"
        finally:
            writer.close()


async def test_pipelined_requests_whose_answers_are_not_read_are_not_all_fetched(
    token_server: StandInTokenServer,
) -> None:
    """A client that pipelines requests and reads nothing gets no more fetched than its socket
    holds: the proxy answers the next request only when the last answer is on its way."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n" + b"x" * 60000
    async with proxy_in_front_of(token_server, canned(answer)) as (raw, proxy):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n" * 500)
            await writer.drain()
            await asyncio.sleep(1.0)
            fetched = len(raw.requests)
        finally:
            writer.transport.abort()
    assert 1 <= fetched < 250  # all 500 (30 MB held in the proxy) without the bound


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(
    start_proxy: ProxyFactory,
) -> None:
    """After server.send_timeout without taking bytes, the client is cut off; the one upstream
    connection it held serves the next client."""
    async with start_proxy(
        server={"send_timeout": 0.5}, upstream={"pool_size": 1, "pool_timeout": 5}
    ) as proxy:
        await wait_ready(proxy)
        writer = await download_nobody_reads(proxy.port)
        started = time.monotonic()
        after = await exchange(proxy.port, b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n", timeout=8)
        waited = time.monotonic() - started
        writer.transport.abort()
    assert after.status == 200
    assert waited < 4


async def test_an_early_upstream_answer_to_an_upload_ends_cleanly(
    token_server: StandInTokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream refuses a large upload before reading it: the client gets that answer, the
    rest of its body is read and dropped for a moment, then the connection closes."""

    async def refuse_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        writer.close()

    async with proxy_before(token_server, refuse_at_once) as (proxy, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            b"PUT /big HTTP/1.1\r\nHost: p\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000
        )
        await writer.drain()
        async with asyncio.timeout(6):
            response = await read_response(reader)
            rest = await reader.read()  # to EOF: the proxy closes the connection
        writer.close()
    assert (response.status, response.body) == (413, b"big!")
    assert rest == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def warm(proxy: Proxy) -> None:
    """One request, so a pooled upstream connection is idle: the next bodiless request is
    then answered from callbacks, without a task."""
    assert (await exchange(proxy.port, b"GET /warm HTTP/1.1\r\nHost: p\r\n\r\n")).status == 200


def serving_tasks() -> list[asyncio.Task[object]]:
    """The proxy's tasks answering client connections (the tests share its event loop)."""
    return [t for t in asyncio.all_tasks() if "ClientConnection._serve" in repr(t.get_coro())]


@pytest.mark.parametrize("pooled", [False, True], ids=["new-connection", "pooled-no-task"])
async def test_a_malformed_request_behind_one_being_answered_gets_its_400(
    proxy: Proxy, upstream: StandInUpstream, pooled: bool
) -> None:
    """A bad request that arrives while the one before it is answered is answered too, in
    order, before the connection closes."""
    if pooled:
        await warm(proxy)
        upstream.received.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /slow/1 HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: bool(upstream.received), timeout=5)
        assert bool(serving_tasks()) is not pooled
        writer.write(b"GET /two HTTP/1.1\r\nHost: p\r\nBad Header\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            first = await read_response(reader)
            second = await read_response(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert (first.status, second.status, rest) == (200, 400, b"")
    assert [r.target for r in upstream.received] == ["/slow/1"]


async def test_shutdown_does_not_wait_for_a_client_that_reads_nothing(
    start_proxy: ProxyFactory,
) -> None:
    """SIGTERM's grace is a bound: a client that takes nothing does not hold the exit."""
    async with start_proxy(server={"shutdown_grace": 0.5}) as proxy:
        await wait_ready(proxy)
        writer = await download_nobody_reads(proxy.port)
        started = time.monotonic()
    stopped_in = time.monotonic() - started
    writer.transport.abort()
    assert stopped_in < 3


async def test_pipelined_requests_behind_a_slow_body_are_all_answered(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """A request whose body comes late, then twenty pipelined behind it: twenty-one answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /slow/0.3 HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n" * 20)
        await writer.drain()
        async with asyncio.timeout(10):
            statuses = [(await read_response(reader)).status for _ in range(21)]
    finally:
        writer.close()
    assert statuses == [200] * 21
    assert len(upstream.received) == 21


async def test_many_pipelined_requests_are_all_answered_in_order(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Sixty requests in one write: parsing pauses and resumes along the queue, and every
    request gets its answer, in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"".join(b"GET /n%d HTTP/1.1\r\nHost: p\r\n\r\n" % i for i in range(60)))
        await writer.drain()
        async with asyncio.timeout(10):
            answers = [await read_response(reader) for _ in range(60)]
    finally:
        writer.close()
    assert [json.loads(a.body)["target"] for a in answers] == [f"/n{i}" for i in range(60)]


async def test_a_client_that_leaves_before_a_pending_answer_frees_slot_and_connection(
    token_server: StandInTokenServer, logs: LogCapture
) -> None:
    """A request answered from callbacks, abandoned while the upstream thinks: the upstream
    connection closes, the one slot serves the next request, the access log says 499."""
    stalled, closed = asyncio.Event(), asyncio.Event()

    async def stall_on_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                writer.close()  # the proxy closed this connection
                return
            if head.startswith(b"GET /stall "):
                stalled.set()
                await reader.read()  # returns at EOF: when the proxy closes its side
                closed.set()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with proxy_before(
        token_server, stall_on_request, upstream={"pool_size": 1}, log={"access": True}
    ) as (proxy, _):
        await warm(proxy)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /stall HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            await stalled.wait()
        assert serving_tasks() == []
        writer.close()
        async with asyncio.timeout(5):
            await closed.wait()
        after = await exchange(proxy.port, b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n")
    gc.collect()  # an exception never retrieved is reported when its future is collected
    assert after.status == 200
    assert [line for line in logs.lines if '"GET /stall"' in line and " 499 " in line]
    assert [line for line in logs.lines if line.startswith("ERROR")] == []


async def test_shutdown_finishes_a_pending_answer_first(
    start_proxy: ProxyFactory, upstream: StandInUpstream
) -> None:
    """SIGTERM while a request is answered from callbacks: its answer still comes, whole,
    with ``Connection: close``."""
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        await warm(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /slow/1 HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: len(upstream.received) == 2)
        assert serving_tasks() == []
        stopping = asyncio.create_task(proxy.stop())
        async with asyncio.timeout(5):
            response = await read_response(reader)
            await stopping
        writer.close()
    assert response.status == 200
    assert json.loads(response.body)["target"] == "/slow/1"
    assert response.header("Connection") == ["close"]


async def test_a_401_to_a_pending_request_is_retried_with_a_new_token(
    token_server: StandInTokenServer,
) -> None:
    """The upstream rejects the held token on a request answered from callbacks: the proxy
    fetches a new token and sends the request again, once."""

    async def reject_first_token(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        rejected = request.header("Authorization") == [f"Bearer {token_server.issued[0]}"]
        if rejected and request.start_line.startswith("GET /reject "):
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with proxy_in_front_of(token_server, reject_first_token) as (raw, proxy):
        await warm(proxy)
        response = await exchange(proxy.port, b"GET /reject HTTP/1.1\r\nHost: p\r\n\r\n")
    assert (response.status, response.body) == (200, b"ok")
    assert [r.start_line for r in raw.requests] == [
        "GET /warm HTTP/1.1",
        "GET /reject HTTP/1.1",
        "GET /reject HTTP/1.1",
    ]
    assert raw.requests[-1].header("Authorization") == [f"Bearer {token_server.issued[1]}"]


async def test_a_pending_request_the_upstream_never_answers_is_a_504(
    token_server: StandInTokenServer,
) -> None:
    """upstream.read_timeout holds for requests answered from callbacks too."""

    async def never_answer_stall(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.start_line.startswith("GET /stall "):
            await asyncio.sleep(30)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with proxy_in_front_of(
        token_server, never_answer_stall, upstream={"read_timeout": 0.3}
    ) as (_raw, proxy):
        await warm(proxy)
        response = await exchange(proxy.port, b"GET /stall HTTP/1.1\r\nHost: p\r\n\r\n")
    assert response.status == 504
    assert response.header(ERROR_HEADER) == ["upstream_timeout"]


async def test_pipelined_requests_answered_with_and_without_tasks_stay_in_order(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Sixty pipelined requests, slow and quick in turn, on a warm pool: reading pauses and
    resumes while answers alternate between callbacks and tasks; each is answered once, in
    order."""
    await asyncio.gather(*(warm(proxy) for _ in range(2)))
    targets = [f"/slow/0.02?n={i}" if i % 2 == 0 else f"/n{i}" for i in range(60)]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: p\r\n\r\n" % t.encode() for t in targets))
        await writer.drain()
        async with asyncio.timeout(10):
            answers = [await read_response(reader) for _ in targets]
    finally:
        writer.close()
    assert [json.loads(a.body)["target"] for a in answers] == targets


async def test_a_refused_upload_is_closed_at_once(start_proxy: ProxyFactory) -> None:
    """A 413 before the body is read closes the connection right after the answer: an unread
    body is not waited for when the connection closes anyway."""
    async with start_proxy(server={"max_body_size": 10}) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 1000\r\n\r\n")
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(5):
            response = await read_response(reader)
            rest = await reader.read()  # to EOF
        closed_in = time.monotonic() - started
        writer.close()
    assert (response.status, rest) == (413, b"")
    assert closed_in < 1.8  # LINGER (2 s) is for clients still sending, not for this one


async def test_a_client_gone_before_the_task_taking_up_its_answer_runs(
    start_proxy: ProxyFactory, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer needs a task (over 64 KiB) and the client's connection is lost before that
    task's first step (so it never runs): the slot, the in-flight count and the access line
    are settled all the same."""
    handed_over = listener.ClientConnection._hand_to_task

    def then_lost(self: listener.ClientConnection, pending: listener.Pending) -> None:
        handed_over(self, pending)
        self.connection_lost(None)  # as if the client's reset was processed first
        self.abort()

    async with start_proxy(
        upstream={"pool_size": 1, "pool_timeout": 0.5}, log={"access": True}
    ) as proxy:
        await wait_ready(proxy)
        await warm(proxy)
        monkeypatch.setattr(listener.ClientConnection, "_hand_to_task", then_lost)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /bytes/100000 HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: any(" 499 " in line for line in logs.lines))
        writer.close()
        monkeypatch.undo()
        after = await exchange(proxy.port, b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n")
        in_flight = proxy.app[FORWARDER].in_flight
    assert in_flight == 0
    assert after.status == 200  # a slot left taken would make this a 503 after 0.5 s


async def test_a_slot_given_back_as_its_waiter_gives_up_goes_to_the_next() -> None:
    """A wait for a slot cancelled (timeout, hang-up) just after the slot was handed to it:
    the cancellation stands and the slot is passed on, not lost."""
    slots = Slots(1)
    assert slots.take_now()
    waiting = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give()  # handed to the waiter...
    waiting.cancel()  # ...which gives up before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.take_now()
    assert not slots.take_now()


# -- request bodies of known length read around the parser ------------------------------------

AFTER = b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n"


@pytest.fixture
def bypassed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(bytes read, body bytes still due) for each read that went around the request parser."""
    return spy_on_bypass(monkeypatch, listener.ClientConnection)


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes, cuts: list[int]) -> None:
    """Write ``data`` in pieces ending at ``cuts``, a pause between each (one read each)."""
    start = 0
    for end in [*cuts, len(data)]:
        writer.write(data[start:end])
        await writer.drain()
        await asyncio.sleep(0.02)
        start = end


def post_head(body: bytes, fields: bytes = b"") -> bytes:
    """The head of a POST of ``body`` to /up, with ``fields`` among its header fields."""
    return b"POST /up HTTP/1.1\r\nHost: p\r\n%bContent-Length: %d\r\n\r\n" % (fields, len(body))


@pytest.mark.parametrize("length", [40_000, 1_000_000], ids=["buffered", "streamed"])
async def test_an_upload_in_pieces_then_the_next_request(
    proxy: Proxy, upstream: StandInUpstream, bypassed: list[tuple[int, int]], length: int
) -> None:
    """A body of known length that arrives over many reads (when streamed, more than the proxy
    buffers at once) reaches the upstream byte for byte; the request that follows it in the
    same read is read as a request."""
    body = os.urandom(length)
    head = post_head(body)
    cuts = [len(head) + 100, len(head) + length // 3, len(head) + length // 3 + 1]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await send_in_pieces(writer, head + body + AFTER, cuts)
        async with asyncio.timeout(10):
            answers = [await read_response(reader) for _ in range(2)]
    finally:
        writer.close()
    assert [a.status for a in answers] == [200, 200]
    assert [r.target for r in upstream.received] == ["/up", "/after"]
    assert upstream.received[0].body_sha256 == hashlib.sha256(body).hexdigest()
    assert len(bypassed) >= 3
    read, due = bypassed[-1]
    assert read - due == len(AFTER)  # the last read: the body's end, then the next request


@pytest.mark.parametrize(
    ("after", "later", "statuses", "targets"),
    [
        (b"", AFTER, [200, 200], ["/up", "/after"]),
        (AFTER * 30, b"", [200] * 31, ["/up"] + ["/after"] * 30),
        (AFTER[:20], AFTER[20:], [200, 200], ["/up", "/after"]),
        (b"\x00garbage\r\n\r\n", b"", [200, 400], ["/up"]),
    ],
    ids=["later", "pipelined", "begun", "garbage"],
)
async def test_bytes_after_an_upload_in_pieces(
    proxy: Proxy,
    upstream: StandInUpstream,
    bypassed: list[tuple[int, int]],
    after: bytes,
    later: bytes,
    statuses: list[int],
    targets: list[str],
) -> None:
    """Where a body read around the parser ends, the parser takes over: what follows, in the
    same read or a later one, is parsed as the next requests (in order, however many), or
    answered 400 if it is not HTTP. None of it is body."""
    body = b"0123456789"
    head = post_head(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await send_in_pieces(writer, head + body + after, [len(head), len(head) + 4])
        if later:
            writer.write(later)
        async with asyncio.timeout(10):
            answers = [await read_response(reader) for _ in statuses]
            if statuses[-1] == 400:
                assert await reader.read() == b""  # and the connection closes
    finally:
        writer.close()
    assert [a.status for a in answers] == statuses
    assert [r.target for r in upstream.received] == targets
    assert upstream.received[0].body_sha256 == hashlib.sha256(body).hexdigest()
    assert bypassed[-1] == (6 + len(after), 6)  # the body's last 6 bytes, and what followed


@pytest.mark.parametrize("after", [AFTER, b""], ids=["request-behind", "body-at-the-end"])
async def test_a_body_the_parser_had_whole_in_one_read(
    proxy: Proxy,
    upstream: StandInUpstream,
    bypassed: list[tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
    after: bytes,
) -> None:
    """A body over the reader's buffer that arrives whole in one read (a request behind it, or
    not): the parser stops after the body (the buffer is full), holding what follows, and ends
    the body itself when reading resumes. Nothing goes around it; what follows is served."""
    reads: list[int] = []
    data_received = listener.ClientConnection.data_received

    def spy(connection: listener.ClientConnection, data: bytes) -> None:
        reads.append(len(data))
        data_received(connection, data)

    monkeypatch.setattr(listener.ClientConnection, "data_received", spy)
    big = 1024 * 1024  # receive and send buffers that hold the whole write at once
    assert proxy._server is not None
    for server_socket in proxy._server.sockets:  # accepted connections inherit it
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, big)
    client = socket.create_connection(("127.0.0.1", proxy.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, big)
    reader, writer = await asyncio.open_connection(sock=client)
    body = os.urandom(3 * listener.READ_BUFFER)
    first = post_head(body) + body + after
    try:
        writer.write(first)  # sent before the proxy, on this event loop, reads any of it
        async with asyncio.timeout(5):
            answers = [await read_response(reader) for _ in range(2 if after else 1)]
            writer.write(post_head(b"abc") + b"abc")
            answers.append(await read_response(reader))
    finally:
        writer.close()
    assert reads[0] == len(first)
    targets = ["/up", "/after", "/up"] if after else ["/up", "/up"]
    assert [a.status for a in answers] == [200] * len(targets)
    assert [r.target for r in upstream.received] == targets
    assert upstream.received[0].body_sha256 == hashlib.sha256(body).hexdigest()
    assert upstream.received[-1].body_sha256 == hashlib.sha256(b"abc").hexdigest()
    assert bypassed == []


@pytest.mark.parametrize("length", [40_000, 1_000_000], ids=["buffered", "streamed"])
async def test_a_client_gone_in_the_middle_of_an_upload_in_pieces(
    proxy: Proxy, upstream: StandInUpstream, bypassed: list[tuple[int, int]], length: int
) -> None:
    """A body cut short after the parser was left behind never reaches the upstream as a
    whole request, and the proxy serves on."""
    body = os.urandom(length)
    head = post_head(body)
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await send_in_pieces(writer, head + body[: length // 2], [len(head) + 10, len(head) + 20])
    writer.transport.abort()
    await asyncio.sleep(0.2)
    assert bypassed
    assert bypassed[-1][0] < bypassed[-1][1]  # the body was still due when the client left
    answer = await exchange(proxy.port, AFTER)
    assert answer.status == 200
    assert [r.target for r in upstream.received] == ["/after"]


async def test_an_upgrade_request_body_is_read_by_the_parser(
    proxy: Proxy, upstream: StandInUpstream, bypassed: list[tuple[int, int]]
) -> None:
    """After an upgrade request the parser decides what the next bytes are: its body is not
    read around it, and what follows is never served as a request."""
    body = b"0123456789"
    head = post_head(body, b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await send_in_pieces(writer, head + body + AFTER, [len(head), len(head) + 4])
        async with asyncio.timeout(5):
            answer = await read_response(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert answer.status == 200
    assert rest == b""  # the connection closed after the answer
    assert bypassed == []
    assert [r.target for r in upstream.received] == ["/up"]
