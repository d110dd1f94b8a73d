"""The replay world on tiny hand-made traces: node API timing, billing, ordering, refereeing."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from provisioner.bench.baselines import (
    BandPolicy,
    PoolPolicy,
    StaticPolicy,
    make_policy,
    policy_factory,
    rate_oracle_policy,
)
from provisioner.bench.suite import markdown_table, pareto_plot, run_suite
from provisioner.bench.trace import Trace, TraceError, counted_events, load_trace
from provisioner.bench.world import PolicyViolation, World, run_replay


def write_trace(path: Path, events: list[tuple[float, str, str]], *,
                boot: list[float] | None = None, max_nodes: int = 10,
                duration: float = 100.0) -> Path:
    """A trace file; events are (t, "connect"|"disconnect"|"activity", user)."""
    header = {
        "format": "provisioner-trace/1", "name": path.name.split(".")[0],
        "description": "hand-made", "epoch": 1_767_225_600, "duration_s": duration,
        "seed": 0, "users": 0, "events": len(events),
        "nodes": {"boot_delay_s": boot or [10.0, 20.0], "api_latency_s": 0.2,
                  "terminate_delay_s": 5.0, "max_nodes": max_nodes},
    }
    lines = [json.dumps(header)]
    for t, kind, user in events:
        msg: dict[str, Any] = {"user_id": user}
        if kind == "activity":
            msg["timestamp"] = 1_767_225_600 + int(t)
        lines.append(json.dumps({"t": t, "ch": f"user:{kind}", "msg": msg}))
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


class Recorder(PoolPolicy):
    """Creates `creates` nodes at start, terminates on request, and records node statuses."""

    def __init__(self, creates: int = 0, terminate_at: dict[float, str] | None = None) -> None:
        super().__init__("recorder")
        self.creates = creates
        self.terminate_at = terminate_at or {}
        self.statuses: list[tuple[float, str, str]] = []
        self.created: list[str | None] = []
        self.terminated: list[bool] = []

    async def start(self, world: World) -> None:
        await super().start(world)
        self.created = [world.create_node() for _ in range(self.creates)]

    async def on_node_status(self, t: float, node_id: str, status: str) -> None:
        self.statuses.append((t, node_id, status))

    async def tick(self, t: float) -> None:
        if t in self.terminate_at:
            self.terminated.append(self.world.terminate_node(self.terminate_at[t]))


def test_trace_loads_gzip_and_plain(tmp_path: Path) -> None:
    events = [(1.0, "activity", "u1"), (2.5, "connect", "u1"), (9.0, "disconnect", "u1")]
    for name in ("t.jsonl.gz", "t.jsonl"):
        trace = load_trace(write_trace(tmp_path / name, events))
        assert trace.boot_delays == (10.0, 20.0)
        assert (trace.api_latency_s, trace.terminate_delay_s, trace.max_nodes) == (0.2, 5.0, 10)
        assert [(e.t, e.channel) for e in trace.events] == [
            (1.0, "user:activity"), (2.5, "user:connect"), (9.0, "user:disconnect")]


@pytest.mark.parametrize(("lines", "message"), [
    (['{"format": "other/1"}'], "t.jsonl:1: format"),
    (["HEADER", '{"t": 1, "ch": "user:connect", "msg": {}}'], "t.jsonl:2: msg"),
    (["HEADER", '{"t": 1, "ch": "node:status", "msg": {"user_id": "u"}}'], "t.jsonl:2: unknown"),
    (["HEADER", '{"t": 5, "ch": "user:connect", "msg": {"user_id": "u"}}',
      '{"t": 4, "ch": "user:connect", "msg": {"user_id": "v"}}'], "t.jsonl:3: event at t=4.0"),
    (["HEADER", "{not json"], "t.jsonl:2:"),
    (["HEADER", '{"t": 1%s, "ch": "user:connect", "msg": {"user_id": "u"}}' % ("0" * 400)],
     "t.jsonl:2: t must be a finite number in .* got 1000000000000000000000000000000000..."),
    (["HEADER", '{"t": 1, "ch": "user:activity", "msg": {"user_id": "u", "timestamp": 9%s}}'
      % ("9" * 400)], "t.jsonl:2: activity timestamp must be an integer in [0, 100000000000]"),
    (["HEADER", '{"t": 1, "ch": "user:activity", "msg": {"user_id": "u", "timestamp": -5}}'],
     "t.jsonl:2: activity timestamp must be"),
    ([], "empty file"),
])
def test_bad_traces_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    header = (tmp_path / "h.jsonl")
    write_trace(header, [])
    text = "\n".join(header.read_text().strip() if line == "HEADER" else line for line in lines)
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=message.replace("[", r"\[")):
        load_trace(path)


def test_counted_events_skip_a_repeated_connect_and_a_disconnect_with_no_session(
        tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (1.0, "connect", "a"), (2.0, "connect", "a"), (3.0, "disconnect", "b"),
        (4.0, "activity", "b"), (5.0, "disconnect", "a"), (6.0, "disconnect", "a"),
        (7.0, "connect", "a")]))
    assert [(e.t, e.channel) for e in counted_events(trace.events)] == [
        (1.0, "user:connect"), (4.0, "user:activity"), (5.0, "user:disconnect"),
        (7.0, "user:connect")]


def test_boot_delays_follow_creation_order_after_api_latency(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", []))
    policy = Recorder(creates=3)
    run_replay(trace, policy)
    assert policy.created == ["node-000000", "node-000001", "node-000002"]
    # k-th create at t=0: booting at 0.2; ready at 0.2 + boot[k % 2] = 10.2, 20.2, 10.2.
    # Equal times keep scheduling order: node-000000's ready before node-000002's.
    assert [(round(t, 6), n, s) for t, n, s in policy.statuses] == [
        (0.2, "node-000000", "booting"), (0.2, "node-000001", "booting"),
        (0.2, "node-000002", "booting"), (10.2, "node-000000", "ready"),
        (10.2, "node-000002", "ready"), (20.2, "node-000001", "ready"),
    ]


def test_boot_offset_starts_the_delays_elsewhere(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [])).with_boot_offset(3)
    assert trace.boot_delays == (20.0, 10.0)  # 3 mod 2 = 1
    policy = Recorder(creates=1)
    run_replay(trace, policy)
    assert [(round(t, 6), s) for t, _, s in policy.statuses] == [(0.2, "booting"), (20.2, "ready")]


def test_max_nodes_refuses_creates_until_one_is_terminated(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [], max_nodes=2))
    policy = Recorder(creates=3, terminate_at={5.0: "node-000000"})
    run_replay(trace, policy)
    assert policy.created == ["node-000000", "node-000001", None]

    class CreateAfterTerminate(Recorder):
        async def tick(self, t: float) -> None:
            await super().tick(t)
            if t == 5.0:
                self.created.append(self.world.create_node())

    again = CreateAfterTerminate(creates=2, terminate_at={5.0: "node-000000"})
    run_replay(trace, again)
    assert again.created == ["node-000000", "node-000001", "node-000002"]


def test_terminate_bills_the_delay_and_reports_terminated(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [], boot=[10.0]))
    policy = Recorder(creates=1, terminate_at={30.0: "node-000000", 31.0: "node-000000",
                                               32.0: "node-999999"})
    scores = run_replay(trace, policy)
    assert policy.terminated == [True, False, False]  # again, and unknown: refused
    assert policy.statuses[-1] == (35.0, "node-000000", "terminated")
    # Billed from the create request (0) to terminate request + delay (30 + 5).
    assert scores.node_hours == pytest.approx(35 / 3600)
    # Terminated while booting: no booting/ready status, billed 0..5 s.
    early = Recorder(creates=1, terminate_at={0.0: "node-000000"})
    assert run_replay(trace, early).node_hours == pytest.approx(5 / 3600)
    assert early.statuses == [(5.0, "node-000000", "terminated")]


def test_node_counts_follow_every_status_change(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [], boot=[10.0, 20.0, 30.0]))

    class Counting(Recorder):
        def __init__(self) -> None:
            super().__init__(creates=3, terminate_at={5.0: "node-000001"})
            self.counts: dict[float, tuple[int, ...]] = {}

        async def tick(self, t: float) -> None:
            await super().tick(t)
            if t in (0.0, 1.0, 6.0, 11.0, 31.0):
                c = self.world.node_counts()
                self.counts[t] = (c.requested, c.booting, c.ready, c.terminating)

    policy = Counting()
    run_replay(trace, policy)
    # (requested, booting, ready, terminating): created at 0, booting from 0.2, node 1
    # terminated at 5 (gone at 10), node 0 ready at 10.2, node 2 at 30.2
    assert policy.counts == {0.0: (3, 0, 0, 0), 1.0: (0, 3, 0, 0), 6.0: (0, 2, 0, 1),
                             11.0: (0, 1, 1, 0), 31.0: (0, 0, 2, 0)}


def test_static_policy_hand_worked(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (5.0, "connect", "u1"), (7.0, "connect", "u1"), (50.0, "disconnect", "u1"),
        (50.5, "connect", "u2"), (60.0, "disconnect", "u2"), (70.0, "disconnect", "nobody"),
    ], boot=[10.0]))
    scores = run_replay(trace, StaticPolicy(1))
    # tick 0: spare 0 -> create n0 (ready 10.2). t=5: u1 misses; the tick at 5 comes after the
    # connect: spare 0+1-1 = 0 -> create n1 (ready 15.2). t=7: repeated connect, not counted.
    # 10.2: n0 serves u1 (wait 5.2). 15.2: n1 idle. 50: u1 leaves, n0 idle.
    # 50.5: u2 gets the longest-idle node, n1. 60: u2 leaves.
    # Billed: n0 0..100 + n1 5..100 = 195 s. Busy: 10.2..50 + 50.5..60 = 39.8 + 9.5 = 49.3 s.
    assert (scores.connects, scores.misses, scores.abandoned, scores.nodes_created) == (2, 1, 0, 2)
    assert scores.wait_p95_s == pytest.approx(5.2)
    assert scores.node_hours == pytest.approx(195 / 3600)
    assert scores.busy_hours == pytest.approx(49.3 / 3600)
    assert scores.cost_ratio == pytest.approx(195 / 49.3)


def test_band_policy_hand_worked(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (20.0, "connect", "u1"), (30.0, "disconnect", "u1"),
    ], boot=[10.0]))
    policy = BandPolicy("band", [(50.0, 0, 0, 20.0), (0.0, 1, 2, 0.0)])  # any order
    scores = run_replay(trace, policy)
    # From 0, boot below 1, reap above 2: tick 0 creates n0 (ready 10.2); u1 takes it at 20 and
    # the tick at 20 creates n1 (ready 30.2). At 30 u1 leaves: n0 idle, spare 2, nothing reaped.
    # From 50, reap above 0 once idle 20 s: n0 (idle since 30) goes at 50, n1 (since 30.2) at 51.
    # Billed: n0 0..50 + 5, n1 20..51 + 5 = 55 + 36 s.
    assert (scores.connects, scores.misses, scores.nodes_created) == (1, 0, 2)
    assert scores.node_hours == pytest.approx(91 / 3600)


def test_the_rate_oracle_replays_the_bands_bound_picks_at_its_price(tmp_path: Path) -> None:
    from provisioner.bench.bound import rate_oracle

    events = [(float(t), "connect", f"u{t}") for t in range(10, 1190, 30)]
    trace = load_trace(write_trace(tmp_path / "t.jsonl", events, duration=1200.0))
    policy = rate_oracle_policy(trace, 0.5, seconds=2_000)
    wins, (point,) = rate_oracle(trace, seconds=2_000, thetas=(0.5,))
    assert policy.name == "rate-oracle-0.5"
    assert policy.schedule == [(w.start_s, b.boot_to, b.reap_above, b.idle_s)
                               for w, b in zip(wins, point.bands, strict=True)]
    assert policy.band(599.0) == policy.schedule[0] and policy.band(600.0) == policy.schedule[1]
    hourly = make_policy("rate-oracle-0.5-w1200", trace)
    assert isinstance(hourly, BandPolicy) and hourly.name == "rate-oracle-0.5-w1200"
    assert [b[0] for b in hourly.schedule] == [0.0]  # one window for the whole 1200 s


@pytest.mark.parametrize("name", ["rate-oracle-", "rate-oracle-x", "rate-oracle-0",
                                  "rate-oracle--1", "rate-oracle-nan", "rate-oracle-inf",
                                  "rate-oracle-0.5-w", "rate-oracle-0.5-w30",
                                  "rate-oracle-0.5-wx", "rate-oracle-0.5-winf"])
def test_a_rate_oracle_needs_a_positive_finite_price(name: str) -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        policy_factory(name)


def test_node_ready_at_the_instant_of_a_connect_serves_it(tmp_path: Path) -> None:
    # static-1 creates at tick 0; the node is ready at 0.2 + 10 = 10.2, the instant u1 connects.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [(10.2, "connect", "u1")], boot=[10.0]))
    assert run_replay(trace, StaticPolicy(1)).misses == 0


def test_waiting_user_who_leaves_is_abandoned(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (1.0, "connect", "u1"), (2.0, "disconnect", "u1"), (3.0, "connect", "u2"),
    ], boot=[200.0]))
    scores = run_replay(trace, make_policy("reactive"))
    assert (scores.connects, scores.misses, scores.abandoned) == (2, 2, 2)


SESSIONS = [(float(t), kind, f"u{t // 40}") for t in range(45, 440, 20)
            for kind in (["connect"] if t % 40 == 5 else ["disconnect"])]


@pytest.mark.parametrize("name", ["static-2", "reactive", "keepalive-10m", "seed-count",
                                  "hybrid-histogram", "clairvoyant", "rate-oracle-1"])
def test_replays_are_deterministic_and_legal(tmp_path: Path, name: str) -> None:
    events = [(t - 1.5, "activity", user) for t, _, user in SESSIONS] + SESSIONS
    events.sort(key=lambda e: e[0])
    trace = load_trace(write_trace(tmp_path / "t.jsonl", events, duration=500.0))
    first = run_replay(trace, make_policy(name, trace))
    assert first == run_replay(trace, make_policy(name, trace))
    assert first.connects == 10


def test_clairvoyant_has_nodes_ready_in_time(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", SESSIONS, duration=500.0))
    scores = run_replay(trace, make_policy("clairvoyant", trace))
    # 20 s sessions 20 s apart: keeping the one node beats rebooting (5 + 0.2 + 10 s).
    # First connect at 45, boot 10 s: created at the last tick t with 45 - 0.2 - 10 < t + 1,
    # t = 34. The last session ends at 425: terminated then, billed until 430.
    assert (scores.misses, scores.nodes_created) == (0, 1)
    assert scores.node_hours == pytest.approx((430 - 34) / 3600)


class Cheat(StaticPolicy):
    def __init__(self, how: str) -> None:
        super().__init__(1)
        self.how = how

    async def on_connect(self, t: float, user_id: str) -> None:
        if self.how == "booting-node":
            self.world.report_hit(user_id, next(iter(self.booting)))
        elif self.how == "miss-with-ready-node":
            self.world.report_miss(user_id)
        elif self.how == "silent":
            return
        elif self.how == "twice" and user_id in self.holding:
            self.world.report_hit(user_id, self.world.create_node() or "")
        else:
            await super().on_connect(t, user_id)

    async def on_disconnect(self, t: float, user_id: str) -> None:
        if self.how == "terminate-allocated":
            self.world.terminate_node(self.holding[user_id])
        elif self.how != "keep-node":
            await super().on_disconnect(t, user_id)


@pytest.mark.parametrize(("how", "message"), [
    ("booting-node", "not ready and free"),
    ("miss-with-ready-node", "is ready and free while"),
    ("silent", "neither a hit nor a miss"),
    ("twice", "whose counted connect is not being handled"),
    ("terminate-allocated", "which is allocated"),
    ("keep-node", "did not free the node"),
])
def test_world_catches_cheating_policies(tmp_path: Path, how: str, message: str) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (5.0, "connect", "u1"), (30.0, "connect", "u2"), (31.0, "connect", "u2"),
        (40.0, "disconnect", "u2"),
    ], boot=[10.0]))
    with pytest.raises(PolicyViolation, match=message):
        run_replay(trace, Cheat(how))


def test_world_catches_a_swallowed_violation_and_queue_jumping(tmp_path: Path) -> None:
    class Swallow(StaticPolicy):
        async def on_connect(self, t: float, user_id: str) -> None:
            try:
                self.world.report_hit(user_id, "node-000000")  # still booting
            except PolicyViolation:
                await super().on_connect(t, user_id)

    class JumpQueue(StaticPolicy):
        def _free(self, t: float, node_id: str) -> None:
            self.waiting.move_to_end(next(iter(self.waiting)))  # serve the newest first
            super()._free(t, node_id)

    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (5.0, "connect", "u1"), (6.0, "connect", "u2")], boot=[10.0]))
    with pytest.raises(PolicyViolation, match="not ready and free"):
        run_replay(trace, Swallow(1))
    with pytest.raises(PolicyViolation, match="oldest waiting user is u1"):
        run_replay(trace, JumpQueue(1))


def test_suite_runs_named_and_extra_policies(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "tiny.jsonl.gz", SESSIONS, duration=500.0)
    seen: list[str] = []

    def factory(trace: Trace) -> StaticPolicy:
        return StaticPolicy(3)

    rows = run_suite([path], ["static-best", "clairvoyant"], extra_policies={"mine": factory},
                     progress=lambda row: seen.append(row.policy))
    assert seen == ["static-best", "clairvoyant", "mine"]
    assert rows[0].detail.startswith("K=")
    assert rows[0].scores.miss_rate <= 0.01
    table = markdown_table(rows)
    assert "| tiny | clairvoyant | 10 |" in table and "| tiny | mine |" in table
    with pytest.raises(ValueError, match="unknown policy"):
        run_suite([path], ["static-x"])
    pytest.importorskip("matplotlib")
    pareto_plot(rows, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_warm_up_plays_earlier_copies_with_their_own_users(tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (1.0, "activity", "u1"), (2.0, "connect", "u1"), (50.0, "disconnect", "u1"),
        (60.0, "activity", "u2"), (70.0, "connect", "u2"),  # still connected at the end
    ]))
    assert trace.warmed_up(0) is trace
    warm = trace.warmed_up(2)
    assert (warm.duration_s, warm.scored_from_s) == (300.0, 200.0)
    assert warm.boot_delays == trace.boot_delays
    seen = [(e.t, e.channel.split(":")[1], e.msg["user_id"], e.msg.get("timestamp"))
            for e in warm.events]
    stamp = 1_767_225_600
    # Warm-up copies: their own users; the session open at the end browses but never connects.
    assert seen[:8] == [
        (1.0, "activity", "u1.w2", stamp + 1), (2.0, "connect", "u1.w2", None),
        (50.0, "disconnect", "u1.w2", None), (60.0, "activity", "u2.w2", stamp + 60),
        (101.0, "activity", "u1.w1", stamp + 101), (102.0, "connect", "u1.w1", None),
        (150.0, "disconnect", "u1.w1", None), (160.0, "activity", "u2.w1", stamp + 160),
    ]
    # The scored copy is the trace itself, moved; its users keep their ids.
    assert seen[8:] == [
        (201.0, "activity", "u1", stamp + 201), (202.0, "connect", "u1", None),
        (250.0, "disconnect", "u1", None), (260.0, "activity", "u2", stamp + 260),
        (270.0, "connect", "u2", None),
    ]
    with pytest.raises(ValueError, match="copies"):
        trace.warmed_up(-1)


def test_a_warm_replay_scores_only_the_scored_copy(tmp_path: Path) -> None:
    events = [(t - 1.5, "activity", user) for t, _, user in SESSIONS] + SESSIONS
    events.sort(key=lambda e: e[0])
    trace = load_trace(write_trace(tmp_path / "t.jsonl", events, duration=500.0))
    cold = run_replay(trace, StaticPolicy(2))
    warm = run_replay(trace.warmed_up(1), StaticPolicy(2))
    # The same sessions are scored; the pool is already up when they start, so the warm replay
    # pays no boot before the first connect.
    assert (warm.connects, warm.busy_hours) == (cold.connects, pytest.approx(cold.busy_hours))
    assert cold.misses == 0 and warm.misses == 0
    assert warm.nodes_created < cold.nodes_created
    # One session at a time, 20 s in every 40: two spare nodes plus the one in use (or just
    # freed, and reaped only after 300 s idle) are up for all of the scored 500 s.
    assert warm.node_hours == pytest.approx(3 * 500 / 3600)
    rows = run_suite([tmp_path / "t.jsonl"], ["static-best"], warm_up=1)
    assert rows[0].scores.connects == cold.connects


def test_a_suite_at_a_boot_offset_replays_that_draw_and_picks_its_static_best(
        tmp_path: Path) -> None:
    path = write_trace(tmp_path / "draw.jsonl", SESSIONS, boot=[5.0, 90.0, 90.0],
                       duration=500.0)
    trace = load_trace(path)
    rows = {offset: run_suite([path], ["static-best"], boot_offset=offset,
                              extra_policies={"static-1": lambda t: StaticPolicy(1)})
            for offset in (0, 1)}
    for offset, (best, one) in rows.items():
        drawn = trace.with_boot_offset(offset)
        k = int(best.detail.removeprefix("K="))
        assert best.scores == run_replay(drawn, StaticPolicy(k))
        assert one.scores == run_replay(drawn, StaticPolicy(1))
    # The draws differ (the first boot takes 5 s or 90 s), so the offset is not ignored.
    assert rows[0][1].scores != rows[1][1].scores


def test_the_reference_check_holds_the_cost_ratio_to_the_third_decimal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It allowed 2% either way (0.026-0.038 on these traces): a scoreboard billing nodes from
    # ready, not from the create, passed it on four of the six.
    from provisioner.bench import suite
    from provisioner.bench.baselines import StaticPolicy
    from provisioner.bench.trace import load_trace
    from provisioner.bench.world import run_replay

    # Connects once a static pool has booted (boots take 10-20 s here), one at a time.
    events = [(100.0 + 60 * i, "connect", f"u{i}") for i in range(5)]
    events += [(130.0 + 60 * i, "disconnect", f"u{i}") for i in range(5)]
    path = write_trace(tmp_path / "tiny.jsonl.gz", sorted(events), duration=500.0)
    trace = load_trace(path)
    k = next(k for k in range(10) if run_replay(trace, StaticPolicy(k)).miss_rate <= 0.01)
    scores = run_replay(trace, StaticPolicy(k))
    shown = round(scores.cost_ratio, 3)

    def check(cost_ratio: float) -> list[str]:
        monkeypatch.setattr(suite, "REFERENCE", {"tiny": suite.Reference(
            scores.connects, 1.0, k, cost_ratio)})
        return suite.check_reference(tmp_path)

    assert check(shown) == []
    assert check(round(shown + 0.002, 3)) == [
        f"tiny: static-{k} cost ratio {scores.cost_ratio:.3f}, reference {shown + 0.002:.3f}"]


def test_the_reference_check_takes_a_cost_ratio_exactly_its_tolerance_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1.3075 against the table's 1.307 is 0.0005 off, the tolerance, but computes as
    0.000500000000000167: the check's 1e-9 of slack takes it, and only it (untested: dropping
    the slack passed). The replay is replaced, to score exactly these figures."""
    from provisioner.bench import suite
    from provisioner.bench.scoring import Scores

    write_trace(tmp_path / "tiny.jsonl.gz", [], duration=100.0)
    monkeypatch.setattr(suite, "REFERENCE", {"tiny": suite.Reference(10, 1.0, 4, 1.307)})

    def check(cost_ratio: float) -> list[str]:
        def replay(trace: Trace, policy: Any) -> Scores:
            misses = 0 if policy.k == 4 else 5  # static-4 meets 1%, static-3 does not
            return Scores(10, misses, misses / 10, 0.0, 0, 4, cost_ratio, 1.0, cost_ratio)

        monkeypatch.setattr(suite, "run_replay", replay)
        return suite.check_reference(tmp_path)

    assert abs(1.3075 - 1.307) > 0.0005  # what the slack is for
    for taken in (1.3075, 1.3065):
        assert check(taken) == [], taken
    for past in (1.3076, 1.3064, 1.31):
        assert check(past) == [f"tiny: static-4 cost ratio {past:.3f}, reference 1.307"], past


class _OneNode(PoolPolicy):
    def __init__(self) -> None:
        super().__init__("one-node")

    async def start(self, world: World) -> None:
        await super().start(world)
        self.create()


class _TerminatesFreedNode(_OneNode):
    def _free(self, t: float, node_id: str) -> None:
        if self.waiting:
            self.world.terminate_node(node_id)  # instead of serving the oldest waiting user
            return
        super()._free(t, node_id)


class _TerminatesReadyNode(PoolPolicy):
    def __init__(self) -> None:
        super().__init__("terminates-ready")

    def on_miss(self, t: float, user_id: str) -> None:
        self.create()

    async def on_node_status(self, t: float, node_id: str, status: str) -> None:
        if status == "ready" and node_id in self.booting and self.waiting:
            del self.booting[node_id]
            self.world.terminate_node(node_id)
            return
        await super().on_node_status(t, node_id, status)


def test_a_node_freed_or_ready_while_a_user_waits_cannot_be_terminated_instead(
        tmp_path: Path) -> None:
    """Found by a review: the world let a policy terminate a node that became ready or was
    freed while a user waited, where FORMAT.md gives it to the oldest waiting user; the user
    then ended the replay abandoned, left out of the waits' percentile (wait_p95_s 0.0 where
    serving them gave 10.0)."""
    freed = load_trace(write_trace(tmp_path / "freed.jsonl", [
        (20.0, "connect", "u1"), (30.0, "connect", "u2"), (40.0, "disconnect", "u1"),
    ], boot=[10.0], duration=100.0))
    with pytest.raises(PolicyViolation, match="ready and free while u2 waits"):
        run_replay(freed, _TerminatesFreedNode())
    ready = load_trace(write_trace(tmp_path / "ready.jsonl", [(20.0, "connect", "u1")],
                                   boot=[10.0], duration=100.0))
    with pytest.raises(PolicyViolation, match="ready and free while u1 waits"):
        run_replay(ready, _TerminatesReadyNode())
    # Served instead, as the rules say, the same traffic replays.
    assert run_replay(freed, _OneNode()).misses == 1


def test_a_connect_at_the_instant_the_books_close_is_delivered_and_counted(
        tmp_path: Path) -> None:
    # Events at t = duration_s are part of the trace (the loader refuses only later ones): the
    # static pool's node is ready from 10.2, so the connect at 100 is a counted hit.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [(100.0, "connect", "u1")],
                                   boot=[10.0], duration=100.0))
    scores = run_replay(trace, StaticPolicy(1))
    assert (scores.connects, scores.misses, scores.abandoned) == (1, 0, 0)


def test_static_k_reaps_ready_nodes_idle_300_s_or_more_while_more_than_k_are_ready(
        tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (20.0, "connect", "u1"), (35.0, "connect", "u2"),
        (50.0, "disconnect", "u1"), (60.0, "disconnect", "u2"),
    ], boot=[10.0], duration=400.0))

    class Watched(StaticPolicy):
        def __init__(self) -> None:
            super().__init__(1)
            self.terminated: list[tuple[float, str]] = []

        async def on_node_status(self, t: float, node_id: str, status: str) -> None:
            if status == "terminated":
                self.terminated.append((t, node_id))
            await super().on_node_status(t, node_id, status)

    policy = Watched()
    scores = run_replay(trace, policy)
    # tick 0 creates n0 (ready 10.2); u1 takes it at 20 and the tick at 20 creates n1 (ready
    # 30.2); u2 takes n1 at 35 and the tick at 35 creates n2 (ready 45.2). Ready and idle, oldest
    # first: n2 since 45.2, n0 since 50, n1 since 60. n2 is idle 300 s or more first at the tick
    # of 346 (300.8 s); n0 at 350, exactly 300 s, which FORMAT.md's "idle >= 300 s" reaps. Then
    # one node is ready, K = 1: n1 stays. Terminated 5 s after the request.
    assert policy.terminated == [(351.0, "node-000002"), (355.0, "node-000000")]
    assert (scores.connects, scores.misses) == (2, 0)
    # Billed: n0 0..355, n1 20..400, n2 35..351 = 355 + 380 + 316 s.
    assert scores.node_hours == pytest.approx(1051 / 3600)
    assert scores.busy_hours == pytest.approx((30 + 25) / 3600)


def _one_at_a_time(extra: list[tuple[float, str, str]], sessions: int) -> list[
        tuple[float, str, str]]:
    """u0 connects at 1, before any node can be ready (every boot takes 10.2 s), and leaves at
    15; then `sessions` users one at a time, 5 s each, every 10 s from 20: a static pool of
    one or more serves all of those."""
    events = [(1.0, "connect", "u0"), (15.0, "disconnect", "u0")]
    for i in range(sessions):
        events += [(20.0 + 10 * i, "connect", f"s{i}"), (25.0 + 10 * i, "disconnect", f"s{i}")]
    return sorted(events + extra, key=lambda e: e[0])


def test_static_best_is_the_smallest_k_with_a_miss_rate_of_at_most_one_percent(
        tmp_path: Path) -> None:
    from provisioner.bench.baselines import best_static

    # 100 connects; every pool misses u0's (static-0 too, then boots a node for the waiting u0
    # and serves every session with it): 1% exactly, inside the target, so K = 0.
    exact = load_trace(write_trace(tmp_path / "exact.jsonl", _one_at_a_time([], 99),
                                   boot=[10.0], duration=1100.0))
    k, scores = best_static(exact)
    assert (k, scores.connects, scores.misses) == (0, 100, 1)
    # 199 connects; three users connect at once at 2000, when static-K has K + 1 nodes ready (it
    # made one more for u0's miss, and the sessions take them in turn, so none idles 300 s):
    # static-1 misses 2 of 199 (1.005%, over the target), static-2 1.
    burst = [(2000.0, "connect", f"b{i}") for i in range(3)]
    burst += [(2005.0, "disconnect", f"b{i}") for i in range(3)]
    over = load_trace(write_trace(tmp_path / "over.jsonl", _one_at_a_time(burst, 195),
                                  boot=[10.0], duration=2100.0))
    assert run_replay(over, StaticPolicy(1)).misses == 2
    k, scores = best_static(over)
    assert (k, scores.connects, scores.misses) == (2, 199, 1)



def test_max_nodes_counts_ready_and_allocated_nodes_too(tmp_path: Path) -> None:
    # FORMAT.md: booting + ready + allocated nodes count against max_nodes. static-2 creates
    # two at tick 0 (ready 10.2); u1 takes one at 15, and the tick at 15 asks for a third,
    # which the quota of 2 refuses (one allocated and one ready exist), at every later tick too.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [(15.0, "connect", "u1")],
                                   boot=[10.0], max_nodes=2))
    assert run_replay(trace, StaticPolicy(2)).nodes_created == 2


class _LateCheat(StaticPolicy):
    """static-1 with one illegal step (the ones `Cheat` does not try)."""

    def __init__(self, how: str) -> None:
        super().__init__(1)
        self.how = how

    async def on_disconnect(self, t: float, user_id: str) -> None:
        if self.how == "ignore-waiting-user-leaving" and user_id in self.waiting:
            return  # the user stays in line and would be served after leaving
        await super().on_disconnect(t, user_id)

    async def tick(self, t: float) -> None:
        if self.how == "hand-out-terminated-node" and t == 20.0:
            self.world.terminate_node(next(iter(self.ready)))  # but kept in its own pool
        if self.how == "release-without-disconnect" and t == 35.0:
            self.world.report_released(next(iter(self.holding)))
        await super().tick(t)


@pytest.mark.parametrize(("how", "message"), [
    ("ignore-waiting-user-leaving", "did not free the node or the wait"),
    ("hand-out-terminated-node", "allocated node-000000 to u2, but it is not ready and free"),
    ("release-without-disconnect", "released u2, who is not disconnecting now"),
])
def test_world_catches_a_waiting_user_kept_a_terminated_node_handed_out_and_an_early_release(
        tmp_path: Path, how: str, message: str) -> None:
    # tick 0 creates n0 (ready 10.2); u1 misses at 5 and leaves waiting at 6; n0 is idle from
    # 10.2; u2 takes the longest-idle node at 30 and holds it past 35.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (5.0, "connect", "u1"), (6.0, "disconnect", "u1"), (30.0, "connect", "u2"),
    ], boot=[10.0]))
    assert run_replay(trace, StaticPolicy(1)).abandoned == 1
    with pytest.raises(PolicyViolation, match=message):
        run_replay(trace, _LateCheat(how))


def test_boot_offset_rotates_the_delays_to_start_at_that_index(tmp_path: Path) -> None:
    # Three delays, so starting at index 1 differs from rotating the other way (two cannot tell).
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [], boot=[10.0, 20.0, 30.0]))
    assert trace.with_boot_offset(1).boot_delays == (20.0, 30.0, 10.0)
    assert trace.with_boot_offset(5).boot_delays == (30.0, 10.0, 20.0)
    assert trace.with_boot_offset(3).boot_delays == trace.boot_delays


def test_reactive_boots_one_node_per_miss_and_reaps_it_only_after_more_than_keep_s(
        tmp_path: Path) -> None:
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (5.0, "connect", "u1"), (30.0, "disconnect", "u1")], boot=[10.0], duration=400.0))
    scores = run_replay(trace, make_policy("reactive"))
    # u1 misses at 5 and one node is created for it (ready 15.2); idle from 30, it is not
    # reaped at 330 (idle exactly 300 s) but at 331; billed 5..336.
    assert (scores.misses, scores.nodes_created) == (1, 1)
    assert scores.wait_p95_s == pytest.approx(10.2)
    assert scores.node_hours == pytest.approx(331 / 3600)


def test_future_demand_skips_repeated_connects_and_disconnects_with_no_session(
        tmp_path: Path) -> None:
    from provisioner.bench.baselines import future_demand

    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (1.0, "connect", "a"), (2.0, "connect", "a"), (3.0, "disconnect", "b"),
        (5.0, "disconnect", "a"), (7.0, "connect", "a")]))
    assert future_demand(trace) == ([1.0, 7.0], [5.0])


def test_clairvoyant_counts_supply_first_at_equal_times_and_waiting_users_as_uncovered(
        tmp_path: Path) -> None:
    from provisioner.bench.baselines import ClairvoyantPolicy

    # b's release at 10 can serve a's connect at 10 (supply first); c's at 20 has no node.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (1.0, "connect", "b"), (10.0, "connect", "a"), (10.0, "disconnect", "b"),
        (20.0, "connect", "c")]))
    policy = ClairvoyantPolicy(trace)
    assert policy.uncovered(5.0, 30.0) == [20.0]
    # A user already waiting takes the release first, so both connects lack a node; after the
    # release, the waiting user lacks one now.
    policy.waiting["w"] = 4.0
    assert policy.uncovered(5.0, 30.0) == [10.0, 20.0]
    assert policy.uncovered(11.0, 30.0) == [11.0, 20.0]


def test_clairvoyant_times_each_uncovered_connect_by_the_boot_it_would_get(
        tmp_path: Path) -> None:
    # Four connects at 100; boots 10, 10, 10, 50. The fourth connect would get the 50 s boot,
    # due before t + 1 at 100 - 0.2 - 50 = 49.8: at the tick of 49 four nodes are created (each
    # look sees the fourth uncovered connect still due). The three 10 s nodes, ready at 59.2,
    # are not needed before a replacement could boot and are given up; three more come at 89.
    # Judging every connect by the next boot, or looking at three, reaches the 50 s boot at 89
    # and makes a fifth node instead (5 nodes: a rule the committed clairvoyant figures are not).
    events = [(100.0, "connect", f"u{i}") for i in range(4)]
    trace = load_trace(write_trace(tmp_path / "t.jsonl", events, boot=[10.0, 10.0, 10.0, 50.0],
                                   duration=200.0))
    scores = run_replay(trace, make_policy("clairvoyant", trace))
    assert (scores.misses, scores.nodes_created) == (0, 7)


def test_clairvoyant_creates_at_the_last_tick_that_is_in_time_and_keeps_a_node_needed_soon(
        tmp_path: Path) -> None:
    # u1 at 45.2, boot 10: created at 35 (45.2 - 0.2 - 10 = 35 < 35 + 1; not yet at 34), ready
    # exactly at 45.2. Freed at 50, it is kept for u2 at 63: a replacement would be billed the
    # 5 s terminate delay plus its own boot (the window: 5 + 0.2 + 10 + 1 s). Terminated when
    # u2 leaves at 70, billed 35..75.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (45.2, "connect", "u1"), (50.0, "disconnect", "u1"), (63.0, "connect", "u2"),
        (70.0, "disconnect", "u2")], boot=[10.0]))
    scores = run_replay(trace, make_policy("clairvoyant", trace))
    assert (scores.misses, scores.nodes_created) == (0, 1)
    assert scores.node_hours == pytest.approx(40 / 3600)


def test_hybrid_histogram_windows_by_nearest_rank_bins() -> None:
    from provisioner.bench.baselines import HybridHistogramPolicy

    policy = HybridHistogramPolicy()
    policy.bins[2], policy.bins[3], policy.bins[7] = 1, 18, 1
    policy.samples = 9
    assert policy.windows() == (0.0, 600.0)  # fewer than 10 gaps: the fixed fallback
    policy.samples = 20
    # 5th percentile: the 1st gap, in bin 2 -> pre-warm 2 min x 0.9; 99th: the 20th, in bin 7
    # -> keep-alive to its upper edge, 8 min x 1.1.
    assert policy.windows() == pytest.approx((108.0, 528.0))


def test_seed_count_counts_activities_in_the_last_two_minutes_not_at_their_start() -> None:
    from provisioner.bench.baselines import SeedCountPolicy

    policy = SeedCountPolicy()
    policy.recent["a"] = [0.0, 1.0, 2.0]
    assert policy.seeds(119.0) == 1
    assert policy.seeds(120.0) == 0  # the activity at 0 is outside (0, 120]


def test_a_suite_makes_a_fresh_policy_per_trace_and_replays_at_its_tick(tmp_path: Path) -> None:
    one = write_trace(tmp_path / "one.jsonl", SESSIONS, duration=500.0)
    two = write_trace(tmp_path / "two.jsonl", SESSIONS[:4], boot=[30.0], duration=300.0)
    made: list[str] = []

    def factory(trace: Trace) -> PoolPolicy:
        made.append(trace.name)
        return make_policy("seed-count")

    rows = run_suite([one, two], [], extra_policies={"seed-count": factory}, tick_s=7.0)
    assert made == ["one", "two"]
    for path, row in zip((one, two), rows, strict=True):
        assert row.scores == run_replay(load_trace(path), make_policy("seed-count"), tick_s=7.0)
    # The tick is not ignored: at 7 s the pool is topped up at other instants than at 1 s.
    assert rows[0].scores != run_replay(load_trace(one), make_policy("seed-count"))


def test_the_table_prints_each_figure_to_its_committed_precision() -> None:
    from provisioner.bench.scoring import Scores
    from provisioner.bench.suite import Row

    scores = Scores(connects=722, misses=4, miss_rate=4 / 722, wait_p95_s=21.06, abandoned=1,
                    nodes_created=269, node_hours=203.3649, busy_hours=174.0312,
                    cost_ratio=203.3649 / 174.0312)
    table = markdown_table([Row("diurnal", "static-best", scores, 21.84, "K=6"),
                            Row("spike", "x", Scores(1, 0, 0.0, 0.0, 0, 1, 1.0, 0.0,
                                                     float("inf")), 0.04)])
    assert table.splitlines()[2:] == [
        "| diurnal | static-best (K=6) | 722 | 4 | 0.55% | 21.1 | 1 | 269 | 203.36 | 174.03 "
        "| 1.169 | 21.8 |",
        "| spike | x | 1 | 0 | 0.00% | 0.0 | 0 | 1 | 1.00 | 0.00 | inf | 0.0 |"]


def test_the_reference_check_holds_a_one_percent_miss_rate_and_flags_k_minus_one_at_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.bench import suite

    # 100 connects one at a time, 400 s apart (a freed node is reaped after 300 s idle); the
    # first lands before any node is up: static-1 misses exactly 1% of them (which meets the
    # bar), static-0 all.
    events = [(5.0, "connect", "u0"), (30.0, "disconnect", "u0")]
    events += [(400.0 * i, "connect", f"u{i}") for i in range(1, 100)]
    events += [(400.0 * i + 30, "disconnect", f"u{i}") for i in range(1, 100)]
    write_trace(tmp_path / "tiny.jsonl.gz", sorted(events), boot=[10.0], duration=40_000.0)
    trace = load_trace(tmp_path / "tiny.jsonl.gz")
    one, two = (run_replay(trace, StaticPolicy(k)) for k in (1, 2))
    assert (one.connects, one.misses, one.miss_rate) == (100, 1, 0.01)

    def check(k: int, cost_ratio: float) -> list[str]:
        monkeypatch.setattr(suite, "REFERENCE", {"tiny": suite.Reference(100, 1.0, k,
                                                                           cost_ratio)})
        return suite.check_reference(tmp_path)

    assert check(1, round(one.cost_ratio, 3)) == []
    # At K=2 the table would be wrong: static-1 already meets 1%.
    assert check(2, round(two.cost_ratio, 3)) == ["tiny: static-1 already meets 1% (1.00%)"]
    # K=1 is checked against static-0 too: on a trace without connects it meets 1% as well.
    write_trace(tmp_path / "tiny.jsonl.gz", [], boot=[10.0], duration=100.0)
    monkeypatch.setattr(suite, "REFERENCE", {"tiny": suite.Reference(0, 1.0, 1, 1.0)})
    assert "tiny: static-0 already meets 1% (0.00%)" in suite.check_reference(tmp_path)


def test_a_node_ready_at_a_connect_s_instant_serves_it_whatever_the_float_sum(
        tmp_path: Path) -> None:
    # FORMAT.md: the node is ready api_latency + boot_delay = 0.2 + 5.001 = 5.201 s after its
    # create at tick 0, the instant u1 connects; in floats 0.2 + 5.001 = 5.2010000000000005.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [(5.201, "connect", "u1")],
                                   boot=[5.001]))
    scores = run_replay(trace, StaticPolicy(1))
    assert (scores.misses, scores.wait_p95_s) == (0, 0.0)


class _TerminatesTheFreeNodeThenMisses(StaticPolicy):
    """static-1 that, on a connect, terminates the ready and free node and reports a miss."""

    async def on_connect(self, t: float, user_id: str) -> None:
        for node_id in list(self.ready):
            del self.ready[node_id]
            self.world.terminate_node(node_id)
        await super().on_connect(t, user_id)


def test_a_connect_cannot_be_made_a_miss_by_terminating_the_ready_node_it_would_get(
        tmp_path: Path) -> None:
    # static-1's node is ready and free from 10.2; u1 connects at 50, when it could be assigned.
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [(50.0, "connect", "u1")],
                                   boot=[10.0]))
    assert run_replay(trace, StaticPolicy(1)).misses == 0
    with pytest.raises(PolicyViolation, match="ready and free while the connect of u1"):
        run_replay(trace, _TerminatesTheFreeNodeThenMisses(1))


class _SeesTime(StaticPolicy):
    """static-1 from its fourth tick on, noting every instant it is told of."""

    def __init__(self) -> None:
        super().__init__(1)
        self.instants: list[float] = []

    async def tick(self, t: float) -> None:
        self.instants.append(t)
        if t > 0.25:
            await super().tick(t)

    async def on_node_status(self, t: float, node_id: str, status: str) -> None:
        self.instants.append(t)
        await super().on_node_status(t, node_id, status)


def test_a_node_s_times_rounded_never_fall_before_its_create(tmp_path: Path) -> None:
    # FORMAT.md allows api_latency_s 0: a create at the tick 3 * 0.1 = 0.30000000000000004
    # boots at that instant, which the nanosecond's rounding made 0.3, before the create.
    path = write_trace(tmp_path / "t.jsonl", [], boot=[1.0], duration=2.0)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["nodes"]["api_latency_s"] = 0.0
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    policy = _SeesTime()
    asyncio.run(World(load_trace(path), policy, tick_s=0.1).run())
    assert policy.instants == sorted(policy.instants), [
        (a, b) for a, b in itertools.pairwise(policy.instants) if b < a]
