"""``serve --workers N``: processes sharing a port and one token, restarted when they die."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.standins import StandInTokenServer, StandInUpstream
from proxy.workers import serve_workers

from .support import free_port, get_statuses
from .test_cli import (
    api,
    auth_config,
    cli_env,
    cli_process,
    finish,
    issuer,
    poll,
    readyz_status,
    wait_ready,
)

__all__ = ["api", "issuer"]  # fixtures, re-used


def worker_env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment, its temporary files (the private token directory) in tmp_path."""
    return cli_env(TMPDIR=str(tmp_path))


def assert_no_private_dir(tmp_path: Path) -> None:
    """No private token directory (and so no live token) was left behind."""
    assert not list(tmp_path.glob("sparks-proxy-*"))


def children(pid: int) -> set[int]:
    """The live worker processes of supervisor ``pid`` (not multiprocessing's own helpers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    found = set()
    for child in path.read_text().split() if path.exists() else ():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            found.add(int(child))
    return found


async def test_workers_share_one_token_and_survive_a_crash(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream
) -> None:
    """Two workers, a cold burst of 300 requests: one token request; a killed worker returns."""
    issuer.delay = 0.3  # a slow issuer: both workers want a token at the same time
    port = free_port()
    config = auth_config(
        tmp_path,
        issuer,
        extra=f'[upstream]\nurl = "{api.url}"\n[log]\naccess = false\n',
    )
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", config, "--port", str(port), "--workers", "2"]
    async with cli_process(args, tmp_path, worker_env(tmp_path)) as proc:
        await wait_ready(proc, url)
        await poll(lambda: _async(len(children(proc.pid)) == 2), 10, "two workers")
        statuses = await get_statuses(f"{url}/burst/{i}" for i in range(300))
        assert statuses == [200] * 300
        assert len(issuer.requests) == 1

        victim = min(children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        # Until its sockets are closed, the kernel still hands the victim's listener a share of
        # new connections (SO_REUSEPORT), and resets them when it goes. Its files close with its
        # last thread, and only then can the supervisor reap it.
        await poll(
            lambda: _async(not Path(f"/proc/{victim}").exists()), 10, "the killed worker reaped"
        )
        # The other worker keeps serving while the supervisor starts a replacement.
        assert await get_statuses([f"{url}/burst/1000"]) == [200]
        await poll(
            lambda: _async(len(children(proc.pid)) == 2 and victim not in children(proc.pid)),
            15,
            "a replacement worker",
        )
        await wait_ready(proc, url)
        statuses = await get_statuses(f"{url}/burst/{i}" for i in range(100))
        assert statuses == [200] * 100
        # The replacement read the shared token instead of fetching its own.
        assert len(issuer.requests) == 1
        survivors = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        status, _, stderr = await finish(proc, 20)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in survivors)
    assert_no_private_dir(tmp_path)


async def test_workers_need_a_fixed_port(tmp_path: Path, issuer: StandInTokenServer) -> None:
    """``--workers`` with port 0 is a configuration error (they could not share it)."""
    config = auth_config(tmp_path, issuer)
    args = ["serve", "--config", config, "--port", "0", "--workers", "2"]
    async with cli_process(args, tmp_path, worker_env(tmp_path)) as proc:
        status, _, stderr = await finish(proc, 20)
    assert status == 2
    assert "server.workers" in stderr
    assert_no_private_dir(tmp_path)


async def _async(value: bool) -> bool:
    return value


@pytest.mark.parametrize("serving", [True, False], ids=["serving", "starting"])
async def test_workers_do_not_outlive_a_killed_supervisor(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream, serving: bool
) -> None:
    """SIGKILL to the supervisor: the kernel stops its workers, which remove its private token.

    Also while they are starting: before they serve, even before they ask the kernel for it.
    """
    port = free_port()
    config = auth_config(tmp_path, issuer, extra=f'[upstream]\nurl = "{api.url}"\n')
    args = ["serve", "--config", config, "--port", str(port), "--workers", "2"]
    async with cli_process(args, tmp_path, worker_env(tmp_path)) as proc:
        if serving:
            await wait_ready(proc, f"http://127.0.0.1:{port}")
        await poll(lambda: _async(len(children(proc.pid)) == 2), 10, "two workers")
        workers = children(proc.pid)
        proc.kill()
        await proc.wait()
        await poll(
            lambda: _async(not any(Path(f"/proc/{pid}").exists() for pid in workers)),
            10,
            "the workers to stop",
        )
    assert_no_private_dir(tmp_path)


async def test_workers_on_a_taken_port_exit_2(tmp_path: Path, issuer: StandInTokenServer) -> None:
    """A port that cannot be had stops the supervisor with status 2, not endless restarts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = auth_config(tmp_path, issuer)
        args = ["serve", "--config", config, "--port", str(port), "--workers", "2"]
        async with cli_process(args, tmp_path, worker_env(tmp_path)) as proc:
            status, _, stderr = await finish(proc, 20)
    assert status == 2
    assert "server.port" in stderr
    assert "Traceback" not in stderr
    assert_no_private_dir(tmp_path)


@asynccontextmanager
async def in_a_session(
    tmp_path: Path,
    issuer: StandInTokenServer,
    api: StandInUpstream,
    workers: int,
    *,
    ready: bool = True,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``serve`` in a session of its own, whose process group is what a terminal signals.

    Yields the process and its URL once its ``workers`` (if more than 1) are up and, with
    ``ready``, once it answers. In-flight requests get 5 s to finish.
    """
    port = free_port()
    config = auth_config(
        tmp_path,
        issuer,
        extra=f'''
        [server]
        shutdown_grace = 5
        [upstream]
        url = "{api.url}"
        [log]
        access = false
        ''',
    )
    args = ["serve", "--config", config, "--port", str(port), "--workers", str(workers)]
    env = worker_env(tmp_path)
    async with cli_process(args, tmp_path, env, wrapper=wrapper, start_new_session=True) as proc:
        url = f"http://127.0.0.1:{port}"
        if ready:
            await wait_ready(proc, url)
        if workers > 1:
            await poll(lambda: _async(len(children(proc.pid)) == workers), 10, "the workers")
        yield proc, url


ONE_PROCESS_OR_WORKERS = pytest.mark.parametrize(
    "workers", [2, 1], ids=["two-workers", "one-process"]
)


@ONE_PROCESS_OR_WORKERS
async def test_a_closed_terminal_drains_in_flight_requests(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream, workers: int
) -> None:
    """SIGHUP to the whole process group (a closed terminal) drains, as SIGTERM does."""
    async with in_a_session(tmp_path, issuer, api, workers) as (proc, url):
        targets = [f"/slow/2?n={i}" for i in range(8)]
        in_flight = asyncio.create_task(get_statuses(url + target for target in targets))
        try:
            await poll(
                lambda: _async({r.target for r in api.received} >= set(targets)),
                5,
                "the slow requests to reach the upstream",
            )
            os.killpg(proc.pid, signal.SIGHUP)
            assert await asyncio.wait_for(in_flight, 10) == [200] * len(targets)
        finally:
            in_flight.cancel()
        status, _, stderr = await finish(proc, 20)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert_no_private_dir(tmp_path)


@ONE_PROCESS_OR_WORKERS
async def test_under_nohup_a_closed_terminal_changes_nothing(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream, workers: int
) -> None:
    """Started with SIGHUP ignored, the proxy keeps serving through one; SIGTERM still stops it."""
    async with in_a_session(tmp_path, issuer, api, workers, wrapper=["nohup"]) as (proc, url):
        before = children(proc.pid)
        os.killpg(proc.pid, signal.SIGHUP)
        await asyncio.sleep(0.5)  # ample time to start draining, had SIGHUP been taken for a stop
        assert await readyz_status(url) == 200
        assert await get_statuses([f"{url}/after-sighup"]) == [200]
        assert children(proc.pid) == before  # the same workers: none stopped and restarted
        proc.send_signal(signal.SIGTERM)
        status, _, stderr = await finish(proc, 20)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert_no_private_dir(tmp_path)


def test_workers_without_a_writable_temporary_directory_say_what_to_set(
    tmp_path: Path, issuer: StandInTokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No place for the private token file (a read-only root): a config error, no worker."""
    settings = config.load(auth_config(tmp_path, issuer), {}, {"server.port": free_port()})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # as TMPDIR would
    with pytest.raises(ConfigError) as raised:
        serve_workers(settings, 2)
    message = str(raised.value)
    assert message.startswith("server.workers: cannot make a directory for the shared token")
    assert "auth.token_cache_file" in message


async def test_ctrl_c_while_workers_start_stops_them_cleanly(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream
) -> None:
    """Ctrl-C (SIGINT to the process group) as the workers start: exit 0, no traceback."""
    async with in_a_session(tmp_path, issuer, api, 2, ready=False) as (proc, _):
        for pid in children(proc.pid):  # SIGHUP (1) and SIGINT (2) held or ignored from spawn on
            status = Path(f"/proc/{pid}/status").read_text()
            masks = dict(re.findall(r"^(SigBlk|SigIgn):\s*([0-9a-f]+)$", status, re.M))
            assert (int(masks["SigBlk"], 16) | int(masks["SigIgn"], 16)) & 0b11 == 0b11
        await asyncio.sleep(0.2)  # the workers are importing (a start takes ~0.5 s or more)
        os.killpg(proc.pid, signal.SIGINT)
        status, _, stderr = await finish(proc, 20)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert_no_private_dir(tmp_path)
