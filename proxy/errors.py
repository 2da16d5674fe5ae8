"""The exception tree, and the one place where an error becomes an HTTP answer.

::

    SparksProxyError
     ├── ConfigError            settings are unusable; the CLI exits with status 2
     ├── TokenError             one token request failed (network, status, body)
     └── ProxyError             the proxy answers a request itself, as JSON
          ├── BadRequest            400: the request cannot be forwarded as sent
          ├── CrossSiteRequest      403: a browser's request from another site
          ├── NotFound              404: a reserved /-/ path that does not exist
          ├── MethodNotAllowed      405: a wrong method on a /-/ path
          │    └── TunnelRefused    405: CONNECT (the connection closes)
          ├── RequestTimeout        408: the request body stalled for server.body_timeout
          ├── PayloadTooLarge       413: body over server.max_body_size
          ├── ExpectationFailed     417: an Expect other than 100-continue
          ├── MisdirectedRequest    421: a Host not in server.allowed_hosts
          ├── UnsupportedTransferCoding  501: a transfer coding other than chunked
          ├── VersionNotSupported   505: anything but HTTP/1.0 and HTTP/1.1
          ├── UpstreamUnreachable   502: connect refused, reset, DNS, TLS, or connect timeout
          ├── BadUpstreamResponse   502: the upstream answered something that is not HTTP
          ├── TokenUnavailable      503: no valid token and none can be had right now
          ├── UpstreamBusy          503: no pooled connection came free in time
          └── UpstreamTimeout       504: no byte from the upstream within read_timeout

Every answer made here carries ``X-Sparks-Proxy-Error: <code>`` so clients and operators can
tell proxy-made errors from upstream answers, and a body ``{"error": code, "detail": text}``.
Details are written by this package, never copied from request bytes, secrets or tokens.
"""

from __future__ import annotations

import json
import math

from .messages import Answer

ERROR_HEADER = "X-Sparks-Proxy-Error"


class SparksProxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SparksProxyError):
    """Raised by configuration loading: the message names the key and what is expected."""


class TokenError(SparksProxyError):
    """Raised when a token request fails.

    ``code`` is a standard OAuth error code (``invalid_client``) or one of ours
    (``token_timeout``); ``detail`` is the proxy's own words: both may reach clients, metrics and
    readiness. ``said`` is what the token endpoint wrote about it, redacted, for the operator
    only (the log and the CLI): an issuer's text is not the proxy's to pass on.
    ``permanent`` marks failures that retrying soon will not fix (bad credentials);
    ``retry_after`` is the server's own wait hint in seconds, when it gave one.
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        permanent: bool = False,
        retry_after: float | None = None,
        said: str = "",
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.permanent = permanent
        self.retry_after = retry_after
        self.said = said

    def for_operator(self) -> str:
        """The detail, and what the token endpoint said about it if anything."""
        return f"{self.detail} (the token endpoint said: {self.said})" if self.said else self.detail


class ProxyError(SparksProxyError):
    """An answer the proxy gives itself instead of the upstream's."""

    status = 500
    code = "internal_error"
    closes_connection = False
    """Whether the connection must close after the answer (the framing cannot be trusted)."""
    allow = ""
    """The methods a 405 lists in its ``Allow`` field, when the proxy knows them."""

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class BadRequest(ProxyError):
    """Raised when a request cannot be forwarded as it was sent."""

    status = 400
    code = "bad_request"
    closes_connection = True


class CrossSiteRequest(ProxyError):
    """Raised for a browser request sent from another site (Sec-Fetch-Site, Origin)."""

    status = 403
    code = "cross_site_request"


class NotFound(ProxyError):
    """Raised for a path under the reserved ``/-/`` prefix that the proxy does not serve."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """Raised for a method a reserved ``/-/`` path does not serve; ``allow`` lists those it
    does (the ``Allow`` field of the answer), when the proxy is what answers for the path."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, detail: str, *, allow: str = "") -> None:
        super().__init__(detail)
        self.allow = allow  # the /-/ path's methods; for TRACE and CONNECT, unknown here


class TunnelRefused(MethodNotAllowed):
    """Raised for CONNECT: the proxy never opens a tunnel."""

    closes_connection = True  # a CONNECT client would go on with tunnel bytes


class RequestTimeout(ProxyError):
    """Raised when the client stops sending its body for ``server.body_timeout`` seconds."""

    status = 408
    code = "request_timeout"
    closes_connection = True


class PayloadTooLarge(ProxyError):
    """Raised when a request body is larger than ``server.max_body_size``."""

    status = 413
    code = "payload_too_large"
    closes_connection = True


class ExpectationFailed(ProxyError):
    """Raised for an ``Expect`` header other than ``100-continue``."""

    status = 417
    code = "expectation_failed"
    closes_connection = True


class MisdirectedRequest(ProxyError):
    """Raised for a Host the proxy does not serve (``server.allowed_hosts``)."""

    status = 421
    code = "host_not_allowed"


class UnsupportedTransferCoding(ProxyError):
    """Raised for a Transfer-Encoding other than a lone ``chunked``."""

    status = 501
    code = "unsupported_transfer_coding"
    closes_connection = True


class VersionNotSupported(ProxyError):
    """Raised for a request that is not HTTP/1.0 or HTTP/1.1."""

    status = 505
    code = "http_version_not_supported"
    closes_connection = True


class UpstreamUnreachable(ProxyError):
    """Raised when no connection to the upstream could be made (refused, DNS, TLS, timeout)."""

    status = 502
    code = "upstream_unreachable"


class BadUpstreamResponse(ProxyError):
    """Raised when the upstream closed the connection or answered something malformed."""

    status = 502
    code = "bad_upstream_response"


class TokenUnavailable(ProxyError):
    """Raised when no valid token is held and none can be obtained right now."""

    status = 503
    code = "token_unavailable"


class UpstreamBusy(ProxyError):
    """Raised when every pooled upstream connection stayed busy for ``pool_timeout``."""

    status = 503
    code = "upstream_busy"


class UpstreamTimeout(ProxyError):
    """Raised when the upstream sent nothing for ``read_timeout`` seconds."""

    status = 504
    code = "upstream_timeout"


def json_error(
    status: int,
    code: str,
    detail: str,
    *,
    retry_after: float | None = None,
    close: bool = False,
    allow: str = "",
) -> Answer:
    """A proxy-made error answer: JSON body, marker header, optional Retry-After and Allow."""
    headers = [
        ("Content-Type", "application/json"),
        (ERROR_HEADER, code),
        ("Cache-Control", "no-store"),
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(max(1, math.ceil(retry_after)))))
    if allow:
        headers.append(("Allow", allow))
    body = json.dumps({"error": code, "detail": detail}).encode()
    return Answer(status, body, headers, close=close)


def error_answer(error: ProxyError) -> Answer:
    """The HTTP answer for a :class:`ProxyError`."""
    return json_error(
        error.status,
        error.code,
        error.detail,
        retry_after=error.retry_after,
        close=error.closes_connection,
        allow=error.allow,
    )
