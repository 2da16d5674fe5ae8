"""Hardening, byte for byte: malformed requests stop at the proxy, faults get honest answers.

Every request here is written to a raw socket (an HTTP client library would tidy it up), and
every check looks at what the stand-in upstream actually received. What aiohttp's parser
rejects on its own is tested too, so an upgrade that loosens it is caught.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
import pytest

from proxy.app import TOKENS
from proxy.config import ServerSettings
from proxy.errors import ERROR_HEADER
from proxy.headers import HeaderMemo
from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream

from .rawhttp import RawRequest, canned, exchange, read_response
from .support import (
    ProxyFactory,
    make_settings,
    proxy_before,
    proxy_in_front_of,
    wait_for,
    wait_ready,
)

POST = b"POST /x HTTP/1.1\r\nHost: p\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

MALFORMED = [
    # Content-Length confusion
    ("cl-and-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two-cl", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-minus", POST + b"Content-Length: -1\r\n\r\nhello", 400),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-underscore", POST + b"Content-Length: 1_0\r\n\r\nhellohello", 400),
    ("cl-two-numbers", POST + b"Content-Length: 5 5\r\n\r\nhello", 400),
    ("cl-empty", POST + b"Content-Length: \r\n\r\nhello", 400),
    # Disguised Transfer-Encoding
    ("te-leading-space", POST + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-leading-tab", POST + b"\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-control-byte", POST + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-comma-chunked", POST + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-chunked-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    (
        "te-twice",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-on-http10",
        b"POST /x HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # Bad chunks
    ("chunk-0x", CHUNKED + b"0x1\r\na\r\n0\r\n\r\n", 400),
    ("chunk-underscore", CHUNKED + b"1_0\r\naaaaaaaaaaaaaaaa\r\n0\r\n\r\n", 400),
    ("chunk-negative", CHUNKED + b"-1\r\na\r\n0\r\n\r\n", 400),
    ("chunk-leading-space", CHUNKED + b" 1\r\na\r\n0\r\n\r\n", 400),
    ("chunk-junk", CHUNKED + b"1junk\r\na\r\n0\r\n\r\n", 400),
    ("chunk-more-data", CHUNKED + b"1\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-missing-crlf", CHUNKED + b"1\r\na0\r\n\r\n", 400),
    ("chunk-bare-lf", CHUNKED + b"1\na\n0\n\n", 400),
    ("chunk-bare-cr", CHUNKED + b"1\ra\r0\r\r", 400),
    ("chunk-ext-cr", CHUNKED + b"1;a\rb\r\na\r\n0\r\n\r\n", 400),
    ("chunk-ext-lf", CHUNKED + b"1;a\nb\r\na\r\n0\r\n\r\n", 400),
    ("chunk-ext-nul", CHUNKED + b"1;a\x00b\r\na\r\n0\r\n\r\n", 400),
    # Malformed headers
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: a\rb\r\n\r\n", 400),
    ("nul-in-value", b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n\r\n", 400),
    ("empty-name", b"GET /x HTTP/1.1\r\nHost: p\r\n: v\r\n\r\n", 400),
    ("non-token-name", b"GET /x HTTP/1.1\r\nHost: p\r\nX(A): v\r\n\r\n", 400),
    ("no-colon", b"GET /x HTTP/1.1\r\nHost: p\r\nNoColon\r\n\r\n", 400),
    ("space-before-first-header", b"GET /x HTTP/1.1\r\n Host: p\r\n\r\n", 400),
    ("host-missing", b"GET /x HTTP/1.1\r\n\r\n", 400),
    ("host-doubled", b"GET /x HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n", 400),
    ("host-userinfo", b"GET /x HTTP/1.1\r\nHost: user@p\r\n\r\n", 400),
    # Versions: 505 where the version is well-formed but not ours (RFC 9110 15.6.6)
    ("http-0.9", b"GET /x HTTP/0.9\r\nHost: p\r\n\r\n", 505),
    ("http-2.0", b"GET /x HTTP/2.0\r\nHost: p\r\n\r\n", 505),
    ("http-1.01", b"GET /x HTTP/1.01\r\nHost: p\r\n\r\n", 400),
    # Sizes
    ("long-request-line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: p\r\n\r\n", 414),
    ("long-header", b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (
        "too-many-headers",
        b"GET /x HTTP/1.1\r\nHost: p\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(200))
        + b"\r\n",
        431,
    ),
]


async def _send_and_read_to_close(
    port: int, data: bytes, *, piece: int = 0, pause: float = 0.0
) -> bytes:
    """Write ``data`` (in ``piece``-byte writes when set) and read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)] if piece else [data]
        for part in pieces:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        async with asyncio.timeout(5):
            return await reader.read(-1)  # to EOF: the proxy must close after a framing error
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(("data", "status"), [(d, s) for _, d, s in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])  # fmt: skip
async def test_malformed_request_never_reaches_the_upstream(
    proxy: Proxy, upstream: StandInUpstream, data: bytes, status: int
) -> None:
    """Rejected with the right status, connection closed, zero bytes upstream, still serving."""
    answer = await _send_and_read_to_close(proxy.port, data)
    assert answer.startswith(b"HTTP/"), answer[:80]  # aiohttp answers in the request's version
    assert int(answer.split(b" ", 2)[1]) == status
    body = answer.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]
    assert upstream.received == []
    after = await exchange(proxy.port, b"GET /next HTTP/1.1\r\nHost: p\r\n\r\n")
    assert after.status == 200


@pytest.mark.parametrize(
    "name", ["long-request-line", "long-header", "too-many-headers", "obs-fold"]
)
async def test_oversized_or_malformed_head_sent_a_few_bytes_at_a_time(
    proxy: Proxy, upstream: StandInUpstream, name: str
) -> None:
    """Limits hold when the head trickles in: the parser counts across reads."""
    data, status = next((d, s) for n, d, s in MALFORMED if n == name)
    answer = await _send_and_read_to_close(proxy.port, data, piece=7)
    assert int(answer.split(b" ", 2)[1]) == status
    assert upstream.received == []


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: "
        b"dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    ],
    ids=["websocket", "h2c"],
)
async def test_upgrade_never_opens_a_tunnel(
    proxy: Proxy, upstream: StandInUpstream, upgrade: bytes
) -> None:
    """Upgrade is hop-by-hop: the upstream sees a plain request and the client never gets 101."""
    response = await exchange(proxy.port, b"GET /ws HTTP/1.1\r\nHost: p\r\n" + upgrade + b"\r\n")
    assert response.status == 200
    seen = upstream.received[-1]
    assert seen.header("Upgrade") == []
    assert seen.header("Connection") == []
    assert seen.header("HTTP2-Settings") == []


async def test_pipelined_requests_get_answers_in_order(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Two requests in one write get two answers, in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"GET /one HTTP/1.1\r\nHost: p\r\n\r\nPOST /two HTTP/1.1\r\nHost: p\r\n"
            b"Content-Length: 3\r\n\r\nabc"
        )
        await writer.drain()
        first = await asyncio.wait_for(read_response(reader), 5)
        second = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert json.loads(first.body)["target"] == "/one"
    assert json.loads(second.body)["target"] == "/two"
    assert [r.target for r in upstream.received] == ["/one", "/two"]


async def test_malformed_pipelined_request_is_never_forwarded(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """A bad request after a good one in the same write: 400, close, nothing bad upstream.

    Known difference: aiohttp's compiled parser drops the good first request when the same
    read also holds the bad one, so it goes unanswered rather than answered before the 400.
    """
    answer = await _send_and_read_to_close(
        proxy.port,
        b"GET /one HTTP/1.1\r\nHost: p\r\n\r\nGET /two HTTP/1.1\r\nHost: p\r\nBad Header\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: p\r\n\r\n",
    )
    assert b" 400 " in answer.split(b"\r\n", 1)[0] or b"HTTP/1.1 200" in answer
    assert answer.count(b"HTTP/1.") <= 2
    assert all(r.target == "/one" for r in upstream.received)


async def test_smuggled_request_in_a_body_stays_a_body(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Bytes that look like a request inside a declared body are forwarded as that body."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: p\r\n\r\n"
    response = await exchange(
        proxy.port, POST + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    )
    assert response.status == 200
    assert [r.target for r in upstream.received] == ["/x"]
    assert upstream.received[0].body_size == len(smuggled)


# --- the token stays home -----------------------------------------------------------------------


async def test_exactly_one_authorization_reaches_the_upstream(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """Several client Authorization headers, Proxy-Authorization, Connection: Authorization."""
    await exchange(
        proxy.port,
        b"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n"
        b"Proxy-Authorization: Basic eDp5\r\nConnection: Authorization, X-Logicdrop-ApiKey\r\n"
        b"X-Logicdrop-ApiKey: k\r\n\r\n",
    )
    seen = upstream.received[-1]
    assert seen.header("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert seen.header("Proxy-Authorization") == []


async def test_error_bodies_never_echo_request_bytes(proxy: Proxy) -> None:
    """Whatever the client sent, the proxy's error answer is in its own words."""
    marker = b"echo-marker-7f3a"
    for data in (
        b"GET /" + marker + b"\x00 HTTP/1.1\r\nHost: p\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: p\r\nX-" + marker + b": a\x00b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: " + marker + b"@p\r\n\r\n",
        b"CONNECT " + marker + b":443 HTTP/1.1\r\nHost: p\r\n\r\n",
    ):
        answer = await _send_and_read_to_close(proxy.port, data)
        assert answer.startswith(b"HTTP/1."), answer[:60]
        assert marker not in answer


# --- faults ---------------------------------------------------------------------------------------


async def test_upstream_header_with_cr_lf_is_a_502(token_server: StandInTokenServer) -> None:
    """A response header broken by a bare CR is refused (502), never relayed."""
    answer = b"HTTP/1.1 200 OK\r\nX-Bad: a\rInjected: yes\r\nContent-Length: 2\r\n\r\nok"

    async def bad(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with proxy_in_front_of(token_server, bad) as (_raw, proxy):
        response = await exchange(proxy.port, b"GET /bad HTTP/1.1\r\nHost: p\r\n\r\n")
        after = await exchange(proxy.port, b"GET /-/healthz HTTP/1.1\r\nHost: p\r\n\r\n")
    assert response.status == 502
    assert response.header(ERROR_HEADER) == ["bad_upstream_response"]
    assert response.header("Injected") == []
    assert after.status == 200


async def test_upstream_body_longer_than_its_length_never_passes_the_extra(
    token_server: StandInTokenServer,
) -> None:
    """Bytes past Content-Length never reach the client; in one read they make the answer 502."""

    async def long(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA-BYTES")
        await writer.drain()
        writer.close()

    async with proxy_in_front_of(token_server, long) as (_raw, proxy):
        response = await exchange(proxy.port, b"GET /long HTTP/1.1\r\nHost: p\r\n\r\n")
    # The upstream pool's parser sees the extra bytes with the answer and refuses the whole
    # response: an honest 502 rather than a guess at which bytes were meant.
    assert (response.status, response.header(ERROR_HEADER)) == (502, ["bad_upstream_response"])
    assert b"EXTRA" not in response.body


async def test_stale_pooled_connection_is_retried_for_idempotent_requests(
    token_server: StandInTokenServer,
) -> None:
    """The upstream closes an idle pooled connection: the next GET is retried on a new one."""

    async def once(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # advertised keep-alive, then closed while idle

    async with proxy_in_front_of(token_server, once) as (raw, proxy):
        first = await exchange(proxy.port, b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n")
        await asyncio.sleep(0.2)
        second = await exchange(proxy.port, b"GET /b HTTP/1.1\r\nHost: p\r\n\r\n")
    assert first.status == second.status == 200
    assert raw.connections == 2


async def test_busy_pool_waits_a_bounded_time_then_503(
    start_proxy: ProxyFactory, upstream: StandInUpstream
) -> None:
    """More long requests than pooled connections: the extra one gets 503 after pool_timeout."""
    async with start_proxy(upstream={"pool_size": 2, "pool_timeout": 0.5}) as proxy:
        await wait_ready(proxy)
        slow = [
            asyncio.create_task(exchange(proxy.port, b"GET /slow/3 HTTP/1.1\r\nHost: p\r\n\r\n"))
            for _ in range(2)
        ]
        await wait_for(lambda: len(upstream.received) == 2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        extra = await exchange(proxy.port, b"GET /extra HTTP/1.1\r\nHost: p\r\n\r\n")
        waited = loop.time() - started
        done = await asyncio.gather(*slow)
    assert extra.status == 503
    assert extra.header(ERROR_HEADER) == ["upstream_busy"]
    assert extra.header("Retry-After") == ["1"]
    assert 0.5 <= waited < 2.5  # not until a pooled connection came free (3 s)
    assert [r.status for r in done] == [200, 200]


async def test_token_endpoint_timeout_is_named(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """A token endpoint that never answers: token_timeout after auth.timeout, then 503."""
    token_server.failures = ["stall"]
    async with start_proxy(auth={"timeout": 0.3, "max_backoff": 30.0}) as proxy:
        tokens = proxy.app[TOKENS]
        await wait_for(lambda: tokens.last_error is not None)
        assert tokens.last_error is not None
        assert tokens.last_error.code == "token_timeout"
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 503


# --- clients that misbehave ---------------------------------------------------------------------


async def test_dribbled_headers_are_cut_off(
    start_proxy: ProxyFactory, upstream: StandInUpstream
) -> None:
    """One byte every 0.2 s: 408 and a closed connection after header_timeout, nothing upstream."""
    async with start_proxy(server={"header_timeout": 0.6}) as proxy:
        await wait_ready(proxy)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await _send_and_read_to_close(
            proxy.port, b"GET /slowloris HTTP/1.1\r\nHost: p\r\nX-A: " + b"a" * 100,
            piece=1, pause=0.2,
        )  # fmt: skip
        elapsed = loop.time() - started
    # The 408 is written before the close; a client still writing may see a reset instead.
    assert answer.startswith(b"HTTP/1.1 408") or answer == b""
    assert elapsed < 3
    assert upstream.received == []


async def test_idle_connections_are_closed(start_proxy: ProxyFactory) -> None:
    """Hundreds of sockets that never send a byte are closed after keepalive_timeout."""
    async with start_proxy(server={"keepalive_timeout": 0.5}) as proxy:
        await wait_ready(proxy)
        sockets = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(300)]
        try:
            async with asyncio.timeout(5):
                eofs = await asyncio.gather(*(reader.read() for reader, _ in sockets))
        finally:
            for _, writer in sockets:
                writer.close()
    assert eofs == [b""] * 300


async def test_connections_over_the_limit_get_503(start_proxy: ProxyFactory) -> None:
    """Over max_connections, a new connection is answered 503 and closed; room frees up."""
    get_x = b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n"
    async with start_proxy(server={"max_connections": 20}) as proxy:
        await wait_ready(proxy)
        held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
        try:
            refused = await _send_and_read_to_close(proxy.port, get_x)
        finally:
            for _, writer in held:
                writer.close()
        async with asyncio.timeout(5):  # room frees up as the proxy sees the closes
            while (accepted := await exchange(proxy.port, get_x)).status == 503:
                await asyncio.sleep(0.05)
    assert refused.startswith(b"HTTP/1.1 503")
    assert b"too_many_connections" in refused
    assert accepted.status == 200


async def test_stalled_upload_is_cut_off_with_408(
    start_proxy: ProxyFactory, upstream: StandInUpstream
) -> None:
    """A body that stops arriving: 408 after body_timeout (streamed and buffered bodies alike)."""
    async with start_proxy(server={"body_timeout": 0.3}) as proxy:
        await wait_ready(proxy)
        for length in (10, 1_000_000):  # buffered for replay / streamed
            answer = await _send_and_read_to_close(
                proxy.port, POST + b"Content-Length: %d\r\n\r\nabc" % length
            )
            assert answer.startswith(b"HTTP/1.1 408"), answer[:40]


@pytest.mark.parametrize("length", [40_000, 400_000], ids=["buffered", "streamed"])
async def test_a_body_that_keeps_coming_is_not_cut_off(
    start_proxy: ProxyFactory, upstream: StandInUpstream, length: int
) -> None:
    """body_timeout bounds each wait for the next bytes, not the whole body: one that trickles
    in, every piece well within it, arrives whole though it takes longer than body_timeout."""
    body = os.urandom(length)
    # 16 pieces 0.1 s apart take 1.6 s: longer than the timeout, and a stall of the loop
    # shorter than 0.9 s (a busy machine) still cannot look like the client's.
    async with start_proxy(server={"body_timeout": 1.0}) as proxy:
        await wait_ready(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(POST + b"Content-Length: %d\r\n\r\n" % length)
        piece = length // 16
        for start in range(0, length, piece):
            await asyncio.sleep(0.1)
            writer.write(body[start : start + piece])
            await writer.drain()
        async with asyncio.timeout(5):
            response = await read_response(reader)
        writer.close()
    assert response.status == 200
    assert upstream.received[-1].body_sha256 == hashlib.sha256(body).hexdigest()


async def test_an_upstream_slow_to_take_a_body_is_not_the_clients_stall(
    token_server: StandInTokenServer,
) -> None:
    """body_timeout times the client only: while the upstream stops taking the body (longer
    than body_timeout), the proxy stops reading the client, and that wait is nobody's stall."""
    length = 16 * 1024 * 1024  # more than loopback buffers hold: the proxy's writes wait
    taken: list[int] = []

    async def pause_then_take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got = len(await reader.readexactly(1024 * 1024))
        await asyncio.sleep(1.0)  # takes nothing for over three body_timeouts
        got += len(await reader.readexactly(length - got))
        taken.append(got)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the proxy lets go of the connection
        writer.close()

    async with proxy_before(
        token_server, pause_then_take, server={"body_timeout": 0.3}, upstream={"read_timeout": 5}
    ) as (proxy, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(POST + b"Content-Length: %d\r\n\r\n" % length)
        chunk = os.urandom(65536)
        for _ in range(length // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        async with asyncio.timeout(10):
            response = await read_response(reader)
        writer.close()
    assert (response.status, response.body) == (200, b"ok")
    assert taken == [length]


async def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_client_disconnects_free_everything(
    start_proxy: ProxyFactory, upstream: StandInUpstream
) -> None:
    """Hang-ups mid-upload and mid-download free their upstream slot, fds and tasks."""
    async with start_proxy(upstream={"pool_size": 4, "pool_timeout": 5}) as proxy:
        await wait_ready(proxy)
        await exchange(proxy.port, b"GET /warm HTTP/1.1\r\nHost: p\r\n\r\n")
        await asyncio.sleep(0.1)
        fds, tasks = await _open_fds(), len(asyncio.all_tasks())
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(POST + b"Content-Length: 10000000\r\n\r\n" + b"x" * 200_000)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.transport.abort()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: p\r\n\r\n")
            await writer.drain()
            await reader.readexactly(100_000)
            writer.transport.abort()
        await wait_for(lambda: len(asyncio.all_tasks()) <= tasks, timeout=5)
        await asyncio.sleep(0.3)
        assert await _open_fds() <= fds + 4  # a few pooled upstream connections may stay open
        # 40 hang-ups through a pool of 4: had one slot leaked, these would wait, then 503.
        after = await asyncio.gather(
            *(exchange(proxy.port, b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n") for _ in range(8))
        )
    assert [a.status for a in after] == [200] * 8


# --- browsers and DNS rebinding -----------------------------------------------------------------


async def test_default_allowed_hosts_refuse_other_names(
    token_server: StandInTokenServer, upstream: StandInUpstream
) -> None:
    """With the default allow-list, a rebinding page's Host gets 421; loopback names pass."""
    settings = make_settings(
        token_server, upstream, server={"allowed_hosts": ServerSettings().allowed_hosts}
    )
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        evil = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: evil.example:8080\r\n\r\n")
        answers = [
            await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            for host in (b"localhost:8080", b"127.0.0.1", b"[::1]:8080", b"LOCALHOST")
        ]
    assert evil.status == 421
    assert evil.header(ERROR_HEADER) == ["host_not_allowed"]
    assert [a.status for a in answers] == [200, 200, 200, 200]
    assert len(upstream.received) == 4


@pytest.mark.parametrize(
    "browser",
    [b"Origin: http://evil.example\r\n", b"Sec-Fetch-Site: cross-site\r\n", b"Origin: null\r\n"],
    ids=["foreign-origin", "sec-fetch-cross-site", "null-origin"],
)
async def test_cross_site_browser_requests_are_refused(
    proxy: Proxy, upstream: StandInUpstream, browser: bytes
) -> None:
    """A page on another site cannot spend the proxy's token: 403, nothing upstream."""
    response = await exchange(
        proxy.port,
        b"POST /delete HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n" + browser + b"\r\n",
    )
    assert response.status == 403
    assert response.header(ERROR_HEADER) == ["cross_site_request"]
    assert upstream.received == []


async def test_same_site_browser_requests_pass(proxy: Proxy, upstream: StandInUpstream) -> None:
    """A local dev app (Origin on an allowed host, same-site fetch) may use the proxy."""
    response = await exchange(
        proxy.port,
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://localhost:3000\r\n"
        b"Sec-Fetch-Site: same-site\r\n\r\n",
    )
    assert response.status == 200
    assert len(upstream.received) == 1


async def test_a_header_list_seen_before_is_judged_again_in_another_version(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Checks are remembered per header list *and* version: chunked passes in HTTP/1.1 only."""
    head = b"POST /x HTTP/%s\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"2\r\nok\r\n0\r\n\r\n"
    first = await exchange(proxy.port, head % b"1.1" + body)
    again = await exchange(proxy.port, head % b"1.1" + body)
    old = await exchange(proxy.port, head % b"1.0" + body)
    assert [first.status, again.status, old.status] == [200, 200, 400]
    assert old.header(ERROR_HEADER) == ["bad_request"]
    assert [r.body_size for r in upstream.received] == [2, 2]


async def test_absolute_form_to_a_reserved_path_is_not_forwarded(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """``GET http://x/-/metrics`` is the proxy's own path, never the upstream's."""
    response = await exchange(proxy.port, b"GET http://p/-/metrics HTTP/1.1\r\nHost: p\r\n\r\n")
    assert response.status == 200
    assert b"sparks_proxy_requests_total" in response.body
    assert upstream.received == []


@pytest.mark.parametrize("expect", [b"foo", b"100-continue, foo"])
async def test_unsupported_expect_is_417_even_without_a_body(
    proxy: Proxy, upstream: StandInUpstream, expect: bytes
) -> None:
    """Only 100-continue is understood; anything else is refused whatever the body, also when
    an idle pooled connection could have taken the request at once."""
    request = b"GET /x HTTP/1.1\r\nHost: p\r\nExpect: %b\r\n\r\n" % expect
    cold = await exchange(proxy.port, request)
    warm = await exchange(proxy.port, b"GET /warm HTTP/1.1\r\nHost: p\r\n\r\n")
    pooled = await exchange(proxy.port, request)  # an upstream connection is idle now
    assert (cold.status, warm.status, pooled.status) == (417, 200, 417)
    assert pooled.header(ERROR_HEADER) == ["expectation_failed"]
    assert [r.target for r in upstream.received] == ["/warm"]


async def test_connection_closes_after_an_upgrade_request(proxy: Proxy) -> None:
    """After a request that asked to upgrade, the connection is closed, not reused."""
    answer = await _send_and_read_to_close(
        proxy.port,
        b"GET /ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    # _send_and_read_to_close reads to EOF: reaching it means the proxy closed the connection.
    assert answer.startswith(b"HTTP/1.1 200")


async def test_header_bytes_that_would_change_are_refused(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Latin-1 bytes would be altered on the way through: 400. UTF-8 passes byte for byte."""
    refused = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: caf\xe9!\r\n\r\n")
    assert refused.status == 400
    assert upstream.received == []
    response = await exchange(
        proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: caf\xc3\xa9!\r\n\r\n"
    )
    assert response.status == 200
    raw = [v for k, v in upstream.received[-1].headers if k == "X-A"]
    assert [v.encode("latin-1") for v in raw] == [b"caf\xc3\xa9!"]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-A: caf\xe9!\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    ],
    ids=["non-ascii-header", "unsolicited-101", "control-byte-in-header", "space-before-colon"],
)
async def test_upstream_answers_the_proxy_cannot_relay_faithfully_are_502(
    token_server: StandInTokenServer, answer: bytes
) -> None:
    """Bytes that would be altered or that a client may misread, or a protocol switch: 502
    rather than a changed answer."""
    async with proxy_in_front_of(token_server, canned(answer, close=True)) as (_raw, proxy):
        response = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
    assert response.status == 502


async def test_a_bug_is_counted_as_500_not_as_a_hang_up(token_server: StandInTokenServer) -> None:
    """An upstream reason phrase with a control byte: 502, and the access record agrees."""
    answer = b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok"
    async with proxy_in_front_of(token_server, canned(answer, close=True)) as (_raw, proxy):
        response = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
    assert response.status == 502
    assert response.header(ERROR_HEADER) == ["bad_upstream_response"]


async def test_fully_qualified_localhost_is_allowed(
    token_server: StandInTokenServer, upstream: StandInUpstream
) -> None:
    """``Host: localhost.`` (with the root dot) names the same host: not refused."""
    settings = make_settings(
        token_server, upstream, server={"allowed_hosts": ServerSettings().allowed_hosts}
    )
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        response = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: localhost.:80\r\n\r\n")
    assert response.status == 200


async def test_relayed_answers_gain_no_server_or_content_type(
    token_server: StandInTokenServer,
) -> None:
    """What the upstream did not send, the client does not get (Date excepted)."""
    async with proxy_in_front_of(
        token_server, canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    ) as (_raw, proxy):
        response = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
    names = {name.lower() for name, _ in response.headers}
    assert "server" not in names
    assert "content-type" not in names
    assert response.body == b"ok"


def test_remembered_header_lists_stay_bounded() -> None:
    """Whatever clients send, the memo of checked header lists holds a bounded amount."""
    memo: HeaderMemo[int] = HeaderMemo()
    small = ((b"Accept", b"*/*"),)
    for key in range(HeaderMemo.ENTRIES + 3):
        memo.remember(key, small, key)
    remembered = [key for key in range(HeaderMemo.ENTRIES + 3) if memo.get(key) is not None]
    assert remembered == [HeaderMemo.ENTRIES, HeaderMemo.ENTRIES + 1, HeaderMemo.ENTRIES + 2]
    huge = ((b"Cookie", b"c" * HeaderMemo.MAX_BYTES),)
    memo.remember("huge", huge, 1)
    assert memo.get("huge") is None
