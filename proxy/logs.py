"""Logging set-up: one line per event, JSON or text, on stderr.

Nothing here ever formats a token, secret or Authorization value: the modules that log only
pass codes, counts and paths without queries. Third-party loggers that could echo request
bytes (aiohttp's server and access loggers) are kept quiet; the proxy logs those events itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .config import LogSettings

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``extra`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception text from libraries may quote request bytes.
            doc["exception"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message``; exceptions shown by type only."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 - the stdlib's name
        return f"({ei[0].__name__})" if ei and ei[0] else ""


class _ProxyHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` installs (and replaces when called again)."""


def configure(settings: LogSettings, stream: Any = None) -> logging.Handler:
    """Route log records to ``stream`` (stderr) in the configured format; return the handler."""
    handler = _ProxyHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProxyHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # aiohttp's own server/access loggers may quote raw request lines; ours replace them.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("sparks_proxy.access").disabled = not settings.access
    return handler
