"""The HTTP listener: aiohttp's low-level server with a proxy's defaults instead of a framework's.

aiohttp's own error page quotes the offending request bytes back to the client and logs them
with a traceback; a request line or header can hold a credential, so this listener answers
parse errors with a short JSON body of its own words and logs only the error's type.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from .config import ServerSettings
from .errors import json_error

log = logging.getLogger("sparks_proxy.listener")

# Why a request could not be parsed, in words that quote nothing the client sent.
_PARSE_ERRORS: tuple[tuple[type[Exception], int, str, str], ...] = (
    (
        http_exceptions.LineTooLong,
        431,
        "request_too_large",
        "the request line or a header is longer than the proxy accepts",
    ),
    (
        http_exceptions.BadHttpMethod,
        400,
        "bad_request",
        "the request method is not a valid HTTP token",
    ),
    (
        http_exceptions.TransferEncodingError,
        400,
        "bad_request",
        "the chunked request body is malformed",
    ),
    (
        http_exceptions.ContentLengthError,
        400,
        "bad_request",
        "the request body does not match its Content-Length",
    ),
    (http_exceptions.InvalidHeader, 400, "bad_request", "a request header is malformed"),
    (http_exceptions.BadStatusLine, 400, "bad_request", "the request line is malformed"),
    (http_exceptions.InvalidURLError, 400, "bad_request", "the request target is malformed"),
    (http_exceptions.BadHttpMessage, 400, "bad_request", "the request is not valid HTTP/1.1"),
)


class ProxyRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with errors that echo nothing back."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a parse error or an unexpected handler failure; the connection is closed."""
        code, detail = "internal_error", "the proxy failed to handle the request; see its log"
        for kind, kind_status, kind_code, kind_detail in _PARSE_ERRORS:
            if isinstance(exc, kind):
                status, code, detail = kind_status, kind_code, kind_detail
                break
        else:
            if status != 500:
                code, detail = "bad_request", "the request is not valid HTTP/1.1"
        if status == 500:
            log.error(
                "unexpected error while handling a request (%s)", type(exc).__name__, exc_info=exc
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


class ProxyServer(web.Server):
    """aiohttp's low-level server, making :class:`ProxyRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return ProxyRequestHandler(self, loop=self._loop, **kwargs)


def build_server(handler: Any, settings: ServerSettings) -> ProxyServer:
    """The listener's protocol factory, with limits from ``[server]``."""
    return ProxyServer(
        handler,
        # A client that hangs up cancels its handler, which cancels the upstream request
        # and frees the pooled connection.
        handler_cancellation=True,
        # A proxy passes compressed bodies through; it does not inflate them.
        auto_decompress=False,
        access_log=None,
        keepalive_timeout=settings.keepalive_timeout,
        max_line_size=settings.max_line_size,
        max_field_size=settings.max_field_size,
        max_headers=settings.max_headers,
    )
