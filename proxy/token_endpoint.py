"""One client-credentials token request (RFC 6749 4.4) and the reading of its answer.

Caching, single flight and refresh timing live in :mod:`proxy.tokens`; this module only knows
how to ask once and what the answer means. The secret leaves the process only in the body or
Basic header of the request built here, only to ``auth.token_url``, and never in an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import aiohttp

from .config import AuthSettings, read_secret_file
from .errors import TokenError

log = logging.getLogger("sparks_proxy.tokens")

DEFAULT_LIFETIME = 3600.0
MIN_LIFETIME = 2.0
MAX_LIFETIME = 30 * 86400.0  # the vendor documents 30-day tokens
MAX_ANSWER_BYTES = 64 * 1024

# Errors that mean "the credential itself is wrong": retrying soon only burns quota.
PERMANENT_ERRORS = frozenset(
    {"invalid_client", "unauthorized_client", "invalid_grant", "invalid_scope", "access_denied"}
)
# The codes an answer's "error" may give the failure (RFC 6749 5.2, RFC 6750 3.1, and Auth0's
# too_many_requests). Any other text in that field is the issuer's, not a code: it could be
# anything, a secret or a token included, and labels a metric too.
OAUTH_ERRORS = PERMANENT_ERRORS | {
    "invalid_request",
    "unsupported_grant_type",
    "invalid_token",
    "server_error",
    "temporarily_unavailable",
    "too_many_requests",
}
# What may be a token or a key in an issuer's text (a JWT, an opaque token, a Basic value).
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9\-._~+/]{24,}=*")
# RFC 6750 b64token: what may follow "Bearer " in a header.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when it stops being usable (on the monotonic clock)."""

    value: str = field(repr=False)
    expires_at: float
    lifetime: float
    scope: str = ""
    authorization: str = field(init=False, repr=False)
    """The ready-made ``Authorization`` header value, built once per token, not per request."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "authorization", "Bearer " + self.value)

    def remaining(self, now: float | None = None) -> float:
        """Seconds until expiry."""
        return self.expires_at - (time.monotonic() if now is None else now)


@dataclass(frozen=True, slots=True)
class CredentialIdentity:
    """What a token is for; the cache key. Deliberately excludes the secret."""

    token_url: str
    client_id: str
    audience: str
    scope: str

    @classmethod
    def of(cls, auth: AuthSettings) -> CredentialIdentity:
        """The identity of the configured credential."""
        return cls(auth.token_url, auth.client_id, auth.audience, auth.scope)


class TokenEndpoint:
    """Asks ``auth.token_url`` for a token with the client-credentials grant."""

    def __init__(self, auth: AuthSettings, session: aiohttp.ClientSession) -> None:
        self._auth = auth
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=auth.timeout)

    def _secret(self) -> str:
        # Read at every fetch so a rotated Kubernetes Secret is used without a restart.
        if not self._auth.client_secret_file:
            return self._auth.client_secret.reveal()
        try:
            secret = read_secret_file(self._auth.client_secret_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(
                "secret_unreadable",
                f"cannot read auth.client_secret_file ({type(exc).__name__})",
                permanent=True,
            ) from None
        if not secret:
            raise TokenError(
                "secret_unreadable",
                "auth.client_secret_file is empty; expected the client secret in it",
                permanent=True,
            )
        return secret

    def _request(self, secret: str) -> tuple[dict[str, str], bytes]:
        auth = self._auth
        fields = {"grant_type": "client_credentials"}
        if auth.audience:
            fields["audience"] = auth.audience
        if auth.scope:
            fields["scope"] = auth.scope
        headers = {"Accept": "application/json"}
        if auth.client_auth == "basic":
            pair = f"{quote_plus(auth.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            fields["client_id"] = auth.client_id
            fields["client_secret"] = secret
        if auth.request_format == "form":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return headers, urlencode(fields).encode()
        headers["Content-Type"] = "application/json"
        return headers, json.dumps(fields).encode()

    async def fetch(self) -> Token:
        """Request one token; raise :class:`TokenError` saying why when that fails."""
        secret = self._secret()
        headers, body = self._request(secret)
        sent_at = time.monotonic()
        try:
            async with self._session.post(
                self._auth.token_url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                raw = await _read_limited(resp)
                status = resp.status
                resp_headers = resp.headers
        except TimeoutError:
            raise TokenError(
                "token_timeout",
                f"no answer from the token endpoint within {self._auth.timeout:g} s",
            ) from None
        except aiohttp.ClientError as exc:
            # The OS's reason ("Connection refused") says where to look; the exception's own
            # message may quote the address or URL, so it is not used.
            detail = f"token request failed: {type(exc).__name__}"
            if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
                detail += f" ({os.strerror(exc.os_error.errno)})"
            raise TokenError("token_endpoint_unreachable", detail) from None
        return _parse(
            status, resp_headers, raw, sent_at, self._auth.scope, _sent_forms(secret, headers)
        )


def _sent_forms(secret: str, headers: dict[str, str]) -> tuple[str, ...]:
    """The secret in each encoding the request carried it in: what an issuer might echo."""
    forms = {secret, quote_plus(secret), quote(secret, safe=""), json.dumps(secret)[1:-1]}
    basic = headers.get("Authorization")
    if basic is not None:
        forms.add(basic.removeprefix("Basic "))
    # Longest first, so no shorter form cuts a longer one apart before it is found.
    return tuple(sorted(filter(None, forms), key=len, reverse=True))


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TokenError("bad_token_response", "token endpoint answer is larger than 64 KiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(
    status: int,
    headers: Any,
    raw: bytes,
    sent_at: float,
    configured_scope: str,
    confidential: tuple[str, ...],
) -> Token:
    if 300 <= status < 400:
        raise TokenError(
            "token_redirect",
            f"token endpoint answered {status} (a redirect); not followed, check auth.token_url",
        )
    payload: Any = None
    with contextlib.suppress(ValueError, RecursionError):  # RecursionError: "[[[[..."
        payload = json.loads(raw)
    if status == 429:
        raise TokenError(
            "rate_limited",
            "token endpoint answered 429 Too Many Requests",
            retry_after=retry_after_seconds(headers),
        )
    if status != 200:
        error = payload.get("error") if isinstance(payload, dict) else None
        description = payload.get("error_description") if isinstance(payload, dict) else None
        described = _redact(description, confidential) if isinstance(description, str) else ""
        if isinstance(error, str) and error in OAUTH_ERRORS:
            raise TokenError(
                error,
                f"token endpoint answered {status} {error}",
                permanent=error in PERMANENT_ERRORS,
                said=described,
            )
        unknown = _redact(error, confidential) if isinstance(error, str) else ""
        raise TokenError(
            "token_endpoint_error",
            f"token endpoint answered {status}",
            retry_after=retry_after_seconds(headers) if status == 503 else None,
            said=" ".join(filter(None, (unknown, described))),
        )
    if not isinstance(payload, dict):
        kind = "an empty body" if not raw.strip() else "a body that is not JSON"
        raise TokenError("bad_token_response", f"token endpoint answered 200 with {kind}")
    value = payload.get("access_token")
    if not isinstance(value, str) or not B64TOKEN.fullmatch(value):
        raise TokenError("bad_token_response", "token endpoint answer has no usable access_token")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(
            "bad_token_response", "token endpoint answered a token_type other than Bearer"
        )
    lifetime = _lifetime(payload.get("expires_in"), value)
    scope = payload.get("scope")
    return Token(
        value=value,
        expires_at=sent_at + lifetime,
        lifetime=lifetime,
        scope=scope if isinstance(scope, str) else configured_scope,
    )


def _lifetime(expires_in: Any, value: str) -> float:
    """Seconds the token is good for: ``expires_in``, else the JWT ``exp``, else a default.

    A zero or negative ``expires_in`` is treated as absent rather than clamped up to the
    minimum: refetching every few seconds would burn the issuer's quota, while a token that
    really is short-lived is replaced after its first 401 anyway.
    """
    seconds: float | None = None
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool):
        seconds = float(expires_in)
    elif isinstance(expires_in, str):
        with contextlib.suppress(ValueError):
            seconds = float(expires_in)
    if seconds is None or not seconds > 0:  # absent, unparsable, NaN, zero or negative
        if seconds is not None:
            log.warning("token endpoint sent expires_in=%r; ignoring it", expires_in)
        exp = _jwt_exp(value)
        left = exp - time.time() if exp is not None else 0.0
        # An exp already past says more about clock skew than about the token: ignore it.
        seconds = left if left > 0 else DEFAULT_LIFETIME
    clamped = min(max(seconds, MIN_LIFETIME), MAX_LIFETIME)
    if clamped != seconds:
        log.warning("token lifetime %.0f s is out of range; using %.0f s", seconds, clamped)
    return clamped


def _jwt_exp(value: str) -> float | None:
    parts = value.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a 429/503 asks for: ``Retry-After`` (seconds or date) or ``x-ratelimit-reset``."""
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    reset = headers.get("X-RateLimit-Reset")
    if reset and reset.strip().isdigit():
        # Auth0 sends the epoch second when the limit resets.
        return max(0.0, float(reset) - time.time())
    return None


def _redact(text: str, confidential: tuple[str, ...]) -> str:
    """An issuer's text fit for a log line: the secret in every form the request carried it,
    and anything shaped like a token, replaced; at most 200 printable characters."""
    # Redact before cutting, so no prefix of the secret can survive the cut.
    for form in confidential:
        text = text.replace(form, "<SECRET>")
    text = _TOKEN_LIKE.sub("<REDACTED>", text)
    return "".join(ch if ch.isprintable() else "?" for ch in text[:200])
