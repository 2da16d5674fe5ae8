"""The reserved ``/-/`` paths, answered by the proxy and never forwarded.

- ``/-/healthz``: 200 while the process serves (liveness).
- ``/-/readyz``: 200 only while a valid token is held and the proxy is not draining (readiness).
- ``/-/metrics``: Prometheus text exposition.
- ``/-/oauth/token``: a stand-in token endpoint for apps built on the official SDKs, which insist
  on fetching a token themselves. It answers any client-credentials request with an inert
  placeholder; the real token never leaves the proxy, which replaces whatever the app sends.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .bodies import expects_continue, read_whole
from .config import ServerSettings
from .errors import BadRequest, MethodNotAllowed, NotFound
from .messages import Answer, Request
from .metrics import Metrics
from .tokens import TokenManager

PLACEHOLDER_TOKEN = "sparks-proxy-placeholder-token"
PLACEHOLDER_LIFETIME = 86400
MAX_TOKEN_REQUEST = 64 * 1024

AdminHandler = Callable[[Request], Awaitable[Answer]]


class Lifecycle:
    """Whether the proxy is shutting down (readiness fails at once when it is)."""

    def __init__(self) -> None:
        self.draining = False


class Admin:
    """Answers the reserved paths."""

    def __init__(
        self,
        tokens: TokenManager,
        metrics: Metrics,
        lifecycle: Lifecycle,
        server: ServerSettings,
    ) -> None:
        self._tokens = tokens
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._body_timeout = server.body_timeout
        self._routes: dict[str, tuple[frozenset[str], AdminHandler]] = {
            "/-/healthz": (frozenset({"GET", "HEAD"}), self.healthz),
            "/-/readyz": (frozenset({"GET", "HEAD"}), self.readyz),
            "/-/metrics": (frozenset({"GET", "HEAD"}), self.metrics),
            "/-/oauth/token": (frozenset({"POST"}), self.oauth_token),
        }

    async def __call__(self, request: Request, target: str) -> Answer:
        """Answer ``target`` (a ``/-/`` path); errors are raised as ProxyError."""
        path = target.partition("?")[0]
        route = self._routes.get(path)
        if route is None:  # the detail names our paths, never echoes the client's
            raise NotFound(
                f"that /-/ path is reserved by the proxy and does not exist; "
                f"reserved paths are {', '.join(self._routes)}"
            )
        methods, handler = route
        if request.method not in methods:
            allow = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{path} accepts {allow} only", allow=allow)
        return await handler(request)

    async def healthz(self, request: Request) -> Answer:
        """Liveness: the process is up and serving."""
        return json_answer({"status": "ok"})

    async def readyz(self, request: Request) -> Answer:
        """Readiness: a valid token is held and the proxy is not shutting down."""
        token = self._tokens.current()
        checks: dict[str, dict[str, object]] = {}
        if token is not None:
            checks["token"] = {"ok": True, "expires_in": round(token.remaining())}
        else:
            error = self._tokens.last_error
            checks["token"] = {
                "ok": False,
                "error": error.code if error else "pending",
                "detail": error.detail if error else "the first token request is under way",
                "retry_in": round(self._tokens.retry_after(), 1),
            }
        checks["shutdown"] = {"ok": not self._lifecycle.draining}
        ready = all(check["ok"] for check in checks.values())
        shared = self._tokens.shared_cache_healthy
        if shared is not None:
            # Reported, never part of readiness: without it the proxy works on its own.
            checks["shared_token_cache"] = {"ok": shared}
        return json_answer(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

    async def metrics(self, request: Request) -> Answer:
        """Prometheus text exposition of this proxy's registry."""
        body = generate_latest(self._metrics.registry)
        return Answer(200, body, [("Content-Type", CONTENT_TYPE_LATEST), _NO_STORE])

    async def oauth_token(self, request: Request) -> Answer:
        """A client-credentials endpoint that issues only an inert placeholder."""
        if expects_continue(request):
            request.send_continue()
        body = await read_whole(
            request.content, limit=MAX_TOKEN_REQUEST, read_timeout=self._body_timeout
        )
        grant = _grant_type(body, request.content_type)
        if grant != "client_credentials":
            raise BadRequest(
                "unsupported_grant_type: the proxy's token endpoint serves the "
                "client_credentials grant only, sent as application/x-www-form-urlencoded or "
                "application/json; any client_id and client_secret will do"
            )
        return json_answer(
            {
                "access_token": PLACEHOLDER_TOKEN,
                "token_type": "Bearer",
                "expires_in": PLACEHOLDER_LIFETIME,
            }
        )


# Every answer here is the state of the moment (or a token): no cache may keep one.
_NO_STORE = ("Cache-Control", "no-store")


def json_answer(doc: object, *, status: int = 200) -> Answer:
    """A JSON answer, never to be stored."""
    fields = [("Content-Type", "application/json; charset=utf-8"), _NO_STORE]
    return Answer(status, json.dumps(doc).encode(), fields)


def _grant_type(body: bytes, content_type: str) -> str | None:
    if content_type == "application/x-www-form-urlencoded":
        values = parse_qs(body.decode("utf-8", "replace")).get("grant_type")
        return values[0] if values else None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..."
        return None
    grant = doc.get("grant_type") if isinstance(doc, dict) else None
    return grant if isinstance(grant, str) else None
