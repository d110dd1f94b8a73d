"""A pool's learned model as a file: export, import (lua/load_model.lua), and replays from it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from typer.testing import CliRunner

from provisioner.bench.service_policy import ServicePolicy
from provisioner.bench.trace import load_trace
from provisioner.bench.world import run_replay
from provisioner.cli import app
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.model import FORMAT, ModelFileError, model_document, read_document
from provisioner.scripts import Call, Scripts
from tests.helpers import T0, PoolUnderTest
from tests.test_bench_service import _trace

CONFIG = PoolConfig(min_ready=0, max_nodes=1000)
# A model as a pool learns it: a cell seen a lot and often followed by a connect, the users not
# browsing yet, the arrivals, the release rate and a long boot time.
LEARNED = {"x4_1": 900.0, "r4_1": 450.0, "x0": 2000.0, "r0": 60.0, "arr": 400.0,
           "rel": 12.0, "bx": 9000.0, "boot_ms": 150000.0, "boot_n": 9.0}


def pool_named(client: aioredis.Redis, name: str, clock: ManualClock) -> PoolUnderTest:
    keys = PoolKeys(name)
    return PoolUnderTest(client, keys, Scripts(client, keys), clock)


@pytest.fixture
async def pools(aredis: aioredis.Redis) -> AsyncIterator[tuple[PoolUnderTest, PoolUnderTest]]:
    clock = ManualClock(T0)
    yield pool_named(aredis, "learned", clock), pool_named(aredis, "new", clock)


async def browse(pool: PoolUnderTest, users: int = 10) -> None:
    """`users` users with ten activities each, the last now: level 8, first seen 45 s ago."""
    for i in range(users):
        for j in range(10):
            ts = pool.now - (9 - j) * 5_000
            await pool.scripts.record_activity(pool.now, f"u{i}", ts, CONFIG.window_ms, 3, 100)


async def forecast(pool: PoolUnderTest) -> str:
    """The target and the forecast behind it, from a decision now (not the spare it held)."""
    decision = await pool.scripts.scale_decide(CONFIG.policy_args(pool.now, "r1"))
    assert decision.won
    found = re.search(r"target (\d+ \(.*\)): (create|hold)", decision.reason)
    assert found, decision.reason
    return found.group(1)


async def test_a_new_pool_imported_from_another_forecasts_as_that_pool_does(
        pools: tuple[PoolUnderTest, PoolUnderTest], aredis: aioredis.Redis) -> None:
    learned, new = pools
    await aredis.hset(learned.keys.key("model"), mapping={"last_ms": learned.now, **LEARNED})
    await browse(learned)
    await browse(new)
    await forecast(learned)  # the tick writes its running fields: horizon, window, the check
    exported = model_document(
        await learned.scripts.read_model(),
        await learned.scripts.learned_fields(learned.config.policy_args(learned.now, "t")),
        "learned", learned.now)
    assert exported["format"] == FORMAT
    assert exported["fields"].keys() >= LEARNED.keys()
    assert not {"last_ms", "check_until_ms", "horizon_ms"} & exported["fields"].keys()
    assert exported["learned_over"] == {"horizon_ms": 120000.0, "window_ms": 120000.0}

    fields = read_document(json.dumps(exported))
    loaded = await new.scripts.load_model(new.now, fields)
    assert loaded.loaded and loaded.fields == len(fields)

    learned.clock.advance(1_000)
    as_learned = await forecast(learned)
    from_priors = await forecast(pool_named(aredis, "priors", learned.clock))
    assert await forecast(new) == as_learned
    assert as_learned != from_priors
    assert "150s" in as_learned  # the boot time it learned, not the 60 s prior
    assert (await new.snap()).stats["model_imports"] == "1"


@pytest.mark.parametrize("learned", [{"boot_ms": 150000.0, "boot_n": 3.0},
                                     {"rel": 12.0, "bx": 9000.0}])
async def test_an_import_is_refused_where_the_pool_learned_without_a_forecast_tick(
        learned: dict[str, float], pools: tuple[PoolUnderTest, PoolUnderTest],
        aredis: aioredis.Redis) -> None:
    """Found by a review: the refusal looked for the forecast tick's clock alone, so a pool on
    --scaling-policy heuristic, which learns the boot time (the stuck-boot timeout reads it) and
    the release rate but never runs the forecast, had them overwritten by an import without
    --replace."""
    pool, _ = pools
    await aredis.hset(pool.keys.key("model"), mapping=learned)
    refused = await pool.scripts.load_model(pool.now, {"boot_ms": 90_000.0})
    assert not refused.loaded
    assert refused.reason.startswith("refused: the pool has a model already"), refused.reason
    assert await aredis.hgetall(pool.keys.key("model")) == {f: str(v) for f, v in learned.items()}


async def test_an_import_replaces_the_whole_model_and_starts_the_checks_afresh(
        pools: tuple[PoolUnderTest, PoolUnderTest], aredis: aioredis.Redis) -> None:
    pool, _ = pools
    await aredis.hset(pool.keys.key("model"), mapping={"last_ms": pool.now - 5_000, **LEARNED})
    await forecast(pool)
    pool.clock.advance(10_000)
    refused = await pool.scripts.load_model(pool.now, {"boot_ms": 90_000.0})
    assert not refused.loaded
    assert refused.reason.startswith("refused: the pool has a model already")
    loaded = await pool.scripts.load_model(pool.now, {"boot_ms": 90_000.0}, replace=True)
    assert loaded.loaded and loaded.fields == 1
    # Nothing of the old model is mixed in; the tick's horizon and window stay for allocate;
    # the boot time imported stands for boots seen to end now (reap_idle.lua, a stuck boot).
    assert await pool.scripts.read_model() == {
        "last_ms": str(pool.now), "boot_ms": "90000.0", "horizon_ms": "120000",
        "window_ms": "120000", "boot_seen_ms": str(pool.now)}


@pytest.mark.parametrize("fields, problem", [
    ({"x9_9": 1.0}, "x9_9: not a field the forecast learns"),
    ({"last_ms": 1.0}, "last_ms: not a field the forecast learns"),
    ({"check_mean": 1.0}, "check_mean: not a field the forecast learns"),
    ({"x4_1": -1.0}, "x4_1: -1.0 is not a non-negative finite number"),
    ({"boot_ms": float("inf")}, "boot_ms: inf is not a non-negative finite number"),
    ({"boot_ms": float("nan")}, "boot_ms: nan is not a non-negative finite number"),
    # No pool learns these: a mean boot past the longest boot timeout (a day), a decayed sum
    # past 10^12. A boot of 1e308 ms imported made an idle pool's next tick create 20 nodes.
    ({"boot_ms": 1e308}, "boot_ms: 1e+308 is more than any pool learns (at most 86400000)"),
    ({"boot_ms": 86_400_001.0},
     "boot_ms: 86400001.0 is more than any pool learns (at most 86400000)"),
    ({"x4_1": 2e12}, "x4_1: 2000000000000.0 is more than any pool learns (at most 1000000000000)"),
])
async def test_a_bad_field_refuses_the_whole_import(
        pools: tuple[PoolUnderTest, PoolUnderTest], fields: dict[str, float],
        problem: str) -> None:
    _, pool = pools
    before = await pool.dump()
    loaded = await pool.scripts.load_model(pool.now, {"r4_1": 3.0, **fields})
    assert not loaded.loaded
    assert loaded.reason == "refused: the model is not valid"
    assert loaded.problems == [problem]
    assert await pool.dump() == before


async def test_the_most_any_pool_learns_is_itself_taken(
        pools: tuple[PoolUnderTest, PoolUnderTest]) -> None:
    """The bounds are the most a pool learns, not past it: a mean boot of exactly a day (the
    longest boot timeout) and a sum of exactly 10^12 load."""
    _, pool = pools
    loaded = await pool.scripts.load_model(pool.now, {"boot_ms": 86_400_000.0, "x4_1": 1e12})
    assert loaded.loaded and loaded.fields == 2


async def test_a_field_given_twice_refuses_the_whole_import(
        pools: tuple[PoolUnderTest, PoolUnderTest]) -> None:
    """Scripts.load_model takes a mapping, so only another client of the script can name a field
    twice; which of the two values is meant cannot be told, and neither is written."""
    _, pool = pools
    reply = await pool.scripts.run(Call("load_model", (pool.now, "0", "rel", "1.0", "rel", "2.0"),
                                        list))
    assert reply == [0, "refused: the model is not valid", "rel: given twice"]
    assert await pool.dump() == {}


async def test_an_empty_model_is_refused(pools: tuple[PoolUnderTest, PoolUnderTest]) -> None:
    _, pool = pools
    loaded = await pool.scripts.load_model(pool.now, {})
    assert (loaded.loaded, loaded.reason) == (False, "refused: the model has no field")
    assert await pool.dump() == {}


def test_an_export_leaves_out_what_an_import_would_refuse() -> None:
    learned = ["x4_1", "r4_1", "boot_ms", "x0"]
    document = model_document({"x4_1": "12.5", "r4_1": "zz", "boot_ms": "inf", "x0": "-1",
                               "last_ms": "5", "horizon_ms": "oops", "check_mean": "2"},
                              learned, "p", 7)
    assert document["fields"] == {"x4_1": 12.5}
    assert document["skipped"] == ["boot_ms", "r4_1", "x0"]
    assert document["learned_over"] == {}


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[1]", "the top level is not an object"),
    ('{"format": "other", "fields": {"x0": 1}}', "format is 'other'"),
    (json.dumps({"format": FORMAT}), "has no fields"),
    (json.dumps({"format": FORMAT, "fields": {}}), "has no fields"),
    (json.dumps({"format": FORMAT, "fields": {"x0": "1", "r0": True, "arr": 2}}),
     "not numbers: r0, x0"),
    # Neither may stop the command with a traceback.
    ('{"a": ' * 5000 + "1" + "}" * 5000, "nested too deep"),
    ('{"format": "' + FORMAT + '", "fields": {"r0": ' + "9" * 400 + ', "x0": 1}}',
     "not finite numbers (past a float's range, ±1.8e308, or Infinity or NaN): r0"),
    # An operator's drill: told "not numbers" of the first, and "inf" of 1e999.
    ('{"format": "' + FORMAT + '", "fields": {"r0": 1e999, "x0": NaN, "x1": -Infinity}}',
     "not finite numbers (past a float's range, ±1.8e308, or Infinity or NaN): r0, x0, x1"),
    ('{"format": "' + FORMAT + '", "fields": {"r0": ' + "9" * 5000 + "}}", "not JSON"),
])
def test_a_model_file_that_cannot_be_imported_says_why(text: str, message: str) -> None:
    with pytest.raises(ModelFileError, match=re.escape(message)):
        read_document(text)


def test_model_export_and_import_on_the_command_line(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    sync_redis.hset(PoolKeys("a").key("model"), mapping={"last_ms": 1, **LEARNED})
    out = tmp_path / "model.json"
    runner = CliRunner()
    exported = runner.invoke(app, ["model", "export", "--redis-url", redis_url, "--pool", "a",
                                   "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert read_document(out.read_text()) == LEARNED

    def import_into_b(*extra: str) -> tuple[int, str]:
        result = runner.invoke(app, ["model", "import", str(out), "--redis-url", redis_url,
                                     "--pool", "b", *extra])
        return result.exit_code, " ".join(result.output.split())

    # b holds no state: refused, as a misspelt --pool would be, unless started on purpose
    code, output = import_into_b()
    assert code == 2 and "no pool 'b' on this server" in output, output
    assert "nothing imported; to start a new pool from the file, add --new-pool" in output
    assert sync_redis.exists(PoolKeys("b").key("model"), PoolKeys("b").key("stats")) == 0
    code, output = import_into_b("--new-pool")
    assert code == 0 and output.startswith("pool b starts from")
    assert output.endswith(": 9 learned fields")
    code, output = import_into_b()
    assert code == 2 and "pool b: refused: the pool has a model already" in output
    assert import_into_b("--replace")[0] == 0
    stored = sync_redis.hgetall(PoolKeys("b").key("model"))
    assert stored.pop("boot_seen_ms") == stored["last_ms"]  # the import's time
    assert {k: float(v) for k, v in stored.items() if k != "last_ms"} == LEARNED

    out.write_text(json.dumps({"format": FORMAT, "fields": {"x9_9": 1}}))
    code, output = import_into_b("--replace")
    assert code == 2 and "x9_9: not a field the forecast learns" in output
    out.write_text("{}")
    code, output = import_into_b()
    assert code == 2 and "model file: not a model file" in output
    out.write_bytes(b"\xff\xfe{}")
    code, output = import_into_b()
    assert code == 2 and "not UTF-8 text" in output
    empty = runner.invoke(app, ["model", "export", "--redis-url", redis_url, "--pool", "c"])
    assert empty.exit_code == 2 and "pool c has no model" in empty.output
    # An operator's walkthrough: a directory that is not there gave a raw
    # "error: FileNotFoundError: ..."
    nowhere = tmp_path / "no-such-dir" / "model.json"
    failed = runner.invoke(app, ["model", "export", "--redis-url", redis_url, "--pool", "a",
                                 "--out", str(nowhere)], env={"COLUMNS": "200"})
    said = " ".join(failed.output.split())
    assert failed.exit_code == 2, said
    assert f"cannot write {nowhere}: No such file or directory; nothing written" in said, said


def test_model_export_to_stdout_is_the_file_alone_and_names_what_it_left_out(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """Without --out the model goes to stdout (`model export > model.json`, `| ssh ...
    model import`): stdout is the file and nothing else, and a learned value it cannot carry
    (a hand repair gone wrong) is named on stderr, so the operator knows the import will
    start the pool without it."""
    for name, value in {"last_ms": 1.0, **LEARNED, "boot_n": -3.0}.items():
        sync_redis.hset(PoolKeys("a").key("model"), name, value)
    exported = CliRunner().invoke(app, ["model", "export", "--redis-url", redis_url,
                                        "--pool", "a"], env={"COLUMNS": "200"})
    assert exported.exit_code == 0, exported.output
    document = json.loads(exported.stdout)
    assert document["skipped"] == ["boot_n"], document
    assert read_document(exported.stdout) == {k: v for k, v in LEARNED.items()
                                              if k != "boot_n"}
    assert "written to" not in exported.stdout
    assert ("left out, not non-negative numbers: boot_n"
            in " ".join(exported.stderr.split())), exported.stderr


def test_a_replay_saves_its_model_and_another_starts_from_it(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    trace, saved = str(_trace(tmp_path)), tmp_path / "learned.json"
    runner = CliRunner()
    first = runner.invoke(app, ["bench", "replay", trace, "--json", "--redis-url", redis_url,
                                "--save-model", str(saved)])
    assert first.exit_code == 0, first.output
    fields = read_document(saved.read_text())
    assert fields["boot_n"] > 0 and fields["rel"] > 0  # it learned boots and sessions
    again = runner.invoke(app, ["bench", "replay", trace, "--json", "--redis-url", redis_url,
                                "--model", str(saved)])
    assert again.exit_code == 0, again.output
    policy = ServicePolicy(redis_url, model=fields)
    run_replay(load_trace(Path(trace)), policy)
    assert policy.final_stats is not None
    assert policy.final_stats.stats["model_imports"] == "1"
    refused = runner.invoke(app, ["bench", "replay", trace, "--policy", "static-3",
                                  "--model", str(saved)])
    assert refused.exit_code == 2 and "only `provisioner` learns a model" in refused.output


async def test_model_show_reads_the_chances_as_the_forecast_does(
        pools: tuple[PoolUnderTest, PoolUnderTest], aredis: aioredis.Redis) -> None:
    learned, new = pools
    # Arrivals usual enough (2000, decayed) that ten new users are no panic.
    await aredis.hset(learned.keys.key("model"),
                      mapping={"last_ms": learned.now, **LEARNED, "arr": 2000})
    shown = await learned.scripts.model_view(CONFIG.policy_args(learned.now, "r1"))
    cells = {(c["level"], c["age_from_s"]): c for c in shown["cells"]}
    assert len(cells) == 20
    # The prior's 2% over 300 s joins the cell's 450 credited seconds of 900.
    assert cells[8, 0]["chance"] == pytest.approx((450 + 6) / (900 + 300))
    assert cells[8, 0]["exposure_s"] == 900 and cells[8, 0]["age_to_s"] == 60
    assert cells[16, 300]["chance"] == pytest.approx(0.02)  # nothing learned there
    assert cells[16, 300]["age_to_s"] is None
    assert shown["not_browsing_per_horizon"] == pytest.approx((60 + 30) / (2000 + 600))
    assert shown["session_mean_s"] == pytest.approx((9000 + 900) / 13)
    assert shown["arrivals_per_min"] == pytest.approx(2000 * math.log(2) / 1800 * 60)
    assert shown["memory_min"] == pytest.approx(1800 / math.log(2) / 60)
    assert (shown["lead_s"], shown["horizon_s"], shown["boots"]) == (150, 120, 9)
    assert shown["learned"] and shown["boot_learned"]
    # Ten users in that cell: the decision's forecast within H is theirs and the others'.
    await browse(learned)
    why = await forecast(learned)
    within = 10 * cells[8, 0]["chance"] + shown["not_browsing_per_horizon"]
    assert f"learned over 120s, {(150 / 120 - 1) * within:.2f} of them" in why

    fresh = await new.scripts.model_view(CONFIG.policy_args(new.now, "r1"))
    assert not fresh["learned"] and not fresh["boot_learned"] and fresh["lead_s"] == 60
    assert all(c["chance"] == pytest.approx(0.02) for c in fresh["cells"])


def test_model_show_on_the_command_line(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    sync_redis.hset(PoolKeys("a").key("model"), mapping={"last_ms": 1, **LEARNED})
    runner = CliRunner(env={"COLUMNS": "120"})
    table = runner.invoke(app, ["model", "show", "--redis-url", redis_url, "--pool", "a"])
    assert table.exit_code == 0, table.output
    assert "boot lead time 150 s, learned from 9 boots" in table.output
    assert re.search(r"│ 8-15 +│ +38\.0%, 15 min │", table.output), table.output
    shown = json.loads(runner.invoke(app, ["model", "show", "--redis-url", redis_url,
                                           "--pool", "a", "--json"]).stdout)
    assert shown["learned"] and len(shown["cells"]) == 20
    empty = runner.invoke(app, ["model", "show", "--redis-url", redis_url, "--pool", "b"])
    assert "pool b has learned nothing yet" in empty.output
    # no state at all: said, as `status` says it (a review: the priors alone, in silence)
    assert "warning: no pool 'b' on this server" in " ".join(empty.output.split())
    assert "warning" not in table.output
