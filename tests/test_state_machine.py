"""Random event sequences through the real scripts; the invariants hold after every step.

Hypothesis drives connects, disconnects, node statuses (in any order, repeated, for unknown
ids, listed, from a replica whose clock is off), reconciliations, creates (answered, late,
twice, given back for each reason), ticks of two replicas and reaping, operators' drains and
releases, `provisioner replace`'s hold and its drains, calls made again or passed over, and
model imports through the Lua scripts of a private server, under three pool settings, and
after every step checks what must always be true: a node has at most one user, a user at most
one node, nobody waits while a node is ready, every structure agrees with the node records,
every per-user key has a TTL (and a tombstone; a live node's record none), the hold's key its
lease, and the snapshot counts what the structures hold. Hypothesis runs its own event loop
per example, so this test drives the async scripts through one loop of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from redis.exceptions import ResponseError

from provisioner.clock import ManualClock
from provisioner.config import PoolConfig, ServiceConfig
from provisioner.keys import PoolKeys
from provisioner.metrics import Metrics
from provisioner.nodeapi import ListedNode
from provisioner.scripts import Allocation, Call, Drain, Release, Scripts
from provisioner.service import Replica
from provisioner.view import check_invariants
from tests.fakes import FakeNodeApi
from tests.helpers import T0, dump_pool

USERS = st.sampled_from([f"u{i}" for i in range(6)])
NODES = st.sampled_from([f"n{i}" for i in range(6)])
STATUSES = st.sampled_from(["booting", "ready", "terminated"])
POOL = "prop"


@pytest.fixture
def state_machine(redis_url: str, sync_redis: Any) -> type[RuleBasedStateMachine]:
    loop = asyncio.new_event_loop()

    class PoolMachine(RuleBasedStateMachine):
        @initialize(variant=st.sampled_from([0, 0, 1, 2]))
        def setup(self, variant: int) -> None:
            self.client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            loop.run_until_complete(self.client.flushall())
            self.keys = PoolKeys(POOL)
            self.scripts = Scripts(self.client, self.keys)
            self.clock = ManualClock(T0)
            self.config = [
                PoolConfig(min_ready=1, max_nodes=5, idle_timeout_s=30, boot_timeout_s=60,
                           create_timeout_s=20, delete_timeout_s=20, engaged_threshold=2),
                # every edge at once: nothing kept idle, one create a tick, deadlines at once
                PoolConfig(min_ready=0, max_nodes=2, idle_timeout_s=0, boot_timeout_s=0.001,
                           create_timeout_s=0.001, delete_timeout_s=0.001, max_batch=1,
                           keep_window_s=0, engaged_threshold=1, max_events_per_user=1),
                PoolConfig(min_ready=3, max_nodes=6, idle_timeout_s=10, boot_timeout_s=20,
                           create_timeout_s=5, delete_timeout_s=5, engaged_threshold=1,
                           conversion=1.0, scaling_policy="heuristic"),
            ][variant]
            self.pending: list[str] = []
            #: nodes an operator drained (terminating since), and drained in a session
            self.drained: set[str] = set()
            self.draining: dict[str, str] = {}
            self.marks = 0
            #: the last connect or disconnect, to make again as after a reply lost
            self.last_marked: Call[Any] | None = None
            #: every marked call by its seq, the seqs never run, the creates answered
            self.calls: dict[int, Call[Any]] = {}
            self.skipped: set[int] = set()
            self.registered: list[tuple[str, str]] = []

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
            self.calls[self.marks] = call

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

        # --- the transitions the rules above leave out ----------------------------------------

        def at(self, back: int) -> int:
            """`now` of a replica whose clock is `back` seconds behind (or ahead, below 0)."""
            return self.clock.now_ms() - back * 1000

        @rule(node=NODES, status=STATUSES, listed=st.booleans(),
              back=st.integers(min_value=-5, max_value=30))
        def node_status_seen(self, node: str, status: str, listed: bool, back: int) -> None:
            """A status read from the Node API's list (reconcile) or received by a replica
            whose clock is off."""
            self.run(self.scripts.apply_node_status(self.at(back), node, status, listed=listed))

        @rule(node=NODES, which=st.sampled_from(["pending", "unknown", "again"]),
              asked=st.sampled_from([None, -1, 0, -30, 5, "nan"]),
              back=st.integers(min_value=-5, max_value=30))
        def create_answered(self, node: str, which: str, asked: Any, back: int) -> None:
            """A POST's answer: for a reservation pending, one unknown (lapsed and trimmed),
            or the last one answered again; sent some seconds before (asked)."""
            now = self.at(back)
            if which == "pending":
                if not self.pending:
                    return
                rid = self.pending.pop(0)
            elif which == "unknown":
                rid = f"r9:{self.marks + 1000}"
            else:
                if not self.registered:
                    return
                rid, node = self.registered[-1]
            self.registered.append((rid, node))
            if asked == "nan":
                self.run(self.scripts._call("register_node", now, rid, node, "nan"))
                return
            asked_ms = None if asked is None else (now + asked * 1000 if asked else 0)
            self.run(self.scripts.register_node(now, rid, node, asked_ms))

        @rule(why=st.sampled_from(["failed", "unusable", "withdrawn"]),
              which=st.sampled_from(["pending", "answered"]))
        def create_given_back(self, why: str, which: str) -> None:
            if which == "pending":
                if not self.pending:
                    return
                rid = self.pending.pop(0)
            else:
                if not self.registered:
                    return
                rid = self.registered[-1][0]
            self.run(self.scripts.cancel_create(rid, why))

        @rule(mode=st.sampled_from(["take", "renew", "keep", "release"]),
              run=st.sampled_from(["ra", "rb", ""]), extra=st.integers(min_value=1, max_value=3))
        def hold(self, mode: str, run: str, extra: int) -> None:
            """`provisioner replace`'s hold of spare nodes (two runs, and --cancel)."""
            if mode != "release" and not run:
                run = "ra"
            self.run(self.scripts.hold_spare(self.clock.now_ms(), mode, run, extra))

        @rule(data=st.data(), run=st.sampled_from(["ra", "rb", "holder"]), last=st.booleans(),
              at_once=st.booleans(), take=st.sampled_from([0, 0, 1, 2]))
        def replace_drain(self, data: st.DataObject, run: str, last: bool,
                          at_once: bool, take: int) -> None:
            """A replace run's drain (of any node, or one in a session), refused unless the
            run holds the spare; half the time the run (re)takes its hold first, as a round
            of `provisioner replace` does."""
            if take:
                self.run(self.scripts.hold_spare(self.clock.now_ms(), "take",
                                                 "ra" if run == "holder" else run, take))
            before = self.run(self.client.get(self.keys.key("replacing")))
            if run == "holder":
                run = before.split(":", 2)[2] if before else "ra"
            held = sorted(self.run(self.client.hvals(self.keys.key("alloc"))))
            node = data.draw(st.sampled_from(held) if held and data.draw(st.booleans())
                             else NODES)
            state = self.run(self.client.hget(self.keys.node(node), "state"))
            result = self.run(self.scripts.drain_node(self.clock.now_ms(), node, "op:replace",
                                                      at_once=at_once, run=run, last=last))
            if state in ("ready", "booting", "allocated") and (
                    before is None or before.split(":", 2)[2] != run):
                assert result.code is Drain.NOT_HELD, (before, run, result)
            after = self.run(self.client.get(self.keys.key("replacing")))
            if result.code is Drain.DRAINING:
                self.drained.add(node)
            elif result.code is Drain.MARKED:
                self.draining.setdefault(node, result.user)
            lowered = (result.code is Drain.DRAINING and last and result.state != "allocated"
                       and int(before.split(":")[0]) > 0)
            if lowered:
                assert int(after.split(":")[0]) == int(before.split(":")[0]) - 1, (before, after)
            else:
                assert after == before, (before, after, result)

        @rule(user=USERS, data=st.data())
        def operator_release(self, user: str, data: st.DataObject) -> None:
            """`provisioner release`, confirmed as the user was shown (or as it was before)."""
            node = self.run(self.client.hget(self.keys.key("alloc"), user))
            waits = self.run(self.client.hexists(self.keys.key("waiting_since"), user))
            shown = f"node:{node}" if node else "waiting" if waits else "nothing"
            expected = data.draw(st.sampled_from([shown, "nothing", "waiting", "node:n0"]))
            session = self.run(self.client.zscore(self.keys.key("sessions"), user))
            session_ms = data.draw(st.sampled_from(
                [None, None if session is None else int(session), 1]))
            result = self.run(self.scripts.release(self.clock.now_ms(), user, by="op",
                                                   expected=expected, session_ms=session_ms))
            if expected != shown:
                assert result.code is Release.CHANGED, (expected, shown, result)

        @rule(node=NODES, data=st.data(), how=st.sampled_from(["", "now", "cancel"]))
        def operator_drain(self, node: str, data: st.DataObject, how: str) -> None:
            """`provisioner drain`, confirmed as the node was shown (or as it was before)."""
            state, user = self.run(self.client.hmget(self.keys.node(node), "state", "user"))
            shown = f"allocated:{user}" if state == "allocated" else (state or "")
            expected = data.draw(st.sampled_from([shown, "ready", "booting", "allocated:u0"]))
            result = self.run(self.scripts.drain_node(
                self.clock.now_ms(), node, "op", expected=expected, at_once=how == "now",
                cancel=how == "cancel"))
            if result.code is Drain.DRAINING:
                self.drained.add(node)
            elif result.code is Drain.MARKED:
                self.draining.setdefault(node, result.user)
            elif result.code is Drain.CANCELLED:
                self.draining.pop(node, None)

        @rule(events=st.lists(st.tuples(USERS, st.integers(min_value=-2, max_value=200)),
                              min_size=1, max_size=6))
        def activities_at_once(self, events: list[tuple[str, int]]) -> None:
            """Several activity events in one call (the listener's batch), some of one second,
            some late, one a second ahead (a client's clock)."""
            now = self.clock.now_ms()
            call = self.scripts.record_activities_call(
                now, [(user, now - back * 1000) for user, back in events],
                self.config.window_ms, self.config.engaged_threshold,
                self.config.max_events_per_user)
            results = self.run(self.scripts.run(call))
            assert len(results) == len(events)

        @rule(node=NODES, status=STATUSES, user=USERS, back=st.integers(min_value=0, max_value=30))
        def a_late_copy(self, node: str, status: str, user: str, back: int) -> None:
            """Another replica applies, late, a status and a connect it was sent earlier."""
            self.run(self.scripts.apply_node_status(self.at(back), node, status))
            self.run(self.scripts.allocate(self.at(back), user, "r2"))

        @rule(listed=st.lists(st.tuples(NODES, st.sampled_from(
            ["booting", "ready", "terminating", "terminated"])), max_size=6,
            unique_by=lambda pair: pair[0]))
        def reconcile(self, listed: list[tuple[str, str]]) -> None:
            """A replica's reconciliation against the Node API's list: several scripts, the
            pool read between them (provisioner/service.py Replica.reconcile)."""
            api = FakeNodeApi()
            api.listed = [ListedNode(n, state) for n, state in listed]
            service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r3")
            replica = Replica(self.client, service, self.config, api, clock=self.clock,
                              metrics=Metrics())
            self.run(replica.reconcile())
            self.run(replica.settle())

        @rule(seq=st.integers(min_value=1, max_value=60), ask=st.booleans())
        def an_older_call_made_again(self, seq: int, ask: bool) -> None:
            """A connect or disconnect of the batch made again, or asked about: one that ran
            changes nothing, one passed over (or asked about and never run) is refused."""
            if seq in self.skipped and seq > max(self.calls, default=0):
                return  # no later call ran: made again, it runs as a first try would
            if seq in self.skipped:
                call: Call[Any] = self.scripts.allocate_call(self.clock.now_ms(), "u0", "r1",
                                                             mark=f"r1:i:{seq}")
            elif seq in self.calls:
                call = self.calls[seq]
            else:
                return
            mark = call.args[-1] + ("?" if ask else "")
            again = Call(call.name, (*call.args[:-1], mark), call.parse)
            before = self.run(dump_pool(self.client, self.keys))
            try:
                result = self.run(self.scripts.run(again))
            except ResponseError as exc:
                assert seq in self.skipped or "NOT RUN" in str(exc), (seq, str(exc))
                after = self.run(dump_pool(self.client, self.keys))
                assert after == before
                return
            assert seq not in self.skipped, seq
            assert result.code in (Allocation.MADE_AGAIN, Release.MADE_AGAIN)

        @rule(n=st.integers(min_value=1, max_value=3))
        def calls_refused(self, n: int) -> None:
            """Calls of the batch the server refused (never run) before the next one ran."""
            for _ in range(n):
                self.skipped.add(self.marks + 1)
                self.marks += 1

        @rule(boot_s=st.sampled_from([0, 1, 30, 600, 86400]), n=st.integers(0, 5))
        def model_imported(self, boot_s: int, n: int) -> None:
            result = self.run(self.scripts.load_model(
                self.clock.now_ms(), {"boot_ms": boot_s * 1000, "boot_n": n}, replace=True))
            assert result.loaded, result

        @rule(replica=st.sampled_from(["r1", "r2"]), back=st.integers(-90, 90))
        def another_tick(self, replica: str, back: int) -> None:
            """A tick of a replica whose clock is off, its heartbeat first, then its reap."""
            beat = self.run(self.scripts.heartbeat(replica, {}, 600_000))
            args = self.config.policy_args(self.at(back), replica, epoch=beat.epoch)
            decision = self.run(self.scripts.scale_decide(args))
            self.pending.extend(decision.reservations)
            self.run(self.scripts.reap_idle(args))

        @invariant()
        def records_agree_with_their_role(self) -> None:
            if not hasattr(self, "client"):
                return

            async def read() -> dict[str, Any]:
                k = self.keys.key
                nodes = await self.client.zrange(k("nodes"), 0, -1)
                out: dict[str, Any] = {"nodes": nodes}
                out["records"] = {n: await self.client.hgetall(self.keys.node(n)) for n in nodes}
                out["ttl"] = {n: await self.client.pttl(self.keys.node(n)) for n in nodes}
                out["terminating"] = set(await self.client.zrange(k("terminating"), 0, -1))
                out["unclaimed"] = await self.client.zrange(k("unclaimed"), 0, -1)
                out["alloc"] = await self.client.hgetall(k("alloc"))
                out["waiting"] = await self.client.zrange(k("waiting"), 0, -1)
                out["sessions"] = dict(await self.client.zrange(k("sessions"), 0, -1,
                                                                withscores=True))
                out["engaged"] = set(await self.client.zrange(k("engaged"), 0, -1))
                out["levels"] = {m.rsplit("|", 1)[-1]
                                 for m in await self.client.zrange(k("levels"), 0, -1)}
                out["replacing"] = await self.client.get(k("replacing"))
                out["replacing_ttl"] = await self.client.pttl(k("replacing"))
                tombs = [n for n in (f"n{i}" for i in range(6)) if n not in nodes]
                out["tombs"] = {n: (await self.client.hget(self.keys.node(n), "state"),
                                    await self.client.pttl(self.keys.node(n))) for n in tombs}
                out["snapshot"] = (await self.scripts.snapshot(self.clock.now_ms(),
                                                               self.config.window_ms)).counts
                out["ready"] = await self.client.lrange(k("ready"), 0, -1)
                out["created"] = dict(await self.client.zrange(k("nodes"), 0, -1,
                                                               withscores=True))
                out["targets"] = await self.client.lrange(k("targets"), 0, -1)
                out["drains"] = set(await self.client.zrange(k("drains"), 0, -1))
                out["booting"] = await self.client.zcard(k("booting"))
                out["pending"] = await self.client.zcard(k("pending"))
                return out

            d = self.run(read())
            for node, record in d["records"].items():
                assert d["ttl"][node] == -1, f"live node {node} expires: {record}"
                if record.get("state") in ("ready", "booting"):
                    assert record.get("user", "") == "", (node, record)
                    assert "drain_by" not in record, (node, record)
                if record.get("state") == "allocated":
                    user = record["user"]
                    assert float(record["allocated_ms"]) == d["sessions"].get(user), (node, record)
            targets = [int(t.split(":")[1]) for t in d["targets"]]
            assert all(a > b for a, b in itertools.pairwise(targets)), d["targets"]
            for node in d["drains"]:
                record = d["records"].get(node, {})
                assert record.get("state") == "allocated" and "drain_by" in record, (node, record)
            for node, record in d["records"].items():
                assert float(record["created_ms"]) == d["created"][node], (node, record)
            for node, (state, ttl) in d["tombs"].items():
                assert state in (None, "terminated"), (node, state)
                assert state is None or ttl > 0, (node, ttl)
            live = set(d["nodes"]) - d["terminating"]
            assert set(d["unclaimed"]) <= live, (d["unclaimed"], live)
            holding = set(d["alloc"]) | set(d["waiting"])
            assert not holding & d["engaged"], (holding, d["engaged"])
            assert not holding & d["levels"], (holding, d["levels"])
            if d["replacing"] is not None:
                assert d["replacing_ttl"] > 0, d["replacing"]
                assert 0 <= int(d["replacing"].split(":")[0]) <= 3, d["replacing"]
            snap = d["snapshot"]
            assert (snap["ready"], snap["booting"], snap["allocated"], snap["waiting"],
                    snap["nodes"], snap["pending"]) == (
                len(d["ready"]), d["booting"], len(d["alloc"]), len(d["waiting"]),
                len(d["nodes"]), d["pending"]), snap

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
    """`PROVISIONER_STATE_MACHINE_EXAMPLES` runs more sequences than the 60 of a test run,
    `PROVISIONER_STATE_MACHINE_STEPS` longer ones than its 40 steps."""
    examples = int(os.environ.get("PROVISIONER_STATE_MACHINE_EXAMPLES", "60"))
    steps = int(os.environ.get("PROVISIONER_STATE_MACHINE_STEPS", "40"))
    runner = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)(state_machine)
    runner.TestCase().runTest()
