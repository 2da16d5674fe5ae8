"""TokenManager: holds a valid token and keeps it fresh, so no request waits on the issuer.

- The token lives in a cachetools ``TLRUCache`` on the monotonic clock, keyed by the credential
  identity; an expired token cannot be read back out of it, so it is never sent.
- Single flight: however many requests find the cache empty, one token request is made and they
  all await it (shielded, so a client hanging up cannot cancel it for the others).
- A background task refreshes ``refresh_margin`` seconds (default: min(300 s, lifetime / 10),
  with a little jitter) before expiry, so the current token serves while its successor is fetched.
- Failures back off exponentially with jitter, capped at ``auth.max_backoff``; a server's
  ``Retry-After`` is honoured; bad-credential errors wait the full cap instead of hammering.
- With a token cache file, a fetch first takes the file's lock and re-reads it: processes
  sharing the file (``--workers``, restarts) make one token request between them. One that is
  backing off looks in the file (or Redis) every second and takes a token a sibling stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable

from cachetools import TLRUCache

from .config import AuthSettings
from .errors import TokenError, TokenUnavailable
from .metrics import Metrics
from .token_endpoint import Token, TokenEndpoint
from .token_store import TokenStore

log = logging.getLogger("sparks_proxy.tokens")

BACKOFF_BASE = 1.0
MAX_RETRY_AFTER = 3600.0
MAX_REFRESH_MARGIN = 300.0
# A token must still be good for this long when it arrives, or the fetch counts as failed.
MIN_USABLE = 1.0
# Replacing a token the upstream rejected: at once the first time; if the replacement is
# rejected young too, the upstream is refusing our tokens and each further replacement waits
# twice as long (up to the cap), so a misconfigured audience cannot burn the issuer's quota.
REPLACE_HOLD_OFF = 1.0
MAX_REPLACE_HOLD_OFF = 300.0
YOUNG = 60.0
# While backing off, how often a shared store is looked at for a token another process got.
STORE_RECHECK = 1.0


def _expiry(_key: object, token: Token, _now: float) -> float:
    return token.expires_at


class TokenManager:
    """Owns the token for one credential: fetch, cache, single flight, refresh, invalidate."""

    def __init__(
        self,
        auth: AuthSettings,
        endpoint: TokenEndpoint,
        *,
        store: TokenStore | None = None,
        metrics: Metrics | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._auth = auth
        self._endpoint = endpoint
        self._store = store
        self._metrics = metrics
        self._jitter = jitter
        # One credential per manager, so one entry; a str key hashes once, not per lookup.
        self._key = "token"
        self._cache: TLRUCache[str, Token] = TLRUCache(maxsize=1, ttu=_expiry, timer=time.monotonic)
        self._inflight: asyncio.Task[Token] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refresh_at = 0.0
        self._obtained_at = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._store_failing = False
        self._hold_off = 0.0
        self._rejected: collections.deque[str] = collections.deque(maxlen=4)
        self.last_error: TokenError | None = None
        """The most recent token failure, until a token is obtained again."""
        if metrics is not None:
            metrics.watch_token(self._remaining)

    # -- the request path -------------------------------------------------------------------

    def current(self) -> Token | None:
        """The held token while it is valid, else None. Never waits."""
        try:
            return self._cache[self._key]  # one expiry check, not get()'s two
        except KeyError:
            return None

    async def get(self) -> Token:
        """A valid token: the held one, or the result of the (single) fetch in flight.

        Raises :class:`TokenUnavailable` (503) with a Retry-After when none can be had now.
        """
        token = self.current()
        return token if token is not None else await self._fetch_shared()

    def invalidate(self, token: Token) -> bool:
        """Drop ``token`` after the upstream rejected it; True if a new one should be fetched.

        Only the held token is dropped: a request that raced a refresh must not evict the
        fresh token. A token rejected soon after an earlier replacement is kept for a while
        (see REPLACE_HOLD_OFF), and its request gets the upstream's 401.
        """
        if self._cache.get(self._key) is not token:
            return True
        now = time.monotonic()
        age = now - self._obtained_at
        if age < self._hold_off:
            log.warning(
                "upstream rejected a token issued %.1f s ago; next replacement in %.0f s",
                age,
                self._hold_off - age,
            )
            return False
        if age < YOUNG:  # rejected young: the upstream may be refusing every token we get
            self._hold_off = min(max(self._hold_off * 2, REPLACE_HOLD_OFF), MAX_REPLACE_HOLD_OFF)
        else:
            self._hold_off = 0.0
        log.info("upstream rejected the held token (401); fetching a new one")
        self._rejected.append(token.value)  # never adopt it again from a shared cache file
        if self._metrics is not None:
            self._metrics.token_rejections.inc()
        self._cache.pop(self._key, None)
        self._wake.set()
        return True

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load a persisted token if one is still good, then start the background refresher.

        The first fetch starts at once, so readiness does not wait for traffic; it does not
        block start-up, so health checks answer while the issuer is slow or down.
        """
        if self._store is not None:
            stored = await self._store.load()
            if stored is not None:
                log.info("reusing the persisted token (expires in %.0f s)", stored.remaining())
                self._hold(stored)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="token-refresher")

    async def close(self) -> None:
        """Stop the refresher and any fetch in flight."""
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @property
    def shared_cache_healthy(self) -> bool | None:
        """Whether the shared token store answers (None when there is none)."""
        return None if self._store is None else self._store.healthy

    def retry_after(self) -> float:
        """Seconds until the next token request is allowed (0 if it may go now)."""
        return max(0.0, self._retry_at - time.monotonic())

    # -- internals --------------------------------------------------------------------------

    def _remaining(self) -> float:
        token = self.current()
        return max(0.0, token.remaining()) if token is not None else 0.0

    def _margin(self, token: Token) -> float:
        configured = self._auth.refresh_margin
        margin = configured if configured > 0 else min(MAX_REFRESH_MARGIN, token.lifetime / 10)
        # Never so large that a token is replaced as soon as it arrives.
        return min(margin, token.lifetime / 2)

    def _hold(self, token: Token) -> None:
        self._cache[self._key] = token
        self._obtained_at = time.monotonic()
        margin = self._margin(token)
        # Jitter spreads the refreshes of many replicas; it only ever refreshes a little earlier.
        self._refresh_at = token.expires_at - margin - 0.1 * margin * self._jitter()
        self._wake.set()

    async def _fetch_shared(self) -> Token:
        if self._inflight is None:
            wait = self.retry_after()
            if wait > 0:
                raise self._unavailable(wait)
            self._inflight = asyncio.create_task(self._fetch(), name="token-fetch")
        try:
            return await asyncio.shield(self._inflight)
        except TokenError:
            raise self._unavailable(self.retry_after()) from None

    def _unavailable(self, wait: float) -> TokenUnavailable:
        error = self.last_error
        detail = (
            f"no valid token: {error.detail}" if error is not None else "no valid token yet"
        ) + "; the proxy keeps retrying, try again after Retry-After"
        return TokenUnavailable(detail, retry_after=max(wait, 1.0))

    async def _fetch(self) -> Token:
        try:
            if self._store is None:
                token = await self._request_token()
            else:
                async with self._store.exclusive(self._auth.timeout + 5, self._shared_is_ready):
                    token = await self._shared_token() or await self._request_token(self._store)
        except TokenError as error:
            self._note_failure(error)
            raise
        except Exception as exc:  # a bug must not stop token refreshes for good
            log.error("unexpected error in a token request (%s)", type(exc).__name__)
            failure = TokenError("bad_token_response", f"unexpected {type(exc).__name__}")
            self._note_failure(failure)
            raise failure from None
        finally:
            self._inflight = None
        self._succeeded(token)
        return token

    def _succeeded(self, token: Token) -> None:
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = None
        self._hold(token)

    async def _adopt_shared(self) -> bool:
        """While backing off: take the token another process stored meanwhile, if any.

        Our failure (a 429, an outage) says nothing of the token a sibling got: it is taken
        at once rather than after our backoff.
        """
        try:
            token = await self._shared_token(quiet=True)
        except Exception as exc:  # the refresher must outlive a broken store too
            if not self._store_failing:  # one line per outage, not one a second
                log.error("unexpected error reading the shared token (%s)", type(exc).__name__)
            self._store_failing = True
            return False
        self._store_failing = False
        # While the store answered, the backoff may have ended and a fetch begun: leave it be.
        if token is None or self._inflight is not None or self.retry_after() == 0:
            return False
        log.info("using the token another process obtained (expires in %.0f s)", token.remaining())
        self._succeeded(token)
        return True

    async def _shared_is_ready(self) -> bool:
        return await self._shared_token(quiet=True) is not None

    async def _shared_token(self, *, quiet: bool = False) -> Token | None:
        """The token another process (or an earlier run) stored, if it is not due for refresh."""
        assert self._store is not None
        stored = await self._store.load()
        held = self.current()
        if (
            stored is None
            or stored.value in self._rejected
            # Our own token: we are here because it is due, so a new one is needed.
            or (held is not None and held.value == stored.value)
            or stored.expires_at - self._margin(stored) <= time.monotonic()
        ):
            return None
        if not quiet:
            log.info(
                "using the token another process obtained (expires in %.0f s)", stored.remaining()
            )
        return stored

    async def _request_token(self, store: TokenStore | None = None) -> Token:
        """Ask the token endpoint; with ``store``, save the token before the lock is let go."""
        token = await self._endpoint.fetch()
        if token.remaining() < MIN_USABLE:
            # The answer took longer than the token lives (or its lifetime is in the past):
            # using it would send an expired token, refetching at once would loop.
            raise TokenError(
                "token_expired_on_arrival",
                f"the token endpoint issued a token good for {token.lifetime:.0f} s that had "
                "expired by the time the answer arrived",
            )
        if self._metrics is not None:
            self._metrics.token_requests.labels("ok").inc()
        log.info(
            "obtained a token (expires in %.0f s, scope %r)", token.lifetime, token.scope or "-"
        )
        if store is not None:
            await store.save(token)
        return token

    def _note_failure(self, error: TokenError) -> None:
        self._failures += 1
        self.last_error = error
        cap = self._auth.max_backoff
        if error.permanent:
            delay = cap
        else:
            delay = min(cap, BACKOFF_BASE * 2 ** (self._failures - 1))
            delay *= 0.5 + 0.5 * self._jitter()
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER))
        self._retry_at = time.monotonic() + delay
        if self._metrics is not None:
            self._metrics.token_requests.labels(error.code).inc()
        held = self.current()
        log.warning(
            "token request failed (%s); next attempt in %.1f s; %s",
            error.for_operator(),
            delay,
            f"still serving the held token for {held.remaining():.0f} s"
            if held is not None
            else "no valid token held",
        )

    async def _refresh_loop(self) -> None:
        while True:
            self._wake.clear()  # before reading the state: a change from here on wakes the wait
            now = time.monotonic()
            due = self._refresh_at if self.current() is not None else now
            if self._retry_at > max(due, now):  # backing off
                due = self._retry_at
                if self._store is not None:  # a sibling may get a token meanwhile
                    if await self._adopt_shared():
                        continue
                    now = time.monotonic()
                    due = min(due, now + STORE_RECHECK)
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due - now)
                continue
            # Failures are noted by _fetch (which turns any error into a TokenError), and the
            # backoff decides the next attempt: this loop outlives every failure.
            with contextlib.suppress(TokenUnavailable):
                await self._fetch_shared()
