"""The reserved /-/ paths: health, readiness, metrics and the SDK token endpoint."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.admin import PLACEHOLDER_TOKEN
from proxy.app import LIFECYCLE, TOKENS
from proxy.errors import ERROR_HEADER
from proxy.server import Proxy
from proxy.standins import DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream

from .rawhttp import exchange
from .support import ProxyFactory, wait_for


async def test_healthz_answers_while_the_process_serves(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """Liveness does not depend on the token: 200 even while no token can be had."""
    token_server.fail_always = "500"
    async with start_proxy() as proxy, client.get(proxy.url + "/-/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readyz_follows_the_token(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """503 with the reason while no token is held, 200 once one is."""
    token_server.failures = ["500"]
    async with start_proxy() as proxy:
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        async with client.get(proxy.url + "/-/readyz") as response:
            before = (response.status, await response.json())
        await wait_for(lambda: len(token_server.issued) == 1, timeout=5)
        async with client.get(proxy.url + "/-/readyz") as response:
            after = (response.status, await response.json())
    assert before[0] == 503
    assert before[1]["checks"]["token"]["ok"] is False
    assert before[1]["checks"]["token"]["error"] == "server_error"
    assert after[0] == 200
    assert after[1]["checks"]["token"]["expires_in"] > 3500


async def test_admin_paths_are_never_forwarded(
    proxy: Proxy, upstream: StandInUpstream, client: aiohttp.ClientSession
) -> None:
    """Reserved paths, known or not, stay in the proxy; unknown ones are a JSON 404."""
    for path in ("/-/healthz", "/-/readyz", "/-/metrics", "/-/nope", "/-/healthz?x=1"):
        async with client.get(proxy.url + path) as response:
            if path == "/-/nope":
                assert response.status == 404
                assert response.headers[ERROR_HEADER] == "not_found"
                assert "/-/healthz" in (await response.json())["detail"]
    assert upstream.received == []


async def test_wrong_method_on_an_admin_path_is_405(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    """POST /-/healthz is a JSON 405; GET /-/oauth/token likewise. Allow says what would do."""
    async with client.post(proxy.url + "/-/healthz") as response:
        assert response.status == 405
        assert (await response.json())["error"] == "method_not_allowed"
        assert response.headers.get("Allow") == "GET, HEAD"
    async with client.get(proxy.url + "/-/oauth/token") as response:
        assert response.status == 405
        assert response.headers.get("Allow") == "POST"


async def test_no_admin_answer_may_be_stored(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    """Health, readiness and metrics are the state of the moment; the token answer is a token:
    every one says no-store, so no cache between a prober and the proxy keeps one."""
    for path in ("/-/healthz", "/-/readyz", "/-/metrics"):
        async with client.get(proxy.url + path) as response:
            assert response.status == 200, path
            assert response.headers.get("Cache-Control") == "no-store", path
    grant = {"grant_type": "client_credentials", "client_id": "app", "client_secret": "x"}
    async with client.post(proxy.url + "/-/oauth/token", json=grant) as response:
        assert response.status == 200
        assert response.headers.get("Cache-Control") == "no-store"


async def test_metrics_count_requests_and_tokens_without_secrets(
    proxy: Proxy, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """Prometheus text with request, error and token counters; no token or secret inside."""
    for path in ("/a", "/status/404", "/b"):
        async with client.get(proxy.url + path) as response:
            await response.read()
    async with client.get(proxy.url + "/-/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert 'sparks_proxy_requests_total{code="200",method="GET"} 2.0' in text
    assert 'sparks_proxy_requests_total{code="404",method="GET"} 1.0' in text
    assert 'sparks_proxy_token_requests_total{result="ok"} 1.0' in text
    # Durations: every bucket as prometheus-client spells it, cumulative up to +Inf.
    buckets = [line for line in text.splitlines() if "request_duration_seconds_bucket" in line]
    assert [line.split('"')[1] for line in buckets][-3:] == ["10.0", "30.0", "+Inf"]
    assert buckets[-1].endswith(" 3.0")
    assert "sparks_proxy_request_duration_seconds_count 3.0" in text
    assert "sparks_proxy_request_duration_seconds_sum " in text
    expiry = next(
        line for line in text.splitlines() if line.startswith("sparks_proxy_token_expiry_seconds")
    )
    assert 3500 < float(expiry.split()[1]) <= 3600
    tasks = next(
        line for line in text.splitlines() if line.startswith("sparks_proxy_asyncio_tasks")
    )
    assert float(tasks.split()[1]) >= 2  # at least the token refresher and this request
    assert token_server.issued[0] not in text
    assert DEMO_CLIENT_SECRET not in text


async def test_unusual_methods_get_a_bounded_metrics_label(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    """Methods outside the standard set count as OTHER: labels stay bounded."""
    await exchange(proxy.port, b"PROPFIND /x HTTP/1.1\r\nHost: p\r\n\r\n")
    text = ""
    for _ in range(50):  # the count lands just after the answer is written
        async with client.get(proxy.url + "/-/metrics") as response:
            text = await response.text()
        if 'method="OTHER"' in text:
            break
        await asyncio.sleep(0.01)
    assert 'method="OTHER"' in text
    assert "PROPFIND" not in text


@pytest.mark.parametrize("form", [True, False])
async def test_sdk_token_endpoint_issues_an_inert_placeholder(
    proxy: Proxy, token_server: StandInTokenServer, client: aiohttp.ClientSession, form: bool
) -> None:
    """Any client-credentials request gets the placeholder, never the real token."""
    fields = {
        "client_id": "anything",
        "client_secret": "anything",
        "audience": proxy.url,
        "grant_type": "client_credentials",
    }
    kwargs = {"data": fields} if form else {"json": fields}
    async with client.post(proxy.url + "/-/oauth/token", **kwargs) as response:
        assert response.status == 200
        body = await response.json()
    assert body["access_token"] == PLACEHOLDER_TOKEN
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 0
    assert token_server.issued[0] not in json.dumps(body)
    assert len(token_server.requests) == 1


async def test_sdk_token_endpoint_rejects_other_grants(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    """Other grants (or garbage) get a JSON 400 that says what is supported."""
    async with client.post(proxy.url + "/-/oauth/token", data=b"not json") as response:
        assert response.status == 400
        assert "client_credentials" in (await response.json())["detail"]
    async with client.post(
        proxy.url + "/-/oauth/token", json={"grant_type": "password"}
    ) as response:
        assert response.status == 400


async def test_sdk_token_endpoint_bounds_what_it_reads(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    """A deeply nested or oversized body is a JSON 400/413, never a 500."""
    async with client.post(
        proxy.url + "/-/oauth/token",
        data=b"[" * 50_000,
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
    async with client.post(proxy.url + "/-/oauth/token", data=b"x" * 200_000) as response:
        assert response.status == 413
        assert response.headers[ERROR_HEADER] == "payload_too_large"


async def test_readiness_fails_first_during_a_drain(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With a drain delay, /-/readyz answers 503 while the listener still accepts."""
    async with start_proxy(server={"drain_delay": 2.0}) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].current() is not None)
        stopping = asyncio.create_task(proxy.stop())
        await wait_for(lambda: proxy.app[LIFECYCLE].draining)
        async with client.get(proxy.url + "/-/readyz") as ready:
            body = await ready.json()
            assert ready.status == 503
        async with client.get(proxy.url + "/-/healthz") as health:
            assert health.status == 200
        await stopping
    assert body["checks"]["shutdown"]["ok"] is False


async def test_sdk_token_endpoint_honours_expect(proxy: Proxy) -> None:
    """100-continue is answered at once; any other expectation is 417."""
    body = b'{"grant_type": "client_credentials"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /-/oauth/token HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim.startswith(b"HTTP/1.1 100")
    finally:
        writer.close()
    refused = await exchange(
        proxy.port,
        b"POST /-/oauth/token HTTP/1.1\r\nHost: p\r\nExpect: foo\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert refused.status == 417
