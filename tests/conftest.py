"""Shared fixtures: stand-in servers on loopback and the proxy as it ships in front of them.

Every test's log output, at every level and from every logger, is captured and checked at the
end for the demo secret and every token the stand-in token server issued: none may appear.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from proxy.server import Proxy
from proxy.standins import DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream

from .support import LogCapture, ProxyFactory, make_settings, wait_ready


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's proxy and sparks-proxy variables never leak into a test."""
    for name in list(os.environ):
        if name.startswith("SPARKS_PROXY_") or name.lower() in (
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
        ):
            monkeypatch.delenv(name)


@pytest.fixture
async def token_server(logs: LogCapture) -> AsyncIterator[StandInTokenServer]:
    """A stand-in token endpoint issuing one-hour tokens to demo-client/demo-secret."""
    async with StandInTokenServer() as server:
        logs.watch(server.issued)
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[StandInUpstream]:
    """A stand-in Sparks API that echoes and records what it receives."""
    async with StandInUpstream() as server:
        yield server


@pytest.fixture
def start_proxy(token_server: StandInTokenServer, upstream: StandInUpstream) -> ProxyFactory:
    """``async with start_proxy(auth={...}) as proxy:`` a proxy in front of the stand-ins."""

    @asynccontextmanager
    async def start(**sections: dict[str, Any]) -> AsyncIterator[Proxy]:
        async with Proxy(make_settings(token_server, upstream, **sections)) as proxy:
            yield proxy

    return start


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> AsyncIterator[Proxy]:
    """A proxy with default settings in front of the stand-ins, holding its first token."""
    async with start_proxy() as running:
        await wait_ready(running)
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for talking to the proxy."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture(autouse=True)
def logs() -> Iterator[LogCapture]:
    """Every log line written during the test; afterwards, none may hold a secret or token."""
    handler = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = handler.text()
    leaked = [s for s in [DEMO_CLIENT_SECRET, *handler.watched()] if s in text]
    assert not leaked, "a secret or token appeared in the logs"
