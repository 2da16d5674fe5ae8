"""The client side of the proxy: framing both ways, pipelining, slow readers, early answers."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream

from .rawhttp import canned, exchange, read_response
from .support import ProxyFactory, proxy_before, proxy_in_front_of, wait_for, wait_ready

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


async def test_a_malformed_request_behind_one_being_answered_gets_its_400(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """A bad request that arrives while the one before it is answered is answered too, in
    order, before the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /slow/0.3 HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: bool(upstream.received), timeout=5)
        writer.write(b"GET /two HTTP/1.1\r\nHost: p\r\nBad Header\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            first = await read_response(reader)
            second = await read_response(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert (first.status, second.status, rest) == (200, 400, b"")
    assert [r.target for r in upstream.received] == ["/slow/0.3"]


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
