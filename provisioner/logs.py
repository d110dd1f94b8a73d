"""Logging as text or JSON lines, and a rate limiter for warnings about bad input."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())


class MalformedRequests(logging.Filter):
    """aiohttp logs every malformed request to /metrics and the health endpoints (a 100 KB
    header, a bad chunk size) at ERROR with a traceback, though it answers 400 as it should:
    any peer could flood the log. Those become one warning line every `every` seconds with the
    count held back; any other error of the server logs as before."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last = -math.inf
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return False
        self._last = now
        record.msg = "malformed HTTP request answered %s: %s (%d more since the last line)"
        record.args = (error.code, type(error).__name__, self._held)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._held = 0
        return True


class RateLimitedLog:
    """At most one line per key every `every` seconds, with the count of what it held back."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        return self._log(logging.WARNING, key, message, args, False)

    def exception(self, key: str, message: str, *args: object) -> bool:
        """As `warning`, at ERROR with the exception being handled."""
        return self._log(logging.ERROR, key, message, args, True)

    def _log(self, level: int, key: str, message: str, args: tuple[object, ...],
             exc_info: bool) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more like it in the last {self.every:.0f}s)" if held else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
        return True
