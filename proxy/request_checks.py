"""What a request must satisfy before anything answers it, and where it is routed.

llhttp rejects most malformed framing on its own (CL with TE, bad chunk sizes, obs-fold, bare
CR, ...; see tests/test_hardening.py). A proxy must also refuse what would be read one way here
and another way upstream (RFC 9112 6.1, RFC 9110 7.2), and what a browser could be tricked
into sending to a proxy that holds a credential:

- CONNECT (no tunnels), and TRACE: the upstream echoes a TRACE request back, and the proxy's
  credential with it (RFC 9110 9.3.8: a client never sends credentials in one);
- an ``Expect`` other than ``100-continue``, the one expectation the proxy meets (417);
- versions other than HTTP/1.0 and HTTP/1.1 (``HTTP/0.9``, ``HTTP/2.0`` sent as text);
- Transfer-Encoding on HTTP/1.0, and any transfer coding but a lone ``chunked`` (the proxy
  re-frames bodies, so a coding it does not decode would reach the upstream mislabelled);
- a Host that is not a single ``host[:port]``, or names a host not in ``server.allowed_hosts``
  (DNS rebinding: a web page whose name now resolves to 127.0.0.1);
- a browser's cross-site request (``Sec-Fetch-Site: cross-site``, or an ``Origin`` whose host
  is not allowed): any page open in a browser could otherwise spend the proxy's token;
- header values that are neither ASCII nor UTF-8, which aiohttp would alter on the way.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from aiohttp import hdrs

from .config import ServerSettings
from .errors import (
    BadRequest,
    CrossSiteRequest,
    ExpectationFailed,
    MethodNotAllowed,
    MisdirectedRequest,
    TunnelRefused,
    UnsupportedTransferCoding,
    VersionNotSupported,
)
from .headers import HeaderMemo, passes_unchanged
from .messages import Request

_SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})
# An Expect list may hold empty elements (RFC 9110 5.6.1.2): they ask for nothing.
_MET_EXPECTATIONS = frozenset({"100-continue", ""})
# RFC 3986 host (reg-name, IPv4 or IP-literal) and optional port; no userinfo.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")


class RequestPolicy:
    """The checks, with the allowed hosts from ``[server]`` worked out once."""

    def __init__(self, settings: ServerSettings) -> None:
        names = {name.strip().lower() for name in settings.allowed_hosts.split(",")}
        names.discard("")
        self._any_host = "*" in names
        if settings.host not in ("0.0.0.0", "::", ""):  # noqa: S104 - compared, not bound
            names.add(settings.host.lower())
        # "[::1]" and "::1" name the same host; keep both spellings.
        self._hosts = frozenset(names | {n.strip("[]") for n in names} | {f"[{n}]" for n in names})
        # Header lists (with the version) that passed: clients send the same one every time.
        self._passed: HeaderMemo[bool] = HeaderMemo()

    def check(self, request: Request) -> str:
        """The request's origin-form target; raise a ProxyError if it must not be served."""
        method = request.method
        if method == "CONNECT":
            raise TunnelRefused("CONNECT is not supported: the proxy never opens a tunnel")
        if method == "TRACE":
            raise MethodNotAllowed(
                "TRACE is not forwarded: the upstream's echo would carry the proxy's credential"
            )
        if request.version not in _SUPPORTED_VERSIONS:
            raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
        key = (request.version, request.raw_headers)
        if not self._passed.get(key):
            self._check_headers(request)
            self._passed.remember(key, request.raw_headers, True)
        return origin_form(request.raw_path)

    def _check_headers(self, request: Request) -> None:
        headers = request.headers
        codings = headers.getall("Transfer-Encoding", ())
        if codings:
            if request.version == (1, 0):
                raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request")
            parts = [part.strip().lower() for value in codings for part in value.split(",")]
            if "" in parts:
                raise BadRequest("the Transfer-Encoding header is malformed")
            if parts != ["chunked"]:
                raise UnsupportedTransferCoding("the only transfer coding supported is chunked")
        for value in headers.getall(hdrs.EXPECT, ()):
            if any(part.strip().lower() not in _MET_EXPECTATIONS for part in value.split(",")):
                raise ExpectationFailed("only Expect: 100-continue is supported")
        hosts = headers.getall("Host", ())
        if len(hosts) > 1:
            raise BadRequest("the Host header must be a single host[:port]")
        if hosts:
            self._check_host(hosts[0])
        if headers.get("Sec-Fetch-Site") == "cross-site" or not self._allowed_origin(
            headers.get("Origin")
        ):
            raise CrossSiteRequest(
                "browser requests from other sites may not use the proxy's credential"
            )
        if not passes_unchanged(request.raw_headers):
            raise BadRequest("header values must be ASCII or UTF-8; the proxy would alter others")

    def _check_host(self, host: str) -> None:
        if not _HOST.fullmatch(host):
            raise BadRequest("the Host header must be a single host[:port]")
        if not self.allows_host(host):
            raise MisdirectedRequest(
                "this proxy does not serve that Host; use 127.0.0.1 or localhost, "
                "or add the name to server.allowed_hosts"
            )

    def allows_host(self, host: str) -> bool:
        """Whether a ``Host`` header value (``name[:port]``) names a host this proxy serves."""
        return self._allowed(_hostname(host))

    def _allowed(self, name: str) -> bool:
        return self._any_host or name in self._hosts

    def _allowed_origin(self, origin: str | None) -> bool:
        if origin is None or self._any_host:
            return True
        try:
            host = urlsplit(origin).hostname
        except ValueError:
            return False
        return host is not None and self._allowed(host)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    name = host.rpartition(":")[0] if ":" in host else host
    return name.rstrip(".").lower()  # "localhost." is the same host, fully qualified


def origin_form(target: str) -> str:
    """The path and query of a request target, byte for byte.

    An absolute-form target (``http://other.example/x``) keeps only its path and query: the
    destination is always the configured upstream, whatever the client wrote.
    """
    if target.startswith("/"):
        return target
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha():
        raise BadRequest("the request target must be a path such as /projects")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path.startswith("/") else "/" + path
