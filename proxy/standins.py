"""Stand-ins for the token server and the Sparks API, for the demo, the tests and benchmarks.

Both are real aiohttp servers on loopback. The token server speaks the client-credentials grant
(JSON or form body, credentials in the body or HTTP Basic), counts what it issues and can be
told to fail. The upstream echoes what it received (method, raw target, headers in order, body
digest), streams, and answers chosen statuses, redirects and cookies.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from aiohttp import web

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"


class _LoopbackServer:
    """An aiohttp app served on 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (port 0: a free one)."""
        self._runner = web.AppRunner(
            self._app(),
            access_log=None,
            auto_decompress=False,
            handle_signals=False,
            # Scripted stalls must not hold up a stop: hang-ups cancel them, and stopping
            # waits briefly for what is still in flight.
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass
class TokenRequest:
    """What the stand-in token server received in one request (tests inspect it)."""

    content_type: str
    fields: dict[str, str]
    basic: tuple[str, str] | None
    headers: dict[str, str] = field(repr=False)


class StandInTokenServer(_LoopbackServer):
    """A client-credentials token endpoint at ``/oauth/token``.

    ``failures`` is a queue of scripted answers used before normal service resumes; each is one
    of ``"500"``, ``"html"``, ``"empty"``, ``"no_token"``, ``"mac_token"``, ``"deep_json"``,
    ``"429"``, ``"429_reset"``, ``"invalid_client"``, ``"echo"``, ``"token_as_code"``,
    ``"redirect"``, ``"reset"`` or ``"stall"``. Setting ``fail_always`` repeats one of them
    forever.
    """

    def __init__(
        self,
        *,
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str = DEMO_CLIENT_SECRET,
        expires_in: Any = 3600,
        scope: str = "data admin core",
        delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.scope = scope
        self.delay = delay
        self.failures: list[str] = []
        self.fail_always: str | None = None
        self.retry_after = 2
        self.redirect_to = "http://127.0.0.1:9/steal"
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        self._serial = itertools.count(1)

    @property
    def token_url(self) -> str:
        """The endpoint's URL."""
        return self.url + "/oauth/token"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if request.content_type == "application/x-www-form-urlencoded":
            fields = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        else:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {}
            fields = {k: str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}
        basic = _basic_credentials(request.headers.get("Authorization", ""))
        self.requests.append(
            TokenRequest(request.content_type, fields, basic, dict(request.headers))
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        failure = self.failures.pop(0) if self.failures else self.fail_always
        if failure is not None:
            return await self._fail(failure, request)
        client_id, secret = basic or (fields.get("client_id"), fields.get("client_secret"))
        if (client_id, secret) != (self.client_id, self.client_secret):
            return web.json_response(
                {"error": "access_denied", "error_description": "Unauthorized"}, status=401
            )
        if fields.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"standin.{next(self._serial)}.{secrets.token_urlsafe(16)}"
        self.issued.append(token)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if self.scope:
            answer["scope"] = self.scope
        return web.json_response(answer)

    async def _fail(self, failure: str, request: web.Request) -> web.StreamResponse:
        if failure == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if failure == "html":
            return web.Response(
                text="<html><body>Bad gateway</body></html>", content_type="text/html"
            )
        if failure == "empty":
            return web.Response(body=b"", content_type="application/json")
        if failure == "no_token":
            return web.json_response({"token_type": "Bearer", "expires_in": 3600})
        if failure == "deep_json":
            return web.Response(body=b"[" * 100_000, content_type="application/json")
        if failure == "mac_token":
            return web.json_response({"access_token": "abc", "token_type": "mac"})
        if failure == "429":
            return web.json_response(
                {"error": "too_many_requests"},
                status=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        if failure == "429_reset":  # Auth0's style: the epoch second the limit resets
            return web.json_response(
                {"error": "too_many_requests"},
                status=429,
                headers={"X-RateLimit-Reset": str(int(time.time()) + self.retry_after + 1)},
            )
        if failure == "invalid_client":
            return web.json_response(
                {"error": "invalid_client", "error_description": "Unknown client or bad secret"},
                status=401,
            )
        if failure == "echo":  # an issuer that quotes the request back in its description
            quoted = f"got {request.headers.get('Authorization', '')} {await request.text()}"
            return web.json_response(
                {"error": "invalid_client", "error_description": quoted}, status=401
            )
        if failure == "token_as_code":  # ... or quotes a token where an error code belongs
            return web.json_response({"error": self.issued[-1]}, status=400)
        if failure == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to})
        if failure == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if failure == "stall":
            await asyncio.sleep(3600)
        raise ValueError(f"unknown failure {failure!r}")


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except ValueError:
        return None
    return unquote_plus(user), unquote_plus(password)


@dataclass
class Received:
    """One request as the stand-in upstream saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_size: int
    body_sha256: str

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


class StandInUpstream(_LoopbackServer):
    """A stand-in Sparks API.

    Every path echoes the request as JSON, except these:

    - ``/status/<code>``: answer that status (empty body for 204/304);
    - ``/redirect?to=<url>``: 302 to ``to``;
    - ``/cookies``: two ``Set-Cookie`` headers;
    - ``/bytes/<n>``: ``n`` bytes streamed in 64 KiB chunks (chunked, no Content-Length);
    - ``/gzip``: a gzip-encoded body with ``Content-Encoding: gzip``;
    - ``/slow/<seconds>``: wait, then echo.

    A request whose token is in ``rejected_tokens`` gets 401, like a revoked token would;
    with ``reject_all`` every request does, like an API that refuses the credential outright.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.rejected_tokens: set[str] = set()
        self.reject_all = False

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        seen = Received(
            method=request.method,
            target=request.raw_path,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body_size=size,
            body_sha256=digest.hexdigest(),
        )
        self.received.append(seen)
        auth = request.headers.get("Authorization", "")
        if self.reject_all or auth.removeprefix("Bearer ") in self.rejected_tokens:
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        path = request.path
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if status in (204, 304):
                return web.Response(status=status)
            return web.json_response({"status": status}, status=status)
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": request.query["to"]})
        if path == "/cookies":
            response = web.json_response({"cookies": 2})
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            return response
        if path.startswith("/bytes/"):
            return await _stream_bytes(request, int(path.rsplit("/", 1)[1]))
        if path == "/gzip":
            return web.Response(
                body=gzip.compress(b'{"compressed": true}'),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        if path.startswith("/slow/"):
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        return web.json_response(
            {
                "method": seen.method,
                "target": seen.target,
                # The token itself stays out of the echo: answers are shown to people.
                "headers": [
                    (k, "Bearer <redacted>" if k.lower() == "authorization" else v)
                    for k, v in seen.headers
                ],
                "body_size": seen.body_size,
                "body_sha256": seen.body_sha256,
            }
        )


async def _stream_bytes(request: web.Request, size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.method == "HEAD":
        return response
    response.enable_chunked_encoding()
    await response.prepare(request)
    block = b"x" * 65536
    remaining = size
    try:
        while remaining > 0:
            n = min(remaining, len(block))
            await response.write(block[:n])
            remaining -= n
        await response.write_eof()
    except ConnectionError:
        pass  # the reader hung up: nothing more to send
    return response
