"""Shared fixtures: stand-in servers on loopback and the proxy as it ships in front of them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from proxy import config
from proxy.app import TOKENS
from proxy.config import AuthSettings, Secret, ServerSettings, Settings, UpstreamSettings
from proxy.server import Proxy
from proxy.standins import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    StandInTokenServer,
    StandInUpstream,
)


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
async def token_server() -> AsyncIterator[StandInTokenServer]:
    """A stand-in token endpoint issuing one-hour tokens to demo-client/demo-secret."""
    async with StandInTokenServer() as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[StandInUpstream]:
    """A stand-in Sparks API that echoes and records what it receives."""
    async with StandInUpstream() as server:
        yield server


def make_settings(
    token_server: StandInTokenServer, upstream: StandInUpstream, **sections: dict[str, Any]
) -> Settings:
    """Validated settings pointing at the stand-ins; ``sections`` override single keys."""
    base = Settings(
        server=ServerSettings(port=0),
        upstream=UpstreamSettings(url=upstream.url),
        auth=AuthSettings(
            token_url=token_server.token_url,
            client_id=DEMO_CLIENT_ID,
            client_secret=Secret(DEMO_CLIENT_SECRET),
        ),
    )
    for name, values in sections.items():
        base = dataclasses.replace(
            base, **{name: dataclasses.replace(getattr(base, name), **values)}
        )
    return config.validate(base)


ProxyFactory = Callable[..., AbstractAsyncContextManager[Proxy]]


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


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` is true, polling every 10 ms."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def wait_ready(proxy: Proxy, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy holds a token."""
    tokens = proxy.app[TOKENS]
    await wait_for(lambda: tokens.current() is not None, timeout)


class LogCapture(logging.Handler):
    """Collects every formatted log line at every level (tests scan them for secrets)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every log line (all loggers, DEBUG and up) written during the test."""
    handler = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)
