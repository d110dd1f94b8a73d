"""Every setting's range, at its bounds: each end taken, and the value just past it refused
with a message naming the setting. The ranges are written here as the operator is told them
(`run`'s messages, the README), not read from the code that checks them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import redis.asyncio as aioredis

from provisioner.config import ConfigError, PoolConfig, ServiceConfig
from provisioner.service import Replica
from tests.fakes import FakeNodeApi

#: A pool setting, its range's ends, and whether the low end is open; (and what else must be
#: set for its ends to be valid together).
POOL_RANGES: list[tuple[str, float, float, dict[str, Any]]] = [
    ("min_ready", 0, 100_000, {"max_nodes": 100_000}),
    ("max_nodes", 1, 100_000, {"min_ready": 0}),
    ("idle_timeout_s", 0, 86400, {}),
    ("boot_timeout_s", 0.001, 86400, {}),
    ("tick_interval_s", 0.05, 600, {}),
    ("activity_window_s", 1, 86400, {}),
    ("engaged_threshold", 1, 100, {}),  # at most max_events_per_user (100)
    ("conversion", 0, 1, {}),
    ("create_timeout_s", 0.001, 86400, {}),
    ("delete_timeout_s", 0.001, 86400, {}),
    ("max_batch", 1, 1000, {}),
    ("max_events_per_user", 1, 10_000, {"engaged_threshold": 1}),
    ("decision_log_len", 10, 1_000_000, {}),
    ("buffer_sd", 0, 10, {}),
    ("surge_buffer_sd", 0, 10, {}),
    ("learning_half_life_s", 10, 30 * 86400, {}),
    ("boot_prior_s", 1, 3600, {}),
    ("keep_window_s", 0, 86400, {}),
    ("new_session_frees", 0, 1, {}),
    ("overdue_boots", 0, 1, {}),
    ("uncredited_exposure", 0, 1, {}),
    ("estimation_error", 0, 4, {}),
]

#: A service setting, how its messages name it (its field, where no option sets it), its
#: range's ends, and whether the low end is open (a timeout of 0 would fail every call; a lag
#: of 0 every probe; an event age or a clock skew of 0 would drop every activity a moment off
#: the replica's clock).
SERVICE_RANGES: list[tuple[str, str, float, float, bool]] = [
    ("http_port", "http port", 0, 65535, False),
    ("api_timeout_s", "api timeout", 0, 600, True),
    ("api_retries", "api retries", 1, 10, False),
    ("reconcile_interval_s", "reconcile interval", 0, 86400, False),
    ("heartbeat_interval_s", "heartbeat interval", 0, 20, False),
    ("max_event_lag_s", "max event lag", 0, 3600, True),
    ("max_event_age_s", "max_event_age_s", 0, 30 * 86400, True),
    ("max_clock_skew_s", "max_clock_skew_s", 0, 3600, True),
    ("shutdown_grace_s", "shutdown_grace_s", 0, 600, False),
    ("event_hold_s", "event hold", 0, 3600, False),
    ("event_backlog", "event backlog", 200, 10_000_000, False),
]


def _past(bound: float, direction: int, whole: bool) -> float:
    """The nearest value past `bound` in `direction` (-1 below, +1 above): the next count, or
    the next float."""
    return bound + direction if whole else math.nextafter(bound, direction * math.inf)


@pytest.mark.parametrize(("name", "low", "high", "with_"), POOL_RANGES,
                         ids=[r[0] for r in POOL_RANGES])
def test_a_pool_setting_is_taken_at_each_end_of_its_range_and_refused_past_it(
        name: str, low: float, high: float, with_: dict[str, Any]) -> None:
    whole = isinstance(getattr(PoolConfig(), name), int)
    kind = int if whole else float
    for value in (low, high):
        assert PoolConfig(**{**with_, name: kind(value)}).problems() == [], (name, value)
    for value in (_past(low, -1, whole), _past(high, +1, whole)):
        problems = PoolConfig(**{**with_, name: kind(value)}).problems()
        # named, with its range (min_ready past max_nodes is said too, and engaged_threshold
        # past max_events_per_user)
        assert any(p.startswith(f"{name} must be in [") for p in problems), \
            (name, value, problems)


@pytest.mark.parametrize(("name", "label", "low", "high", "low_open"), SERVICE_RANGES,
                         ids=[r[0] for r in SERVICE_RANGES])
def test_a_service_setting_is_taken_at_each_end_of_its_range_and_refused_past_it(
        name: str, label: str, low: float, high: float, low_open: bool) -> None:
    whole = isinstance(getattr(ServiceConfig("redis://h/0", "http://api"), name), int)
    kind = int if whole else float
    taken = [_past(low, +1, whole) if low_open else low, high]
    refused = [low if low_open else _past(low, -1, whole), _past(high, +1, whole)]
    for value in taken:
        config = ServiceConfig("redis://h/0", "http://api", **{name: kind(value)})
        assert config.problems() == [], (name, value)
    for value in refused:
        config = ServiceConfig("redis://h/0", "http://api", **{name: kind(value)})
        assert [p.split(" must be")[0] for p in config.problems()] == [label], \
            (name, value, config.problems())


@pytest.mark.parametrize(("name", "label", "low"), [
    ("reconcile_interval_s", "reconcile interval", 1.0),
    ("heartbeat_interval_s", "heartbeat interval", 0.1),
])
def test_a_setting_0_turns_off_is_refused_between_0_and_its_shortest(
        name: str, label: str, low: float) -> None:
    """A reconcile interval of 0.0004 s was taken, and every turn's lock (whole milliseconds)
    refused; 0 turns it off, and its shortest is 1 s (a heartbeat's 0.1 s)."""
    def problems(value: float) -> list[str]:
        return ServiceConfig("redis://h/0", "http://api", **{name: value}).problems()

    assert problems(0.0) == [] and problems(low) == []
    for value in (0.0004, math.nextafter(low, 0), math.nan, math.inf):
        said = problems(value)
        assert said and said[0].startswith(f"{label} must be 0 or in [{low:g}, "), (value, said)


@pytest.mark.parametrize(("name", "refused"), [
    ("max_event_age_s", (math.nan, math.inf, -math.inf, -1.0, 0.0)),
    ("max_clock_skew_s", (math.nan, math.inf, -math.inf, -1.0, 0.0)),
    ("shutdown_grace_s", (math.nan, math.inf, -math.inf, -1.0)),
])
def test_a_setting_no_option_sets_is_checked_too(name: str, refused: tuple[float, ...]) -> None:
    """The settings only code sets (tests, the dev stack, the benchmark) were not checked, and
    a bad one misbehaved without a word: a nan or negative age or skew dropped every activity
    event, an infinite age took a timestamp of any age, one of 0 dropped every event a moment
    old; a nan or negative grace cancelled the work in flight at once, an infinite one never
    let the replica stop."""
    default = getattr(ServiceConfig("redis://h/0", "http://api"), name)
    assert ServiceConfig("redis://h/0", "http://api", **{name: default}).problems() == []
    for value in refused:
        problems = ServiceConfig("redis://h/0", "http://api", **{name: value}).problems()
        assert [p.split(" must be in ")[0] for p in problems] == [name], (value, problems)


@pytest.mark.parametrize(("field", "label"), [("replica_id", "replica id"), ("pool", "pool")])
def test_a_name_is_taken_up_to_64_characters_and_refused_beyond_or_with_a_colon(
        field: str, label: str) -> None:
    def problems(value: str) -> list[str]:
        return ServiceConfig("redis://h/0", "http://api", **{field: value}).problems()

    assert problems("a") == [] and problems("a" * 64) == []
    for bad in ("", "a" * 65, "a:b"):
        assert [p.split(" must be")[0].split(" '")[0] for p in problems(bad)] == [label], bad


def test_an_http_host_name_is_taken_up_to_253_characters() -> None:
    """A name's length is a DNS name's: 253 characters at most, whatever its labels'
    (untested: dropping the bound passed; a longer one failed only at the listen, after Redis
    was reached)."""
    def problems(host: str) -> list[str]:
        return ServiceConfig("redis://h/0", "http://api", http_host=host).problems()

    longest = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(longest) == 253 and problems(longest) == []
    assert [p.split(" must be")[0] for p in problems(longest + "a")] == [
        f"http host {longest + 'a'!r}"]



def test_a_replica_made_by_code_is_held_to_the_service_settings_ranges() -> None:
    """Only the CLI checked the settings, and no option sets the three above: a replica made
    by code (a replay, a test, an embedding) took a nan age, and dropped every event."""
    redis = aioredis.Redis()  # not connected: making a replica reads nothing
    good = ServiceConfig("redis://h/0", "http://api")
    Replica(redis, good, PoolConfig(), FakeNodeApi())
    with pytest.raises(ConfigError, match="max_event_age_s must be in"):
        Replica(redis, dataclasses.replace(good, max_event_age_s=math.nan), PoolConfig(),
                FakeNodeApi())
