"""The rate-oracle reference: band simulation, per-window choice and the frontier."""

from __future__ import annotations

import math

import pytest

from provisioner.bench.bound import (
    IDLE_CHOICES,
    THETAS,
    WIDTHS,
    Band,
    BandResult,
    FrontierPoint,
    Nodes,
    Window,
    arrivals,
    candidate_bands,
    chance_to_meet,
    frontier,
    idle_at,
    poisson_at_most,
    rate_oracle,
    simulate,
    window_results,
    windows,
)
from provisioner.bench.trace import Trace, TraceEvent

NODES = Nodes(boot_delays=(60.0,), api_latency_s=0.0, terminate_delay_s=5.0)


def _run(band: Band, ticks: list[tuple[bool, ...]]) -> BandResult:
    return simulate(band, ticks, NODES.boot_delays, NODES.api_latency_s,
                    NODES.terminate_delay_s)


def test_no_pool_misses_every_connect_and_costs_nothing() -> None:
    ticks = arrivals(0.1, 0.0, 5_000, seed=1)
    result = _run(Band(0, 0, 0.0), ticks)
    assert result.miss_prob == 1.0
    assert result.idle_nodes == 0.0


def test_a_deep_pool_misses_nothing_and_pays_for_its_depth() -> None:
    ticks = arrivals(0.05, 0.05, 20_000, seed=2)
    deep = simulate(Band(12, 12, 0.0), ticks, NODES.boot_delays, 0.0, 5.0, warmup=1_000)
    shallow = _run(Band(2, 2, 0.0), ticks)
    assert deep.miss_prob == 0.0
    assert shallow.miss_prob > 0.05
    assert deep.idle_nodes > shallow.idle_nodes + 8


def test_one_connect_is_served_from_stock_and_the_replacement_boots_for_its_delay() -> None:
    ticks: list[tuple[bool, ...]] = [()] * 200
    ticks[100] = (True,)
    result = _run(Band(1, 1, 0.0), ticks)
    assert result.miss_prob == 0.0
    # booting until 60, ready until the connect at 100 takes it, then its replacement boots:
    # exactly one spare node every second, and no reap
    assert result.idle_nodes == pytest.approx(1.0)


def test_freed_nodes_above_the_band_are_reaped_only_once_idle_long_enough() -> None:
    ticks: list[tuple[bool, ...]] = [()] * 300
    ticks[10] = (False, False, False)  # three frees land on a pool of one
    eager = _run(Band(1, 1, 0.0), ticks)
    patient = _run(Band(1, 1, 60.0), ticks)
    assert eager.idle_nodes == pytest.approx((300 + 3 * 5.0) / 300)
    # the pool's own node is still booting; the three freed ones wait out 60 s, then go
    assert patient.idle_nodes == pytest.approx((300 + 3 * 60 + 3 * 5.0) / 300)


def test_windows_count_connects_and_frees_by_the_scoring_rules() -> None:
    def ev(t: float, ch: str, user: str) -> TraceEvent:
        return TraceEvent(t, ch, {"user_id": user})

    trace = Trace("t", "", 0, 1200.0, (60.0,), 0.2, 5.0, 10, [
        ev(10, "user:connect", "a"), ev(20, "user:connect", "a"),  # repeat: not counted
        ev(30, "user:disconnect", "b"),  # holds nothing: not a free
        ev(700, "user:disconnect", "a"), ev(800, "user:connect", "b"),
    ])
    assert windows(trace, 600.0) == [Window(0.0, 600.0, 1, 0), Window(600.0, 600.0, 1, 1)]
    # a session closed at the trace's last second frees a node for no time the trace scores;
    # a connect there is one the replay delivers, and counts
    trace.events += [ev(1200, "user:disconnect", "b"), ev(1200, "user:connect", "c")]
    assert windows(trace, 600.0) == [Window(0.0, 600.0, 1, 0), Window(600.0, 600.0, 2, 1)]


def test_the_frontier_trades_misses_for_idle_time() -> None:
    wins = [Window(0.0, 600.0, 30, 30), Window(600.0, 600.0, 3, 3)]
    results = [window_results(w, NODES, 20_000, seed=7 + i) for i, w in enumerate(wins)]
    points = frontier(wins, results, thetas=(0.1, 1.0, 10.0, 100.0))
    misses = [p.misses for p in points]
    idle = [p.idle_hours for p in points]
    assert misses == sorted(misses) and misses[0] < misses[-1]
    assert idle == sorted(idle, reverse=True) and idle[0] > idle[-1]


def test_idle_at_interpolates_between_frontier_points() -> None:
    points = [FrontierPoint(1.0, 2.0, 0.005, 30.0, ()), FrontierPoint(2.0, 6.0, 0.015, 20.0, ())]
    assert idle_at(points, 0.01) == pytest.approx(25.0)
    assert idle_at(points, 0.02) is None


def test_the_warmup_is_left_out_of_the_figures() -> None:
    ticks: list[tuple[bool, ...]] = [()] * 200
    ticks[5] = (True,)  # lands while the first node still boots: a miss, but in the warm-up
    result = simulate(Band(1, 1, 0.0), ticks, NODES.boot_delays, 0.0, 5.0, warmup=100)
    assert result.miss_prob == 0.0
    assert result.idle_nodes == pytest.approx(1.0)


def test_rate_oracle_gives_one_point_per_price_over_the_trace_windows() -> None:
    events = [TraceEvent(float(t), "user:connect", {"user_id": f"u{t}"}) for t in range(0, 900, 60)]
    trace = Trace("t", "", 0, 1200.0, (30.0, 90.0), 0.2, 5.0, 10, events)
    wins, points = rate_oracle(trace, window_s=600.0, seconds=2_000)
    assert [w.connects for w in wins] == [10, 5]
    assert len(points) == len(THETAS)
    assert all(len(p.bands) == 2 for p in points)
    # Each window's idle hours are its band's, and they add up to the point's.
    assert all(len(p.window_idle_hours) == 2 for p in points)
    assert all(sum(p.window_idle_hours) == pytest.approx(p.idle_hours) for p in points)


def test_poisson_at_most_sums_the_counts_up_to_k() -> None:
    assert poisson_at_most(0, 2.0) == pytest.approx(math.exp(-2.0))
    assert poisson_at_most(2, 2.0) == pytest.approx(5.0 * math.exp(-2.0))  # 1 + 2 + 2
    assert poisson_at_most(-1, 2.0) == 0.0
    assert poisson_at_most(0, 0.0) == 1.0
    assert poisson_at_most(60, 3.0) == pytest.approx(1.0)


def test_the_chance_to_meet_the_bar_is_the_poisson_chance_of_at_most_one_percent_missed() -> None:
    point = FrontierPoint(theta=0.5, misses=2.0, miss_rate=0.01, idle_hours=5.0, bands=())
    # 150 connects allow 1 miss (1.5 rounds down); 200 allow 2; 99 allow none.
    assert chance_to_meet(point, 150, idle_limit_hours=6.0) == pytest.approx(3 * math.exp(-2))
    assert chance_to_meet(point, 200, idle_limit_hours=6.0) == pytest.approx(5 * math.exp(-2))
    assert chance_to_meet(point, 99, idle_limit_hours=6.0) == pytest.approx(math.exp(-2))
    # Idle time above the limit fails the cost half whatever the misses.
    assert chance_to_meet(point, 200, idle_limit_hours=4.9) == 0.0
    assert chance_to_meet(point, 200, idle_limit_hours=5.0) > 0.0


def test_rate_oracle_gives_the_prices_asked_for() -> None:
    events = [TraceEvent(float(t), "user:connect", {"user_id": f"u{t}"}) for t in range(0, 900, 60)]
    trace = Trace("t", "", 0, 1200.0, (30.0, 90.0), 0.2, 5.0, 10, events)
    _, points = rate_oracle(trace, window_s=600.0, seconds=2_000, thetas=(0.5, 2.0))
    assert [p.theta for p in points] == [0.5, 2.0]
    # A dearer miss (smaller theta) never buys fewer idle hours.
    assert points[0].idle_hours >= points[1].idle_hours
    assert points[0].misses <= points[1].misses


def test_a_node_ready_at_a_tick_serves_that_ticks_connect() -> None:
    ticks: list[tuple[bool, ...]] = [()] * 200
    ticks[60] = (True,)  # the first node, created at 0, is ready at 60 (boot 60 s, no latency)
    assert _run(Band(1, 1, 0.0), ticks).miss_prob == 0.0


def test_the_oldest_idle_node_is_served_first_and_reaped_first() -> None:
    # Two frees at 10 and 40 on an empty band: the node freed at 10 is reaped after its 60 s
    # idle, at 70, and the other at 100 (idle node-seconds 30 + 2 * 30 + 30, two terminations).
    ticks: list[tuple[bool, ...]] = [()] * 200
    ticks[10] = ticks[40] = (False,)
    assert _run(Band(0, 0, 60.0), ticks).idle_nodes == pytest.approx((120 + 2 * 5.0) / 200)
    # A connect at 50 takes the node freed at 10; the one freed at 40 goes at 100.
    ticks[50] = (True,)
    assert _run(Band(0, 0, 60.0), ticks).idle_nodes == pytest.approx((100 + 5.0) / 200)


def test_connects_and_frees_of_a_second_land_in_a_random_order() -> None:
    ticks = arrivals(1.0, 1.0, 1_000, seed=3)
    mixed = [tick for tick in ticks if True in tick and False in tick]
    assert any(tick.index(False) < tick.index(True) for tick in mixed)
    assert any(tick.index(True) < tick.index(False) for tick in mixed)


def test_idle_at_a_miss_rate_two_points_share_takes_the_cheaper() -> None:
    points = [FrontierPoint(1.0, 2.0, 0.01, 30.0, ()), FrontierPoint(2.0, 2.0, 0.01, 20.0, ())]
    assert idle_at(points, 0.01) == 20.0


def test_the_rate_oracle_draws_window_i_from_seed_1000_plus_i() -> None:
    # The committed rate-oracle figures are reproducible only with these seeds.
    events = [TraceEvent(float(t), "user:connect", {"user_id": f"u{t}"}) for t in range(0, 900, 60)]
    trace = Trace("t", "", 0, 1200.0, (30.0, 90.0), 0.2, 5.0, 10, events)
    wins, points = rate_oracle(trace, window_s=600.0, seconds=2_000, thetas=(0.5, 2.0))
    nodes = Nodes((30.0, 90.0), 0.2, 5.0)
    results = [window_results(w, nodes, 2_000, seed=1_000 + i) for i, w in enumerate(wins)]
    assert points == frontier(wins, results, thetas=(0.5, 2.0))


def test_the_candidate_bands_reach_four_deviations_past_the_mean_plus_two() -> None:
    # mean demand over one 100 s boot is 1; 1 + 4 * sqrt(1 + 1) = 6.66 -> 7, + 2 = 9
    bands = candidate_bands(0.01, 0.01, 100.0)
    assert max(b.boot_to for b in bands) == 9
    assert len(bands) == 10 * len(WIDTHS) * len(IDLE_CHOICES)


def test_the_misses_allowed_are_the_limit_of_the_connects_rounded_down_not_below() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point: 29 misses are allowed, not 28.
    point = FrontierPoint(theta=0.5, misses=29.0, miss_rate=0.29, idle_hours=1.0, bands=())
    assert chance_to_meet(point, 100, 2.0, miss_rate_limit=0.29) == pytest.approx(
        poisson_at_most(29, 29.0))


def test_the_frontier_prices_a_windows_misses_by_its_connects_and_rates_them_over_all() -> None:
    # Per window: A misses 10% and idles nothing; B misses nothing and idles one node (1/6 h
    # over 600 s). At theta 1, A's misses cost 0.1 * connects: dearer than B in the busy
    # window (10 > 1/6), cheaper in the quiet one (0.1 < 1/6).
    a, b = Band(0, 0, 0.0), Band(1, 1, 0.0)
    wins = [Window(0.0, 600.0, 100, 0), Window(600.0, 600.0, 1, 0)]
    options = [BandResult(a, 0.1, 0.0), BandResult(b, 0.0, 1.0)]
    (point,) = frontier(wins, [options, options], thetas=(1.0,))
    assert point.bands == (b, a)
    assert point.misses == pytest.approx(0.1)
    assert point.miss_rate == pytest.approx(0.1 / 101)
    assert point.idle_hours == pytest.approx(600 / 3600)
