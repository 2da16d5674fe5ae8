"""The proxy's own cost per small GET, without sockets: for finding where the time goes.

The wrk rows of ``bench/run.py`` measure the whole machine: kernel, loopback, and a VM whose
speed varies from one minute to the next. This drives the proxy as it ships (its app, its
listener, its upstream pool and parsers) through in-memory transports instead: a client that
sends the next request when the answer arrives, an upstream that answers at once with nginx's
316-byte answer. What is left is the proxy's Python and the event loop, one request at a time.

    .venv/bin/python bench/hotpath.py                  # CPU time per request
    .venv/bin/python bench/hotpath.py --instructions   # instructions per request (callgrind)

The instruction count is deterministic (valgrind's callgrind, two runs of different lengths,
the difference divided by the extra requests): a change's effect shows even when timings on
this kind of machine wander by a third. py-spy on the timed run says where the time goes::

    py-spy record -r 1000 -o profile.svg -- .venv/bin/python bench/hotpath.py --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import config  # noqa: E402
from proxy.app import FORWARDER, TOKENS  # noqa: E402
from proxy.server import Proxy, run_loop  # noqa: E402
from proxy.standins import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, StandInTokenServer  # noqa: E402
from proxy.upstream import UpstreamConnection  # noqa: E402

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 09:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 316\r\nConnection: keep-alive\r\n\r\n"
) + b"x" * 316


class MemoryTransport(asyncio.Transport):
    """A transport that hands every write to ``on_write`` and never blocks."""

    def __init__(self, on_write: Any) -> None:
        super().__init__()
        self._on_write = on_write
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._on_write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def drive(requests: int) -> tuple[float, float]:
    """Answer ``requests`` small GETs one after another; (CPU s, wall s) per request."""
    loop = asyncio.get_running_loop()
    async with StandInTokenServer() as token_server:
        empty = Path(tempfile.mkdtemp()) / "empty.toml"  # defaults, whatever ./config.toml says
        empty.write_text("")
        settings = config.load(
            str(empty),
            environ={},
            overrides={
                "server.port": 0,
                "upstream.url": "http://127.0.0.1:9",  # never dialled: the pool is pre-filled
                "auth.token_url": token_server.token_url,
                "auth.client_id": DEMO_CLIENT_ID,
                "auth.client_secret": config.Secret(DEMO_CLIENT_SECRET),
                "log.access": False,
            },
        )
        async with Proxy(settings) as proxy:
            await proxy.app[TOKENS].get()  # the first token, before the clock starts
            pool = proxy.app[FORWARDER]._pool  # a bench may reach in
            upstream = UpstreamConnection(loop, pool, settings.upstream.read_timeout)
            upstream.connection_made(
                MemoryTransport(lambda _: loop.call_soon(upstream.data_received, ANSWER))
            )
            pool.park(upstream, None)
            done = loop.create_future()
            answered = 0

            def answer_arrived(data: bytes) -> None:
                nonlocal answered
                answered += 1
                if not data.startswith(b"HTTP/1.1 200 "):
                    done.set_exception(RuntimeError(f"answer {answered}: {data[:60]!r}"))
                elif answered == requests:
                    done.set_result(None)
                else:
                    loop.call_soon(client.data_received, REQUEST)

            assert proxy._listener is not None
            client = proxy._listener()
            client.connection_made(MemoryTransport(answer_arrived))
            gc.freeze()
            cpu, wall = time.process_time(), time.perf_counter()
            client.data_received(REQUEST)
            await done
            return (time.process_time() - cpu) / requests, (time.perf_counter() - wall) / requests


def instructions_per_request(requests: int) -> int:
    """Callgrind's instruction count for ``requests`` more requests, divided by them."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    totals = []
    with tempfile.TemporaryDirectory() as out:
        for count in (requests // 4, requests + requests // 4):
            done = subprocess.run(
                [
                    valgrind,
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}/callgrind.{count}",
                    sys.executable,
                    __file__,
                    "--requests",
                    str(count),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
                timeout=1200,
            )
            found = re.search(r"Collected : (\d+)", done.stderr)
            if found is None:
                sys.exit(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) // requests


def main() -> None:
    """Command line: time the hot path, or count its instructions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests to answer")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions (callgrind; slow)"
    )
    args = parser.parse_args()
    if args.instructions:
        per_request = instructions_per_request(min(args.requests, 1000))
        print(f"{per_request:,} instructions per request")
        return
    cpu, wall = run_loop(drive(args.requests))
    print(f"{args.requests:,} requests: {cpu * 1e6:.1f} us CPU, {wall * 1e6:.1f} us wall each")


if __name__ == "__main__":
    main()
