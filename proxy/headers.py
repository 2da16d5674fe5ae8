"""Header rules for a transparent, credential-holding proxy (RFC 9110 7.6.1, RFC 9112).

Pure functions, no I/O, and a bounded memo of their results. Hop-by-hop fields (the fixed
list plus whatever ``Connection`` names) never cross the proxy in either direction. The
client's own credentials never reach the upstream: the proxy alone authenticates. Repeated
fields (several ``Set-Cookie``) are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from aiohttp import hdrs
from multidict import CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

CLIENT_CREDENTIALS = frozenset({"authorization", "x-logicdrop-apikey"})

# Set by the proxy itself: Host comes from the upstream URL, X-Forwarded-* are rebuilt, and
# Expect is answered by the proxy (100 Continue) rather than passed on.
_REBUILT = frozenset({"host", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})

# Body framing is written by whoever writes the message, from the length the parser used:
# never copied, so no header list (nor a Connection header naming Content-Length) can change
# where one message ends and the next begins.
FRAMING = frozenset({"content-length", "transfer-encoding"})

_DROPPED = HOP_BY_HOP | CLIENT_CREDENTIALS | _REBUILT | FRAMING
# Servers that turn field names into variables (CGI, WSGI: X-Forwarded-For becomes
# HTTP_X_FORWARDED_FOR) read X_Forwarded_For the same way: a client must not get past these
# rules under that spelling. nginx drops every name with an underscore by default.
_REQUEST_DROP = _DROPPED | {name.replace("-", "_") for name in _DROPPED}
_RESPONSE_DROP_RAW = frozenset(name.encode() for name in HOP_BY_HOP | FRAMING)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def declared_length(headers: CIMultiDictProxy[str]) -> int | None:
    """The body length a message declares in ``Content-Length``, if any.

    The parser has rejected anything but one field of digits, so this reads what it framed the
    body by.
    """
    value = headers.get(hdrs.CONTENT_LENGTH)  # an istr: no lower-casing per lookup
    return int(value) if value is not None and value.isdigit() else None


def connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Lower-cased field names listed in ``Connection`` (they are hop-by-hop too)."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    if len(values) == 1 and len(values[0]) <= 64:
        return _listed_once(values[0])  # "keep-alive", "close": parsed once, not per message
    return _listed(values)


def _listed(values: Iterable[str]) -> frozenset[str]:
    return frozenset(
        name.strip().lower() for value in values for name in value.split(",") if name.strip()
    )


@functools.lru_cache(maxsize=32)
def _listed_once(value: str) -> frozenset[str]:
    return _listed((value,))


def upstream_request_headers(
    headers: CIMultiDictProxy[str], *, client_ip: str | None, proto: str
) -> str:
    """The header block (``Name: value`` lines) to send upstream for a client request.

    Drops hop-by-hop and framing fields and client credentials, and appends the client to
    ``X-Forwarded-For``/``-Proto``/``-Host``. Everything else passes in order, repeats
    included; nothing the client did not send is added. Not here: ``Host`` (the upstream's,
    written by the connection pool with the framing for the body it sends) and
    ``Authorization`` (the proxy's token, added per attempt by the forwarder).
    """
    listed = connection_listed(headers)
    fields = [
        (name, value)
        for name, value in headers.items()
        if (lower := name.lower()) not in _REQUEST_DROP and lower not in listed
    ]
    fields.append(("X-Forwarded-For", _appended(headers, "X-Forwarded-For", listed, client_ip)))
    fields.append(("X-Forwarded-Proto", _appended(headers, "X-Forwarded-Proto", listed, proto)))
    host = headers.get("Host")
    if host is not None:
        fields.append(("X-Forwarded-Host", _appended(headers, "X-Forwarded-Host", listed, host)))
    return field_block(fields)


def field_block(fields: Iterable[tuple[str, str]]) -> str:
    """``Name: value`` lines for ``fields``: a header block as requests and replies take it."""
    return "".join([f"{name}: {value}\r\n" for name, value in fields])


def _appended(
    headers: CIMultiDictProxy[str], name: str, listed: frozenset[str], value: str | None
) -> str:
    earlier = [] if name.lower() in listed else headers.getall(name, [])
    return ", ".join([*earlier, value or "unknown"])


def downstream_response_headers(
    headers: CIMultiDictProxy[str],
    raw_headers: RawHeaders,
    *,
    location: LocationRewriter,
    proxy_origin: str | None,
) -> bytes:
    """The header block to send the client for an upstream answer, in the bytes received.

    ``headers`` and ``raw_headers`` are the same fields, parsed and as received. Hop-by-hop
    and framing fields are left out: the reply writes its own framing.
    """
    drop = _RESPONSE_DROP_RAW
    listed = connection_listed(headers)
    if not listed <= HOP_BY_HOP:  # "keep-alive" and "close" name nothing else
        drop = drop | {name.encode("utf-8", "surrogateescape") for name in listed}
    parts: list[bytes] = []
    for name, value in raw_headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"location":
            rewritten = location.rewrite(value.decode("utf-8", "surrogateescape"), proxy_origin)
            value = rewritten.encode("utf-8", "surrogateescape")
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


RawHeaders = tuple[tuple[bytes, bytes], ...]
V = TypeVar("V")


class HeaderMemo(Generic[V]):
    """Results of pure functions of a header list, for the lists that come again and again.

    A client (an SDK, a legacy app) sends the same fields with every request: the header rules
    then run once per distinct list, not once per request. Bounded whatever clients send: at
    most ENTRIES lists of at most MAX_BYTES each, forgotten all at once when full.
    """

    ENTRIES = 256
    MAX_BYTES = 4096

    def __init__(self) -> None:
        self._results: dict[Hashable, V] = {}
        # The dict's own get, bound once: a lookup per request costs no Python call of ours.
        self.get: Callable[[Hashable], V | None] = self._results.get
        """The result remembered for a key, if any."""

    def remember(self, key: Hashable, raw_headers: RawHeaders, result: V) -> None:
        """Remember ``result`` for ``key``, whose header list is ``raw_headers``."""
        if sum([len(name) + len(value) for name, value in raw_headers]) > self.MAX_BYTES:
            return
        if len(self._results) >= self.ENTRIES:
            self._results.clear()
        self._results[key] = result


class LocationRewriter:
    """Rewrites a ``Location`` on the upstream's origin to the proxy's (nginx ``proxy_redirect
    default``); any other ``Location`` is left alone, so a redirect elsewhere is never hidden."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._scheme = parts.scheme
        self._host = (parts.hostname or "").lower()
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._base_path = parts.path.rstrip("/")

    def rewrite(self, value: str, proxy_origin: str | None) -> str:
        """``value`` with the upstream origin and base path replaced by ``proxy_origin``."""
        if value.startswith("/") and not value.startswith("//"):
            rest = self._strip_base(value)
            return value if rest is None else (proxy_origin or "") + rest
        try:
            parts = urlsplit(value)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:
            return value
        if (
            parts.scheme.lower() != self._scheme
            or (parts.hostname or "").lower() != self._host
            or port != self._port
        ):
            return value
        # Keep the path and query exactly as sent: cut at the end of the authority.
        after_scheme = value.split("//", 1)[1]
        cut = min(
            (i for i in (after_scheme.find("/"), after_scheme.find("?")) if i >= 0),
            default=len(after_scheme),
        )
        rest = self._strip_base(after_scheme[cut:] or "/")
        if rest is None:
            return value
        return (proxy_origin or "") + rest

    def _strip_base(self, path: str) -> str | None:
        if not self._base_path:
            return path if path.startswith("/") else "/" + path
        if path == self._base_path or path.startswith(self._base_path + "/"):
            return path[len(self._base_path) :] or "/"
        if path.startswith(self._base_path + "?"):
            return "/" + path[len(self._base_path) :]
        return None


def passes_unchanged(raw_headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether every raw header field is one the proxy passes on exactly and safely.

    Names must be tokens (RFC 9110 5.1; the upstream's parser lets a space before the colon
    through). Values must be ASCII or UTF-8 (other bytes, obs-text such as Latin-1, are refused
    rather than guessed at) and hold no control character but HTAB: the upstream's parser is
    lenient about those, and a client's parser may not be.
    """
    names = []
    values = []
    for name, value in raw_headers:
        if not name:
            return False
        names.append(name)
        values.append(value)
    # One C pass each, not one per field: deleting every allowed byte must leave nothing.
    if b"".join(names).translate(None, _TOKEN_BYTES):  # e.g. "Content-Length " (a space)
        return False
    joined = b"".join(values)
    if len(joined.translate(None, _CONTROL_BYTES)) != len(joined):
        return False
    if joined.isascii():
        return True
    try:
        for value in values:  # one by one: halves of two fields could join into valid UTF-8
            value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
