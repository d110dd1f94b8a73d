"""`provisioner decisions`: the decisions stream read by a span of time and a kind, so that "why
were three nodes booted at 10:02?" is answered after `status`'s last eight entries moved on."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import typer
from typer.testing import CliRunner

from provisioner import view
from provisioner.cli import app, when_ms
from provisioner.keys import PoolKeys

POOL = "decided"
KEYS = PoolKeys(POOL)
# 2026-12-05T10:00:00Z, in ms
T10 = 1796464800000
MINUTE = 60_000
# One entry a minute from 10:00 to 10:09: a miss at 10:03, a release at 10:07, the rest scaling
KINDS = {3: "miss", 7: "release", 5: "scale_down", 8: "scale_down"}


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat()


@pytest.fixture
def logged(sync_redis: redis.Redis) -> list[str]:
    """Ten entries as the scripts write them (log_entry), one a minute from 10:00; their ids."""
    sync_redis.hset(KEYS.key("stats"), "connects", 1)  # a pool with state
    ids = []
    for minute in range(10):
        at = T10 + minute * MINUTE
        kind = KINDS.get(minute, "scale_up")
        ids.append(sync_redis.xadd(KEYS.key("decisions"), {
            "now": at, "replica": "r1", "kind": kind, "reason": f"{kind} at minute {minute}",
            "numbers": json.dumps({"target": minute}), "acted": 1}, id=f"{at}-0"))
    return ids


def decisions(redis_url: str, *args: str) -> tuple[int, Any]:
    result = CliRunner().invoke(app, ["decisions", "--redis-url", redis_url, "--pool", POOL,
                                      *args], env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    if "--json" in args and result.exit_code == 0:
        return 0, json.loads(result.output)
    return result.exit_code, result.output


def minutes(found: dict[str, Any]) -> list[int]:
    return [(entry["written_ms"] - T10) // MINUTE for entry in found["decisions"]]


def test_a_span_of_time_lists_its_entries_oldest_first(redis_url: str, logged: list[str]) -> None:
    code, found = decisions(redis_url, "--since", _iso(T10 + 2 * MINUTE),
                            "--until", _iso(T10 + 4 * MINUTE), "--json")
    assert code == 0
    assert minutes(found) == [2, 3, 4]  # both ends within the span
    assert [e["kind"] for e in found["decisions"]] == ["scale_up", "miss", "scale_up"]
    first = found["decisions"][0]
    assert first["id"] == logged[2] and first["now"] == T10 + 2 * MINUTE
    assert first["numbers"] == {"target": 2} and first["acted"] == 1
    assert found["more"] is False and found["stream_length"] == 10
    assert (found["stream_from_ms"], found["stream_to_ms"]) == (T10, T10 + 9 * MINUTE)


def test_a_kind_picks_its_entries_alone(redis_url: str, logged: list[str]) -> None:
    code, found = decisions(redis_url, "--kind", "scale_down", "--kind", "miss", "--json")
    assert code == 0
    assert minutes(found) == [3, 5, 8]
    code, found = decisions(redis_url, "--kind", "scale_up", "--since", _iso(T10 + 5 * MINUTE),
                            "--json")
    assert minutes(found) == [6, 9]


def test_the_limit_keeps_the_first_of_a_span_with_since_and_the_last_without(
        redis_url: str, logged: list[str]) -> None:
    for args, shown, more in [
            (["--since", _iso(T10 + MINUTE), "--limit", "3"], [1, 2, 3], True),
            (["--until", _iso(T10 + 6 * MINUTE), "--limit", "3"], [4, 5, 6], True),
            (["--limit", "3", "--kind", "scale_up"], [4, 6, 9], True),
            (["--limit", "10"], list(range(10)), False)]:
        code, found = decisions(redis_url, *args, "--json")
        assert code == 0, found
        assert (minutes(found), found["more"]) == (shown, more), args


@pytest.mark.parametrize("forward", [True, False])
async def test_a_span_is_read_a_page_at_a_time_and_finds_what_one_read_finds(
        forward: bool, aredis: aioredis.Redis, logged: list[str]) -> None:
    """Pages of 2 over kinds that skip most entries: no entry read twice or passed over at a
    page's edge."""
    start = T10 + MINUTE if forward else None
    for kinds, limit in [(frozenset(), 100), (frozenset({"scale_down", "release"}), 100),
                         (frozenset({"scale_up"}), 2)]:
        paged = await view.decision_rows(aredis, POOL, start, None, kinds, limit, page=2)
        whole = await view.decision_rows(aredis, POOL, start, None, kinds, limit, page=1000)
        assert paged == whole
        assert len({e["id"] for e in paged.entries}) == len(paged.entries)
        ids = [e["id"] for e in paged.entries]
        assert ids == sorted(ids, key=view.written_ms)


def test_the_table_shows_each_entry_with_its_reason(redis_url: str, logged: list[str]) -> None:
    code, output = decisions(redis_url, "--kind", "miss")
    assert code == 0, output
    assert "miss at minute 3" in output and "scale_up" not in output.split("entries of")[1]
    assert "miss entries of pool decided" in output


def test_a_span_the_stream_no_longer_holds_says_what_it_holds(redis_url: str,
                                                              logged: list[str]) -> None:
    code, output = decisions(redis_url, "--until", _iso(T10 - MINUTE))
    assert code == 0, output
    assert "none in that span: the stream holds 10 entries, written from" in " ".join(
        output.split())
    # A filter that matched nothing is named: the span was the whole stream (a helper's audit).
    code, output = decisions(redis_url, "--user", "nobody", "--kind", "miss")
    assert code == 0, output
    assert ("none in that span of the --kind and --user asked: the stream holds 10 entries"
            in " ".join(output.split())), output


@pytest.mark.parametrize(("args", "said"), [
    (["--since", "yesterday"], "is not a time before now"),
    (["--since", "25:00"], "hour must be in 0..23"),
    (["--until", "99999999d"], "out of range"),
    (["--kind", "scaleup"], "not a kind of decision"),
    (["--since", "10m", "--until", "20m"], "is after --until"),
    # Found by a review: it went into the table's title as Rich markup, a traceback
    # (MarkupError), and no user the service takes has such an id
    (["--user", "[/x]"], "not a user id"),
    (["--user", "u1 waits"], "not a user id"),
])
def test_what_it_cannot_read_is_refused_by_name(redis_url: str, logged: list[str],
                                                args: list[str], said: str) -> None:
    code, output = decisions(redis_url, *args)
    assert code == 2, output
    assert said in " ".join(output.replace("│", " ").split()), output


def test_a_pool_the_server_holds_nothing_of_is_an_error(redis_url: str,
                                                        sync_redis: redis.Redis) -> None:
    code, output = decisions(redis_url)
    assert code == 2 and "no pool 'decided' on this server" in " ".join(output.split()), output


NOW = datetime.datetime(2026, 12, 5, 0, 10, tzinfo=datetime.UTC)


@pytest.mark.parametrize(("text", "at"), [
    ("15m", NOW - datetime.timedelta(minutes=15)),
    ("1.5h", NOW - datetime.timedelta(minutes=90)),
    ("2d", NOW - datetime.timedelta(days=2)),
    ("2026-12-04T23:00Z", datetime.datetime(2026, 12, 4, 23, tzinfo=datetime.UTC)),
    ("2026-12-04T23:00+01:00", datetime.datetime(2026, 12, 4, 22, tzinfo=datetime.UTC)),
])
def test_a_time_is_read_in_each_form_it_is_given(text: str, at: datetime.datetime) -> None:
    assert when_ms(text, NOW, "--since") == round(at.timestamp() * 1000)


def test_a_clock_time_is_the_last_one_before_now() -> None:
    local = NOW.astimezone()
    earlier, later = local - datetime.timedelta(minutes=5), local + datetime.timedelta(minutes=5)
    assert when_ms(earlier.strftime("%H:%M"), NOW, "--since") == round(
        earlier.replace(second=0, microsecond=0).timestamp() * 1000)
    # later today has not come yet: it is yesterday's
    assert when_ms(later.strftime("%H:%M"), NOW, "--since") == round(
        (later.replace(second=0, microsecond=0) - datetime.timedelta(days=1)).timestamp() * 1000)
    # a time without a zone is this machine's local time
    assert when_ms(earlier.replace(tzinfo=None).isoformat(), NOW, "--since") == round(
        earlier.timestamp() * 1000)
    with pytest.raises(typer.BadParameter):
        when_ms("12:00 tomorrow", NOW, "--since")


@pytest.mark.parametrize(("since", "until"), [(-20, -5), (-1, 2), (-30, 60)])
def test_an_until_clock_time_is_the_first_from_since_on(since: int, until: int) -> None:
    """Found by a review: the README's own `--since 10:01 --until 10:03`, asked at 10:02, was
    refused as since after until: --until, the last 10:03 before now, was yesterday's."""
    local = NOW.astimezone().replace(second=0, microsecond=0)
    at = {m: local + datetime.timedelta(minutes=m) for m in (since, until)}
    start = when_ms(at[since].strftime("%H:%M"), NOW, "--since")
    assert start == round(at[since].timestamp() * 1000)
    end = when_ms(at[until].strftime("%H:%M"), NOW, "--until", start)
    assert end == round(at[until].timestamp() * 1000)  # not a day before, and after since


def test_a_span_of_clock_times_around_now_is_listed(redis_url: str,
                                                    sync_redis: redis.Redis) -> None:
    sync_redis.hset(KEYS.key("stats"), "connects", 1)
    written = sync_redis.xadd(KEYS.key("decisions"), {"kind": "miss"})  # now
    now = datetime.datetime.now().astimezone()
    code, found = decisions(redis_url, "--since", (now - datetime.timedelta(minutes=2)).strftime(
        "%H:%M"), "--until", (now + datetime.timedelta(minutes=2)).strftime("%H:%M"), "--json")
    assert code == 0, found
    assert [e["id"] for e in found["decisions"]] == [written]


def test_an_entry_with_a_field_named_id_keeps_its_stream_id(redis_url: str,
                                                            sync_redis: redis.Redis) -> None:
    """Found by a review: an entry given a field `id` by hand had it in place of its stream id,
    and `--json` stopped with a traceback (ValueError, int('xyz'))."""
    sync_redis.hset(KEYS.key("stats"), "connects", 1)
    written = sync_redis.xadd(KEYS.key("decisions"), {"kind": "miss", "id": "xyz"})
    code, found = decisions(redis_url, "--json")
    assert code == 0, found
    assert [(e["id"], e["written_ms"]) for e in found["decisions"]] == [
        (written, view.written_ms(written))]


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_numbers_json_does_not_have_are_shown_as_their_text(redis_url: str,
                                                            sync_redis: redis.Redis) -> None:
    """Found by a review: numbers edited by hand that Python's JSON reader takes and JSON has
    not (NaN, 1e999) were printed as NaN and Infinity, which `jq` refuses, and numbers nested
    too deep stopped `--json` with a traceback (RecursionError)."""
    sync_redis.hset(KEYS.key("stats"), "connects", 1)
    edited = ['{"spare": NaN}', '{"target": 1e999}', "[" * 100_000, '{"target": 3}']
    for numbers in edited:
        sync_redis.xadd(KEYS.key("decisions"), {"kind": "scale_up", "numbers": numbers})
    result = CliRunner().invoke(app, ["decisions", "--redis-url", redis_url, "--pool", POOL,
                                      "--json"])
    assert result.exit_code == 0, result.output
    found = strict_json(result.output)
    assert [e["numbers"] for e in found["decisions"]] == [*edited[:3], {"target": 3}]


@pytest.fixture
def berlin() -> Iterator[None]:
    """This machine's local time as Berlin's, whose clocks change twice a year."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def _utc(*at: int) -> datetime.datetime:
    return datetime.datetime(*at, tzinfo=datetime.UTC)


@pytest.mark.parametrize(("now", "text", "at"), [
    # 2027-03-28, 02:00 CET became 03:00 CEST; asked at 10:00 CEST
    (_utc(2027, 3, 28, 8), "01:30", _utc(2027, 3, 28, 0, 30)),  # 01:30 CET, that morning
    (_utc(2027, 3, 28, 8), "11:00", _utc(2027, 3, 27, 10)),  # 11:00 CET, the day before
    # 2026-10-25, 03:00 CEST became 02:00 CET; asked at 10:00 CET
    (_utc(2026, 10, 25, 9), "01:30", _utc(2026, 10, 24, 23, 30)),  # 01:30 CEST
    (_utc(2026, 10, 25, 9), "02:30", _utc(2026, 10, 25, 1, 30)),  # shown twice: the later, CET
    (_utc(2026, 10, 25, 9), "11:00", _utc(2026, 10, 24, 9)),  # 11:00 CEST, the day before
])
def test_a_clock_time_on_a_day_the_clocks_change_is_in_its_own_offset(
        berlin: None, now: datetime.datetime, text: str, at: datetime.datetime) -> None:
    """Found by a review: a clock time was put in the offset of now, so on a day the clocks
    changed one before the change (or the day before's) was an hour off: `--since 01:30` asked
    at 10:00 CEST on the day summer time began read 00:30 CET."""
    assert when_ms(text, now, "--since") == round(at.timestamp() * 1000)


def test_the_live_scripts_entries_are_listed(redis_url: str, sync_redis: redis.Redis) -> None:
    """Entries the scripts write themselves (a miss, by allocate), read back by kind."""
    from provisioner.scripts import Scripts

    async def miss() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            for user in ("u1", "u2"):
                await Scripts(client, KEYS).allocate(T10, user, "r1", 1000)
        finally:
            await client.aclose()

    asyncio.run(miss())
    code, found = decisions(redis_url, "--kind", "miss", "--json")
    assert code == 0, found
    assert [e["reason"].split(":")[0] for e in found["decisions"]] == [
        "user u1 waits at position 1", "user u2 waits at position 2"]
    code, found = decisions(redis_url, "--user", "u2", "--json")
    assert [e["reason"].split(":")[0] for e in found["decisions"]] == [
        "user u2 waits at position 2"]
    code, found = decisions(redis_url, "--user", "u", "--json")  # a user, not a prefix
    assert found["decisions"] == []


def test_an_entry_without_its_time_shows_when_it_was_written(redis_url: str,
                                                             sync_redis: redis.Redis) -> None:
    """A review: an entry whose `now` a hand took away showed `-` in the time column."""
    sync_redis.hset(KEYS.key("stats"), "connects", 1)
    sync_redis.xadd(KEYS.key("decisions"), {"kind": "miss", "reason": "r"}, id=f"{T10}-0")
    code, output = decisions(redis_url)
    assert code == 0, output
    assert _local(T10) in output, output


def _local(ms: int) -> str:
    """`ms` as the table shows it: the machine's local date and time."""
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _listed_around_10(redis_url: str, sync_redis: redis.Redis,
                      written: list[tuple[int, int]]) -> str:
    """The table from 9:59 to 10:01 of misses each written at `at` by a replica whose clock
    read `now`, for each (at, now)."""
    sync_redis.hset(KEYS.key("stats"), "connects", 1)
    for at, now in written:
        sync_redis.xadd(KEYS.key("decisions"), {"now": now, "replica": "r1", "kind": "miss",
                                                "reason": "r"}, id=f"{at}-0")
    code, output = decisions(redis_url, "--since", _iso(T10 - MINUTE),
                             "--until", _iso(T10 + MINUTE))
    assert code == 0, output
    return str(output)


def test_an_entry_decided_by_a_clock_far_off_shows_when_it_was_written_too(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """A span is selected by the server's time of writing and each entry was shown at its
    replica's time: one written at 10:00 by a replica ten minutes ahead showed 10:10 in a
    span asked for from 9:59 to 10:01, with no word why. Within the clocks' tolerance the
    replica's time is shown alone."""
    output = _listed_around_10(redis_url, sync_redis,
                               [(T10, T10 + 10 * MINUTE), (T10 + 1000, T10 + 2000)])
    assert f"{_local(T10 + 10 * MINUTE)} (written {_local(T10)[11:]})" in output, output
    assert f"{_local(T10 + 2000)} " in output and "written " + _local(T10 + 1000)[11:] \
        not in output, output


def test_an_entry_decided_a_day_off_shows_the_day_it_was_written(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """The time of writing was shown without its date: a replica's clock a day ahead showed
    tomorrow's 10:00:00 "(written 10:00:00)", the two alike, and one a minute ahead at
    midnight gave no day to the time written. Where the days differ it is shown whole."""
    output = _listed_around_10(redis_url, sync_redis, [(T10, T10 + 24 * 60 * MINUTE)])
    assert f"(written {_local(T10)})" in output, output


def test_an_entry_decided_by_a_clock_behind_shows_when_it_was_written_too(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """A replica's clock behind the server's puts the two apart as one ahead does; exactly
    2 s apart is within the clocks' tolerance, and the replica's time is shown alone."""
    output = _listed_around_10(redis_url, sync_redis,
                               [(T10, T10 - 10 * MINUTE), (T10 + 30_000, T10 + 28_000)])
    assert f"{_local(T10 - 10 * MINUTE)} (written {_local(T10)[11:]})" in output, output
    assert _local(T10 + 28_000) in output and _local(T10 + 30_000)[11:] not in output, output


def test_status_gives_its_recent_decisions_in_the_shape_decisions_gives_them(
        redis_url: str, logged: list[str]) -> None:
    """A newcomer's walkthrough: `status --json` gave each entry's times and count as strings
    and its numbers as JSON inside a string, with no id, where `decisions --json` gives
    numbers, an object and the entry's id."""
    result = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--pool", POOL,
                                      "--json"])
    assert result.exit_code == 0, result.output
    recent = json.loads(result.output)["decisions"]
    code, found = decisions(redis_url, "--json", "--since", _iso(T10))
    assert code == 0
    assert recent[0] == found["decisions"][-1]  # the newest, alike
    assert recent[0]["numbers"] == {"target": 9} and recent[0]["id"] == logged[-1]
    assert recent[0]["now"] == T10 + 9 * MINUTE and recent[0]["acted"] == 1
