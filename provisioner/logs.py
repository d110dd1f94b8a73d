"""Logging as text or JSON lines, and a rate limiter for warnings about bad input."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from provisioner.terminal import printable

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class TextFormatter(logging.Formatter):
    """Log lines as text, with what a terminal acts on in them (an id another writer put in
    Redis, logged by reconcile, set a terminal's title and cleared its screen: a review)
    written as its escape, `\\x1b`; a traceback keeps its lines."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n")


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
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
        self._throttle = Throttle(every)

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        held = self._throttle.due("malformed")
        if held is None:
            return False
        record.msg = "malformed HTTP request answered %s: %s (%d more since the last line)"
        record.args = (error.code, type(error).__name__, held)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class Throttle:
    """At most one line per key every `every` seconds, counting those held back in between.
    With `most`, keys by the user (a user id) are kept bounded: past that many, those whose
    last line is over `every` old are forgotten, and if that is not enough, the older half."""

    def __init__(self, every: float, most: int | None = None) -> None:
        self.every = every
        self.most = most
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """The count held back since the last line for `key` if one may go out now (and it is
        taken as gone out), else None (and it is counted as held back)."""
        now = time.monotonic()
        if self.held_back(key, now):
            return None
        self._last[key] = now
        if self.most is not None and len(self._last) > self.most:
            self._forget(now)
        return self._held.pop(key, 0)

    def held_back(self, key: str, now: float | None = None) -> bool:
        """Whether a line for `key` went out within `every` seconds: then this one is held back,
        and counted; else nothing is counted, and no line is taken as gone out."""
        last = self._last.get(key)
        if last is None or (time.monotonic() if now is None else now) - last >= self.every:
            return False
        self._held[key] = self._held.get(key, 0) + 1
        return True

    def _forget(self, now: float) -> None:
        keep = {k: t for k, t in self._last.items() if now - t < self.every}
        if self.most is not None and len(keep) > self.most:
            keep = dict(sorted(keep.items(), key=lambda item: item[1])[len(keep) // 2:])
        self._last = keep
        self._held = {k: n for k, n in self._held.items() if k in keep}


class RateLimitedLog:
    """At most one line per key every `every` seconds, with the count of what it held back."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self._throttle = Throttle(every)

    def warning(self, key: str, message: str, *args: object) -> bool:
        return self._log(logging.WARNING, key, message, args, False)

    def exception(self, key: str, message: str, *args: object) -> bool:
        """As `warning`, at ERROR with the exception being handled."""
        return self._log(logging.ERROR, key, message, args, True)

    def _log(self, level: int, key: str, message: str, args: tuple[object, ...],
             exc_info: bool) -> bool:
        held = self._throttle.due(key)
        if held is None:
            return False
        # Held since the last line of this key, however long ago: "in the last 10 s" read as a
        # burst lines that had been held across minutes.
        suffix = f" ({held} more like it since the last line)" if held else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
        return True
