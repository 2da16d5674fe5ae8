"""The HTTP listener: aiohttp's low-level server with a proxy's defaults instead of a framework's.

aiohttp's own error page quotes the offending request bytes back to the client and logs them
with a traceback; a request line or header can hold a credential, so this listener answers
parse errors with a short JSON body of its own words and logs only the error's type.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import http_exceptions, http_parser, web
from aiohttp.web_protocol import RequestHandler

from .config import ServerSettings
from .errors import ERROR_HEADER, ConfigError, json_error

log = logging.getLogger("sparks_proxy.listener")

# Why a request could not be parsed, in words that quote nothing the client sent.
_PARSE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.BadHttpMethod, "the request method is not a registered HTTP method"),
    (http_exceptions.TransferEncodingError, "the chunked request body is malformed"),
    (http_exceptions.ContentLengthError, "the request body does not match its Content-Length"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidURLError, "the request target is malformed"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP/1.1"),
)


class ProxyRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with a proxy's limits and errors that echo nothing."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accept the connection, or answer 503 and close it when over the connection limit."""
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, ProxyServer)
        if len(manager.connections) > manager.limits.max_connections:
            log.warning(
                "over server.max_connections (%d); refusing a connection",
                manager.limits.max_connections,
            )
            self._refuse(_TOO_MANY_CONNECTIONS)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; time how long the client takes to send a whole request head.

        The timer starts only when bytes arrive that do not yet make a whole request: the
        common case, a head in one read, costs no timer at all.
        """
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._cancel_head_timer()
        elif self._head_timer is None and not self._request_in_progress:
            manager = self._manager
            assert isinstance(manager, ProxyServer)
            self._head_timer = self._loop.call_later(
                manager.limits.header_timeout, self._head_timed_out
            )

    async def _handle_request(self, *args: Any, **kwargs: Any) -> Any:
        # A head that arrived whole queues a request before its body comes in; body bytes read
        # before this handler starts may have armed the timer. A request is being handled now.
        self._cancel_head_timer()
        return await super()._handle_request(*args, **kwargs)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Forget the head timer with the connection."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("a client took longer than server.header_timeout to send a request head")
        self._refuse(_HEADER_TIMEOUT)

    def _refuse(self, answer: bytes) -> None:
        # Written directly: there is no request to answer through the normal path.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
            transport.close()
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a parse error or an unexpected handler failure; the connection is closed."""
        manager = self._manager
        limits = manager.limits if isinstance(manager, ProxyServer) else ServerSettings()
        status, code, detail = _describe(exc, status, limits)
        if status == 500:
            log.error(
                "unexpected error while handling a request (%s)",
                type(exc).__name__,
                exc_info=exc,
            )
        else:
            log.info(
                "rejected a malformed request from %s: %s (%s)",
                request.remote,
                detail,
                type(exc).__name__,
            )
        if request.writer.output_size > 0:
            # Part of an answer is out already; closing is the only honest signal left.
            raise ConnectionError("response already started")
        response = json_error(status, code, detail + "; fix the request and send it again")
        response.force_close()
        return response


def _describe(
    exc: BaseException | None, status: int, limits: ServerSettings
) -> tuple[int, str, str]:
    """Status, code and detail for a parse error, in words that quote nothing it saw."""
    if isinstance(exc, http_exceptions.LineTooLong):
        # The parser reports the limit it hit: max_line_size is the request line's.
        if exc.args[1] == limits.max_line_size != limits.max_field_size:
            return 414, "uri_too_long", "the request line is longer than server.max_line_size"
        return 431, "request_header_too_large", "a header is longer than server.max_field_size"
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "request_header_too_large", "the request has more than server.max_headers"
    for kind, detail in _PARSE_ERRORS:
        if isinstance(exc, kind):
            return 400, "bad_request", detail
    if status == 500:
        return 500, "internal_error", "the proxy failed to handle the request; see its log"
    return 400, "bad_request", "the request is not valid HTTP/1.1"


def _canned(status: str, code: str, detail: str) -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"{ERROR_HEADER}: {code}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY_CONNECTIONS = _canned(
    "503 Service Unavailable",
    "too_many_connections",
    "the proxy is at server.max_connections; retry shortly or raise the limit",
)
_HEADER_TIMEOUT = _canned(
    "408 Request Timeout",
    "request_timeout",
    "the request head did not arrive within server.header_timeout",
)


class ProxyServer(web.Server):
    """aiohttp's low-level server, making :class:`ProxyRequestHandler` connections."""

    def __init__(self, handler: Any, limits: ServerSettings, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return ProxyRequestHandler(self, loop=self._loop, **kwargs)


def require_compiled_parser() -> None:
    """Refuse to run on aiohttp's pure-Python parser: the proxy relies on llhttp's strictness."""
    if http_parser.HttpRequestParser is not getattr(http_parser, "HttpRequestParserC", None):
        raise ConfigError(
            "aiohttp's compiled HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS is set, or "
            "aiohttp was installed without its binary extension); reinstall aiohttp from a wheel"
        )


def build_server(handler: Any, settings: ServerSettings) -> ProxyServer:
    """The listener's protocol factory, with limits from ``[server]``."""
    require_compiled_parser()
    return ProxyServer(
        handler,
        settings,
        # A client that hangs up cancels its handler, which cancels the upstream request
        # and frees the pooled connection.
        handler_cancellation=True,
        # A proxy passes compressed bodies through; it does not inflate them.
        auto_decompress=False,
        access_log=None,
        # After an answer that leaves a request body unread, aiohttp reads and drops the rest
        # for this long so the client sees the answer before the close; a client that stalled
        # must not hold the connection for aiohttp's default 10 s.
        lingering_time=2.0,
        keepalive_timeout=settings.keepalive_timeout,
        max_line_size=settings.max_line_size,
        max_field_size=settings.max_field_size,
        max_headers=settings.max_headers,
    )
