"""Forwarding: what reaches the upstream, what comes back, byte for byte, through real sockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from urllib.parse import quote

import aiohttp
import pytest

from proxy import tokens
from proxy.errors import ERROR_HEADER
from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream

from .rawhttp import RawRequest, RawUpstream, Responder, canned, exchange, read_response
from .support import ProxyFactory, free_port, make_settings, proxy_in_front_of, wait_ready


def get(path: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request with exactly the given header lines."""
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def test_request_arrives_with_the_proxy_token_only(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """The upstream sees exactly one Authorization, the proxy's; client credentials are gone."""
    response = await exchange(
        proxy.port,
        get(
            "/projects/acme",
            "Authorization: Bearer client-own-token",
            "Authorization: Basic Y2xpZW50OnB3",
            "X-Logicdrop-ApiKey: client-api-key",
            "Proxy-Authorization: Basic cHJveHk6cHc=",
        ),
    )
    assert response.status == 200
    seen = upstream.received[-1]
    assert seen.header("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert seen.header("X-Logicdrop-ApiKey") == []
    assert seen.header("Proxy-Authorization") == []


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/%20x+y?q=a+b&q=%2F&z=%C3%A9&w=%e9",
        "/files/r%C3%A9sum%C3%A9.pdf?name=caf%C3%A9&name=th%C3%A9&empty=&flag",
        "/x;matrix=1/./../y?%26=%3D&a=1&a=2",
        "/x?",
        "/",
    ],
)
async def test_raw_path_and_query_are_forwarded_byte_for_byte(
    proxy: Proxy, upstream: StandInUpstream, target: str
) -> None:
    """Escapes, plus signs, dot segments, repeated keys and empty queries are never rewritten."""
    response = await exchange(proxy.port, get(target))
    assert response.status == 200
    assert upstream.received[-1].target == target


async def test_base_path_prefixes_every_forwarded_path(
    token_server: StandInTokenServer, upstream: StandInUpstream
) -> None:
    """``upstream.url`` with a path: ``https://h/base`` + ``/x?y`` goes to ``/base/x?y``."""
    settings = make_settings(token_server, upstream, upstream={"url": upstream.url + "/v2/"})
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        await exchange(proxy.port, get("/projects/acme?view=full"))
        await exchange(proxy.port, get("/"))
    assert [r.target for r in upstream.received] == ["/v2/projects/acme?view=full", "/v2/"]


async def test_host_and_forwarded_headers(proxy: Proxy, upstream: StandInUpstream) -> None:
    """Host becomes the upstream's; X-Forwarded-For/-Proto/-Host are appended, not replaced."""
    await exchange(
        proxy.port,
        get(
            "/x",
            "X-Forwarded-For: 203.0.113.7",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: app.example",
        ),
    )
    seen = upstream.received[-1]
    assert seen.header("Host") == [f"127.0.0.1:{upstream.port}"]
    assert seen.header("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https, http"]
    assert seen.header("X-Forwarded-Host") == ["app.example, proxy.test"]


async def test_each_request_gets_its_own_headers_when_lists_repeat(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Header blocks are remembered per list: a repeated list, then a changed one, go as sent."""
    for accept in ("application/json", "application/json", "text/csv", "application/json"):
        response = await exchange(proxy.port, get("/x", f"Accept: {accept}", "X-Trace: 1"))
        assert response.status == 200
    assert [r.header("Accept") for r in upstream.received] == [
        ["application/json"],
        ["application/json"],
        ["text/csv"],
        ["application/json"],
    ]
    assert all(r.header("X-Trace") == ["1"] for r in upstream.received)
    assert all(r.header("X-Forwarded-For") == ["127.0.0.1"] for r in upstream.received)


async def test_the_same_header_list_from_two_clients_names_each_client(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Header blocks are remembered per list and client: X-Forwarded-For is each one's own."""
    request = get("/x", "Accept: application/json")
    for address in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, local_addr=(address, 0)
        )
        try:
            writer.write(request)
            async with asyncio.timeout(5):
                assert (await read_response(reader)).status == 200
        finally:
            writer.close()
    assert [r.header("X-Forwarded-For") for r in upstream.received] == [
        ["127.0.0.1"],
        ["127.0.0.2"],
        ["127.0.0.1"],
    ]


async def test_nothing_is_added_to_a_bare_request(token_server: StandInTokenServer) -> None:
    """No User-Agent, Accept, Accept-Encoding, Content-Type, Content-Length or chunking."""
    async with proxy_in_front_of(token_server) as (raw, proxy):
        for method in ("GET", "POST", "DELETE"):
            response = await exchange(proxy.port, get("/bare", method=method))
            assert response.status == 200
    names = [[name.lower() for name, _ in request.headers] for request in raw.requests]
    expected = ["host", "authorization", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
    assert names == [expected] * 3
    assert [request.framing for request in raw.requests] == ["none"] * 3


async def test_hop_by_hop_headers_are_dropped_both_ways(
    token_server: StandInTokenServer,
) -> None:
    """Connection and the names it lists, Keep-Alive, TE, Trailer, Upgrade and friends stop here."""
    answer = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Upstream-Hop\r\n"
        b"X-Upstream-Hop: secret-ish\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Kept: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with proxy_in_front_of(token_server, canned(answer)) as (raw, proxy):
        response = await exchange(
            proxy.port,
            get(
                "/hop",
                "Connection: keep-alive, X-Client-Hop",
                "X-Client-Hop: 1",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Trailer: X-Checksum",
                "Proxy-Connection: keep-alive",
                "X-Kept: yes",
            ),
        )
    sent = {name.lower() for name, _ in raw.requests[0].headers}
    assert sent.isdisjoint(
        {"connection", "x-client-hop", "keep-alive", "te", "trailer", "proxy-connection"}
    )
    assert raw.requests[0].header("X-Kept") == ["yes"]
    got = {name.lower() for name, _ in response.headers}
    assert got.isdisjoint({"x-upstream-hop", "keep-alive", "proxy-authenticate", "upgrade"})
    assert response.header("X-Kept") == ["yes"]
    assert response.body == b"ok"


async def test_underscore_spellings_of_controlled_fields_are_dropped(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """CGI-style servers read X_Forwarded_For as X-Forwarded-For: a client may not set, under
    that spelling, what the proxy drops or writes itself. Other underscored names pass."""
    response = await exchange(
        proxy.port,
        get(
            "/u",
            "X_Forwarded_For: 10.0.0.1",
            "X_Forwarded_Host: evil.example",
            "X_Logicdrop_ApiKey: client-key",
            "Proxy_Authorization: Basic eA==",
            "Transfer_Encoding: chunked",
            "X_Custom_Tag: kept",
        ),
    )
    assert response.status == 200
    sent = [name for name, _ in upstream.received[-1].headers]
    underscored = [name for name in sent if "_" in name]
    assert underscored == ["X_Custom_Tag"]
    assert upstream.received[-1].header("X-Forwarded-For") == ["127.0.0.1"]


async def test_repeated_headers_survive_both_ways(proxy: Proxy, upstream: StandInUpstream) -> None:
    """Several Set-Cookie come back separately; repeated request headers go up in order."""
    response = await exchange(proxy.port, get("/cookies", "X-Tag: one", "X-Tag: two"))
    assert response.header("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert upstream.received[-1].header("X-Tag") == ["one", "two"]


async def test_no_cookie_jar_between_clients(
    proxy: Proxy, upstream: StandInUpstream, client: aiohttp.ClientSession
) -> None:
    """Cookies set by the upstream for one client never ride on another client's request."""
    async with client.get(proxy.url + "/cookies") as response:
        assert response.status == 200
    await exchange(proxy.port, get("/after"))
    await exchange(proxy.port, get("/own", "Cookie: mine=1"))
    assert upstream.received[-2].header("Cookie") == []
    assert upstream.received[-1].header("Cookie") == ["mine=1"]


@pytest.mark.parametrize("size", [0, 10, 70_000, 3 * 1024 * 1024])
async def test_request_bodies_stream_with_their_framing(
    proxy: Proxy, upstream: StandInUpstream, size: int
) -> None:
    """A Content-Length body arrives whole with its length; the digest matches."""
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    response = await exchange(
        proxy.port, get("/upload", f"Content-Length: {size}", method="PUT", body=body)
    )
    assert response.status == 200
    seen = upstream.received[-1]
    assert seen.body_size == size
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header("Content-Length") == [str(size)]
    assert seen.header("Transfer-Encoding") == []


async def test_chunked_request_body_streams_upstream(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """A chunked upload arrives chunked (no invented length) with every byte intact."""
    parts = [b"a" * 1000, b"b" * 70_000, b"c"]
    chunked = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    response = await exchange(
        proxy.port, get("/upload", "Transfer-Encoding: chunked", method="POST", body=chunked)
    )
    assert response.status == 200
    seen = upstream.received[-1]
    assert seen.body_sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert seen.header("Transfer-Encoding") == ["chunked"]
    assert seen.header("Content-Length") == []


async def test_compressed_bodies_pass_through_unchanged(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """Neither side inflates: gzip goes up and comes down as the same bytes."""
    packed = gzip.compress(b'{"hello": "world"}' * 100)
    await exchange(
        proxy.port,
        get(
            "/upload",
            "Content-Encoding: gzip",
            f"Content-Length: {len(packed)}",
            method="POST",
            body=packed,
        ),
    )
    assert upstream.received[-1].body_sha256 == hashlib.sha256(packed).hexdigest()
    response = await exchange(proxy.port, get("/gzip", "Accept-Encoding: gzip"))
    assert response.header("Content-Encoding") == ["gzip"]
    assert gzip.decompress(response.body) == b'{"compressed": true}'


async def test_large_download_streams_completely(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    """A 32 MiB chunked answer arrives whole."""
    size = 32 * 1024 * 1024
    async with client.get(proxy.url + f"/bytes/{size}") as response:
        assert response.status == 200
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == size


@pytest.mark.parametrize(
    ("method", "path"), [("HEAD", "/x"), ("GET", "/status/204"), ("GET", "/status/304")]
)
async def test_bodiless_answers_carry_no_body(proxy: Proxy, method: str, path: str) -> None:
    """HEAD, 204 and 304 answers have no body, and the connection stays usable after them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(get(path, method=method) + get("/after"))
        await writer.drain()
        first = await read_response(reader, method=method)
        second = await read_response(reader)
    finally:
        writer.close()
    assert first.body == b""
    assert first.header("Transfer-Encoding") == []
    assert second.status == 200
    assert json.loads(second.body)["target"] == "/after"


async def test_upstream_statuses_pass_through(proxy: Proxy) -> None:
    """Upstream errors are the upstream's: status and body as sent, no proxy marker."""
    for status in (400, 403, 404, 409, 500, 503):
        response = await exchange(proxy.port, get(f"/status/{status}"))
        assert response.status == status
        assert response.header(ERROR_HEADER) == []


async def test_redirects_are_returned_not_followed(proxy: Proxy, upstream: StandInUpstream) -> None:
    """A 302 comes back to the client; the upstream's origin is rewritten, others are not."""
    async with RawUpstream() as elsewhere:
        target = quote(f"{upstream.url}/next%20page?x=1", safe="")
        own = await exchange(proxy.port, get(f"/redirect?to={target}"))
        other = await exchange(proxy.port, get(f"/redirect?to={elsewhere.url}/steal"))
    assert own.status == 302
    assert own.header("Location") == ["http://proxy.test/next%20page?x=1"]
    assert other.header("Location") == [f"{elsewhere.url}/steal"]
    assert elsewhere.connections == 0
    assert [r.target.split("?")[0] for r in upstream.received] == ["/redirect", "/redirect"]


async def test_location_rewrite_strips_the_base_path(token_server: StandInTokenServer) -> None:
    """With a base path, ``<upstream>/base/x`` becomes ``<proxy>/x``; outside it, untouched."""
    locations = iter(["{url}/base/x?y=1", "{url}/other", "/base/rel", "/elsewhere"])

    async def redirect(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        location = next(locations).format(url=raw.url)
        writer.write(
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()

    async with RawUpstream(redirect) as raw:
        settings = make_settings(token_server, raw, upstream={"url": raw.url + "/base"})
        async with Proxy(settings) as proxy:
            await wait_ready(proxy)
            answers = [await exchange(proxy.port, get("/r")) for _ in range(4)]
    assert [a.header("Location")[0] for a in answers] == [
        "http://proxy.test/x?y=1",
        f"{raw.url}/other",
        "http://proxy.test/rel",
        "/elsewhere",
    ]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET http://evil.example/steal?x=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        b"GET //evil.example/steal?x=1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
        b"GET /steal?x=1 HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil.example\r\n\r\n",
    ],
)
async def test_the_token_only_goes_to_the_configured_upstream(
    token_server: StandInTokenServer, upstream: StandInUpstream, request_bytes: bytes
) -> None:
    """Absolute-form targets, ``//host`` paths and odd Host headers never change the destination."""
    async with RawUpstream() as evil:
        request_bytes = request_bytes.replace(b"evil.example", f"127.0.0.1:{evil.port}".encode())
        async with Proxy(make_settings(token_server, upstream)) as proxy:
            await wait_ready(proxy)
            response = await exchange(proxy.port, request_bytes)
    assert response.status == 200
    assert evil.connections == 0
    assert len(upstream.received) == 1
    assert upstream.received[0].target.endswith("/steal?x=1")


async def test_connect_is_refused(proxy: Proxy, upstream: StandInUpstream) -> None:
    """CONNECT never opens a tunnel: 405 from the proxy, nothing upstream."""
    response = await exchange(
        proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert response.status == 405
    assert response.header(ERROR_HEADER) == ["method_not_allowed"]
    assert upstream.received == []


async def test_other_methods_are_forwarded(proxy: Proxy, upstream: StandInUpstream) -> None:
    """Every method but CONNECT and TRACE goes upstream, including unusual ones."""
    for method in ("OPTIONS", "PATCH", "DELETE", "PROPFIND", "SEARCH"):
        response = await exchange(proxy.port, get("/m", method=method))
        assert response.status == 200
    assert [r.method for r in upstream.received] == [
        "OPTIONS",
        "PATCH",
        "DELETE",
        "PROPFIND",
        "SEARCH",
    ]


async def test_trace_is_refused_so_no_echo_carries_the_token(
    token_server: StandInTokenServer,
) -> None:
    """An upstream answers TRACE with the request it received (RFC 9110 9.3.8), which would
    hold the proxy's token: 405 from the proxy instead, before and after the pool is warm."""

    async def echo(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %d\r\n\r\n%b"
            % (len(request.head), request.head)
        )
        await writer.drain()

    async with proxy_in_front_of(token_server, echo) as (raw, proxy):
        cold = await exchange(proxy.port, get("/t", method="TRACE"))
        warm = await exchange(proxy.port, get("/warm"))
        pooled = await exchange(proxy.port, get("/t", method="TRACE"))
    assert (cold.status, warm.status, pooled.status) == (405, 200, 405)
    assert pooled.header(ERROR_HEADER) == ["method_not_allowed"]
    assert b"TRACE" in pooled.body
    assert [r.start_line for r in raw.requests] == ["GET /warm HTTP/1.1"]
    assert token_server.issued[0].encode() in warm.body  # what a forwarded TRACE would show
    assert token_server.issued[0].encode() not in cold.body + pooled.body


async def test_expect_100_continue_is_answered_by_the_proxy(
    proxy: Proxy, upstream: StandInUpstream
) -> None:
    """The client gets 100 Continue, the upstream gets the body without an Expect header."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(get("/upload", "Content-Length: 5", "Expect: 100-continue", method="PUT"))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        final = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert final.status == 200
    assert upstream.received[-1].header("Expect") == []
    assert upstream.received[-1].body_sha256 == hashlib.sha256(b"hello").hexdigest()


# --- upstream failures -------------------------------------------------------------------------


async def test_unreachable_upstream_is_a_fast_502(
    token_server: StandInTokenServer, upstream: StandInUpstream
) -> None:
    """A refused connection answers 502 JSON with the proxy's marker, well within the timeout."""
    closed = free_port()  # nothing listens there
    settings = make_settings(token_server, upstream, upstream={"url": f"http://127.0.0.1:{closed}"})
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await exchange(proxy.port, get("/x"))
        elapsed = loop.time() - started
    assert response.status == 502
    assert response.header(ERROR_HEADER) == ["upstream_unreachable"]
    body = json.loads(response.body)
    assert body["error"] == "upstream_unreachable"
    assert "connect" in body["detail"]
    assert elapsed < settings.upstream.connect_timeout


async def test_slow_upstream_is_a_504(
    token_server: StandInTokenServer, upstream: StandInUpstream
) -> None:
    """No answer within read_timeout: 504 JSON."""
    async with Proxy(
        make_settings(token_server, upstream, upstream={"read_timeout": 0.3})
    ) as proxy:
        await wait_ready(proxy)
        response = await exchange(proxy.port, get("/slow/2"))
    assert response.status == 504
    assert json.loads(response.body)["error"] == "upstream_timeout"


async def test_read_timeout_is_between_bytes_not_a_transfer_cap(
    token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """A body that keeps flowing for longer than read_timeout is never cut off."""

    async def trickle(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        # 1.5 s in all, 0.1 s apart: a stall of the loop under 0.9 s is not a silent upstream.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n")
        for _ in range(15):
            await asyncio.sleep(0.1)
            writer.write(b"x")
            await writer.drain()

    async with (
        proxy_in_front_of(token_server, trickle, upstream={"read_timeout": 1.0}) as (_, proxy),
        client.get(proxy.url + "/trickle") as response,
    ):
        body = await response.read()
    assert body == b"x" * 15


async def _stall_mid_body(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000)
    await writer.drain()
    await asyncio.sleep(5)


async def _reset_mid_body(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    await writer.drain()
    writer.transport.abort()


@pytest.mark.parametrize(
    "respond",
    [
        _stall_mid_body,
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000, close=True),
        _reset_mid_body,
    ],
    ids=["stall", "short", "reset"],
)
async def test_an_answer_cut_short_aborts_the_client_connection(
    token_server: StandInTokenServer, client: aiohttp.ClientSession, respond: Responder
) -> None:
    """Headers sent, then silence, fewer bytes than promised, or a reset: the client sees a
    broken transfer, never a complete body; and the proxy serves on."""
    async with proxy_in_front_of(token_server, respond, upstream={"read_timeout": 0.3}) as (
        _raw,
        proxy,
    ):
        async with client.get(proxy.url + "/cut") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        async with client.get(proxy.url + "/-/healthz") as health:
            assert health.status == 200


# --- the 401 retry ---------------------------------------------------------------------------


async def test_upstream_401_gets_one_retry_with_a_new_token(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """A revoked token: invalidated, a new one fetched, the request (and its body) replayed."""
    upstream.rejected_tokens.add(token_server.issued[0])
    response = await exchange(
        proxy.port, get("/upload", "Content-Length: 4", method="POST", body=b"data")
    )
    assert response.status == 200
    assert len(token_server.issued) == 2
    first, second = upstream.received[-2:]
    assert first.header("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert second.header("Authorization") == [f"Bearer {token_server.issued[1]}"]
    assert first.body_sha256 == second.body_sha256 == hashlib.sha256(b"data").hexdigest()


async def test_401_is_not_retried_when_the_body_cannot_be_replayed(
    start_proxy: ProxyFactory, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """A streamed body (over replay_body_limit) was consumed: the 401 goes back to the client."""
    async with start_proxy(upstream={"replay_body_limit": 10}) as proxy:
        await wait_ready(proxy)
        upstream.rejected_tokens.add(token_server.issued[0])
        response = await exchange(
            proxy.port, get("/upload", "Content-Length: 20", method="POST", body=b"x" * 20)
        )
    assert response.status == 401
    assert len(upstream.received) == 1


async def test_403_is_not_retried(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """403 means the token is fine but not allowed: no new token, no retry."""
    response = await exchange(proxy.port, get("/status/403"))
    assert response.status == 403
    assert len(upstream.received) == 1
    assert len(token_server.issued) == 1


async def test_a_persistent_401_costs_one_retry_per_request_at_most(
    proxy: Proxy,
    upstream: StandInUpstream,
    token_server: StandInTokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the upstream rejects every token, the client gets the 401 after one retry."""
    # The replacement is held for 30 s, not 1: the second request, however late it comes on a
    # busy machine, still finds it too young to replace.
    monkeypatch.setattr(tokens, "REPLACE_HOLD_OFF", 30.0)
    upstream.reject_all = True
    original = token_server.issued[0]
    response = await exchange(proxy.port, get("/x"))
    upstream.rejected_tokens.update(token_server.issued)
    again = await exchange(proxy.port, get("/x"))
    assert response.status == again.status == 401
    assert len(upstream.received) == 3  # the first request retried once; the second not at all
    assert token_server.issued[0] == original
    assert len(token_server.issued) == 2
