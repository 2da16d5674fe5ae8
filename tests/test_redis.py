"""One token for a fleet: replicas sharing it through a real Redis on loopback.

The redis-server binary comes from Debian's package (``.ci/run`` installs it); each test
starts its own on a free port, with persistence off.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from proxy.app import TOKENS
from proxy.config import Settings, load
from proxy.errors import ConfigError
from proxy.server import Proxy
from proxy.standins import DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream

from .support import assert_one_token_served, free_port, get_statuses, make_settings, wait_for
from .test_cli import auth_config, cli_env, cli_process, run_cli, wait_ready


class RedisServer:
    """A redis-server subprocess on 127.0.0.1 that a test can stop and start again."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is needed (Debian package redis-server; .ci/run installs it)")
        self._binary = binary
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port and wait until it answers PING."""
        self._process = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            )
            if probe.stdout.strip() == b"PONG":
                return
            subprocess.run(["sleep", "0.05"], check=False)
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        """Kill it (as an outage would)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis for one test."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def redis_settings(
    token_server: StandInTokenServer, upstream: StandInUpstream, redis_url: str, **auth: object
) -> Settings:
    """Settings for an in-process replica sharing tokens through ``redis_url``."""
    return make_settings(
        token_server, upstream, auth={"token_cache": "redis", "redis_url": redis_url, **auth}
    )


def redis_config(tmp_path: Path, token_server: StandInTokenServer, api_url: str, url: str) -> str:
    """A config file for a ``serve`` replica sharing tokens through Redis."""
    return auth_config(
        tmp_path,
        token_server,
        extra=f'token_cache = "redis"\nredis_url = "{url}"\ntimeout = 1.0\n'
        f'[upstream]\nurl = "{api_url}"\n[log]\naccess = false\nlevel = "warning"\n',
    )


async def test_eight_replicas_cold_make_one_token_request(
    tmp_path: Path,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
) -> None:
    """8 proxy processes start cold together; 500 requests across them; 1 token request."""
    token_server.delay = 0.3
    config = redis_config(tmp_path, token_server, upstream.url, redis_server.url)
    ports = [free_port() for _ in range(8)]
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                cli_process(["serve", "--config", config, "--port", str(p)], tmp_path, cli_env())
            )
            for p in ports
        ]
        for proc, port in zip(procs, ports, strict=True):
            await wait_ready(proc, f"http://127.0.0.1:{port}")
        statuses = await get_statuses(f"http://127.0.0.1:{ports[i % 8]}/r/{i}" for i in range(500))
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
    assert statuses == [200] * 500
    assert_one_token_served(token_server, upstream)


async def test_a_killed_lock_holder_is_taken_over(
    tmp_path: Path,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
) -> None:
    """A replica killed mid-fetch holds the lock only until it expires; another takes over."""
    token_server.delay = 30  # the first replica's fetch never finishes
    config = redis_config(tmp_path, token_server, upstream.url, redis_server.url)
    first, second = free_port(), free_port()
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with cli_process(
            ["serve", "--config", config, "--port", str(first)], tmp_path, cli_env()
        ) as holder:
            await wait_for(lambda: len(token_server.requests) == 1, timeout=10)
            assert await client.keys("sparks-proxy:token:*:lock")
            holder.kill()
            await holder.wait()
        token_server.delay = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with cli_process(
            ["serve", "--config", config, "--port", str(second)], tmp_path, cli_env()
        ) as successor:
            await wait_ready(successor, f"http://127.0.0.1:{second}")
            waited = loop.time() - started
            successor.send_signal(signal.SIGTERM)
    finally:
        await client.aclose()
    # The lock lives auth.timeout + 5 = 6 s: the successor waited for it, then fetched (the
    # holder's own fetch would have taken 30 s).
    assert 2 <= waited < 15
    assert len(token_server.issued) == 1


async def test_redis_outage_never_fails_a_request_and_sharing_resumes(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    """Redis dies: both replicas keep serving on their own; Redis back: one token again."""
    token_server.expires_in = 3
    settings = redis_settings(token_server, upstream, redis_server.url)
    async with Proxy(settings) as a, Proxy(settings) as b:
        tokens_a, tokens_b = a.app[TOKENS], b.app[TOKENS]
        await wait_for(lambda: tokens_a.current() is not None and tokens_b.current() is not None)
        assert tokens_a.current().value == tokens_b.current().value  # type: ignore[union-attr]
        redis_server.stop()
        loop = asyncio.get_running_loop()
        statuses = []
        started = loop.time()
        while loop.time() - started < 4:  # past one token lifetime without Redis
            for proxy in (a, b):
                async with client.get(proxy.url + "/x") as response:
                    statuses.append(response.status)
            await asyncio.sleep(0.05)
        assert set(statuses) == {200}
        assert tokens_a.shared_cache_healthy is False
        async with client.get(a.url + "/-/readyz") as ready:
            body = await ready.json()
            assert ready.status == 200  # readiness does not depend on Redis
        assert body["checks"]["shared_token_cache"]["ok"] is False
        redis_server.start()
        await wait_for(
            lambda: tokens_a.shared_cache_healthy is True and tokens_b.shared_cache_healthy is True,
            timeout=8,
        )
        # The next refresh goes through Redis: both replicas end up on one token.
        await wait_for(
            lambda: (
                (ta := tokens_a.current()) is not None
                and (tb := tokens_b.current()) is not None
                and ta.value == tb.value
            ),
            timeout=8,
        )


async def test_redis_holds_no_secret(
    token_server: StandInTokenServer, upstream: StandInUpstream, redis_server: RedisServer
) -> None:
    """What Redis stores is the token under a fingerprint key: never the client secret."""
    async with Proxy(redis_settings(token_server, upstream, redis_server.url)) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].current() is not None)
        client = redis.Redis.from_url(redis_server.url)
        try:
            keys = await client.keys("*")
            values = [await client.get(k) for k in keys]
            ttls = [await client.pttl(k) for k in keys]
        finally:
            await client.aclose()
    assert len(keys) == 1
    assert keys[0].startswith(b"sparks-proxy:token:")
    assert DEMO_CLIENT_SECRET.encode() not in keys[0] + values[0]
    assert json.loads(values[0])["access_token"] == token_server.issued[0]
    assert 3500_000 < ttls[0] <= 3600_000  # expires in Redis when the token does


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SPARKS_PROXY_AUTH_TOKEN_CACHE": "redis"}, "exactly one of auth.redis_url"),
        (
            {"SPARKS_PROXY_AUTH_TOKEN_CACHE": "redis", "SPARKS_PROXY_AUTH_REDIS_URL": "http://x"},
            "redis://",
        ),
        ({"SPARKS_PROXY_AUTH_TOKEN_CACHE": "file"}, "auth.token_cache_file"),
    ],
)
def test_token_cache_settings_are_checked(
    environ: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cache without what it needs is a configuration error naming the key."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load(None, environ)


async def _replicas(
    stack: AsyncExitStack, count: int, config: str, tmp_path: Path
) -> tuple[list[int], dict[int, asyncio.subprocess.Process]]:
    """Start ``count`` serve processes on free ports; wait until all are ready."""
    ports = [free_port() for _ in range(count)]
    procs = {
        port: await stack.enter_async_context(
            cli_process(["serve", "--config", config, "--port", str(port)], tmp_path, cli_env())
        )
        for port in ports
    }
    for port, proc in procs.items():
        await wait_ready(proc, f"http://127.0.0.1:{port}")
    return ports, procs


async def test_rolling_restart_costs_no_token_and_no_request(
    tmp_path: Path,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
) -> None:
    """All 8 replicas restarted one by one under traffic: 0 new tokens, 0 failed requests."""
    config = redis_config(tmp_path, token_server, upstream.url, redis_server.url)
    async with AsyncExitStack() as stack:
        ports, procs = await _replicas(stack, 8, config, tmp_path)
        live = set(ports)
        routed: dict[int, set[str]] = {port: set() for port in ports}  # targets sent to each
        failures: list[str] = []
        sent = 0
        done = asyncio.Event()

        async def traffic(session: aiohttp.ClientSession) -> None:
            nonlocal sent
            while not done.is_set():
                port = random.choice(sorted(live))  # like a Service: ready endpoints only
                sent += 1
                target = f"/slow/0.3?n={sent}"  # each in flight for a while
                routed[port].add(target)
                try:
                    async with session.get(f"http://127.0.0.1:{port}{target}") as response:
                        await response.read()
                        if response.status != 200:
                            failures.append(str(response.status))
                except aiohttp.ClientError as exc:
                    failures.append(type(exc).__name__)

        def forwarded_all(port: int) -> bool:
            return routed[port] <= {request.target for request in upstream.received}

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            clients = [asyncio.create_task(traffic(s)) for _ in range(8)]
            for port in ports:
                live.discard(port)
                # Once all that was routed there has been forwarded (accepted, maybe not yet
                # answered: the upstream takes 0.3 s), SIGTERM: the drain must answer the rest.
                await wait_for(functools.partial(forwarded_all, port), 10)
                old = procs[port]
                old.send_signal(signal.SIGTERM)
                await asyncio.wait_for(old.wait(), 15)
                new = await stack.enter_async_context(
                    cli_process(
                        ["serve", "--config", config, "--port", str(port)], tmp_path, cli_env()
                    )
                )
                await wait_ready(new, f"http://127.0.0.1:{port}")
                live.add(port)
            done.set()
            await asyncio.gather(*clients)
    assert sent > 100
    assert failures == []
    assert len(token_server.requests) == 1


async def test_a_fleet_spends_one_token_per_lifetime(
    tmp_path: Path,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
) -> None:
    """8 replicas, 20-second tokens, 60 s of traffic: about 3 tokens in all, no 401."""
    token_server.expires_in = 20
    config = redis_config(tmp_path, token_server, upstream.url, redis_server.url)
    statuses: list[int] = []
    async with AsyncExitStack() as stack:
        ports, _ = await _replicas(stack, 8, config, tmp_path)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with aiohttp.ClientSession() as session:
            while loop.time() - started < 60:
                for port in ports:
                    async with session.get(f"http://127.0.0.1:{port}/r") as response:
                        await response.read()
                        statuses.append(response.status)
                await asyncio.sleep(0.1)
    assert set(statuses) == {200}
    # 60 s of 20-second tokens refreshed ~2 s early: the first, then about one per 18 s.
    assert 3 <= len(token_server.issued) <= 5


async def test_encryption_at_rest(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """With a key file, Redis holds only ciphertext; the same key shares, another cannot read."""
    key_file, other_key = tmp_path / "key", tmp_path / "other"
    key_file.write_text(base64.b64encode(bytes(range(32))).decode())
    other_key.write_text(base64.b64encode(bytes(range(1, 33))).decode())
    sealed = redis_settings(
        token_server, upstream, redis_server.url, redis_encryption_key_file=str(key_file)
    )
    async with Proxy(sealed) as first:
        await wait_for(lambda: first.app[TOKENS].current() is not None)
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = await client.keys("sparks-proxy:token:*")
        value = await client.get(keys[0])
    finally:
        await client.aclose()
    assert token_server.issued[0].encode() not in value
    assert value.startswith(b"aesgcm1:")
    async with Proxy(sealed) as same_key:  # reads the sealed token: no new request
        await wait_for(lambda: same_key.app[TOKENS].current() is not None)
    assert len(token_server.issued) == 1
    other = redis_settings(
        token_server, upstream, redis_server.url, redis_encryption_key_file=str(other_key)
    )
    async with Proxy(other) as wrong_key:  # cannot read it: fetches its own
        await wait_for(lambda: wrong_key.app[TOKENS].current() is not None)
    assert len(token_server.issued) == 2


def test_a_malformed_encryption_key_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key file must hold the base64 of an AES key; the error says how to make one."""
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "key"
    bad.write_text("not base64 at all!")
    environ = {
        "SPARKS_PROXY_AUTH_TOKEN_CACHE": "redis",
        "SPARKS_PROXY_AUTH_REDIS_URL": "redis://127.0.0.1:1/0",
        "SPARKS_PROXY_AUTH_REDIS_ENCRYPTION_KEY_FILE": str(bad),
    }
    with pytest.raises(ConfigError, match="head -c 32 /dev/urandom"):
        load(None, environ)


async def test_token_command_shares_through_redis(
    tmp_path: Path, token_server: StandInTokenServer, redis_server: RedisServer
) -> None:
    """``sparks-proxy token`` twice with the Redis cache: the same token, one request."""
    config = redis_config(tmp_path, token_server, "http://127.0.0.1:1", redis_server.url)
    first = await run_cli(["token", "--config", config], tmp_path, cli_env())
    second = await run_cli(["token", "--config", config], tmp_path, cli_env())
    assert first[0] == second[0] == 0
    assert first[1] == second[1] == token_server.issued[0] + "\n"
    assert len(token_server.issued) == 1
