"""What aiohttp's parser lets through but a proxy must not: checks on every parsed request.

llhttp rejects most malformed framing on its own (CL with TE, bad chunk sizes, obs-fold, bare
CR, ...; see tests/test_hardening.py). A proxy must also refuse what would be read one way here
and another way upstream (RFC 9112 6.1, RFC 9110 7.2):

- versions other than HTTP/1.0 and HTTP/1.1 (``HTTP/0.9``, ``HTTP/2.0`` sent as text);
- Transfer-Encoding on HTTP/1.0, and any transfer coding but a lone ``chunked`` (the proxy
  re-frames bodies, so a coding it does not decode would reach the upstream mislabelled);
- a Host that is not ``host[:port]`` (userinfo, spaces, several values).
"""

from __future__ import annotations

import re

from aiohttp import web

from .errors import BadRequest, UnsupportedTransferCoding, VersionNotSupported

_SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})
# RFC 3986 host (reg-name, IPv4 or IP-literal) and optional port; no userinfo.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")


def check_request(request: web.BaseRequest) -> None:
    """Raise a :class:`~proxy.errors.ProxyError` if ``request`` must not be served."""
    if request.version not in _SUPPORTED_VERSIONS:
        raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are supported")
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
    hosts = headers.getall("Host", ())
    if len(hosts) > 1 or (hosts and not _HOST.fullmatch(hosts[0])):
        raise BadRequest("the Host header must be a single host[:port]")
