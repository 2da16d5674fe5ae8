"""A token store on Redis (``auth.token_cache = "redis"``): one token for a whole fleet.

Every replica keeps the token in its own memory (requests never wait on Redis); Redis is read
at start-up and whenever a replica is due to refresh or got a 401. Before fetching, a replica
takes a short lock (``SET NX PX``, released only by its owner through a compare-and-delete
script, expiring by itself if the owner dies) and re-reads the token: the others wait on the
lock and then find the new token instead of fetching their own.

Redis down or slow never fails a request: every call is bounded by a short timeout, errors are
logged (once per outage) and counted, and the replica goes on with its own token and its own
fetches until Redis answers again. The key is the credential's fingerprint, never the secret;
with ``auth.redis_encryption_key_file`` the value is sealed with AES-GCM (``cryptography``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from .metrics import Metrics
from .token_endpoint import CredentialIdentity, Token
from .token_store import decode, encode, fingerprint

log = logging.getLogger("sparks_proxy.tokens")

REDIS_TIMEOUT = 1.0
"""Seconds any one Redis call may take before the replica goes on without it."""

# Deletes the lock only if it still holds our owner value: a lock that expired and was taken by
# another replica is never released by us.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


class RedisTokenStore:
    """Tokens shared through Redis, with a lock so one replica fetches for all."""

    def __init__(
        self,
        url: str,
        identity: CredentialIdentity,
        *,
        prefix: str,
        lock_seconds: float,
        encryption_key: bytes | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._key = prefix + fingerprint(identity)
        self._lock_key = self._key + ":lock"
        self._lock_ms = int(lock_seconds * 1000)
        self._release = self._client.register_script(_RELEASE)
        self._metrics = metrics
        self._sealer = _Sealer(encryption_key, self._key) if encryption_key else None
        self.healthy = True

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _failed(self, what: str, exc: Exception) -> None:
        if self._metrics is not None:
            self._metrics.shared_cache_errors.inc()
        if self.healthy:  # one line per outage, not one per call
            log.warning(
                "redis token cache unavailable (%s: %s); working on the local token",
                what,
                type(exc).__name__,
            )
        self.healthy = False

    def _ok(self) -> None:
        if not self.healthy:
            log.info("redis token cache is back")
        self.healthy = True

    async def load(self) -> Token | None:
        """The shared token, if Redis has a good one (None when Redis is unavailable)."""
        try:
            raw = await self._client.get(self._key)
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return None
        self._ok()
        if raw is None:
            return None
        if self._sealer is not None:
            raw = self._sealer.open(raw if isinstance(raw, bytes) else raw.encode())
            if raw is None:
                return None
        try:
            return decode(json.loads(raw))
        except (ValueError, RecursionError):
            return None

    async def save(self, token: Token) -> None:
        """Share ``token``, expiring in Redis when the token does."""
        ttl_ms = int(token.remaining() * 1000)
        if ttl_ms <= 0:
            return
        value = json.dumps(encode(token)).encode()
        if self._sealer is not None:
            value = self._sealer.seal(value)
        try:
            await self._client.set(self._key, value, px=ttl_ms)
        except (RedisError, OSError) as exc:
            self._failed("write", exc)
        else:
            self._ok()

    @contextlib.asynccontextmanager
    async def exclusive(
        self, wait: float, until: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[bool]:
        """Hold the fleet-wide fetch lock for the block; yield whether it was had.

        Waits (polling) up to ``wait`` s while another replica holds it, and stops early once
        ``until()`` is true (the holder stored a token). With Redis down the answer is at once
        False: the replica fetches on its own rather than wait.
        """
        owner = secrets.token_hex(16)
        locked = False
        deadline = time.monotonic() + wait
        while True:
            try:
                locked = bool(
                    await self._client.set(self._lock_key, owner, nx=True, px=self._lock_ms)
                )
            except (RedisError, OSError) as exc:
                self._failed("lock", exc)
                break
            self._ok()
            if locked or time.monotonic() >= deadline or await until():
                break
            await asyncio.sleep(0.05)
        try:
            yield locked
        finally:
            if locked:
                try:
                    await self._release(keys=[self._lock_key], args=[owner])
                except (RedisError, OSError) as exc:
                    self._failed("unlock", exc)  # it expires by itself


class _Sealer:
    """AES-GCM for the value at rest; the Redis key is the associated data, so a value
    cannot be moved to another credential's key."""

    PREFIX = b"aesgcm1:"

    def __init__(self, key: bytes, name: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only when configured

        self._aead = AESGCM(key)
        self._name = name.encode()
        self._warned = False

    def seal(self, plain: bytes) -> bytes:
        nonce = os.urandom(12)
        return self.PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, plain, self._name))

    def open(self, sealed: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        try:
            if not sealed.startswith(self.PREFIX):
                raise ValueError("not sealed")
            blob = base64.b64decode(sealed[len(self.PREFIX) :])
            return self._aead.decrypt(blob[:12], blob[12:], self._name)
        except (ValueError, InvalidTag):
            if not self._warned:  # a replica with another key, or none: fetch our own
                log.warning("cannot decrypt the shared token (another key?); ignoring it")
                self._warned = True
            return None
