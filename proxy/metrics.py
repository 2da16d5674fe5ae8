"""Prometheus metrics, one registry per app so several proxies can live in one process (tests).

Labels are bounded: methods outside the standard set count as ``OTHER``, statuses are numbers,
token results are error codes. No label ever holds a path, a header value, a token or a secret.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class Metrics:
    """The proxy's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = RequestStats()
        reg.register(self.requests)
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

    def watch_token(self, remaining: Callable[[], float]) -> None:
        """Report ``remaining()`` as the token expiry gauge at every scrape."""
        self.token_expiry.set_function(remaining)

    def count_request(self, method: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        self.requests.count(method, status, seconds)


class RequestStats:
    """Requests answered, by method and status, and how long they took.

    Plain numbers on the request path, turned into Prometheus samples only when scraped:
    prometheus-client's own Counter and Histogram take a lock on every update, which costs a
    proxy more per request than all its counting needs (everything runs on one event loop).
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

    def __init__(self) -> None:
        self._by_label: dict[tuple[str, int], int] = {}
        self._buckets = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self._seconds = 0.0

    def count(self, method: str, status: int, seconds: float) -> None:
        """Count one answer of ``status`` to a ``method`` request that took ``seconds``."""
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (method, status)
        self._by_label[key] = self._by_label.get(key, 0) + 1
        self._buckets[bisect_left(self.BUCKETS, seconds)] += 1  # "le": bound >= seconds
        self._seconds += seconds

    def collect(self) -> Iterator[Metric]:
        """The samples, for the registry."""
        requests = CounterMetricFamily(
            "sparks_proxy_requests",
            "Requests answered, by method and status code.",
            labels=["method", "code"],
        )
        for (method, status), count in sorted(self._by_label.items()):
            requests.add_metric([method, str(status)], count)
        yield requests
        cumulative = 0
        buckets = []
        # Bounds spelled as prometheus-client spells them ("1.0", "+Inf"), so queries match.
        bounds = [*map(floatToGoString, self.BUCKETS), "+Inf"]
        for bound, count in zip(bounds, self._buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "sparks_proxy_request_duration_seconds",
            "Time from request received to response finished.",
            buckets=buckets,
            sum_value=self._seconds,
        )


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the event loop
        return 0.0
