"""One access-log line and one metrics sample per answered request."""

from __future__ import annotations

import logging
import time

from .messages import Request
from .metrics import Metrics

log = logging.getLogger("sparks_proxy.access")

ABORTED = 499  # nginx's code for an exchange cut short before its answer was complete


class AccessLog:
    """Records each request: method, path without query, status, bytes, durations."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def record(
        self,
        request: Request,
        status: int,
        started: float,
        upstream_seconds: float | None = None,
    ) -> None:
        """Count the request and, when access logging is on, write its line.

        ``status`` is what the client got, or what stands for no answer: 499 for a hang-up
        (as nginx logs it), 500 for a failure in the proxy.
        """
        seconds = time.monotonic() - started
        self._metrics.count_request(request.method, status, seconds)
        if log.disabled or not log.isEnabledFor(logging.INFO):
            return
        # The raw path only: queries may carry personal data or, from careless clients,
        # secrets; and the raw form cannot hold the CR/LF a decoded one could forge lines with.
        path = request.raw_path.partition("?")[0]
        size = request.reply.body_bytes
        upstream_ms = round(upstream_seconds * 1000, 2) if upstream_seconds is not None else None
        log.info(
            '%s "%s %s" %d %d B %.2f ms%s',
            request.remote,
            request.method,
            path,
            status,
            size,
            seconds * 1000,
            f" (upstream {upstream_ms} ms)" if upstream_ms is not None else "",
            extra={
                "client": request.remote,
                "method": request.method,
                "path": path,
                "status": status,
                "bytes": size,
                "duration_ms": round(seconds * 1000, 2),
                "upstream_ms": upstream_ms,
            },
        )
