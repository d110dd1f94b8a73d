"""What a replica's log says: JSON lines with their traceback, the level asked for, and a
rate-limited warning's count of the lines it held back."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from provisioner import logs


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, given back as it was: setup_logging replaces its handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_setup_logging_logs_at_the_level_asked_for(root_logging: logging.Logger) -> None:
    """--log-level DEBUG logs DEBUG lines, and WARNING drops INFO ones (untested: a setup
    that left the level as it was passed)."""
    # A logger no code sets a level of: a replay in the same process left
    # provisioner.service at WARNING (bench/service_policy.py, which gives it back now), and
    # the level read here was WARNING.
    logger = logging.getLogger("provisioner.test_logs")
    logs.setup_logging("text", "DEBUG")
    assert logger.isEnabledFor(logging.DEBUG)
    logs.setup_logging("json", "WARNING")
    assert not logger.isEnabledFor(logging.INFO)
    [handler] = root_logging.handlers
    assert isinstance(handler.formatter, logs.JsonFormatter)


def test_a_json_line_carries_its_fields_and_its_traceback() -> None:
    """A JSON line of an error keeps the traceback (`--log-format json` dropped it in a
    mutation test, and no test saw)."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("provisioner.service", logging.ERROR, __file__, 1,
                                   "tick failed for %s", ("pool",), None)
        import sys

        record.exc_info = sys.exc_info()
    record.replica = "r1"
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["level"] == "error" and line["msg"] == "tick failed for pool"
    assert line["replica"] == "r1"
    assert "RuntimeError: boom" in line["exc"] and "Traceback" in line["exc"]


def test_a_rate_limited_warning_says_how_many_lines_it_held_back(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    limited = logs.RateLimitedLog(logging.getLogger("provisioner.test"), every=10.0)
    with caplog.at_level(logging.WARNING, logger="provisioner.test"):
        assert limited.warning("bad", "bad event %s", "e1")
        now[0] += 5
        assert not limited.warning("bad", "bad event %s", "e2")
        assert not limited.warning("bad", "bad event %s", "e3")
        assert limited.warning("other", "another kind")  # each key on its own
        now[0] += 5
        assert limited.warning("bad", "bad event %s", "e4")
    assert [r.getMessage() for r in caplog.records] == [
        "bad event e1", "another kind", "bad event e4 (2 more like it since the last line)"]
