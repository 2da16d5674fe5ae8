"""The on-disk token cache (``auth.token_cache_file``), shared by every process that uses it.

A restart must not cost a new token: issuers count every machine-to-machine token. The file
holds one entry per credential fingerprint (a hash of token_url, client_id, audience and scope,
never the secret) and is written atomically with mode 0600. Beside it, ``<file>.lock`` is an
advisory lock: a process takes it before fetching, then re-reads the file, so workers and
restarts sharing the file make one token request between them, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .token_endpoint import B64TOKEN, MAX_LIFETIME, MIN_LIFETIME, CredentialIdentity, Token

log = logging.getLogger("sparks_proxy.tokens")

# Hosts sharing a store disagree on the time by a little (or one's clock steps): a token
# stored by another with MAX_LIFETIME left may seem to have a little more.
CLOCK_SLACK = 300.0


def fingerprint(identity: CredentialIdentity) -> str:
    """A stable, non-secret name for a credential."""
    text = "\0".join((identity.token_url, identity.client_id, identity.audience, identity.scope))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def encode(token: Token) -> dict[str, Any]:
    """A token as stored: wall-clock expiry, so another process (or a restart) can use it."""
    return {
        "access_token": token.value,
        "expires": time.time() + token.remaining(),
        "lifetime": token.lifetime,
        "scope": token.scope,
    }


def decode(entry: object) -> Token | None:
    """The token in a stored entry, if it is well-formed and still good for a while.

    Anything else, whoever wrote it, counts as no entry: a new token is fetched rather than
    one sent that cannot be timed.
    """
    if not isinstance(entry, dict):
        return None
    value = entry.get("access_token")
    if not isinstance(value, str) or not B64TOKEN.fullmatch(value):
        return None  # damaged: better a new token than one that fails every request
    expires = _finite(entry.get("expires"))
    if expires is None:
        return None
    remaining = expires - time.time()
    if not MIN_LIFETIME <= remaining <= MAX_LIFETIME + CLOCK_SLACK:
        return None  # expired, or further off than any token the proxy would keep
    lifetime = _finite(entry.get("lifetime"))
    scope = entry.get("scope")
    return Token(
        value=value,
        expires_at=time.monotonic() + remaining,
        lifetime=lifetime if lifetime is not None and 0 < lifetime <= MAX_LIFETIME else remaining,
        scope=scope if isinstance(scope, str) else "",
    )


def _finite(number: object) -> float | None:
    """A JSON number as a finite float; None for anything else (NaN, Infinity, 1e400, true)."""
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return None
    try:
        result = float(number)
    except OverflowError:  # an integer past float's range
        return None
    return result if math.isfinite(result) else None


def _read_entries(path: Path) -> tuple[dict[str, Any], str | None]:
    """A token cache file's entries, and what kept them from being read, if anything.

    A missing file holds no entries. A damaged one (not UTF-8, not JSON, not an object) holds
    none either, and the next save writes it anew.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, exc.strerror or type(exc).__name__
    try:
        data = json.loads(raw)  # from bytes: bad UTF-8 is a ValueError, as bad JSON is
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return {}, "not a token cache file"
    return data, None


class TokenStore(Protocol):
    """Where tokens are shared beyond one process's memory (a file, or Redis)."""

    healthy: bool
    """False while the store is unreachable; the proxy then works on its own."""

    async def load(self) -> Token | None:
        """The stored token for this credential, if it is still good for a while."""

    async def save(self, token: Token) -> None:
        """Store ``token`` for this credential (failures are logged, never raised)."""

    def exclusive(
        self, wait: float, until: Callable[[], Awaitable[bool]]
    ) -> contextlib.AbstractAsyncContextManager[bool]:
        """Hold the store's lock for the block; yield whether it was had.

        Waits up to ``wait`` s, and stops waiting early once ``until()`` is true (another
        process stored what the caller wanted), yielding False then.
        """

    async def close(self) -> None:
        """Let go of connections."""


class FileTokenStore:
    """Tokens in a JSON file shared by the processes that use it, one entry per credential."""

    def __init__(self, path: str, identity: CredentialIdentity) -> None:
        self._path = Path(path)
        self._key = fingerprint(identity)
        self._failing: set[str] = set()
        self.healthy = True

    def _outcome(self, operation: str, problem: str | None) -> None:
        """Note whether ``operation`` (lock, read, write) worked: healthy while all of them do.

        A file that cannot be locked, read or written costs the sharing, never the token: the
        proxy goes on alone, and readiness says so until the operation works again (a write:
        at the next token fetch, since until then the held token was not shared). Called on
        the event loop's thread only.
        """
        if problem is None:
            if operation in self._failing:
                self._failing.discard(operation)
                log.info("auth.token_cache_file: %s works again", operation)
        elif operation not in self._failing:  # one line per outage, not one per call
            self._failing.add(operation)
            log.warning(
                "cannot %s auth.token_cache_file (%s); the token is not shared meanwhile",
                operation,
                problem,
            )
        self.healthy = not self._failing

    async def load(self) -> Token | None:
        """The stored token for this credential, if it is still good for a while."""
        entries, problem = _read_entries(self._path)  # a small file: read in place
        self._outcome("read", problem)
        return decode(entries.get(self._key))

    async def close(self) -> None:
        """Nothing to let go of: the file is opened per call."""

    @contextlib.asynccontextmanager
    async def exclusive(
        self, wait: float, until: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[bool]:
        """Hold the file's lock for the block; yield whether it was had (see TokenStore).

        Polls a non-blocking ``flock`` so the wait stays cancellable. When the wait runs out
        (a holder that hangs) the caller goes on without it: a token request too many beats
        no token at all.
        """
        try:
            fd = os.open(
                self._path.with_name(self._path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as exc:
            # A read-only or vanished directory: go on unlocked.
            self._outcome("lock", exc.strerror or type(exc).__name__)
            yield False
            return
        self._outcome("lock", None)
        try:
            deadline = time.monotonic() + wait
            locked = False
            while not locked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    if await until():
                        break
                    if time.monotonic() >= deadline:
                        log.warning("token cache lock busy for %.0f s; fetching anyway", wait)
                        break
                    await asyncio.sleep(0.02)
            yield locked
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    async def save(self, token: Token) -> None:
        """Store ``token``; a write that fails is logged, and the proxy carries on."""
        try:
            await asyncio.to_thread(self._save, token)
        except OSError as exc:
            self._outcome("write", exc.strerror or type(exc).__name__)
        else:
            self._outcome("write", None)
            self._outcome("read", None)  # the file is now one this process wrote

    def _save(self, token: Token) -> None:
        # Drop other credentials' expired entries while at it.
        now = time.time()
        entries = {
            key: entry
            for key, entry in _read_entries(self._path)[0].items()  # on a thread: noted by save()
            if isinstance(entry, dict) and (_finite(entry.get("expires")) or 0.0) > now
        }
        entries[self._key] = encode(token)
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
