"""Random event sequences through the real scripts; the invariants hold after every step.

Hypothesis drives connects, disconnects, node statuses (in any order, repeated, for unknown
ids), creates, ticks and reaping through the Lua scripts of a private server, and after every
step checks what must always be true: a node has at most one user, a user at most one node,
nobody waits while a node is ready, every structure agrees with the node records, and every
per-user key has a TTL. Hypothesis runs its own event loop per example, so this test drives the
async scripts through one loop of its own.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Allocation, Call, Drain, Release, Scripts
from provisioner.view import check_invariants
from tests.helpers import T0, dump_pool

USERS = st.sampled_from([f"u{i}" for i in range(6)])
NODES = st.sampled_from([f"n{i}" for i in range(6)])
STATUSES = st.sampled_from(["booting", "ready", "terminated"])
POOL = "prop"


@pytest.fixture
def state_machine(redis_url: str, sync_redis: Any) -> type[RuleBasedStateMachine]:
    loop = asyncio.new_event_loop()

    class PoolMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            loop.run_until_complete(self.client.flushall())
            self.keys = PoolKeys(POOL)
            self.scripts = Scripts(self.client, self.keys)
            self.clock = ManualClock(T0)
            self.config = PoolConfig(min_ready=1, max_nodes=5, idle_timeout_s=30,
                                     boot_timeout_s=60, create_timeout_s=20,
                                     delete_timeout_s=20, engaged_threshold=2)
            self.pending: list[str] = []
            #: nodes an operator drained (terminating since), and drained in a session
            self.drained: set[str] = set()
            self.draining: dict[str, str] = {}
            self.marks = 0
            #: the last connect or disconnect, to make again as after a reply lost
            self.last_marked: Call[Any] | None = None

        def run(self, coro: Any) -> Any:
            return loop.run_until_complete(coro)

        def teardown(self) -> None:
            if hasattr(self, "client"):
                self.run(self.client.aclose())

        @rule(seconds=st.integers(min_value=0, max_value=40))
        def time_passes(self, seconds: int) -> None:
            self.clock.advance(seconds * 1000)

        def marked(self, call: Call[Any]) -> None:
            self.run(self.scripts.run(call))
            self.last_marked = call

        def mark(self) -> str:
            self.marks += 1
            return f"r1:i:{self.marks}"

        @rule(user=USERS)
        def connect(self, user: str) -> None:
            self.marked(self.scripts.allocate_call(self.clock.now_ms(), user, "r1",
                                                   mark=self.mark()))

        @rule(user=USERS)
        def disconnect(self, user: str) -> None:
            self.marked(self.scripts.release_call(self.clock.now_ms(), user, mark=self.mark()))

        @precondition(lambda self: self.last_marked is not None)
        @rule()
        def made_again(self) -> None:
            """The last connect or disconnect made again, whatever ran since: nothing but the
            count of calls made again changes."""
            assert self.last_marked is not None
            before = self.run(dump_pool(self.client, self.keys))
            result = self.run(self.scripts.run(self.last_marked))
            assert result.code in (Allocation.MADE_AGAIN, Release.MADE_AGAIN)
            after = self.run(dump_pool(self.client, self.keys))
            before_stats, after_stats = before.pop("stats", {}), after.pop("stats")
            made = int(after_stats.pop("calls_made_again"))
            assert made == int(before_stats.pop("calls_made_again", 0)) + 1
            assert (after_stats, after) == (before_stats, before)

        @rule(user=USERS, back=st.integers(min_value=0, max_value=200))
        def activity(self, user: str, back: int) -> None:
            now = self.clock.now_ms()
            self.run(self.scripts.record_activity(
                now, user, now - back * 1000, self.config.window_ms,
                self.config.engaged_threshold, self.config.max_events_per_user))

        @rule(node=NODES, status=STATUSES)
        def node_status(self, node: str, status: str) -> None:
            self.run(self.scripts.apply_node_status(self.clock.now_ms(), node, status))

        @rule()
        def tick(self) -> None:
            args = self.config.policy_args(self.clock.now_ms(), "r1")
            decision = self.run(self.scripts.scale_decide(args))
            self.pending.extend(decision.reservations)
            self.run(self.scripts.reap_idle(args))

        @rule(node=NODES)
        def create_returns(self, node: str) -> None:
            if self.pending:
                rid = self.pending.pop(0)
                self.run(self.scripts.register_node(self.clock.now_ms(), rid, node))

        @rule()
        def create_fails(self) -> None:
            if self.pending:
                self.run(self.scripts.cancel_create(self.pending.pop(0)))

        @rule(node=NODES, outcome=st.sampled_from(["sent", "gone", "failed"]))
        def delete_answered(self, node: str, outcome: str) -> None:
            now = self.clock.now_ms()
            self.run(self.scripts.confirm_terminate(now, node, outcome, now + 20_000))

        @rule(node=NODES, at_once=st.booleans())
        def drain(self, node: str, at_once: bool) -> None:
            """An operator's drain: the node never serves a user again (once its session,
            if any, ends)."""
            result = self.run(self.scripts.drain_node(self.clock.now_ms(), node, "op",
                                                      at_once=at_once))
            if result.code is Drain.DRAINING:
                self.drained.add(node)
            elif result.code is Drain.MARKED:
                self.draining.setdefault(node, result.user)

        @rule(node=NODES, user=USERS)
        def session(self, node: str, user: str) -> None:
            """A node boots and is ready, and a user connects: sessions, which events drawn
            one by one rarely make (a connect finds a ready node in about one run of 100)."""
            now = self.clock.now_ms()
            for status in ("booting", "ready"):
                self.run(self.scripts.apply_node_status(now, node, status))
            self.connect(user)

        @rule(data=st.data(), how=st.sampled_from(["", "now", "cancel"]))
        def drain_held(self, data: st.DataObject, how: str) -> None:
            """A drain of a node in a session (or a drain taken back at once), then, half the
            time, its user's disconnect: a node whose mark was taken back is freed."""
            held = self.run(self.client.hgetall(self.keys.key("alloc")))
            if not held:
                return
            user = data.draw(st.sampled_from(sorted(held)))
            node = held[user]
            self.drain(node, how == "now")
            if how == "cancel":
                marked = self.run(self.client.hexists(self.keys.node(node), "drain_by"))
                result = self.run(self.scripts.drain_node(self.clock.now_ms(), node, "op",
                                                          cancel=True))
                assert result.code is (Drain.CANCELLED if marked else Drain.NOTHING)
                self.draining.pop(node, None)
            if data.draw(st.booleans()):
                call = self.scripts.release_call(self.clock.now_ms(), user, mark=self.mark())
                self.marked(call)
                if how == "cancel":
                    state = self.run(self.client.hget(self.keys.node(node), "state"))
                    assert state in ("ready", "allocated"), state  # freed, or handed on

        @rule(node=NODES)
        def drain_taken_back(self, node: str) -> None:
            """A mark taken back: the node goes back to the pool when its session ends."""
            result = self.run(self.scripts.drain_node(self.clock.now_ms(), node, "op",
                                                      cancel=True))
            if result.code is Drain.CANCELLED:
                self.draining.pop(node, None)

        @invariant()
        def a_drained_node_serves_no_one_again(self) -> None:
            if not hasattr(self, "client"):
                return

            async def record(node: str) -> tuple[str, str]:
                state, user = await self.client.hmget(self.keys.node(node), "state", "user")
                return state, user

            for node in self.drained:
                assert self.run(record(node))[0] in ("terminating", "terminated"), node
            for node, user in self.draining.items():
                # in the session it was drained in, or ending since
                state = self.run(record(node))
                assert state == ("allocated", user) or state[0] in (
                    "terminating", "terminated"), (node, user, state)

        @invariant()
        def pool_is_consistent(self) -> None:
            if not hasattr(self, "client"):
                return
            problems = self.run(check_invariants(self.client, POOL))
            assert problems == [], problems

        @invariant()
        def per_user_keys_expire(self) -> None:
            if not hasattr(self, "client"):
                return

            async def ttls() -> list[int]:
                # Every per-user key: the activity window and the first-seen time.
                keys = [k for prefix in ("acts_prefix", "seen_prefix")
                        async for k in self.client.scan_iter(
                            match=self.keys.key(prefix) + "*")]
                return [await self.client.pttl(k) for k in keys]

            assert all(ttl > 0 for ttl in self.run(ttls()))

    yield PoolMachine
    loop.close()


def test_random_event_sequences_keep_the_pool_consistent(
    state_machine: type[RuleBasedStateMachine],
) -> None:
    """`PROVISIONER_STATE_MACHINE_EXAMPLES` runs more sequences than the 60 of a test run."""
    runner = settings(max_examples=int(os.environ.get("PROVISIONER_STATE_MACHINE_EXAMPLES", "60")),
                      stateful_step_count=40, deadline=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)(state_machine)
    runner.TestCase().runTest()
