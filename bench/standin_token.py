"""Run sparks-proxy's stand-in token server on 127.0.0.1 for the benchmark; print its port.

Usage: ``python bench/standin_token.py [--port N] [--delay SECONDS] [--max-seconds S]``.
The first line on stdout is the port it listens on. It serves until SIGTERM or SIGINT, or
until ``--max-seconds`` have passed, so a helper left behind by a killed run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from proxy.standins import StandInTokenServer


async def serve(port: int, delay: float, max_seconds: float) -> None:
    """Serve tokens on ``port`` (0: a free one) until a signal or ``max_seconds``."""
    server = StandInTokenServer(delay=delay)
    await server.start(port)
    print(server.port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max_seconds)
    finally:
        await server.stop()


def main() -> None:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="exit by itself after this long"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay, args.max_seconds))


if __name__ == "__main__":
    main()
