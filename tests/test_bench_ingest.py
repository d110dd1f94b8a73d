"""The ingest benchmark: one replica's live listener applying a burst of activity messages."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from provisioner.bench.ingest import activity_messages, measure
from provisioner.cli import app
from provisioner.service import ACTIVITY_BATCH


def test_each_message_is_a_distinct_user_second() -> None:
    payloads = [json.loads(p) for p in activity_messages(7, 3, 1000)]
    assert [(p["user_id"], p["timestamp"]) for p in payloads] == [
        ("ingest-0", 1000), ("ingest-1", 1000), ("ingest-2", 1000),
        ("ingest-0", 999), ("ingest-1", 999), ("ingest-2", 999), ("ingest-0", 998)]


async def test_the_listener_applies_every_message_and_the_pool_is_cleaned_up(
        redis_url: str, aredis: aioredis.Redis) -> None:
    before = set(await aredis.keys("prov:{ingest-*"))
    rate = await measure(redis_url, 300, 30, timeout_s=60)
    assert (rate.messages, rate.users, rate.replicas, rate.active) == (300, 30, 1, 30)
    assert rate.duplicates == 0
    assert rate.seconds > 0 and rate.per_second == pytest.approx(300 / rate.seconds)
    assert rate.server_cpu_s > 0
    assert rate.server_us_per_message == pytest.approx(rate.server_cpu_s / 300 * 1e6)
    # A run of activity goes in calls of up to ACTIVITY_BATCH: at least 300 / 50 of them.
    assert 300 // ACTIVITY_BATCH <= rate.script_calls <= 300 and rate.script_s > 0
    assert rate.ms_per_script_call == pytest.approx(rate.script_s / rate.script_calls * 1e3)
    assert rate.server.split()[0] in ("redis", "valkey")
    assert set(await aredis.keys("prov:{ingest-*")) == before


async def test_every_replica_applies_every_message_and_the_later_copies_are_counted(
        redis_url: str, aredis: aioredis.Redis) -> None:
    before = set(await aredis.keys("prov:{ingest-*"))
    rate = await measure(redis_url, 300, 30, replicas=3, timeout_s=60)
    # Each message counted once as applied and twice as found applied: the clock waited for
    # all three replicas, not the first.
    assert (rate.replicas, rate.active, rate.duplicates) == (3, 30, 600)
    assert set(await aredis.keys("prov:{ingest-*")) == before


async def test_more_history_than_half_the_window_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="at most 60 s"):
        await measure(redis_url, 610, 10)


def test_the_command_prints_the_rate(redis_url: str) -> None:
    result = CliRunner().invoke(app, ["bench", "ingest", "--messages", "200", "--users", "20",
                                      "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert "200 activity messages of 20 users applied by one replica's listener" in " ".join(
        result.output.split())
    assert "(0 later copies found applied); " in " ".join(result.output.split())
    assert " ms on average" in " ".join(result.output.split())
    two = CliRunner().invoke(app, ["bench", "ingest", "--messages", "200", "--users", "20",
                                   "--replicas", "2", "--redis-url", redis_url])
    assert two.exit_code == 0, two.output
    assert "applied by each of 2 replicas' listeners" in " ".join(two.output.split())
    assert "(200 later copies found applied)" in " ".join(two.output.split())
    refused = CliRunner().invoke(app, ["bench", "ingest", "--messages", "200", "--users", "1",
                                       "--redis-url", redis_url])
    assert refused.exit_code == 2 and "half the activity window" in " ".join(
        refused.output.split())
