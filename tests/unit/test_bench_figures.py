"""The benchmark's own parts: its schedule, how figures are derived, and how
processes are measured."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.compare import comparison
from bench.figures import BenchResult, Latency, ProcessUse, Tally, delays, drift
from bench.plan import FAST, SLOW, LoadPlan
from bench.processes import TreeUse, descendants
from bench.scenarios import SCENARIOS, cpu_per_1000_results
from bench.timeline import Timeline, lag, per_second, rates, timeline_png


def test_the_plan_interleaves_runs_at_the_total_rate() -> None:
    plan = LoadPlan(runs=3, slices=6, rate=30.0, expected_seconds=5.0)
    sends = list(plan.sends())
    assert len(sends) == 18
    assert [s.run for s in sends[:6]] == [0, 1, 2, 0, 1, 2]
    assert [round(s.at, 6) for s in sends[:3]] == [0.0, round(1 / 30, 6), round(2 / 30, 6)]
    assert sends[-1].at == pytest.approx(plan.duration)
    assert plan.duration == pytest.approx(17 / 30)


def test_each_run_has_two_slow_results_over_the_policy_steps() -> None:
    plan = LoadPlan(runs=2, slices=9, rate=10.0, expected_seconds=4.0)
    for run in (0, 1):
        mine = [s for s in plan.sends() if s.run == run]
        slow = [s for s in mine if s.slow]
        assert [s.index for s in slow] == [3, 6]
        assert [s.seconds for s in slow] == [SLOW[0] * 4.0, SLOW[1] * 4.0]
        assert {s.seconds for s in mine if not s.slow} == {FAST * 4.0}
    assert SLOW[0] > 1.2 and SLOW[1] > 1.5 and FAST < 1.2


def test_a_plan_without_room_for_its_slow_results_is_refused() -> None:
    with pytest.raises(ValueError):
        LoadPlan(runs=1, slices=2, rate=1.0, expected_seconds=1.0)


def test_each_cause_takes_the_first_effect_after_it() -> None:
    causes = {"a": [10.0, 20.0], "b": [5.0]}
    effects = {"a": [9.0, 10.1, 20.3, 20.4], "b": []}
    assert delays(causes, effects) == pytest.approx([0.1, 0.3])


def test_a_late_effect_is_not_taken_by_two_causes() -> None:
    assert delays({"a": [1.0, 2.0]}, {"a": [3.0]}) == pytest.approx([2.0])


def test_latency_percentiles_are_in_milliseconds() -> None:
    latency = Latency.of([i / 1000 for i in range(1, 101)])
    assert (latency.samples, latency.p50, latency.p95, latency.p99, latency.max) == (
        100,
        50.0,
        95.0,
        99.0,
        100.0,
    )
    assert Latency.of([]).p99 is None


def test_the_tally_counts_losses_and_duplicates_per_run() -> None:
    tally = Tally.of({"a": 1, "b": 1, "c": 1}, {"a": 2, "c": 1})
    assert (tally.expected, tally.seen, tally.lost, tally.duplicated) == (3, 3, 1, 1)


def test_a_process_tree_counts_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        tree = TreeUse(os.getpid())
        tree.sample()
        sum(i * i for i in range(2_000_000))  # some CPU for this process
        tree.sample()
        assert tree.peak_rss_mb > 10
        assert tree.cpu_seconds > 0
        assert tree.rss_at(tree.history[-1][0]) == tree.last_rss_mb
    finally:
        child.kill()
        child.wait()


def result(p99_stop: float, lost: int) -> BenchResult:
    return BenchResult(
        started_at="2026-11-23T12:00:00+00:00",
        machine={},
        notes=[],
        plan={"runs": 2, "slices": 10, "rate": 5.0, "duration": 3.8},
        latency_ms={"end_run -> stop_transformer": Latency.of([p99_stop / 1000])},
        sent_per_second=5.0,
        handled_per_second=5.0,
        handoff_drain_seconds=1.0,
        effects={"stop_transformer": Tally(expected=2, seen=2 - lost, lost=lost, duplicated=0)},
        processes={
            "runner": ProcessUse(
                idle_rss_mb=100, peak_rss_mb=120, cpu_seconds=3, load_rss_mb=[110, 111, 112, 113]
            )
        },
        per_added_run_mb=10.0,
    )


def test_results_compare_side_by_side() -> None:
    table = comparison([("before", result(900.0, 1)), ("after", result(200.0, 0))])
    lines = table.splitlines()
    assert lines[0].split() == ["figure", "before", "after"]
    stop = next(line for line in lines if "stop_transformer p99" in line)
    assert stop.split()[-2:] == ["900.0", "200.0"]
    lost = next(line for line in lines if "stop_transformer: lost" in line)
    assert lost.split()[-2:] == ["1", "0"]
    assert "RSS at 1/4" in result(1.0, 0).table()


def test_a_scenario_judges_each_target_pass_or_fail() -> None:
    burst = SCENARIOS["burst-20"]
    good = burst.verdict(result(p99_stop=200.0, lost=0)).splitlines()
    bad = burst.verdict(result(p99_stop=900.0, lost=1)).splitlines()
    stop_good = next(line for line in good if "stop_transformer p99" in line)
    stop_bad = next(line for line in bad if "stop_transformer p99" in line)
    assert stop_good.split()[-3:] == ["200.0", "ms", "pass"]
    assert stop_bad.split()[-3:] == ["900.0", "ms", "FAIL"]
    assert next(line for line in bad if "lost or doubled" in line).split()[-1] == "FAIL"
    # Not measured (no create latency in this result) is no pass.
    assert next(line for line in good if "create_workflow_task" in line).split()[-1] == "FAIL"


def test_cpu_per_thousand_results_counts_every_process() -> None:
    # 3 CPU s for 2 runs x 10 results.
    assert cpu_per_1000_results(result(1.0, 0)) == 150.0


def test_the_hand_off_lag_is_what_was_sent_and_not_yet_acked() -> None:
    sent = [100.0, 100.5, 101.0, 101.5, 102.0]
    acked = [(99.0, 40.0), (100.6, 40.0), (101.6, 42.0), (103.0, 45.0)]  # 40 acked before
    xs, lagging = lag(sent, acked, origin=99.0)
    assert xs == pytest.approx([1.6, 2.6, 4.0]) and lagging == [2, 2, 0]
    assert per_second(sent, origin=100.0) == ([0.0, 1.0, 2.0], [2, 2, 1])
    assert rates([(0.0, 0.0), (2.0, 10.0)], origin=0.0) == ([2.0], [5.0])


def test_the_timeline_is_drawn_as_a_png() -> None:
    png = timeline_png(
        Timeline(
            title="t",
            sent_at=[1.0, 1.5, 2.2],
            acked=[(1.0, 0.0), (2.0, 2.0), (3.0, 3.0)],
            latencies={"stop": [(2.0, 0.3)], "create": []},
            rss_mb={"runner": [(1.0, 100.0), (2.0, 101.0)]},
            cpu_seconds={"runner": [(1.0, 0.0), (2.0, 0.5)]},
        )
    )
    assert png.startswith(b"\x89PNG")


def test_drift_compares_whole_waves_of_the_second_ten_minutes_with_the_last() -> None:
    # Waves of 200 s from t=0 to 3000 s; early: waves starting at 600, 800
    # and 1000 s (1000-1200 ends at 1200: inside); late: the last ten minutes.
    waves = [(200.0 * k, 200.0 * (k + 1)) for k in range(15)]
    sent_at = [float(t) for t in range(0, 3000)]  # one result a second
    rss = {"runner": [(float(t), 100.0 if t < 1500 else 110.0) for t in range(0, 3000, 10)]}
    cpu = {
        "runner": [(float(t), t * 0.002) for t in range(0, 3000, 10)],  # 2 CPU-ms/result
        "server": [
            (float(t), t * 0.001 if t < 2000 else 2.0 + (t - 2000) * 0.0015)
            for t in range(0, 3000, 10)
        ],
    }
    found = drift(waves, sent_at, rss, cpu)
    assert found is not None
    assert (found.early, found.late) == ((600.0, 1200.0), (2400.0, 3000.0))
    assert found.rss_mb == {"runner": (100.0, 110.0)}
    # The samples, every 10 s, end at 2990 s: the late side is a sample short.
    assert found.cpu_per_1000 == pytest.approx((3.0, 3.44), abs=0.02)
    assert found.rss_growth_pct() == pytest.approx(10.0)
    assert found.cpu_growth_pct() == pytest.approx(14.7, abs=0.5)


def test_a_benchmark_too_short_has_no_drift() -> None:
    waves = [(0.0, 200.0), (200.0, 400.0)]
    assert drift(waves, [1.0], {"runner": [(0.0, 1.0)]}, {"runner": [(0.0, 0.0)]}) is None
    assert drift([], [], {}, {}) is None


def test_the_soak_scenario_judges_the_drift() -> None:
    soak = SCENARIOS["soak-1h"]
    assert soak.waves > 1 and soak.rate == 100
    assert soak.runs * soak.slices * soak.waves / soak.rate >= 45 * 60  # most of an hour of load
