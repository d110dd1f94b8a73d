"""The scaling policy under random valid settings and random traffic, through the real scripts:
after every scale_decide and reap_idle the decision, the reaped nodes, the pool and the model
must be sane. It found reap_idle returning a stuck boot twice (boot_timeout, then retry) when the
delete timeout was under a millisecond, 0 ms to the scripts; such timeouts are refused now.

The target itself may exceed max_nodes: it is what the forecast wants, and the creates are what
max_nodes allows (a replica warns when the two differ). `PROVISIONER_FUZZ_EXAMPLES` runs more
examples than `make test` does (some 1,900 clean while it was written)."""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from provisioner.clock import ManualClock
from provisioner.config import MAX_NODES_LIMIT, PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import FORECAST_TERMS, Scripts
from provisioner.view import check_invariants
from tests.helpers import T0

POOL = "fuzz"
DAY_S = 86400.0
TINY = 0.001  # the shortest timeout the settings take
USERS = st.sampled_from([f"u{i}" for i in range(30)])
NODES = st.sampled_from([f"n{i}" for i in range(10)])


def edgy_float(lo: float, hi: float, extra: tuple[float, ...] = ()) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from((lo, hi, *extra)),
                     st.floats(min_value=lo, max_value=hi, allow_nan=False))


@st.composite
def configs(draw: Any) -> PoolConfig:
    max_nodes = draw(st.one_of(st.sampled_from([1, 2, 5, 50, MAX_NODES_LIMIT]),
                               st.integers(1, MAX_NODES_LIMIT)))
    min_ready = draw(st.one_of(st.sampled_from([0, 0, 1, max_nodes, min(1, max_nodes)]),
                               st.integers(0, min(max_nodes, 5)), st.integers(0, max_nodes)))
    min_ready = min(min_ready, max_nodes)
    cap = draw(st.sampled_from([1, 3, 100, 10000]))
    cfg = PoolConfig(
        min_ready=min_ready, max_nodes=max_nodes,
        idle_timeout_s=draw(edgy_float(0, DAY_S, (30.0,))),
        boot_timeout_s=draw(edgy_float(TINY, DAY_S, (0.001, 60.0))),
        tick_interval_s=draw(edgy_float(0.05, 600, (1.0,))),
        activity_window_s=draw(edgy_float(1, DAY_S, (120.0,))),
        engaged_threshold=draw(st.integers(1, cap)),
        conversion=draw(edgy_float(0, 1)),
        create_timeout_s=draw(edgy_float(TINY, DAY_S, (0.001, 60.0))),
        delete_timeout_s=draw(edgy_float(TINY, DAY_S, (0.001, 60.0))),
        max_batch=draw(st.one_of(st.sampled_from([1, 1000]), st.integers(1, 1000))),
        max_events_per_user=cap,
        decision_log_len=draw(st.sampled_from([10, 1000])),
        scaling_policy=draw(st.sampled_from(["forecast", "forecast", "heuristic"])),
        buffer_sd=draw(edgy_float(0, 10, (2.4,))),
        surge_buffer_sd=draw(edgy_float(0, 10, (4.5,))),
        learning_half_life_s=draw(edgy_float(10, 30 * DAY_S, (1800.0,))),
        boot_prior_s=draw(edgy_float(1, 3600, (60.0,))),
        keep_window_s=draw(edgy_float(0, DAY_S, (300.0,))),
        new_session_frees=draw(edgy_float(0, 1)),
        overdue_boots=draw(edgy_float(0, 1)),
        uncredited_exposure=draw(edgy_float(0, 1)),
        estimation_error=draw(edgy_float(0, 4)),
    )
    assert cfg.problems() == [], cfg.problems()
    return cfg


JUMPS = st.one_of(st.sampled_from([0, 1, 49, 50, 999, 1000, 60_000, 3_600_000, 86_400_000,
                                   3 * 86_400_000]),
                  st.integers(0, 3 * 86_400_000))


@pytest.fixture
def machine(redis_url: str, sync_redis: Any) -> type[RuleBasedStateMachine]:
    loop = asyncio.new_event_loop()

    class PolicyMachine(RuleBasedStateMachine):
        @initialize(cfg=configs())
        def setup(self, cfg: PoolConfig) -> None:
            self.client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            self.run(self.client.flushall())
            self.keys = PoolKeys(POOL)
            self.scripts = Scripts(self.client, self.keys)
            self.clock = ManualClock(T0)
            self.config = cfg
            self.pending: list[str] = []
            self.node_seq = 0
            self.ticks = 0

        def run(self, coro: Any) -> Any:
            return loop.run_until_complete(coro)

        def teardown(self) -> None:
            if hasattr(self, "client"):
                self.run(self.client.aclose())

        @property
        def now(self) -> int:
            return self.clock.now_ms()

        # --- the world -------------------------------------------------------------------

        @rule(ms=JUMPS)
        def time_passes(self, ms: int) -> None:
            self.clock.advance(ms)

        @rule(users=st.lists(USERS, min_size=1, max_size=12),
              where=st.lists(st.sampled_from(["edge_in", "edge_out", "edge_in1", "now",
                                              "mid", "future", "sec"]), min_size=1, max_size=6),
              repeat=st.integers(1, 4))
        def burst(self, users: list[str], where: list[str], repeat: int) -> None:
            now, w = self.now, self.config.window_ms
            events: list[tuple[str, int]] = []
            for k, user in enumerate(users * repeat):
                kind = where[k % len(where)]
                ts = {"edge_in": now - w, "edge_out": now - w - 1, "edge_in1": now - w + 1,
                      "now": now, "mid": now - w // 2, "future": now + 300_000,
                      "sec": (now // 1000 - k) * 1000}[kind]
                events.append((user, max(0, ts)))
            c = self.config
            results = self.run(self.scripts.run(self.scripts.record_activities_call(
                now, events, w, c.engaged_threshold, c.max_events_per_user)))
            for r in results:
                assert not isinstance(r, Exception), r

        @rule(n=st.integers(1, 40), spread_ms=st.sampled_from([0, 1000, 59_000, 61_000]))
        def new_crowd(self, n: int, spread_ms: int) -> None:
            """Users never seen before (arrivals: the panic's and the surge's input)."""
            now, c = self.now, self.config
            events = []
            for i in range(n):
                self.node_seq += 1
                events.append((f"new{self.node_seq}", now - (spread_ms * i) // max(1, n)))
            self.run(self.scripts.run(self.scripts.record_activities_call(
                now, events, c.window_ms, c.engaged_threshold, c.max_events_per_user)))

        @rule(k=st.integers(1, 30), step=st.sampled_from([0, 1, 2, 5]))
        def ticks_in_a_row(self, k: int, step: int) -> None:
            """k scaling ticks, `step` intervals apart (0: the same slot, then 1 ms on)."""
            for _ in range(k):
                self.clock.advance(max(1, step * self.config.interval_ms))
                self.tick(None)

        @rule(minutes=st.integers(1, 10), per_minute=st.integers(0, 2))
        def calm(self, minutes: int, per_minute: int) -> None:
            """Quiet minutes of ticks every 10 s with a few arrivals: a baseline to surge on."""
            for _ in range(minutes):
                if per_minute:
                    self.new_crowd(per_minute, 0)
                for _ in range(6):
                    self.clock.advance(10_000)
                    self.tick(None)

        @rule(n=st.integers(1, 8), booting=st.integers(0, 4))
        def surplus(self, n: int, booting: int) -> None:
            """Nodes beyond the target, idle past idle_timeout and keep_window: reaping."""
            for i in range(n + booting):
                self.node_seq += 1
                status = "ready" if i < n else "booting"
                self.run(self.scripts.apply_node_status(self.now, f"s{self.node_seq}", status))
            c = self.config
            self.clock.advance(int(max(c.idle_timeout_s, c.keep_window_s) * 1000) + 1)
            self.tick(None)

        @rule(user=USERS)
        def connect(self, user: str) -> None:
            self.run(self.scripts.allocate(self.now, user, "r1", self.config.decision_log_len))

        @rule(user=USERS)
        def disconnect(self, user: str) -> None:
            self.run(self.scripts.release(self.now, user))

        @rule(node=NODES, status=st.sampled_from(["booting", "ready", "terminated"]),
              listed=st.booleans())
        def node_status(self, node: str, status: str, listed: bool) -> None:
            self.run(self.scripts.apply_node_status(self.now, node, status, listed=listed))

        @precondition(lambda self: bool(getattr(self, "pending", None)))
        @rule(boot_ms=st.one_of(st.sampled_from([0, 1, 60_000, 3_600_000, 4 * 3_600_000]),
                                st.integers(0, 4 * 3_600_000)),
              ready=st.booleans())
        def create_returns(self, boot_ms: int, ready: bool) -> None:
            rid = self.pending.pop(0)
            self.node_seq += 1
            node = f"c{self.node_seq}"
            self.run(self.scripts.register_node(self.now, rid, node))
            if ready:
                self.clock.advance(boot_ms)
                self.run(self.scripts.apply_node_status(self.now, node, "ready"))

        @precondition(lambda self: bool(getattr(self, "pending", None)))
        @rule()
        def create_fails(self) -> None:
            self.run(self.scripts.cancel_create(self.pending.pop(0)))

        @rule(outcome=st.sampled_from(["sent", "gone", "failed"]), which=st.integers(0, 20))
        def delete_answered(self, outcome: str, which: int) -> None:
            terms = self.run(self.client.zrange(self.keys.key("terminating"), 0, -1))
            if terms:
                node = terms[which % len(terms)]
                now = self.now
                self.run(self.scripts.confirm_terminate(now, node, outcome, now + 20_000))

        # --- the policy ------------------------------------------------------------------

        def counts(self) -> dict[str, int]:
            k = self.keys.key

            async def read() -> dict[str, int]:
                pipe = self.client.pipeline(transaction=True)
                pipe.llen(k("ready"))
                pipe.zcard(k("booting"))
                pipe.hlen(k("alloc"))
                pipe.zcard(k("terminating"))
                pipe.zcard(k("pending"))
                pipe.zcard(k("unclaimed"))
                r = await pipe.execute()
                return {"ready": r[0], "booting": r[1], "allocated": r[2], "terminating": r[3],
                        "pending": r[4], "unclaimed": r[5],
                        "total": r[0] + r[1] + r[2] + r[3] + max(0, r[4] - r[5])}
            return self.run(read())

        @rule(held=st.one_of(st.none(), st.integers(0, 5)))
        def tick(self, held: int | None) -> None:
            cfg = self.config
            args = cfg.policy_args(self.now, "r1", held)
            decision = self.run(self.scripts.scale_decide(args))
            self.ticks += 1
            if decision.won:
                nums = decision.numbers
                for key, value in nums.items():
                    if key == "surge":
                        assert isinstance(value, bool)
                        continue
                    if key == "forecast":  # the terms behind the target: each finite, >= 0
                        assert set(value) == set(FORECAST_TERMS), nums
                        assert all(isinstance(v, int | float) and math.isfinite(v) and v >= 0
                                   for v in value.values()), nums
                        assert value["panic"] >= 1 and value["lead_time_s"] > 0, nums
                        continue
                    assert isinstance(value, int | float) and not isinstance(value, bool), nums
                    assert math.isfinite(value), nums
                    if key != "spare":
                        assert value >= 0, nums
                target = nums["target"]
                assert float(target).is_integer(), nums
                assert target >= cfg.min_ready, (nums, decision.reason)
                assert target >= 0, nums
                res = decision.reservations
                assert len(res) == len(set(res))
                assert len(res) <= cfg.max_batch, nums
                if held is not None and held < cfg.max_batch:
                    assert len(res) <= held
                after = self.counts()
                if nums["total"] >= cfg.max_nodes:
                    assert res == [], (nums, res)
                else:
                    assert nums["total"] + len(res) <= cfg.max_nodes, (nums, res)
                assert after["total"] <= max(cfg.max_nodes, nums["total"]), (after, nums)
                self.pending.extend(res)
            self.reap()

        def reap(self) -> None:
            alloc_before = set(self.run(self.client.hvals(self.keys.key("alloc"))))
            out = self.run(self.scripts.reap_idle(self.config.policy_args(self.now, "r1")))
            ids = [t.node_id for t in out]
            assert len(ids) == len(set(ids)), ids
            assert not (set(ids) & alloc_before), (ids, alloc_before)

        @invariant()
        def consistent(self) -> None:
            if not hasattr(self, "client"):
                return
            problems = self.run(check_invariants(self.client, POOL))
            assert problems == [], problems

        @invariant()
        def model_is_finite(self) -> None:
            if not hasattr(self, "client"):
                return
            model = self.run(self.client.hgetall(self.keys.key("model")))
            for field, raw in model.items():
                value = float(raw)
                assert math.isfinite(value) and value >= 0, (field, raw, model)

    yield PolicyMachine
    loop.close()


def test_fuzz_policy(machine: type[RuleBasedStateMachine]) -> None:
    runner = settings(max_examples=int(os.environ.get("PROVISIONER_FUZZ_EXAMPLES", "25")),
                      stateful_step_count=40, deadline=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)(machine)
    runner.TestCase().runTest()
