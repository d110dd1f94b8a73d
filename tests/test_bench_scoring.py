"""The replay scoreboard, on tiny hand-worked scenarios."""

from __future__ import annotations

import dataclasses
import math

import pytest

from provisioner.bench.scoring import Scoreboard, Scores, nearest_rank


def test_two_nodes_three_connects_one_miss() -> None:
    board = Scoreboard(duration_s=100.0, terminate_delay_s=5.0)
    board.node_created("a", 0.0)
    board.node_created("b", 10.0)
    board.connect_hit("u1", "a", 20.0)
    board.connect_miss("u2", 30.0)
    board.served_after_wait("u2", "b", 40.0)  # waited 40 - 30 = 10 s
    board.released("u1", 50.0)  # busy 50 - 20 = 30 s
    board.connect_hit("u3", "a", 60.0)
    board.released("u3", 70.0)  # busy 70 - 60 = 10 s
    board.node_terminate_requested("a", 80.0)  # billed until 80 + 5 = 85
    scores = board.close()
    # u2 still holds b at the end: busy 100 - 40 = 60 s; busy total 30 + 60 + 10 = 100 s.
    # a billed 85 - 0 = 85 s; b never terminated: 100 - 10 = 90 s; total 175 s.
    assert scores == Scores(
        connects=3,
        misses=1,
        miss_rate=pytest.approx(1 / 3),
        wait_p95_s=10.0,
        abandoned=0,
        nodes_created=2,
        node_hours=pytest.approx(175 / 3600),
        busy_hours=pytest.approx(100 / 3600),
        cost_ratio=pytest.approx(1.75),
    )


def test_abandoned_waits_and_billing_capped_at_the_end() -> None:
    board = Scoreboard(duration_s=60.0, terminate_delay_s=5.0)
    board.node_created("a", 0.0)
    board.connect_hit("u1", "a", 0.0)
    board.released("u1", 30.0)  # busy 30 s
    board.node_terminate_requested("a", 58.0)  # 58 + 5 = 63 > 60: billed 60 s
    board.connect_miss("u2", 10.0)
    board.waiting_user_left("u2", 20.0)  # abandoned; its wait is not a served wait
    board.connect_miss("u3", 40.0)  # still waiting at the end: abandoned too
    scores = board.close()
    assert (scores.connects, scores.misses, scores.abandoned) == (3, 2, 2)
    assert scores.wait_p95_s == 0.0
    assert scores.node_hours == pytest.approx(60 / 3600)
    assert scores.cost_ratio == pytest.approx(60 / 30)
    assert board.close() == scores  # closing is repeatable


def test_node_time_splits_the_billed_hours() -> None:
    board = Scoreboard(duration_s=100.0, terminate_delay_s=5.0, scored_from_s=10.0)
    board.node_created("a", 0.0)
    board.node_ready("a", 30.0)  # booting 0-30, 20 s of it scored
    board.connect_hit("u1", "a", 40.0)
    board.released("u1", 60.0)  # busy 20 s
    board.node_terminate_requested("a", 80.0)  # terminating 80-85
    board.node_created("b", 50.0)
    board.node_terminate_requested("b", 70.0)  # never ready: booting 50-70, terminating 70-75
    board.node_created("c", 90.0)  # still booting at the end: 10 s
    time = board.node_time()
    scores = board.close()
    assert time.billed_hours == pytest.approx(scores.node_hours)
    assert time.busy_hours == pytest.approx(scores.busy_hours)
    assert time.booting_hours * 3600 == pytest.approx(20 + 20 + 10)
    assert time.terminating_hours * 3600 == pytest.approx(5 + 5)
    # a: 75 s billed in the window (10-85), b 25, c 10: 110 s = 20 busy + 50 + 10 + 30 idle
    assert scores.node_hours * 3600 == pytest.approx(110)
    assert time.idle_ready_hours * 3600 == pytest.approx(30)
    assert time.describe() == (
        "node time: 0.03 h billed = 0.01 busy + 0.01 booting + 0.01 ready and idle + "
        "0.00 terminating")


def test_given_up_counts_the_terminations_a_create_followed_within_a_boot() -> None:
    board = Scoreboard(duration_s=1000.0, terminate_delay_s=5.0, scored_from_s=100.0)
    board.node_created("early", 0.0)
    board.node_ready("early", 50.0)
    board.node_terminate_requested("early", 90.0)  # before the scored window: not counted
    board.node_created("c0", 95.0)  # would follow it; taken by nothing
    for node, ready in (("r1", 150.0), ("r2", 150.0), ("r3", 150.0)):
        board.node_created(node, 110.0)
        board.node_ready(node, ready)
    board.node_terminate_requested("r1", 200.0)
    board.node_terminate_requested("r2", 201.0)
    board.node_created("c1", 230.0)  # follows r1 within 60 s
    board.node_created("c2", 262.0)  # r2's create came 61 s after it: not within
    board.node_terminate_requested("r3", 500.0)  # nothing after it
    board.node_created("b1", 600.0)
    board.node_terminate_requested("b1", 610.0)  # given up booting
    board.node_created("c3", 640.0)  # follows it
    board.node_created("c4", 641.0)  # one create each: not counted again
    board.node_terminate_requested("c3", 700.0)  # booting at 700 (never ready), nothing after
    given = board.given_up(60.0)
    assert (given.ready, given.booting, given.ready_followed, given.booting_followed) == (
        3, 2, 1, 1)
    assert given.describe() == (
        "given up: 5 nodes terminated (3 ready, 2 booting); a create followed 1 of the ready "
        "and 1 of the booting within 60s, one mean boot")
    # two terminations, one create after both: it answers for the first only
    board = Scoreboard(duration_s=100.0, terminate_delay_s=5.0)
    for node in ("a", "b"):
        board.node_created(node, 0.0)
        board.node_ready(node, 1.0)
        board.node_terminate_requested(node, 10.0)
    board.node_created("c", 20.0)
    assert board.given_up(60.0).ready_followed == 1


def test_unserved_counts_the_nodes_created_in_the_window_that_no_session_held() -> None:
    board = Scoreboard(duration_s=1000.0, terminate_delay_s=5.0, scored_from_s=100.0)
    board.node_created("warm", 0.0)  # created before the scored window: not counted
    board.node_ready("warm", 50.0)
    board.node_created("hit", 110.0)
    board.node_ready("hit", 170.0)
    board.connect_hit("u1", "hit", 200.0)
    board.node_created("waited", 120.0)
    board.connect_miss("u2", 150.0)
    board.node_ready("waited", 180.0)
    board.served_after_wait("u2", "waited", 180.0)
    board.node_created("idle", 300.0)
    board.node_ready("idle", 360.0)
    board.node_terminate_requested("idle", 600.0)  # billed 300-605, 60 s of it booting
    board.node_created("given-up", 700.0)
    board.node_terminate_requested("given-up", 730.0)  # billed 700-735, all booting
    board.node_created("late", 990.0)  # still booting at the end: 10 s
    unserved = board.unserved()
    assert (unserved.created, unserved.unserved) == (5, 3)
    assert unserved.billed_hours * 3600 == pytest.approx(305 + 35 + 10)
    assert unserved.booting_hours * 3600 == pytest.approx(60 + 30 + 10)
    assert unserved.describe() == (
        "never served: 3 of the 5 nodes created held no session, 0.10 h billed (0.03 h of it "
        "booting)")


def test_nearest_rank_percentile() -> None:
    assert nearest_rank([], 95.0) == 0.0
    # 20 waits 1..20: rank ceil(0.95 * 20) = 19 -> 19.
    assert nearest_rank([float(x) for x in range(20, 0, -1)], 95.0) == 19.0
    # 21 waits: rank ceil(0.95 * 21) = ceil(19.95) = 20 -> 20.
    assert nearest_rank([float(x) for x in range(1, 22)], 95.0) == 20.0
    assert nearest_rank([7.0], 95.0) == 7.0
    # 11 waits: rank ceil(0.95 * 11) = ceil(10.45) = 11, the largest; rounding 10.45 would
    # take the 10th and put a 95th percentile below 10 of the 11 waits' 95%.
    assert nearest_rank([float(x) for x in range(1, 12)], 95.0) == 11.0


def test_cost_ratio_without_busy_time() -> None:
    idle = Scoreboard(duration_s=10.0, terminate_delay_s=5.0)
    idle.node_created("a", 0.0)
    assert math.isinf(idle.close().cost_ratio)
    nothing = Scoreboard(duration_s=10.0, terminate_delay_s=5.0).close()
    assert (nothing.cost_ratio, nothing.miss_rate, nothing.node_hours) == (0.0, 0.0, 0.0)


def test_scores_fields_in_order() -> None:
    names = [field.name for field in dataclasses.fields(Scores)]
    assert names == ["connects", "misses", "miss_rate", "wait_p95_s", "abandoned",
                     "nodes_created", "node_hours", "busy_hours", "cost_ratio"]
    scores = Scoreboard(10.0, 5.0).close()
    assert list(scores.as_dict()) == names


def test_only_the_scored_window_counts() -> None:
    board = Scoreboard(duration_s=200.0, terminate_delay_s=5.0, scored_from_s=100.0)
    board.node_created("a", 0.0)  # billed 100..145 of its 0..145
    board.node_created("b", 150.0)  # billed 150..200
    board.connect_hit("u1", "a", 40.0)  # before the window: not a connect, but busy from 100
    board.connect_miss("u2", 90.0)  # a miss before the window, and its wait: not scored
    board.served_after_wait("u2", "b", 160.0)
    board.released("u1", 120.0)  # busy 100..120 = 20 s
    board.node_terminate_requested("a", 140.0)
    board.connect_miss("u3", 170.0)  # scored, still waiting at the end: abandoned
    board.connect_miss("u4", 95.0)
    board.waiting_user_left("u4", 110.0)  # missed before the window: not an abandon either
    scores = board.close()
    # busy: u1 20 s + u2 160..200 = 40 s -> 60 s; nodes: a 45 s + b 50 s = 95 s.
    assert (scores.connects, scores.misses, scores.abandoned) == (1, 1, 1)
    assert (scores.wait_p95_s, scores.nodes_created) == (0.0, 1)
    assert scores.busy_hours == pytest.approx(60 / 3600)
    assert scores.node_hours == pytest.approx(95 / 3600)
    with pytest.raises(ValueError, match="scored_from_s"):
        Scoreboard(duration_s=10.0, terminate_delay_s=5.0, scored_from_s=10.5)
    empty = Scoreboard(duration_s=0.0, terminate_delay_s=5.0).close()  # a zero-length trace
    assert (empty.connects, empty.node_hours) == (0, 0.0)
