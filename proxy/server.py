"""Server lifecycle, top to bottom: start the app, listen, wait for a signal, drain, stop.

On SIGTERM or SIGINT, or SIGHUP (a closed terminal) unless it was ignored from the start (see
:func:`stop_signals`): readiness fails at once, the listening socket closes (no new
connections), idle keep-alive connections close, in-flight requests get
``server.shutdown_grace`` seconds to finish, then the app's resources close and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from .app import LIFECYCLE, Dispatcher, create_app
from .config import Settings
from .errors import ConfigError
from .listener import Listener

log = logging.getLogger("sparks_proxy.server")

T = TypeVar("T")


class Proxy:
    """One running proxy: its app, its listener and their lifetimes.

    ``async with Proxy(settings) as proxy:`` serves on ``proxy.url`` until the block ends.
    """

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        self.app = create_app(settings)
        self._listener: Listener | None = None
        self._server: asyncio.Server | None = None
        self._started_app = False
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080``."""
        host = self.settings.server.host
        # A wildcard address is where it listens, not where a client connects.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start the app's resources, then listen."""
        # As aiohttp's AppRunner does: startup may still set state, then everything freezes.
        self.app.on_startup.freeze()
        self._started_app = True
        await self.app.startup()
        self.app.freeze()
        server_settings = self.settings.server
        self._listener = Listener(Dispatcher(self.app), server_settings)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._listener,
                server_settings.host or None,
                server_settings.port,
                reuse_port=self._reuse_port or None,
            )
        except OSError as exc:
            raise ConfigError(
                f"server.host/server.port: cannot listen on "
                f"{server_settings.host}:{server_settings.port} ({exc.strerror or exc})"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s, forwarding to %s", self.url, self.settings.upstream.url)

    async def stop(self) -> None:
        """Fail readiness, stop accepting, let in-flight requests finish, close resources."""
        self.app[LIFECYCLE].draining = True
        if self._server is not None and self.settings.server.drain_delay:
            # Still accepting: load balancers see readiness fail before connections are refused.
            log.info(
                "draining: readiness fails; closing the listener in %.1f s",
                self.settings.server.drain_delay,
            )
            await asyncio.sleep(self.settings.server.drain_delay)
        if self._server is not None and self._listener is not None:
            log.info(
                "shutting down: waiting up to %.0f s for in-flight requests",
                self.settings.server.shutdown_grace,
            )
            self._server.close()  # no new connections
            await self._listener.shutdown(self.settings.server.shutdown_grace)
            await self._server.wait_closed()
            self._server = None
        if self._started_app:
            await self.app.cleanup()
            self._started_app = False

    async def __aenter__(self) -> Proxy:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def stop_signals() -> list[signal.Signals]:
    """The signals that stop the proxy gracefully: SIGTERM, SIGINT, and SIGHUP unless ignored.

    SIGHUP ignored from the start means ``nohup``, or a worker (a terminal's hang-up reaches the
    whole process group, and the supervisor orchestrates the stop): it then stays ignored.
    """
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    return [signal.SIGTERM, signal.SIGINT, *([] if ignored else [signal.SIGHUP])]


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (the ``fast`` extra), else on asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


async def run(
    settings: Settings,
    on_ready: Callable[[Proxy], None] | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve until one of :func:`stop_signals`, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    async with Proxy(settings, reuse_port=reuse_port) as proxy:
        if on_ready is not None:
            on_ready(proxy)
        # Everything made at start-up lives as long as the process: keep the collector from
        # walking it again and again on the request path.
        gc.freeze()
        await stop.wait()
        log.info("signal received")
