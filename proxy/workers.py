"""``serve --workers N``: N proxy processes on one port, one token between them.

Each worker is a whole proxy (its own event loop, listener and upstream pool) bound with
SO_REUSEPORT, so the kernel spreads connections across them. They share one token through the
token cache file and its lock (:mod:`proxy.token_store`), or through Redis when configured: the
first worker to need a token fetches it, the others read it. With ``auth.token_cache`` left at
"memory" the supervisor makes a private file (in a mode-0700 directory) and removes it at exit;
if the supervisor is killed, the workers remove it as they stop.

The supervisor only watches: a worker that dies is restarted (after 1 s, doubling to 30 s
while it keeps dying young); SIGTERM or SIGINT is passed on to every worker, which drains as a
single proxy does, and the supervisor exits 0 once they have. SIGHUP does the same unless it
was ignored when the supervisor started (``nohup``). A terminal signals its whole process
group: workers ignore its SIGHUP, and its SIGINT (Ctrl-C) until they serve, so the supervisor
drains them. A port that cannot be had, or a worker exiting with status 2 (unusable settings),
stops everything with status 2 instead of restarting forever.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from . import logs
from .config import Settings
from .errors import ConfigError

log = logging.getLogger("sparks_proxy.workers")

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long resets the restart delay
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
EXIT_CONFIG = 2
# Sent by a terminal to its whole foreground process group (Ctrl-C, hang-up).
_TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGHUP}


def _worker(settings: Settings, index: int, supervisor: int, private_dir: str | None) -> None:
    """A worker process: one proxy sharing the port, until SIGTERM or SIGINT.

    A terminal's SIGINT (Ctrl-C) and SIGHUP reach the whole process group, and the supervisor
    stops the workers on them: a worker ignores SIGHUP, and SIGINT until it serves (from then
    on SIGINT drains it as SIGTERM does). If the supervisor is gone when the worker stops, the
    worker removes the supervisor's ``private_dir`` (the shared token).
    """
    # They came blocked (see _start) so that neither could kill the worker before this line.
    for sig in _TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINAL_SIGNALS)
    # Until run() takes SIGTERM over, it must still end the worker through the clean-up below
    # (the kernel sends it when the supervisor dies, maybe while the worker is starting).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        from .server import run, run_loop  # imported here: the spawned process starts clean

        _stop_with(supervisor)
        logs.configure(settings.log)
        log.info("worker %d (pid %d) starting", index, os.getpid())
        run_loop(run(settings, reuse_port=True))
    except ConfigError as error:
        log.error("worker %d: %s", index, error)
        sys.exit(EXIT_CONFIG)
    finally:
        if private_dir is not None and os.getppid() != supervisor:
            # The supervisor was killed and cannot remove it. Each worker removes it as it
            # exits (a sibling still draining goes on without the shared file), so no live
            # token stays behind.
            shutil.rmtree(private_dir, ignore_errors=True)


def serve_workers(settings: Settings, count: int) -> None:
    """Run ``count`` workers until a signal, restarting any that die.

    Raises :class:`ConfigError` when the port cannot be had, or a worker finds its settings
    unusable: restarting would not help.
    """
    if settings.server.port == 0:
        raise ConfigError("server.workers: needs a fixed server.port (workers share it)")
    _check_port(settings.server.host, settings.server.port)
    # Imported here, as in _worker: a spawned worker imports this module before its signals
    # are set, and must not spend that time importing aiohttp.
    from .server import stop_signals

    stopping = False
    fatal: ConfigError | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in stop_signals()}
    private_dir = None
    try:
        if settings.auth.token_cache == "memory":
            # Workers must share their token somehow: a private file unless told otherwise (a
            # configured file or Redis already is shared).
            private_dir = _private_dir()
            settings = dataclasses.replace(
                settings,
                auth=dataclasses.replace(
                    settings.auth,
                    token_cache="file",
                    token_cache_file=str(Path(private_dir, "token.json")),
                ),
            )
        context = multiprocessing.get_context("spawn")
        workers: dict[int, tuple[BaseProcess, float]] = {}
        delays = dict.fromkeys(range(count), RESTART_DELAY)
        restart_at: dict[int, float] = {}
        for index in range(count):
            workers[index] = _start(context, settings, index, private_dir)
        while not stopping:
            now = time.monotonic()
            for index, due in list(restart_at.items()):
                if now >= due:
                    del restart_at[index]
                    workers[index] = _start(context, settings, index, private_dir)
            for index, (process, started) in list(workers.items()):
                if process.is_alive():
                    continue
                del workers[index]
                if process.exitcode == EXIT_CONFIG:
                    stopping = True
                    fatal = ConfigError(
                        f"server.workers: worker {index} could not start; see its log"
                    )
                    break
                lived = time.monotonic() - started  # `now` predates restarts made in this pass
                delay = RESTART_DELAY if lived >= STABLE_AFTER else delays[index]
                delays[index] = min(delay * 2, MAX_RESTART_DELAY)  # if it dies young again
                log.error(
                    "worker %d (pid %s) exited with status %s after %.0f s; restarting in %.0f s",
                    index,
                    process.pid,
                    process.exitcode,
                    lived,
                    delay,
                )
                restart_at[index] = now + delay
            sentinels = [process.sentinel for process, _ in workers.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
        log.info("stopping %d workers", len(workers))
        for process, _ in workers.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = (
            time.monotonic() + settings.server.drain_delay + settings.server.shutdown_grace + 5
        )
        for process, _ in workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
    finally:
        if private_dir is not None:  # before the handlers go: a signal must not skip this
            shutil.rmtree(private_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fatal is not None:
        raise fatal


def _private_dir() -> str:
    """A new mode-0700 directory for the workers' shared token file."""
    try:
        return tempfile.mkdtemp(prefix="sparks-proxy-")
    except OSError as exc:  # e.g. a read-only root filesystem with no writable /tmp
        # Not gettempdir() here: with no usable directory at all, it raises again.
        where = f": {exc.filename}" if exc.filename else ""
        raise ConfigError(
            f"server.workers: cannot make a directory for the shared token ({exc.strerror}"
            f"{where}); set auth.token_cache_file to a writable path, or TMPDIR"
        ) from None


def _check_port(host: str, port: int) -> None:
    """Fail early when the port is taken: workers would only crash and restart forever.

    A plain bind (no SO_REUSEPORT) also fails against another proxy's workers on the port,
    so two supervisors never split one port's traffic between them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"server.host/server.port: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None


def _stop_with(supervisor: int) -> None:
    """Have the kernel send SIGTERM if the supervisor dies, so no worker outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # the status a shell gives a death by this signal


def _start(
    context: multiprocessing.context.SpawnContext,
    settings: Settings,
    index: int,
    private_dir: str | None,
) -> tuple[BaseProcess, float]:
    process = context.Process(
        target=_worker, args=(settings, index, os.getpid(), private_dir), name=f"worker-{index}"
    )
    # Spawning (re)starts multiprocessing's resource tracker when it is not running, and that
    # unblocks SIGINT on its way out, before the worker is forked: start it first, on its own.
    multiprocessing.resource_tracker.ensure_running()
    # The worker inherits the signal mask: the terminal's signals stay blocked until it has
    # ignored them. One arriving meanwhile is held for the supervisor until its mask is restored.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINAL_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return process, time.monotonic()
