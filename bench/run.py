"""sparks-proxy beside nginx doing the same job, measured side by side on this machine.

Run ``.venv/bin/python bench/run.py`` (``--quick`` for a short smoke run). It starts, all on
127.0.0.1 and all under one temporary directory:

- an upstream nginx (core 1) serving a fixed 316-byte JSON body, large files, and a WebDAV
  ``PUT`` location that writes uploads to disk (so every upload byte is really read);
- the stand-in token server (``bench/standin_token.py``, core 1);
- the peer: nginx as an authenticating proxy (one worker, core 0);
- sparks-proxy as shipped, ``sparks-proxy serve --config <tmp toml>`` (core 0);

then drives them from core 1 with wrk, a raw-socket client (64 KiB buffers) for transfers and
aiohttp for the cold burst, and prints one table: medians, and the median of each run's ratio
(sparks-proxy / nginx).
Every load is bounded in time, every process it starts is killed in a ``finally`` and the
temporary directory is removed. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPARKS = ROOT / ".venv" / "bin" / "sparks-proxy"
TOKEN_HELPER = Path(__file__).resolve().with_name("standin_token.py")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CHUNK = 64 * KIB
"""Client read and write buffer for the transfer rows."""

PROXY_CORE = "0"
LOAD_CORE = "1"
FAKE_TOKEN = "bench-fixed-fake-token"
CLIENT_CREDENTIAL = "Bearer client-credential-that-must-not-pass"
TOKEN_DELAY = 0.5
"""Seconds the burst row's token server waits before answering, so the burst finds no token."""
BURST = 1000
START_TIMEOUT = 20.0
TRANSFER_TIMEOUT = 300.0
SOCKET_TIMEOUT = 30.0
TRANSFER_ROUNDS = 6
"""Transfers per server and run; the run's figure is their median (one lasts under a second).
Even: the proxies' order alternates from round to round."""
SPREAD_NOTE = 1.5
"""A row whose runs differ by more than this factor (max / min) gets a note."""
BUSY_BEFORE = 10.0
"""Per cent of all cores busy just before the run above which other work is noted."""
POLL_INTERVAL = 0.002
UPLOAD_NOTE = (
    "upload upstream: nginx WebDAV PUT writing the body to a file in the temp dir; "
    "each upload's file size on disk is checked, so every byte was read"
)


def small_body() -> bytes:
    """The fixed 316-byte JSON answer of the upstream's ``/small``."""
    doc = {"id": "acme-0001", "name": "Acme Corporation", "kind": "project", "pad": ""}
    doc["pad"] = "x" * (316 - len(json.dumps(doc, separators=(",", ":"))))
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == 316
    return body


SMALL = small_body()


class BenchError(Exception):
    """A measurement could not be made; the message says why."""


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def size_text(size: int) -> str:
    """``100 MiB``, ``1 GiB``."""
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size // MIB} MiB"


# -- tools ------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """The tool's path on PATH or in the sbin directories (nginx lives in /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@contextlib.contextmanager
def services_kept_down() -> Iterator[None]:
    """Keep dpkg from starting nginx's own service (port 80) while it is installed."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def ensure_tools() -> dict[str, str]:
    """Paths of nginx and wrk, installing the Debian packages only when one is missing."""
    missing = [name for name in ("nginx", "wrk") if find_tool(name) is None]
    if missing:
        if os.geteuid() != 0:
            raise BenchError(
                f"missing {', '.join(missing)}: run apt-get install {' '.join(missing)}"
            )
        say(f"installing {', '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with services_kept_down():
            subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *missing],
                check=True,
                env=env,
                timeout=900,
            )
    tools = {name: find_tool(name) for name in ("nginx", "wrk")}
    absent = [name for name, path in tools.items() if path is None]
    if absent:
        raise BenchError(f"still missing after apt-get: {', '.join(absent)}")
    return {name: path for name, path in tools.items() if path is not None}


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers; a no-op once the process is reaped.

    Once reaped, the pid may belong to someone else: it is never signalled again.
    """
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5.0)
            return
        except subprocess.TimeoutExpired:
            continue


class Lab:
    """The temporary directory and every process the benchmark starts; ``close`` ends them."""

    def __init__(self, pin: bool) -> None:
        shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private dir in it
        # tmpfs keeps disk writeback out of the upload and download figures.
        root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="sparks-bench-", dir=root))
        self.pin = pin
        self._procs: list[subprocess.Popen[Any]] = []
        self._serial = itertools.count(1)

    def path(self, name: str) -> Path:
        """A fresh, numbered path under the temp dir (``name-3``)."""
        return self.dir / f"{name}-{next(self._serial)}"

    def spawn(
        self, cmd: Sequence[str], *, cpus: str | None, log: Path, stdout: int | None = None
    ) -> subprocess.Popen[Any]:
        """Start ``cmd`` in its own process group, pinned to ``cpus`` when pinning."""
        if cpus is not None and self.pin:
            cmd = ["taskset", "-c", cpus, *cmd]
        with log.open("ab") as err:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=err if stdout is None else stdout,
                stderr=err,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process (newest first) and remove the temp dir."""
        for proc in reversed(self._procs):
            stop_process(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection to 127.0.0.1:``port``; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_200(
    port: int, path: str, proc: subprocess.Popen[Any], log: Path, timeout: float = START_TIMEOUT
) -> None:
    """Poll ``path`` until it answers 200; raise if ``proc`` dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode}: {log_tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, path)[0] == 200:
                return
        time.sleep(POLL_INTERVAL)
    raise BenchError(f"no 200 on :{port}{path} within {timeout:.0f} s: {log_tail(log)}")


def read_line(stream: IO[bytes], timeout: float) -> str:
    """The first line a child prints, waiting at most ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError("helper printed nothing")
        return stream.readline().decode().strip()


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure (kB) from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} for pid {pid}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds the process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_ticks() -> list[int]:
    """All cores' time so far, by kind: user, nice, system, idle, iowait, irq, softirq, steal..."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine_busy(seconds: float = 1.0) -> float:
    """Per cent of all cores busy over the next ``seconds`` (from /proc/stat)."""
    before = cpu_ticks()
    time.sleep(seconds)
    after = cpu_ticks()
    idle = (after[3] + after[4]) - (before[3] + before[4])  # idle + iowait
    return 100.0 * (1 - idle / max(sum(after) - sum(before), 1))


def stolen_share(before: list[int], after: list[int]) -> float | None:
    """Per cent of all cores' time between two ``cpu_ticks()`` that the hypervisor took."""
    if len(before) < 8 or len(after) < 8:
        return None  # a kernel that does not count steal time
    return 100.0 * (after[7] - before[7]) / max(sum(after) - sum(before), 1)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (an nginx master's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


# -- the services -----------------------------------------------------------------------------


def nginx_conf(prefix: Path, port: int, workers: int, body: str) -> str:
    """A complete nginx.conf: foreground, everything under ``prefix``, no access log."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir
    temps = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temps}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
{body}
    }}
}}
"""


def upstream_locations(files: Path, uploads: Path) -> str:
    """The upstream's routes: the small JSON, an Authorization echo, files, WebDAV PUT."""
    small = SMALL.decode()
    return f"""        location = /small {{ default_type application/json; return 200 '{small}'; }}
        location = /auth {{ default_type text/plain; return 200 '$http_authorization'; }}
        location /files/ {{ alias {files}/; sendfile on; tcp_nopush on; }}
        location /upload/ {{
            alias {uploads}/;
            dav_methods PUT;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}"""


def peer_locations(upstream_port: int) -> tuple[str, str]:
    """The nginx peer: (``upstream`` block, server body) doing sparks-proxy's job."""
    pool = f"""    upstream sparks_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
"""
    server = f"""        client_max_body_size 0;
        location / {{
            proxy_pass http://sparks_upstream;
            proxy_http_version 1.1;
            proxy_set_header Host $proxy_host;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {FAKE_TOKEN}";
            proxy_set_header X-Logicdrop-ApiKey "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            # The same 64 KiB relay buffers as the client: with buffering off, nginx's
            # defaults (4-16 KiB) cost it half its transfer throughput.
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
            proxy_read_timeout 60s;
        }}"""
    return pool, server


@dataclass
class Running:
    """A started server: its process, port and log."""

    proc: subprocess.Popen[Any]
    port: int
    log: Path
    forks: bool = False
    """Whether requests are served by a child (an nginx master's worker)."""

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def serving_pid(self) -> int:
        """The process that moves the bytes: the worker of an nginx master, else the process."""
        return children_of(self.proc.pid)[0] if self.forks else self.proc.pid


@dataclass
class Bench:
    """What every measurement needs: the plan, the lab and the long-lived servers."""

    args: argparse.Namespace
    lab: Lab
    tools: dict[str, str]
    files: Path
    uploads: Path
    sparks_cmd: str
    has_workers: bool
    upstream: Running | None = None
    token_url: str = ""
    slow_token_url: str = ""
    peer: Running | None = None
    sparks: Running | None = None
    notes: set[str] = field(default_factory=set)
    busy_before: float = 0.0
    ticks_at_start: list[int] = field(default_factory=cpu_ticks)

    @property
    def transfer(self) -> int:
        """Bytes per download/upload."""
        return 20 * MIB if self.args.quick else 100 * MIB

    @property
    def stream(self) -> int:
        """Bytes streamed for the RSS row."""
        return 100 * MIB if self.args.quick else GIB

    def up(self) -> Running:
        """The upstream (started)."""
        assert self.upstream is not None
        return self.upstream

    def start_nginx(
        self, name: str, body: str, *, workers: int = 1, cpus: str | None, head: str = ""
    ) -> Running:
        """An nginx with ``body`` as its server block, answering 200 on ``/small``."""
        prefix = self.lab.path(name)
        prefix.mkdir()
        port = free_port()
        conf = prefix / "nginx.conf"
        text = nginx_conf(prefix, port, workers, body)
        conf.write_text(text.replace("http {\n", "http {\n" + head, 1))
        log = prefix / "stderr.log"
        cmd = [self.tools["nginx"], "-p", str(prefix), "-c", str(conf), "-e", str(log)]
        proc = self.lab.spawn(cmd, cpus=cpus, log=log)
        wait_for_200(port, "/small", proc, log)
        return Running(proc, port, log, forks=True)

    def start_upstream(self) -> None:
        """The upstream nginx on the load core."""
        self.upstream = self.start_nginx(
            "upstream", upstream_locations(self.files, self.uploads), cpus=LOAD_CORE
        )

    def start_peer(self, *, workers: int = 1, cpus: str | None = PROXY_CORE) -> Running:
        """An nginx peer proxy in front of the upstream."""
        pool, server = peer_locations(self.up().port)
        return self.start_nginx("nginx-peer", server, workers=workers, cpus=cpus, head=pool)

    def start_token_server(self, delay: float) -> str:
        """A stand-in token server in a helper process; its token URL."""
        log = self.lab.path("token-server.log")
        cmd = [sys.executable, str(TOKEN_HELPER), "--delay", str(delay), "--max-seconds", "3600"]
        proc = self.lab.spawn(cmd, cpus=LOAD_CORE, log=log, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        port = read_line(proc.stdout, START_TIMEOUT)
        if not port.isdigit():
            raise BenchError(f"token helper said {port!r}: {log_tail(log)}")
        return f"http://127.0.0.1:{port}/oauth/token"

    def spawn_sparks(
        self,
        *,
        token_url: str | None = None,
        cpus: str | None = PROXY_CORE,
        extra: Sequence[str] = (),
    ) -> Running:
        """Spawn ``sparks-proxy serve`` on a free port (not waiting for it)."""
        port = free_port()
        conf = self.lab.path("sparks.toml")
        conf.write_text(
            f"""[server]
host = "127.0.0.1"
port = {port}
shutdown_grace = 1.0

[upstream]
url = "{self.up().url("")}"

[auth]
token_url = "{token_url or self.token_url}"
client_id = "demo-client"
client_secret = "demo-secret"

[log]
level = "warning"
access = false
"""
        )
        log = conf.with_suffix(".log")
        cmd = [self.sparks_cmd, "serve", "--config", str(conf), *extra]
        return Running(self.lab.spawn(cmd, cpus=cpus, log=log), port, log)

    def start_sparks(self, **kwargs: Any) -> Running:
        """sparks-proxy, ready (a forwarded GET answers 200)."""
        running = self.spawn_sparks(**kwargs)
        wait_for_200(running.port, "/small", running.proc, running.log)
        return running

    def proxies(self, run: int) -> list[tuple[str, Running]]:
        """Both proxies under test, in an order that alternates between runs."""
        assert self.sparks is not None
        assert self.peer is not None
        pair = [("sparks", self.sparks), ("nginx", self.peer)]
        return pair if run % 2 == 0 else pair[::-1]


def make_blob(path: Path, size: int) -> None:
    """A file of ``size`` incompressible bytes (a random MiB repeated)."""
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(block)
        out.write(block[: size % MIB])


def check_servers(bench: Bench) -> None:
    """Both proxies forward byte for byte and replace the client's credential."""
    up = bench.up()
    if http_get(up.port, "/small") != (200, SMALL):
        raise BenchError("the upstream does not serve the 316-byte body")
    for name, proxy in bench.proxies(0):
        if http_get(proxy.port, "/small") != (200, SMALL):
            raise BenchError(f"{name}: /small did not come back byte for byte")
        status, auth = http_get(proxy.port, "/auth", {"Authorization": CLIENT_CREDENTIAL})
        if status != 200 or not auth.startswith(b"Bearer ") or auth == CLIENT_CREDENTIAL.encode():
            raise BenchError(f"{name}: the upstream did not get the proxy's own token")


# -- load generators --------------------------------------------------------------------------


@dataclass
class WrkResult:
    """What one wrk run reported."""

    rps: float
    requests: int
    p50_ms: float | None
    problems: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> WrkResult:
    """Requests/s, the p50 latency (ms, with ``--latency``) and any errors from wrk's output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    if rps is None or requests is None:
        raise BenchError(f"unexpected wrk output: {output[-300:]!r}")
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    problems = [
        m.group(0).strip()
        for m in re.finditer(r"^\s*(Non-2xx or 3xx responses|Socket errors):.*$", output, re.M)
    ]
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(requests.group(1)),
        p50_ms=float(p50.group(1)) * _UNITS_MS[p50.group(2)] if p50 else None,
        problems="; ".join(problems),
    )


def wrk(
    bench: Bench, url: str, *, threads: int, conns: int, duration: float, latency: bool = False
) -> WrkResult:
    """One bounded wrk run, pinned to the load core unless ``threads`` > 1."""
    cmd = [bench.tools["wrk"], f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s"]
    cmd += ["--latency", url] if latency else [url]
    if bench.lab.pin and threads == 1:
        cmd = ["taskset", "-c", LOAD_CORE, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    result = parse_wrk(done.stdout)
    if result.problems:
        bench.notes.add(f"wrk errors against {url}: {result.problems}")
    return result


def read_head(sock: socket.socket, buffer: memoryview) -> tuple[int, int | None, int]:
    """Read a response head: (status, Content-Length or None, body bytes already read)."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        n = sock.recv_into(buffer)
        if n == 0 or len(data) > CHUNK:
            raise BenchError("no complete response head")
        data += buffer[:n]
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }
    if "chunked" in fields.get("transfer-encoding", "").lower():
        raise BenchError("a chunked answer where a Content-Length was expected")
    length = fields.get("content-length")
    return int(status_line.split()[1]), int(length) if length else None, len(rest)


def exchange_head(port: int, method: str, path: str, extra: str = "") -> bytes:
    """A request head that asks the server to close the connection after its answer."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


def download(port: int, path: str, size: int) -> float:
    """GET ``path`` (``size`` bytes expected) with 64 KiB reads; MB/s (10^6 bytes/s)."""
    buffer = memoryview(bytearray(CHUNK))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(exchange_head(port, "GET", path))
        status, length, got = read_head(sock, buffer)
        while got < size and time.monotonic() - started < TRANSFER_TIMEOUT:
            n = sock.recv_into(buffer)
            if n == 0:
                break
            got += n
    elapsed = time.monotonic() - started
    if status != 200 or got != size or length not in (None, size):
        raise BenchError(f"download :{port}{path}: status {status}, {got} of {size} bytes")
    return size / elapsed / 1e6


def upload(port: int, path: str, size: int, landed: Path) -> float:
    """PUT ``size`` bytes in 64 KiB writes; MB/s, counted only if ``landed`` holds them all."""
    landed.unlink(missing_ok=True)
    block = memoryview(os.urandom(CHUNK))
    buffer = memoryview(bytearray(CHUNK))
    length = f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(exchange_head(port, "PUT", path, length))
        for offset in range(0, size, CHUNK):
            sock.sendall(block[: min(CHUNK, size - offset)])
        status = read_head(sock, buffer)[0]
    elapsed = time.monotonic() - started
    written = landed.stat().st_size if landed.exists() else 0
    if status not in (201, 204) or written != size:
        raise BenchError(f"upload :{port}{path}: status {status}, {written} of {size} on disk")
    landed.unlink()
    return size / elapsed / 1e6


async def burst(url: str, count: int) -> dict[int, int]:
    """``count`` concurrent GETs, each on its own connection; how many got each status."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT),
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:

        async def one() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    counts: dict[int, int] = defaultdict(int)
    for status in statuses:
        counts[status if isinstance(status, int) else -1] += 1
    return dict(counts)


# -- measurements -----------------------------------------------------------------------------


class Samples:
    """Every figure measured, by key (``small_rps.sparks``), in run order."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.runs: dict[str, list[int]] = defaultdict(list)
        """The run each figure was measured in (a failed measurement adds none)."""
        self.run = 0
        """The run being measured now."""

    def add(self, key: str, value: float) -> None:
        """Record one figure."""
        self.values[key].append(value)
        self.runs[key].append(self.run)

    def by_run(self, key: str) -> dict[int, float]:
        """The figures under ``key`` by run (the last one, if a run measured it twice)."""
        return dict(zip(self.runs[key], self.values[key], strict=True))

    def median(self, key: str) -> float | None:
        """The median of the figures under ``key``, or None."""
        values = self.values.get(key)
        return statistics.median(values) if values else None


def measure_small_get(bench: Bench, samples: Samples, run: int) -> None:
    """Row 1: requests/s for the small GET at 50 connections, one wrk thread.

    Also the proxy's CPU time per request and how busy it kept its core, for the notes.
    """
    for name, proxy in bench.proxies(run):
        pid = proxy.serving_pid()
        (user_before, system_before), started = cpu_seconds(pid), time.monotonic()
        result = wrk(bench, proxy.url("/small"), threads=1, conns=50, duration=bench.args.duration)
        user, system = cpu_seconds(pid)
        user, system = user - user_before, system - system_before
        requests = max(result.requests, 1)
        samples.add(f"small_rps.{name}", result.rps)
        samples.add(f"cpu_us.{name}", (user + system) / requests * 1e6)
        samples.add(f"system_us.{name}", system / requests * 1e6)
        samples.add(f"cpu_busy.{name}", (user + system) / (time.monotonic() - started) * 100)
        say(f"  small GET c=50  {name:7} {result.rps:10,.0f} req/s")


def measure_latency(bench: Bench, samples: Samples, run: int) -> None:
    """Row 2: p50 at one connection, direct and through each proxy; the difference."""
    targets = [("direct", bench.up()), *bench.proxies(run)]
    p50: dict[str, float] = {}
    for name, server in targets:
        result = wrk(
            bench,
            server.url("/small"),
            threads=1,
            conns=1,
            duration=bench.args.duration,
            latency=True,
        )
        if result.p50_ms is None:
            raise BenchError("wrk printed no latency distribution")
        p50[name] = result.p50_ms
        say(f"  p50 c=1         {name:7} {result.p50_ms:10.3f} ms")
    samples.add("direct_p50_ms", p50["direct"])
    for name in ("sparks", "nginx"):
        samples.add(f"added_ms.{name}", p50[name] - p50["direct"])


def measure_transfers(bench: Bench, samples: Samples, run: int) -> None:
    """Rows 3 and 4: downloads and uploads of ``transfer`` bytes through each server.

    Rounds interleave the servers, so a slow patch on a shared machine hits them all alike;
    the run's figure for each server is the median of its rounds. A download's speed depends
    on the transfer just before it (with one order of the proxies per run, the proxy that came
    first mostly had the lower download figure), so every timed transfer follows another, and
    the proxies' order alternates every round: each follows the direct upload and the other
    proxy's upload equally often.
    """
    size = bench.transfer
    landed = bench.uploads / "blob"
    proxies = bench.proxies(run)
    direct = bench.up()
    download(direct.port, f"/files/blob-{size}", size)  # untimed: what the first round follows
    upload(direct.port, "/upload/blob", size, landed)
    rates: dict[str, list[float]] = defaultdict(list)
    for turn in range(TRANSFER_ROUNDS):
        order = proxies if turn % 2 == 0 else proxies[::-1]
        for name, server in [*order, ("direct", direct)]:
            rates[f"download.{name}"].append(download(server.port, f"/files/blob-{size}", size))
            rates[f"upload.{name}"].append(upload(server.port, "/upload/blob", size, landed))
    for key, values in rates.items():
        samples.add(key, statistics.median(values))
    for name in [*(name for name, _ in proxies), "direct"]:
        down, up = samples.values[f"download.{name}"][-1], samples.values[f"upload.{name}"][-1]
        say(f"  transfer        {name:7} down {down:7.0f} MB/s   up {up:7.0f} MB/s")


def measure_start_and_rss(bench: Bench, samples: Samples, run: int) -> None:
    """Rows 8 and 5 on fresh processes: spawn to first forwarded 200, then RSS over a stream."""
    size = bench.stream
    starters: dict[str, Callable[[], Running]] = {
        "sparks": bench.spawn_sparks,
        "nginx": lambda: bench.start_peer(),
    }
    for name, start in starters.items():
        started = time.monotonic()
        server = start()
        try:
            wait_for_200(server.port, "/small", server.proc, server.log)
            startup_ms = (time.monotonic() - started) * 1000
            pid = server.serving_pid()
            download(server.port, f"/files/blob-{bench.transfer}", bench.transfer)
            before = rss_kib(pid)
            download(server.port, f"/files/blob-{size}", size)
            growth = (rss_kib(pid) - before) / KIB
            peak = rss_kib(pid, "VmHWM") / KIB
        finally:
            stop_process(server.proc)
        samples.add(f"startup_ms.{name}", startup_ms)
        floor = import_aiohttp_ms(bench) if name == "sparks" else None
        if floor is not None:
            samples.add("import_aiohttp_ms", floor)
        samples.add(f"rss_growth.{name}", growth)
        samples.add(f"rss_peak.{name}", peak)
        say(
            f"  fresh start     {name:7} {startup_ms:8.0f} ms to first answer"
            + (f" (importing aiohttp alone: {floor:.0f} ms)" if floor is not None else "")
            + f"; RSS +{growth:.1f} MiB over {size_text(size)}"
        )


def import_aiohttp_ms(bench: Bench) -> float | None:
    """Milliseconds from spawning a fresh interpreter of the proxy's venv to aiohttp imported.

    What the start-up row cannot go below: the proxy's CLI imports aiohttp the same way, with
    garbage collection off, before it can answer anything. None if it could not be measured.
    """
    python = Path(bench.sparks_cmd).with_name("python")
    if not python.exists():
        return None
    code = "import gc; gc.disable(); import aiohttp; print('imported', flush=True)"
    cmd = [str(python), "-c", code]
    if bench.lab.pin:
        cmd = ["taskset", "-c", PROXY_CORE, *cmd]  # where the proxy starts
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        line = read_line(proc.stdout, timeout=60)
        elapsed = (time.monotonic() - started) * 1000
    except BenchError:
        return None
    finally:
        stop_process(proc)
    return elapsed if line == "imported" else None


def measure_cold_burst(bench: Bench, samples: Samples, run: int) -> None:
    """Row 7: a fresh sparks-proxy hit by 1,000 concurrent requests before it holds a token."""
    server = bench.spawn_sparks(token_url=bench.slow_token_url)
    try:
        wait_for_200(server.port, "/-/healthz", server.proc, server.log)
        cold = http_get(server.port, "/-/readyz")[0] == 503
        counts = asyncio.run(burst(server.url("/small"), BURST))
        metrics = http_get(server.port, "/-/metrics")[1].decode()
    finally:
        stop_process(server.proc)
    found = re.search(r'^sparks_proxy_token_requests_total\{result="ok"\} (\S+)$', metrics, re.M)
    tokens = float(found.group(1)) if found else 0.0
    samples.add("token_requests.sparks", tokens)
    if not cold:
        bench.notes.add("cold burst: a token was already held when the burst started")
    if counts != {200: BURST}:
        bench.notes.add(f"cold burst: statuses {counts} (expected {BURST} x 200)")
    say(f"  cold burst      sparks  {tokens:8.0f} token request(s); statuses {counts}")


def measure_workers(bench: Bench, samples: Samples, run: int) -> None:
    """Row 6, when ``serve --workers`` exists: 2 workers vs 1, unpinned, wrk -t2.

    nginx's own 2-worker figure over its 1-worker one, in the same conditions, shows how much
    scaling this machine can show at all.
    """
    if not bench.has_workers:
        return
    duration = bench.args.duration
    contenders: dict[str, Callable[[], Running]] = {
        "sparks": lambda: bench.start_sparks(cpus=None, extra=["--workers", "2"]),
        "sparks1": lambda: bench.start_sparks(cpus=None),
        "nginx": lambda: bench.start_peer(workers=2, cpus=None),
        "nginx1": lambda: bench.start_peer(workers=1, cpus=None),
    }
    for name, start in contenders.items():
        server = start()
        try:
            result = wrk(bench, server.url("/small"), threads=2, conns=50, duration=duration)
        finally:
            stop_process(server.proc)
        samples.add(f"workers_rps.{name}", result.rps)
        say(f"  unpinned -t2    {name:7} {result.rps:10,.0f} req/s")
    rps = samples.values
    for who in ("sparks", "nginx"):
        samples.add(
            f"workers_scaling.{who}", rps[f"workers_rps.{who}"][-1] / rps[f"workers_rps.{who}1"][-1]
        )


MEASUREMENTS: tuple[Callable[[Bench, Samples, int], None], ...] = (
    measure_small_get,
    measure_latency,
    measure_transfers,
    measure_start_and_rss,
    measure_cold_burst,
    measure_workers,
)


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A row's target, as printed, and the test of whether it was met."""

    text: str
    met: Callable[[float | None, float | None], bool]
    """(sparks-proxy figure, ratio) -> target reached."""
    ratio_bound: float | None = None
    """The ratio the target names, for a target on the ratio."""


@dataclass(frozen=True)
class RowSpec:
    """One line of the table: what it shows, how, and what it should reach."""

    label: str
    key: str
    digits: int
    ratio: bool = True
    goal: Goal | None = None


def ratio_at_least(bound: float) -> Goal:
    """A target on the ratio to nginx."""
    return Goal(f">= {bound:.2f}", lambda _s, r: r is not None and r >= bound, bound)


def figure_at_most(bound: float, unit: str = "") -> Goal:
    """A target on sparks-proxy's own figure: no more than ``bound``."""
    return Goal(f"<= {bound:g}{unit}", lambda s, _r: s is not None and s <= bound)


def figure_at_least(bound: float) -> Goal:
    """A target on sparks-proxy's own figure: at least ``bound``."""
    return Goal(f">= {bound:g}", lambda s, _r: s is not None and s >= bound)


def row_specs(bench: Bench) -> list[RowSpec]:
    """The table's rows, sized for this run, with the issue's targets."""
    size, stream = size_text(bench.transfer), size_text(bench.stream)
    return [
        RowSpec("small GET req/s (c=50)", "small_rps", 0, goal=ratio_at_least(0.25)),
        RowSpec("added p50 latency c=1 (ms)", "added_ms", 3, goal=figure_at_most(0.20, " ms")),
        RowSpec(f"download {size} (MB/s)", "download", 0, goal=ratio_at_least(0.90)),
        RowSpec(f"upload {size} (MB/s)", "upload", 0, goal=ratio_at_least(0.90)),
        RowSpec(
            f"RSS growth, {stream} stream (MiB)",
            "rss_growth",
            1,
            ratio=False,
            goal=figure_at_most(4, " MiB"),
        ),
        RowSpec("--workers 2 req/s (c=50, -t2)", "workers_rps", 0),
        RowSpec(
            "--workers 2 / 1 worker (x)",
            "workers_scaling",
            2,
            ratio=False,
            goal=figure_at_least(1.7),
        ),
        RowSpec(
            f"token requests, cold burst {BURST}",
            "token_requests",
            0,
            ratio=False,
            goal=Goal("== 1", lambda s, _r: s == 1),
        ),
        RowSpec("start to first answer (ms)", "startup_ms", 0, goal=figure_at_most(400, " ms")),
    ]


def build_rows(bench: Bench, samples: Samples) -> list[dict[str, Any]]:
    """Medians, ratios and targets, one dict per row."""
    rows = []
    for spec in row_specs(bench):
        sparks = samples.median(f"{spec.key}.sparks")
        nginx = samples.median(f"{spec.key}.nginx")
        ratio = paired_ratio(samples, spec.key) if spec.ratio else None
        rows.append(
            {
                "measure": spec.label,
                "sparks_proxy": sparks,
                "nginx": nginx,
                "ratio": ratio,
                "ratio_digits": shown_digits(ratio, 2, spec.goal and spec.goal.ratio_bound),
                "target": spec.goal.text if spec.goal else "-",
                "met": spec.goal.met(sparks, ratio) if spec.goal and sparks is not None else None,
                "digits": spec.digits,
                "samples": {
                    who: samples.values.get(f"{spec.key}.{who}", []) for who in ("sparks", "nginx")
                },
                "na": "n/a (no --workers)"
                if spec.key.startswith("workers_") and not bench.has_workers
                else "",
            }
        )
    return rows


def paired_ratio(samples: Samples, key: str) -> float | None:
    """The median of each run's sparks-proxy / nginx figures.

    Each run measures both side by side, minutes apart at most; a ratio of the two medians
    could pair figures from different runs, taken when the VM ran at different speeds. A run
    that measured only one of them gives no ratio.
    """
    sparks, nginx = samples.by_run(f"{key}.sparks"), samples.by_run(f"{key}.nginx")
    ratios = [sparks[run] / nginx[run] for run in sparks.keys() & nginx.keys() if nginx[run]]
    return statistics.median(ratios) if ratios else None


def shown_digits(value: float | None, digits: int, bound: float | None) -> int:
    """``digits``, or more where rounding would land on ``bound`` and hide which side of it
    ``value`` is (0.896 against ">= 0.90" would read "0.90 NO")."""
    if value is None or bound is None or value == bound:
        return digits
    while digits < 6 and round(value, digits) == bound:
        digits += 1
    return digits


def cell(value: float | None, digits: int) -> str:
    """A figure as shown in the table."""
    return "-" if value is None else f"{value:,.{digits}f}"


def render(bench: Bench, rows: list[dict[str, Any]], cores: int) -> str:
    """The table as text."""
    args = bench.args
    lines = [
        f"cores: {cores}   runs: {args.runs}   duration: {args.duration:g} s",
        f"{'measure':38}{'sparks-proxy':>14}{'nginx':>11}{'ratio':>9}   {'target':12}met",
    ]
    for row in rows:
        if row["na"]:
            lines.append(f"{row['measure']:38}{row['na']:>14}")
            continue
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(
            f"{row['measure']:38}{cell(row['sparks_proxy'], row['digits']):>14}"
            f"{cell(row['nginx'], row['digits']):>11}"
            f"{cell(row['ratio'], row['ratio_digits']):>9}   "
            f"{row['target']:12}{met}"
        )
    return "\n".join(lines)


def context_notes(bench: Bench, samples: Samples) -> list[str]:
    """The figures that explain the table: direct baselines, pinning, versions."""
    notes = [UPLOAD_NOTE]
    direct = samples.median("direct_p50_ms")
    if direct is not None:
        notes.append(f"direct p50 at c=1 (client -> upstream, no proxy): {direct:.3f} ms")
    down, up = samples.median("download.direct"), samples.median("upload.direct")
    if down is not None and up is not None:
        notes.append(
            f"direct transfer (this client's ceiling): "
            f"download {down:.0f} MB/s, upload {up:.0f} MB/s"
        )
    cpu = [samples.median(f"cpu_us.{who}") for who in ("sparks", "nginx")]
    system = [samples.median(f"system_us.{who}") for who in ("sparks", "nginx")]
    busy = [samples.median(f"cpu_busy.{who}") for who in ("sparks", "nginx")]
    if None not in cpu and None not in system and None not in busy:
        notes.append(
            f"proxy CPU per small GET at c=50: sparks-proxy {cpu[0]:.0f} us, nginx {cpu[1]:.0f} us"
            f" (in the kernel: {system[0]:.0f} and {system[1]:.0f} us;"
            f" core 0 busy: {busy[0]:.0f}% and {busy[1]:.0f}%)"
        )
    floor = samples.median("import_aiohttp_ms")
    if floor is not None:
        notes.append(
            f"start-up floor: a fresh interpreter of the proxy's venv takes {floor:.0f} ms from"
            " spawn to aiohttp imported (garbage collection off, as the CLI imports it)"
        )
    peaks = [samples.median(f"rss_peak.{who}") for who in ("sparks", "nginx")]
    if None not in peaks:
        notes.append(
            f"peak RSS after the stream: sparks-proxy {peaks[0]:.1f} MiB, "
            f"nginx worker {peaks[1]:.1f} MiB"
        )
    for who, name in (("sparks", "sparks-proxy"), ("nginx", "nginx")):
        one, two = samples.median(f"workers_rps.{who}1"), samples.median(f"workers_rps.{who}")
        if one and two:
            notes.append(f"{name}, unpinned, -t2: 2 workers {two:,.0f} req/s, 1 worker {one:,.0f}")
    notes.extend(spread_notes(bench, samples))
    before = bench.busy_before
    other = " (other work on the machine: expect noisier figures)" if before > BUSY_BEFORE else ""
    notes.append(f"CPU busy in the second before the run: {before:.0f}% of all cores{other}")
    stolen = stolen_share(bench.ticks_at_start, cpu_ticks())
    if stolen is not None:
        # A VM's host may run other guests on its cores: time taken so slows everything
        # measured here, unevenly, and is the usual cause of a wide run-to-run spread.
        notes.append(f"CPU time taken by the hypervisor during the run (steal): {stolen:.0f}%")
    notes.append(
        "pinning: proxies on core 0; upstream nginx, token server, wrk and client on core 1"
        if bench.lab.pin
        else "pinning: off (fewer than 2 usable cores)"
    )
    return notes + sorted(bench.notes)


def spread_notes(bench: Bench, samples: Samples) -> list[str]:
    """Rows whose runs disagree by more than SPREAD_NOTE (positive figures only)."""
    wide = []
    for spec in row_specs(bench):
        for who in ("sparks", "nginx"):
            values = samples.values.get(f"{spec.key}.{who}", [])
            if len(values) > 1 and min(values) > 0 and max(values) / min(values) > SPREAD_NOTE:
                low, high = min(values), max(values)
                wide.append(
                    f"{spec.label}, {who}: runs ranged {cell(low, spec.digits)}"
                    f" to {cell(high, spec.digits)} (x{high / low:.1f})"
                )
    return [f"wide run-to-run spread: {'; '.join(wide)}"] if wide else []


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="sparks-proxy beside nginx, side by side.")
    parser.add_argument("--quick", action="store_true", help="1 run, 3 s, smaller transfers")
    parser.add_argument("--runs", type=int, default=3, help="runs; each row is their median")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--sparks-proxy", default=str(DEFAULT_SPARKS), help="the sparks-proxy executable"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 3.0
    if not (1 <= args.runs <= 20 and 1 <= args.duration <= 120):
        parser.error("--runs must be 1..20 and --duration 1..120 seconds")
    return args


def supports_workers(sparks_cmd: str) -> bool:
    """Whether ``sparks-proxy serve`` has a ``--workers`` option."""
    done = subprocess.run(
        [sparks_cmd, "serve", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return "--workers" in done.stdout


def version_of(cmd: Sequence[str]) -> str:
    """The first line a ``--version``-style command prints (stdout or stderr)."""
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]


def byte_compile(sparks_cmd: str) -> None:
    """Byte-compile the proxy's package, as installing its wheel does.

    An editable install runs from the source tree, and where bytecode is never written
    (PYTHONDONTWRITEBYTECODE, as in containers and this kind of machine) every start would
    compile every module again: the start-up row would time the compiler, not the proxy.
    """
    python = Path(sparks_cmd).with_name("python")
    if not python.exists():
        say(f"note: not byte-compiling: no python beside {sparks_cmd}")
        return
    script = (
        "import compileall, os, proxy;"
        " compileall.compile_dir(os.path.dirname(proxy.__file__), quiet=1)"
    )
    subprocess.run([str(python), "-c", script], check=True, timeout=120)


def set_up(bench: Bench) -> None:
    """Data files, then the long-lived servers, checked."""
    byte_compile(bench.sparks_cmd)
    bench.files.mkdir()
    bench.uploads.mkdir()
    for size in {bench.transfer, bench.stream}:
        make_blob(bench.files / f"blob-{size}", size)
    bench.start_upstream()
    bench.token_url = bench.start_token_server(0.0)
    bench.slow_token_url = bench.start_token_server(TOKEN_DELAY)
    bench.peer = bench.start_peer()
    bench.sparks = bench.start_sparks()
    check_servers(bench)
    # The first upload into fresh tmpfs pages is slow; make it here, unmeasured.
    upload(bench.up().port, "/upload/blob", bench.transfer, bench.uploads / "blob")
    for _, proxy in bench.proxies(0):  # warm both pools and code paths
        wrk(bench, proxy.url("/small"), threads=1, conns=50, duration=1)


def run_all(bench: Bench) -> Samples:
    """Every measurement, ``runs`` times; a failed measurement is noted, not fatal."""
    samples = Samples()
    for run in range(bench.args.runs):
        say(f"run {run + 1}/{bench.args.runs}")
        samples.run = run
        for measure in MEASUREMENTS:
            try:
                measure(bench, samples, run)
            except (BenchError, OSError, aiohttp.ClientError, TimeoutError) as exc:
                message = f"{measure.__name__} (run {run + 1}) failed: {exc}"
                bench.notes.add(message)
                say("  " + message)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, optionally write JSON; 0 unless the bench itself failed."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    cores = os.cpu_count() or 1
    pin = {0, 1} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {int(LOAD_CORE)})  # this process is the transfer client
    began = time.monotonic()
    tools = ensure_tools()
    lab = Lab(pin)
    bench = Bench(
        args=args,
        lab=lab,
        tools=tools,
        files=lab.dir / "files",
        uploads=lab.dir / "uploads",
        sparks_cmd=args.sparks_proxy,
        has_workers=supports_workers(args.sparks_proxy),
        busy_before=machine_busy(),
    )
    try:
        set_up(bench)
        samples = run_all(bench)
    finally:
        lab.close()
    rows = build_rows(bench, samples)
    notes = context_notes(bench, samples)
    versions = {
        "sparks-proxy": version_of([args.sparks_proxy, "--version"]),
        "nginx": version_of([tools["nginx"], "-v"]),
    }
    print(render(bench, rows, cores))
    print()
    for note in [*notes, f"versions: {versions['sparks-proxy']}; {versions['nginx']}"]:
        print(f"note: {note}")
    say(f"total time: {time.monotonic() - began:.0f} s")
    if args.json:
        document = {
            "cores": cores,
            "runs": args.runs,
            "duration": args.duration,
            "quick": args.quick,
            "rows": rows,
            "notes": notes,
            "versions": versions,
            "import_aiohttp_ms": samples.values.get("import_aiohttp_ms", []),
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        sys.exit(130)
