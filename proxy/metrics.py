"""Prometheus metrics, one registry per app so several proxies can live in one process (tests).

Labels are bounded: methods outside the standard set count as ``OTHER``, statuses are numbers,
token results are error codes. No label ever holds a path, a header value, a token or a secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class Metrics:
    """The proxy's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "sparks_proxy_requests",
            "Requests answered, by method and status code.",
            ["method", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "sparks_proxy_request_duration_seconds",
            "Time from request received to response finished.",
            registry=reg,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.proxy_errors = Counter(
            "sparks_proxy_errors",
            "Answers made by the proxy itself instead of the upstream, by error code.",
            ["error"],
            registry=reg,
        )
        self.upstream_401_retries = Counter(
            "sparks_proxy_upstream_401_retries",
            "Requests retried once with a new token after the upstream answered 401.",
            registry=reg,
        )
        self.token_rejections = Counter(
            "sparks_proxy_token_rejections",
            "Held tokens dropped because the upstream answered 401.",
            registry=reg,
        )
        self.shared_cache_errors = Counter(
            "sparks_proxy_shared_cache_errors",
            "Failed calls to the shared token cache (Redis); requests go on regardless.",
            registry=reg,
        )
        self.token_requests = Counter(
            "sparks_proxy_token_requests",
            "Token endpoint requests, by result (ok or an error code).",
            ["result"],
            registry=reg,
        )
        self.token_expiry = Gauge(
            "sparks_proxy_token_expiry_seconds",
            "Seconds until the held token expires (0 when none is held).",
            registry=reg,
        )
        self.in_flight = Gauge(
            "sparks_proxy_in_flight_requests",
            "Requests being forwarded right now.",
            registry=reg,
        )
        self.tasks = Gauge(
            "sparks_proxy_asyncio_tasks",
            "asyncio tasks alive in the proxy's event loop (flat over time when nothing leaks).",
            registry=reg,
        )
        self.tasks.set_function(_task_count)
        self._request_counters: dict[tuple[str, int], Counter] = {}

    def watch_token(self, remaining: Callable[[], float]) -> None:
        """Report ``remaining()`` as the token expiry gauge at every scrape."""
        self.token_expiry.set_function(remaining)

    def count_request(self, method: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        key = (method, status)
        counter = self._request_counters.get(key)
        if counter is None:  # labels() once per (method, status), not once per request
            label = method if method in KNOWN_METHODS else "OTHER"
            counter = self._request_counters[key] = self.requests.labels(label, str(status))
        counter.inc()
        self.request_duration.observe(seconds)


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the event loop
        return 0.0
