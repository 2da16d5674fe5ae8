"""The optional on-disk token cache (``auth.token_cache_file``).

A restart must not cost a new token: issuers count every machine-to-machine token. The file
holds one entry per credential fingerprint (a hash of token_url, client_id, audience and scope,
never the secret), is written atomically with mode 0600, and is read once at start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .token_endpoint import B64TOKEN, MIN_LIFETIME, CredentialIdentity, Token

log = logging.getLogger("sparks_proxy.tokens")


def fingerprint(identity: CredentialIdentity) -> str:
    """A stable, non-secret name for a credential."""
    text = "\0".join((identity.token_url, identity.client_id, identity.audience, identity.scope))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TokenStore:
    """Reads and writes the token for one credential in a shared JSON file."""

    def __init__(self, path: str, identity: CredentialIdentity) -> None:
        self._path = Path(path)
        self._key = fingerprint(identity)

    def _entries(self) -> dict[str, Any]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("token cache file %s is unreadable (%s); ignoring it", self._path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def load(self) -> Token | None:
        """The stored token for this credential, if it is still good for a while."""
        entry = self._entries().get(self._key)
        if not isinstance(entry, dict):
            return None
        value, expires, lifetime = (
            entry.get("access_token"),
            entry.get("expires"),
            entry.get("lifetime"),
        )
        if not (
            isinstance(value, str)
            and B64TOKEN.fullmatch(value)
            and isinstance(expires, (int, float))
        ):
            return None
        remaining = float(expires) - time.time()
        if remaining < MIN_LIFETIME:
            return None
        scope = entry.get("scope")
        return Token(
            value=value,
            expires_at=time.monotonic() + remaining,
            lifetime=float(lifetime) if isinstance(lifetime, (int, float)) else remaining,
            scope=scope if isinstance(scope, str) else "",
        )

    def save(self, token: Token) -> None:
        """Store ``token`` for this credential; drop other credentials' expired entries."""
        now = time.time()
        entries = {
            key: entry
            for key, entry in self._entries().items()
            if isinstance(entry, dict)
            and isinstance(entry.get("expires"), (int, float))
            and entry["expires"] > now
        }
        entries[self._key] = {
            "access_token": token.value,
            "expires": now + token.remaining(),
            "lifetime": token.lifetime,
            "scope": token.scope,
        }
        self._write(json.dumps(entries).encode())

    def _write(self, data: bytes) -> None:
        # Write a private temporary file beside the target, then rename over it: readers see
        # the old file or the new one, never half of one, and never with wider permissions.
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
