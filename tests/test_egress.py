"""The way out: TLS is always verified (``ca_file`` adds a CA), and corporate egress proxies."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import UpstreamSettings
from proxy.errors import ERROR_HEADER, ConfigError
from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream
from proxy.upstream import Route

from .rawhttp import RawRequest, RawUpstream, exchange
from .support import make_settings, wait_for, wait_ready

GET = b"GET /secure HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed (Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_upstream(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """An HTTPS upstream on 127.0.0.1 with the self-signed certificate; yields its URL."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"authorization": bool(request.headers.get("Authorization"))})

    app = web.Application()
    app.router.add_get("/secure", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_untrusted_upstream_certificate_is_refused(
    token_server: StandInTokenServer, upstream: StandInUpstream, tls_upstream: str
) -> None:
    """TLS is verified: a certificate no CA vouches for is a 502, and the token is not sent."""
    settings = make_settings(token_server, upstream, upstream={"url": tls_upstream})
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        response = await exchange(proxy.port, GET)
    assert response.status == 502
    assert response.header(ERROR_HEADER) == ["upstream_unreachable"]


async def test_ca_file_trusts_a_private_ca(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    tls_upstream: str,
    certificate: tuple[Path, Path],
) -> None:
    """With ``ca_file`` naming the issuing CA, the same upstream is reached over TLS."""
    settings = make_settings(
        token_server, upstream, upstream={"url": tls_upstream, "ca_file": str(certificate[0])}
    )
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        response = await exchange(proxy.port, GET)
    assert response.status == 200
    assert json.loads(response.body) == {"authorization": True}


async def test_trust_env_sends_traffic_through_the_egress_proxy(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``trust_env = true`` honours HTTP(S)_PROXY for the upstream and the token endpoint."""

    async def egress(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if "/oauth/token" in request.start_line:
            body = b'{"access_token": "via-egress", "token_type": "Bearer", "expires_in": 60}'
        else:
            body = b"{}"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    async with RawUpstream(egress) as corporate_proxy:
        monkeypatch.setenv("HTTP_PROXY", corporate_proxy.url)
        settings = make_settings(token_server, upstream, upstream={"trust_env": True})
        async with Proxy(settings) as proxy:
            await wait_ready(proxy)
            response = await exchange(proxy.port, GET)
    assert response.status == 200
    targets = [r.start_line.split()[1] for r in corporate_proxy.requests]
    assert targets == [token_server.token_url, upstream.url + "/secure"]
    assert corporate_proxy.requests[1].header("Authorization") == ["Bearer via-egress"]
    assert upstream.received == []
    assert token_server.requests == []


async def test_environment_is_ignored_without_trust_env(
    proxy: Proxy, upstream: StandInUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default HTTP(S)_PROXY in the environment does not divert the token anywhere."""
    async with RawUpstream() as elsewhere:
        monkeypatch.setenv("HTTP_PROXY", elsewhere.url)
        response = await exchange(proxy.port, GET)
    assert response.status == 200
    assert elsewhere.connections == 0
    assert len(upstream.received) == 1


async def test_https_upstream_is_reached_through_a_connect_tunnel(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    tls_upstream: str,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``trust_env``, HTTPS_PROXY gets a CONNECT; TLS runs end to end inside the tunnel."""
    connects: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        connects.append(head)
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    settings = make_settings(
        token_server,
        upstream,
        upstream={"url": tls_upstream, "ca_file": str(certificate[0]), "trust_env": True},
    )
    try:
        async with Proxy(settings) as proxy:
            await wait_ready(proxy)
            response = await exchange(proxy.port, GET)
    finally:
        server.close()
    assert response.status == 200
    assert json.loads(response.body) == {"authorization": True}
    authority = tls_upstream.removeprefix("https://").encode()
    assert connects == [b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)]


async def test_a_refused_tunnel_leaves_no_connection_open(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    tls_upstream: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An egress proxy that refuses CONNECT (407, keeping its side open): 502 each time, and
    every connection the proxy opened to it is closed again."""
    open_now = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await reader.read()  # until the proxy closes its side
        finally:
            open_now -= 1
            writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    settings = make_settings(
        token_server, upstream, upstream={"url": tls_upstream, "trust_env": True}
    )
    try:
        async with Proxy(settings) as proxy:
            await wait_ready(proxy)
            statuses = [(await exchange(proxy.port, GET)).status for _ in range(3)]
            await wait_for(lambda: open_now == 0, timeout=3)
    finally:
        server.close()
        await server.wait_closed()
    assert statuses == [502, 502, 502]


async def test_egress_credentials_stay_out_of_reprs_and_https_proxies_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The egress proxy's password never shows in a repr; an https:// egress proxy (which
    would get the password in clear here) is a configuration error."""
    monkeypatch.setenv("HTTPS_PROXY", "http://egress-user:egress-pass@127.0.0.1:3128")
    route = Route.of(UpstreamSettings(url="https://api.example", trust_env=True))
    assert route.tunnel.startswith(b"CONNECT api.example:443 HTTP/1.1")
    assert "egress-pass" not in repr(route)
    assert base64.b64encode(b"egress-user:egress-pass").decode() not in repr(route)
    monkeypatch.setenv("HTTPS_PROXY", "https://127.0.0.1:3128")
    with pytest.raises(ConfigError, match="http:// URL"):
        Route.of(UpstreamSettings(url="https://api.example", trust_env=True))
