"""Logs: one access line per request, JSON or text, and nothing secret in any of them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from proxy import logs as proxy_logs
from proxy.config import LogSettings
from proxy.server import Proxy
from proxy.standins import DEMO_CLIENT_SECRET, StandInTokenServer

from .rawhttp import exchange
from .support import ProxyFactory, wait_for, wait_ready

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure_logs() -> Iterator[Configure]:
    """Apply ``logs.configure`` to a buffer for one test, then undo it."""
    installed: list[logging.Handler] = []
    root = logging.getLogger()
    level = root.level
    quieted = {
        name: logging.getLogger(name).level
        for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web")
    }

    def configure(**values: object) -> io.StringIO:
        buffer = io.StringIO()
        installed.append(proxy_logs.configure(LogSettings(**values), stream=buffer))  # type: ignore[arg-type]
        return buffer

    yield configure
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)
    for name, old in quieted.items():
        logging.getLogger(name).setLevel(old)
    logging.getLogger("sparks_proxy.access").disabled = False


async def _lines(buffer: io.StringIO, needle: str) -> list[str]:
    await wait_for(lambda: needle in buffer.getvalue())
    return [line for line in buffer.getvalue().splitlines() if needle in line]


async def test_json_access_line_has_the_fields(
    start_proxy: ProxyFactory, configure_logs: Configure
) -> None:
    """One JSON object per request: method, path without query, status, bytes, durations."""
    buffer = configure_logs(format="json", level="info")
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        await exchange(proxy.port, b"GET /projects/acme?secret=q HTTP/1.1\r\nHost: p\r\n\r\n")
        lines = await _lines(buffer, '"sparks_proxy.access"')
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "info"
    assert doc["method"] == "GET"
    assert doc["path"] == "/projects/acme"
    assert doc["status"] == 200
    assert doc["bytes"] > 0
    assert doc["duration_ms"] >= doc["upstream_ms"] > 0
    assert "secret=q" not in buffer.getvalue()


async def test_text_access_line(start_proxy: ProxyFactory, configure_logs: Configure) -> None:
    """The text format puts the same facts on one readable line."""
    buffer = configure_logs(format="text", level="info")
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        await exchange(proxy.port, b"DELETE /items/7?x=1 HTTP/1.1\r\nHost: p\r\n\r\n")
        lines = await _lines(buffer, "sparks_proxy.access")
    assert len(lines) == 1
    assert '"DELETE /items/7" 200' in lines[0]
    assert "upstream" in lines[0]
    assert "x=1" not in lines[0]


async def test_access_log_can_be_turned_off(
    start_proxy: ProxyFactory, configure_logs: Configure
) -> None:
    """``[log] access = false`` writes no access lines; other logs still flow."""
    buffer = configure_logs(format="text", level="info", access=False)
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        await exchange(proxy.port, b"GET /quiet HTTP/1.1\r\nHost: p\r\n\r\n")
    assert "sparks_proxy.access" not in buffer.getvalue()
    assert "obtained a token" in buffer.getvalue()


async def test_debug_logs_of_a_whole_session_hold_no_secret(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    configure_logs: Configure,
) -> None:
    """At debug level, through errors and a token failure, no secret or token is written."""
    buffer = configure_logs(format="json", level="debug")
    token_server.failures = ["invalid_client"]
    async with start_proxy(auth={"max_backoff": 1.0}) as proxy:
        await wait_ready(proxy, timeout=5)
        for request in (
            b"GET /a HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer client-token-xyz\r\n\r\n",
            b"GET /status/500 HTTP/1.1\r\nHost: p\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: p\r\nBad\x00Header: Bearer client-token-xyz\r\n\r\n",
        ):
            await exchange(proxy.port, request)
    text = buffer.getvalue()
    assert "invalid_client" in text
    for secret in (DEMO_CLIENT_SECRET, "client-token-xyz", *token_server.issued):
        assert secret not in text


async def test_malformed_request_is_answered_without_echo(
    proxy: Proxy, configure_logs: Configure
) -> None:
    """A request aiohttp cannot parse gets our JSON 400; no request bytes come back."""
    buffer = configure_logs(format="text", level="debug")
    response = await exchange(
        proxy.port, b"GET /x HTTP/1.1\r\nHost: p\r\nX-Bad: Bearer leak-me\x00now\r\n\r\n"
    )
    assert response.status == 400
    assert json.loads(response.body)["error"] == "bad_request"
    assert b"leak-me" not in response.body
    assert "leak-me" not in buffer.getvalue()


async def test_encoded_line_breaks_cannot_forge_log_lines(
    start_proxy: ProxyFactory, configure_logs: Configure
) -> None:
    """A path with %0d%0a is logged as sent (raw), never decoded into a second line."""
    buffer = configure_logs(format="text", level="info")
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        await exchange(
            proxy.port,
            b"GET /x%0d%0a2026-01-01%20ERROR%20sparks_proxy.tokens:%20FORGED HTTP/1.1\r\n"
            b"Host: p\r\n\r\n",
        )
        lines = await _lines(buffer, "sparks_proxy.access")
    assert not any(line.startswith("2026-01-01 ERROR") for line in buffer.getvalue().splitlines())
    assert "%0d%0a" in lines[0]


async def test_a_hang_up_mid_answer_is_logged_as_499(
    start_proxy: ProxyFactory, configure_logs: Configure
) -> None:
    """An exchange cut short still gets its access line, with nginx's 499."""
    buffer = configure_logs(format="json", level="info")
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: p\r\n\r\n")
        await writer.drain()
        await reader.readexactly(100_000)
        writer.transport.abort()
        lines = await _lines(buffer, '"/bytes/50000000"')
    assert json.loads(lines[0])["status"] == 499
