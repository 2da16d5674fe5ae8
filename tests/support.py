"""Helpers shared by the tests: settings for the stand-ins, bounded waits, log capture."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from proxy import config
from proxy.app import TOKENS
from proxy.config import AuthSettings, Secret, ServerSettings, Settings, UpstreamSettings
from proxy.listener import ClientConnection
from proxy.server import Proxy
from proxy.standins import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    StandInTokenServer,
    StandInUpstream,
)
from proxy.upstream import UpstreamConnection

from .rawhttp import RawUpstream, Responder


class HasUrl(Protocol):
    """Anything served on loopback with a base URL (a stand-in, a raw upstream)."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""


@functools.cache
def _ports_outside_ephemeral_range() -> tuple[int, ...]:
    """Ports from 10000 up that the kernel never picks on its own: all but its ephemeral range
    (Linux's default: 32768-60999). All of them if that range covers them all."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        first, last = (int(field) for field in text.split())
    except (OSError, ValueError):
        first, last = 32768, 60999
    ports = range(10000, 65536)
    return tuple(port for port in ports if not first <= port <= last) or tuple(ports)


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that only an explicit bind can take.

    A subprocess binds the port a moment later. A port from ``bind(0)`` would come from the
    ephemeral range, where the kernel also picks the local port of every outgoing connection,
    so a connection of the test's own (a proxy's to redis, say) could take it in that moment.
    Ports outside the range are never picked that way, and none is handed out twice.
    """
    candidates = _ports_outside_ephemeral_range()
    for port in random.sample(candidates, min(len(candidates), 500)):
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_HANDED_OUT.add(port)
        return port
    raise AssertionError("no free port found outside the ephemeral range")


def make_settings(
    token_source: StandInTokenServer, upstream_server: HasUrl, **sections: dict[str, Any]
) -> Settings:
    """Validated settings pointing at the stand-ins; ``sections`` override single keys."""
    base = Settings(
        # proxy.test and p: the Host names the raw-socket tests write.
        server=ServerSettings(port=0, allowed_hosts="localhost,127.0.0.1,::1,proxy.test,p"),
        upstream=UpstreamSettings(url=upstream_server.url),
        auth=AuthSettings(
            token_url=token_source.token_url,
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


@asynccontextmanager
async def proxy_in_front_of(
    token_source: StandInTokenServer, respond: Responder | None = None, **sections: dict[str, Any]
) -> AsyncIterator[tuple[RawUpstream, Proxy]]:
    """A raw upstream answering with ``respond``, and a ready proxy in front of it."""
    async with (
        RawUpstream(respond) as raw,
        Proxy(make_settings(token_source, raw, **sections)) as proxy,
    ):
        await wait_ready(proxy)
        yield raw, proxy


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclasses.dataclass
class _Served:
    url: str


@asynccontextmanager
async def proxy_before(
    token_source: StandInTokenServer, handler: ConnectionHandler, **sections: dict[str, Any]
) -> AsyncIterator[tuple[Proxy, int]]:
    """An upstream that is just ``handler`` on each raw connection (for upstreams that
    misbehave below the level of requests), and a ready proxy in front of it: (proxy, port)."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Proxy(
            make_settings(token_source, _Served(f"http://127.0.0.1:{port}"), **sections)
        ) as proxy:
            await wait_ready(proxy)
            yield proxy, port
    finally:
        server.close()


async def get_statuses(urls: Iterable[str]) -> list[int]:
    """GET every URL at once (each answer read whole); their statuses, in order."""
    async with aiohttp.ClientSession() as session:

        async def one(url: str) -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(url) for url in urls)))


def assert_one_token_served(token_server: StandInTokenServer, upstream: StandInUpstream) -> None:
    """One token request was made, and every request the upstream saw carried that token."""
    assert len(token_server.requests) == 1
    assert {r.header("Authorization")[0] for r in upstream.received} == {
        f"Bearer {token_server.issued[0]}"
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` is true, polling every 10 ms."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def wait_ready(proxy: Proxy, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy holds a token."""
    tokens = proxy.app[TOKENS]
    await wait_for(lambda: tokens.current() is not None, timeout)


def spy_on_bypass(
    monkeypatch: pytest.MonkeyPatch, protocol: type[ClientConnection] | type[UpstreamConnection]
) -> list[tuple[int, int]]:
    """(bytes read, body bytes still due) for every read ``protocol`` passes around its parser,
    so a test knows its pieces took that path rather than arriving together. Tests send bodies
    in three pieces or more: the path is taken unless every piece comes in one read."""
    reads: list[tuple[int, int]] = []
    pass_body = protocol._pass_body

    def spy(connection: Any, data: bytes) -> None:
        body = connection._body
        assert body is not None
        reads.append((len(data), connection._body_length - body.total_bytes))
        pass_body(connection, data)

    monkeypatch.setattr(protocol, "_pass_body", spy)
    return reads


class LogCapture(logging.Handler):
    """Collects every formatted log line at every level (tests scan them for secrets)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._watched: list[list[str]] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def watch(self, values: list[str]) -> None:
        """Treat every string in ``values`` (now or later) as a secret the logs must not show."""
        self._watched.append(values)

    def watched(self) -> list[str]:
        """Every watched secret."""
        return [value for values in self._watched for value in values]

    def text(self) -> str:
        return "\n".join(self.lines)
