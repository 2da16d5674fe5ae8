"""The command line, run as a real subprocess: exit codes, what it prints, signals.

The stand-in token server and upstream run in the test's own event loop on 127.0.0.1, so the
CLI is started with ``asyncio.create_subprocess_exec`` and the loop keeps serving them while the
subprocess talks to them. Every subprocess is bounded by a timeout and killed in ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.standins import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream

from .support import free_port

RUN_TIMEOUT = 20.0
"""Longest any one CLI run may take before the test fails (and the process is killed)."""
READY_TIMEOUT = 20.0
"""Longest a served proxy may take to answer /-/readyz with 200."""
SHUTDOWN_GRACE = 5.0
"""server.shutdown_grace given to served proxies: they must exit within it after SIGTERM."""


# -- helpers -----------------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SPARKS_PROXY_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKS_PROXY_")}
    # Keep the proxy's own clients away from any machine-wide HTTP proxy.
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(name, None)
    env.update(extra)
    return env


def write_config(directory: Path, text: str, name: str = "settings.toml") -> str:
    """Write ``text`` (dedented) as a TOML file in ``directory``; return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def unreachable_issuer_config(directory: Path, secret_line: str) -> str:
    """A config file whose token URL is a loopback port nothing listens on."""
    return write_config(
        directory,
        f"""
        [auth]
        token_url = "http://127.0.0.1:{free_port()}/oauth/token"
        client_id = "{DEMO_CLIENT_ID}"
        {secret_line}
        """,
    )


def auth_config(
    directory: Path,
    token_server: StandInTokenServer,
    *,
    secret: str = DEMO_CLIENT_SECRET,
    extra: str = "",
) -> str:
    """A config file whose [auth] points at ``token_server`` with demo-client and ``secret``."""
    return write_config(
        directory,
        f"""
        [auth]
        token_url = "{token_server.token_url}"
        client_id = "{DEMO_CLIENT_ID}"
        client_secret = "{secret}"
        """
        + textwrap.dedent(extra),
    )


def run_cli_sync(
    args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m proxy ARGS`` to completion (for runs that need no stand-in server)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


async def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m proxy ARGS`` while this loop keeps serving; (status, stdout, stderr)."""
    async with cli_process(args, cwd, env) as proc:
        return await finish(proc, RUN_TIMEOUT)


@asynccontextmanager
async def cli_process(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    *,
    wrapper: Sequence[str] = (),
    **options: Any,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A long-running ``python -m proxy ARGS``; killed on the way out if still running.

    ``wrapper`` is a command it runs under (e.g. ``nohup``); ``options`` go to
    :func:`asyncio.create_subprocess_exec` (e.g. ``start_new_session``).
    """
    proc = await asyncio.create_subprocess_exec(
        *wrapper,
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **options,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def finish(proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, str, str]:
    """Wait (bounded) for ``proc`` to exit; (status, stdout, stderr)."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def poll(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Wait (bounded) until ``await condition()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def readyz_status(url: str) -> int | None:
    """The status of GET /-/readyz on a new connection, or None if nothing answers."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/-/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_ready(proc: asyncio.subprocess.Process, url: str) -> None:
    """Wait (bounded) until the served proxy answers /-/readyz with 200."""

    async def ready() -> bool:
        if proc.returncode is not None:
            _, err = await proc.communicate()
            raise AssertionError(f"proxy exited early ({proc.returncode}): {err.decode()}")
        return await readyz_status(url) == 200

    await poll(ready, READY_TIMEOUT, f"{url}/-/readyz to answer 200")


def assert_no_traceback(stderr: str) -> None:
    """Nothing on stderr looks like an unhandled exception."""
    assert "Traceback" not in stderr, stderr


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def issuer() -> AsyncIterator[StandInTokenServer]:
    """A stand-in token endpoint on 127.0.0.1 issuing one-hour tokens to demo-client."""
    async with StandInTokenServer() as server:
        yield server


@pytest.fixture
async def api() -> AsyncIterator[StandInUpstream]:
    """A stand-in Sparks API on 127.0.0.1 that records what it receives."""
    async with StandInUpstream() as server:
        yield server


# -- configuration errors: exit 2, one line ----------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "args", "key"),
    [
        pytest.param(
            '[auth]\nclient_secret = "demo-secret"\n', {}, [], "auth.client_id", id="no-client-id"
        ),
        pytest.param(
            '[auth]\nclient_id = "demo-client"\n', {}, [], "auth.client_secret", id="no-secret"
        ),
        pytest.param(
            '[auth]\nclient_id = "demo-client"\nclient_secrt = "demo-secret"\n',
            {},
            [],
            "auth.client_secrt",
            id="unknown-key",
        ),
        pytest.param(
            "",
            {"SPARKS_PROXY_AUTH_CLIENT_SECRT": "demo-secret"},
            [],
            "SPARKS_PROXY_AUTH_CLIENT_SECRT",
            id="unknown-env-key",
        ),
        pytest.param('[server]\nport = "eighty"\n', {}, [], "server.port", id="wrong-type"),
        pytest.param(
            '[auth]\nclient_id = "demo-client"\nclient_secret_file = "missing/client_secret"\n',
            {},
            [],
            "auth.client_secret_file",
            id="unreadable-secret-file",
        ),
        pytest.param('[upstream]\nurl = "not a url"\n', {}, [], "upstream.url", id="non-url"),
        pytest.param("", {}, ["--port", "70000"], "server.port", id="flag-out-of-range"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], args: list[str], key: str
) -> None:
    """An unusable configuration exits 2 with exactly one stderr line naming the key."""
    config = write_config(tmp_path, toml)
    result = run_cli_sync(["serve", "--config", config, *args], tmp_path, cli_env(**env))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sparks-proxy: config error: ")
    assert key in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert "demo-secret" not in result.stderr


@pytest.mark.parametrize("command", ["check", "token"])
def test_commands_needing_credentials_refuse_to_start_without_them(
    tmp_path: Path, command: str
) -> None:
    """check and token, with no configuration at all, exit 2 naming auth.client_id."""
    result = run_cli_sync([command], tmp_path, cli_env())
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "auth.client_id" in result.stderr
    assert "SPARKS_PROXY_AUTH_CLIENT_ID" in result.stderr


def test_secret_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """check with auth.client_secret_file naming a directory exits 2 (config), not 1 (token).

    Nothing is listening at the token URL: the error must come from loading the settings.
    """
    volume = tmp_path / "secret-volume"
    volume.mkdir()
    config = unreachable_issuer_config(tmp_path, f'client_secret_file = "{volume}"')
    result = run_cli_sync(["check", "--config", config], tmp_path, cli_env())
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "auth.client_secret_file" in result.stderr


def test_check_says_why_the_token_endpoint_cannot_be_reached(tmp_path: Path) -> None:
    """Nothing listening at the token URL: exit 1, and the OS's reason, not just a class name."""
    config = unreachable_issuer_config(tmp_path, f'client_secret = "{DEMO_CLIENT_SECRET}"')
    result = run_cli_sync(["check", "--config", config], tmp_path, cli_env())
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "sparks-proxy: token request failed: token_endpoint_unreachable: "
        "token request failed: ClientConnectorError (Connection refused)"
    )


def test_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    """A listen address that is taken exits 2 with one line naming server.port, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli_sync(["demo", "--port", str(port)], tmp_path, cli_env())
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1
    assert "server.port" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in result.stderr


def test_pure_python_parser_is_refused(tmp_path: Path) -> None:
    """With aiohttp's compiled parser off (AIOHTTP_NO_EXTENSIONS), the proxy will not start."""
    result = run_cli_sync(
        ["demo", "--port", str(free_port())], tmp_path, cli_env(AIOHTTP_NO_EXTENSIONS="1")
    )
    assert result.returncode == 2, result.stderr
    assert "compiled HTTP parser" in result.stderr
    assert "Traceback" not in result.stderr


# -- check -------------------------------------------------------------------------------------


async def test_check_reports_expiry_and_scope_but_not_the_token(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """check exits 0 printing expiry and scope; neither the token nor the secret is printed."""
    config = auth_config(tmp_path, issuer)
    status, out, err = await run_cli(["check", "--config", config], tmp_path, cli_env())
    assert status == 0, err
    assert "expires in 3600 s" in out
    assert "data admin core" in out
    assert len(issuer.issued) == 1
    assert issuer.issued[0] not in out + err
    assert DEMO_CLIENT_SECRET not in out + err
    assert_no_traceback(err)


async def test_check_with_credentials_from_environment(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """check works with every setting given as SPARKS_PROXY_* variables (no file)."""
    env = cli_env(
        SPARKS_PROXY_AUTH_TOKEN_URL=issuer.token_url,
        SPARKS_PROXY_AUTH_CLIENT_ID=DEMO_CLIENT_ID,
        SPARKS_PROXY_AUTH_CLIENT_SECRET=DEMO_CLIENT_SECRET,
    )
    status, out, err = await run_cli(["check"], tmp_path, env)
    assert status == 0, err
    assert "expires in 3600 s" in out
    assert [r.fields.get("client_secret") for r in issuer.requests] == [DEMO_CLIENT_SECRET]


async def test_check_with_wrong_secret_exits_1_naming_the_oauth_error(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """A refused credential exits 1; stderr names access_denied and never the secret."""
    wrong = "demo-wrong-secret"
    config = auth_config(tmp_path, issuer, secret=wrong)
    status, out, err = await run_cli(["check", "--config", config], tmp_path, cli_env())
    assert status == 1, err
    assert "access_denied" in err
    assert out == ""
    assert wrong not in out + err
    assert issuer.issued == []
    assert_no_traceback(err)


async def test_check_against_invalid_client_exits_1(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """A token endpoint answering invalid_client makes check exit 1 naming invalid_client."""
    issuer.fail_always = "invalid_client"
    config = auth_config(tmp_path, issuer)
    status, out, err = await run_cli(["check", "--config", config], tmp_path, cli_env())
    assert status == 1, err
    assert "invalid_client" in err
    assert DEMO_CLIENT_SECRET not in out + err
    assert_no_traceback(err)


# -- token -------------------------------------------------------------------------------------


async def test_token_prints_exactly_the_issued_token(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """token prints the issued token as the only line on stdout and exits 0."""
    config = auth_config(tmp_path, issuer)
    status, out, err = await run_cli(["token", "--config", config], tmp_path, cli_env())
    assert status == 0, err
    assert len(issuer.issued) == 1
    assert out == issuer.issued[0] + "\n"
    assert DEMO_CLIENT_SECRET not in out + err


async def test_token_cache_file_reuses_the_token_across_runs(
    tmp_path: Path, issuer: StandInTokenServer
) -> None:
    """With auth.token_cache_file, a second run prints the same token without a new request.

    The cache file is private (mode 0600) and holds the token but never the secret.
    """
    cache = tmp_path / "cache" / "tokens.json"
    cache.parent.mkdir()
    config = auth_config(tmp_path, issuer, extra=f'token_cache_file = "{cache}"\n')

    first = await run_cli(["token", "--config", config], tmp_path, cli_env())
    second = await run_cli(["token", "--config", config], tmp_path, cli_env())

    assert first[0] == 0, first[2]
    assert second[0] == 0, second[2]
    assert len(issuer.issued) == 1
    assert first[1] == second[1] == issuer.issued[0] + "\n"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    content = cache.read_text(encoding="utf-8")
    assert issuer.issued[0] in content
    assert DEMO_CLIENT_SECRET not in content


# -- serve -------------------------------------------------------------------------------------


def serve_config(
    directory: Path, issuer: StandInTokenServer, api: StandInUpstream, port: int
) -> str:
    """Settings for ``serve`` on ``port`` in front of the stand-ins."""
    return auth_config(
        directory,
        issuer,
        extra=f"""
        [server]
        host = "127.0.0.1"
        port = {port}
        shutdown_grace = {SHUTDOWN_GRACE}
        [upstream]
        url = "{api.url}"
        """,
    )


async def test_serve_forwards_with_the_token_and_exits_0_on_sigterm(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream
) -> None:
    """serve becomes ready, forwards with the issued bearer token, and exits 0 on SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = serve_config(tmp_path, issuer, api, port)
    async with cli_process(["serve", "--config", config], tmp_path, cli_env()) as proc:
        await wait_ready(proc, url)
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/projects/acme?view=full") as response,
        ):
            assert response.status == 200
            await response.read()
        forwarded = [r for r in api.received if r.target == "/projects/acme?view=full"]
        assert len(forwarded) == 1
        assert issuer.issued, "no token was issued"
        assert forwarded[0].header("Authorization") == [f"Bearer {issuer.issued[-1]}"]

        proc.send_signal(signal.SIGTERM)
        status, out, err = await finish(proc, SHUTDOWN_GRACE)
    assert status == 0, err
    assert_no_traceback(err)
    for token in issuer.issued:
        assert token not in out + err
    assert DEMO_CLIENT_SECRET not in out + err


async def test_sigterm_drains_in_flight_request_and_fails_readiness(
    tmp_path: Path, issuer: StandInTokenServer, api: StandInUpstream
) -> None:
    """After SIGTERM /-/readyz stops answering 200 at once, yet a slow request still gets 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = serve_config(tmp_path, issuer, api, port)
    async with (
        cli_process(["serve", "--config", config], tmp_path, cli_env()) as proc,
        aiohttp.ClientSession() as session,
    ):
        await wait_ready(proc, url)

        async def slow_request() -> tuple[int, bytes]:
            async with session.get(url + "/slow/3") as response:
                return response.status, await response.read()

        slow = asyncio.create_task(slow_request())
        try:

            async def upstream_has_it() -> bool:
                return any(r.target == "/slow/3" for r in api.received)

            await poll(upstream_has_it, 5.0, "the slow request to reach the upstream")
            proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await readyz_status(url) != 200

            await poll(not_ready, 2.0, "/-/readyz to stop answering 200 after SIGTERM")
            assert not slow.done(), "readiness should fail while the request is still in flight"

            status, body = await asyncio.wait_for(slow, SHUTDOWN_GRACE)
        finally:
            slow.cancel()
        assert status == 200
        assert b'"/slow/3"' in body

        code, _, err = await finish(proc, SHUTDOWN_GRACE)
    assert code == 0, err
    assert_no_traceback(err)


# -- demo --------------------------------------------------------------------------------------


async def test_demo_prints_curl_lines_serves_and_exits_0_on_sigint(tmp_path: Path) -> None:
    """demo prints three curl lines for its URL, forwards a request with 200, exits 0 on SIGINT."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with cli_process(["demo", "--port", str(port)], tmp_path, cli_env()) as proc:
        stdout = proc.stdout
        assert stdout is not None
        banner: list[str] = []

        async def banner_done() -> bool:
            line = await asyncio.wait_for(stdout.readline(), READY_TIMEOUT)
            if not line:
                raise AssertionError(f"demo exited before its banner: {banner}")
            banner.append(line.decode())
            return "Ctrl-C" in banner[-1]

        await poll(banner_done, READY_TIMEOUT, "the demo banner", interval=0)
        curl = [line.strip() for line in banner if line.strip().startswith("curl ")]
        assert len(curl) == 3, banner
        assert all(f"{url}/" in line for line in curl), curl
        assert any(f"{url}/-/readyz" in line for line in curl)

        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/projects/acme?view=full") as response,
        ):
            assert response.status == 200
            echoed = await response.json()
        assert echoed["target"] == "/projects/acme?view=full"

        proc.send_signal(signal.SIGINT)
        status, _, err = await finish(proc, SHUTDOWN_GRACE + 10)
    assert status == 0, err
    assert_no_traceback(err)


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (None, ["serve", "check", "token", "demo", "--version"]),
        ("serve", ["--config", "--port", "--host", "--log-level"]),
        ("check", ["--config", "--log-format"]),
        ("token", ["--config"]),
        ("demo", ["--port", "--host"]),
    ],
)
def test_help_for_each_command(tmp_path: Path, command: str | None, options: list[str]) -> None:
    """--help exits 0 with usage and the command's options, even with no configuration."""
    args = [command, "--help"] if command else ["--help"]
    result = run_cli_sync(args, tmp_path, cli_env())
    assert result.returncode == 0, result.stderr
    usage = f"usage: sparks-proxy {command}" if command else "usage: sparks-proxy"
    assert result.stdout.startswith(usage), result.stdout
    for option in options:
        assert option in result.stdout
    assert result.stderr == ""
