"""Soak: minutes of mixed traffic through sparks-proxy, then a report. Run by hand.

    .venv/bin/python bench/soak.py --duration 180

The proxy runs as it ships (``sparks-proxy serve``, a subprocess) in front of the stand-in
token server (60-second tokens) and the stand-in upstream, both on 127.0.0.1 in this process.
The mix: normal GETs, uploads and downloads whose bytes are checked end to end; garbage from
the hardening lists on raw sockets; clients that hang up mid-upload and mid-download; and token
rotations, both by expiry and by revoking the current token at the upstream. Everything is
bounded by ``--duration``; it prints requests sent, answered, wrong answers (must be 0), 401s
seen by clients (must be 0), token requests, and RSS, open fds and asyncio tasks of the proxy
at the start and the end (they should be flat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.standins import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream

REPLAY_BODY_LIMIT = 65536  # the proxy's default upstream.replay_body_limit

GARBAGE = [
    b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\naaaa\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: a\r\n b\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n\r\n",
    b"GET /x HTTP/2.0\r\nHost: p\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
]


@dataclass
class Tally:
    """What happened, counted as it happens."""

    sent: int = 0
    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    unauthorized: int = 0
    unauthorized_streamed: int = 0
    garbage: int = 0
    garbage_accepted: int = 0
    hangups: int = 0

    def bad(self, what: str) -> None:
        """Record a wrong answer (kept short: the first few are printed)."""
        self.wrong.append(what)


def probe(pid: int, metrics: str) -> dict[str, float]:
    """RSS (MiB) and open fds of ``pid``, asyncio tasks from its /-/metrics text."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    tasks = next(
        (float(line.split()[1]) for line in metrics.splitlines()
         if line.startswith("sparks_proxy_asyncio_tasks ")),
        float("nan"),
    )  # fmt: skip
    return {"rss_mib": rss_kib / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")), "tasks": tasks}


async def normal_traffic(
    session: aiohttp.ClientSession, base: str, tally: Tally, stop: float
) -> None:
    """GETs, checked uploads and checked downloads, one after another until ``stop``."""
    rng = random.Random()
    while time.monotonic() < stop:
        kind = rng.choice(("get", "get", "get", "upload", "download"))
        tally.sent += 1
        try:
            if kind == "get":
                async with session.get(f"{base}/projects/p{rng.randrange(100)}?q=1") as resp:
                    body = await resp.json()
                    ok = resp.status == 200 and body["target"].startswith("/projects/p")
            elif kind == "upload":
                data = os.urandom(rng.choice((10, 5_000, 200_000)))
                async with session.post(f"{base}/upload", data=data) as resp:
                    body = await resp.json()
                    ok = (
                        resp.status == 200
                        and body["body_sha256"] == hashlib.sha256(data).hexdigest()
                    )
            else:
                size = rng.choice((1_000, 300_000, 2_000_000))
                async with session.get(f"{base}/bytes/{size}") as resp:
                    ok = resp.status == 200 and len(await resp.read()) == size
            tally.answered += 1
            if resp.status == 401 and kind == "upload" and len(data) > REPLAY_BODY_LIMIT:
                # A streamed body cannot be sent twice: at a revocation its 401 is expected.
                tally.unauthorized_streamed += 1
            elif resp.status == 401:
                tally.unauthorized += 1
                tally.bad(f"{kind} -> 401")
            elif not ok:
                tally.bad(f"{kind} -> {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.bad(f"{kind} -> {type(exc).__name__}")


async def garbage_traffic(port: int, tally: Tally, stop: float) -> None:
    """Malformed requests on raw sockets; none may get a 2xx."""
    rng = random.Random()
    while time.monotonic() < stop:
        tally.garbage += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(rng.choice(GARBAGE))
            await writer.drain()
            async with asyncio.timeout(5):
                answer = await reader.read(64)
            writer.close()
            if answer.startswith(b"HTTP/1.1 2"):
                tally.garbage_accepted += 1
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)


async def hangups(port: int, tally: Tally, stop: float) -> None:
    """Clients that vanish mid-upload and mid-download."""
    rng = random.Random()
    while time.monotonic() < stop:
        tally.hangups += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if rng.random() < 0.5:
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\n\r\n"
                    + b"x" * 100_000
                )
                await writer.drain()
            else:
                writer.write(b"GET /bytes/20000000 HTTP/1.1\r\nHost: p\r\n\r\n")
                await writer.drain()
                async with asyncio.timeout(5):
                    await reader.readexactly(50_000)
            writer.transport.abort()
        await asyncio.sleep(0.1)


async def revoke_tokens(
    token_server: StandInTokenServer, upstream: StandInUpstream, stop: float, every: float
) -> int:
    """Every ``every`` seconds, make the upstream reject the newest token (a revocation)."""
    revoked = 0
    while time.monotonic() + every < stop:
        await asyncio.sleep(every)
        if token_server.issued:
            upstream.rejected_tokens.add(token_server.issued[-1])
            revoked += 1
    return revoked


async def run_clients(base: str, tally: Tally, stop: float, concurrency: int) -> None:
    """``concurrency`` clients of normal traffic sharing one keep-alive session."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await asyncio.gather(
            *(normal_traffic(session, base, tally, stop) for _ in range(concurrency))
        )


async def wait_until_ready(base: str) -> None:
    """Poll /-/readyz (bounded) until the proxy holds a token."""
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(base + "/-/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError("the proxy never became ready")


async def measure(pid: int, base: str) -> dict[str, float]:
    """Let hung-up transfers unwind, then probe the proxy."""
    await asyncio.sleep(2)
    async with aiohttp.ClientSession() as session, session.get(base + "/-/metrics") as resp:
        return probe(pid, await resp.text())


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def soak(duration: float, concurrency: int, token_lifetime: int) -> int:
    """Run the soak; return 0 when nothing went wrong."""
    token_server = StandInTokenServer(expires_in=token_lifetime)
    upstream = StandInUpstream()
    await token_server.start()
    await upstream.start()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sparks-soak-")
    config = Path(workdir, "soak.toml")
    config.write_text(  # noqa: ASYNC240 - once, before any traffic
        f'[server]\nport = {port}\n[upstream]\nurl = "{upstream.url}"\n'
        f'[auth]\ntoken_url = "{token_server.token_url}"\nclient_id = "{DEMO_CLIENT_ID}"\n'
        f'client_secret = "{DEMO_CLIENT_SECRET}"\n[log]\nlevel = "warning"\naccess = false\n'
    )
    # The proxy's log goes to a file: an unread pipe would fill and stall it.
    log_file = open(Path(workdir, "proxy.log"), "wb")  # noqa: ASYNC230, SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        Path(sys.executable).with_name("sparks-proxy"), "serve", "--config", str(config),
        stderr=log_file,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    try:
        await wait_until_ready(base)
        # Warm up with the same mix, then measure with no client connected: what is left
        # open is the proxy's own (pooled upstream connections, its tasks).
        await run_clients(base, Tally(), time.monotonic() + 3, concurrency)
        start = await measure(proc.pid, base)
        stop = time.monotonic() + duration
        revoked, *_ = await asyncio.gather(
            revoke_tokens(token_server, upstream, stop, every=max(5.0, duration / 6)),
            garbage_traffic(port, tally, stop),
            hangups(port, tally, stop),
            run_clients(base, tally, stop, concurrency),
        )
        end = await measure(proc.pid, base)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_status = await asyncio.wait_for(proc.wait(), 20)
        await upstream.stop()
        await token_server.stop()
        log_file.close()
    print(
        f"duration {duration:.0f} s, {concurrency} concurrent clients, tokens of {token_lifetime} s"
    )
    print(f"requests sent {tally.sent}, answered {tally.answered}, wrong {len(tally.wrong)}")
    for what in tally.wrong[:10]:
        print("  wrong:", what)
    print(
        f"401 seen by clients {tally.unauthorized}; revocations {revoked}; streamed uploads "
        f"answered 401 at a revocation (cannot be replayed) {tally.unauthorized_streamed}"
    )
    print(f"proxy log: {workdir}/proxy.log")
    print(
        f"garbage sent {tally.garbage}, accepted {tally.garbage_accepted}; hang-ups {tally.hangups}"
    )
    print(f"token requests {len(token_server.requests)}, issued {len(token_server.issued)}")
    for key in ("rss_mib", "fds", "tasks"):
        print(f"{key:8} start {start[key]:8.1f}   end {end[key]:8.1f}")
    print(f"proxy exit status after SIGTERM: {exit_status}")
    failed = tally.wrong or tally.unauthorized or tally.garbage_accepted or exit_status
    return 1 if failed else 0


def main() -> int:
    """Parse arguments and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--concurrency", type=int, default=16, help="normal clients (16)")
    parser.add_argument("--token-lifetime", type=int, default=60, help="seconds (60)")
    args = parser.parse_args()
    return asyncio.run(soak(args.duration, args.concurrency, args.token_lifetime))


if __name__ == "__main__":
    sys.exit(main())
