"""ProportionalPolicy: workers = rate x p90 / utilisation + backlog x p90 / drain,
within bounds, damped by a tolerance band, stabilisation windows, a step limit,
a cooldown, and patience with workers still on their way."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swf_panda_workers.core.effects import Adjustment
from swf_panda_workers.core.messages import WorkerSize
from swf_panda_workers.core.policies import (
    Bounds,
    Observation,
    ProportionalPolicy,
    ScalingMemory,
    WorkerPlan,
)
from swf_panda_workers.core.slice_window import Demand

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
# No damping unless a test asks for it.
UNDAMPED = ProportionalPolicy(
    bounds=Bounds(min_workers=1, max_workers=1000),
    target_utilisation=0.8,
    drain_seconds=300,
    tolerance=0,
    up_window=0,
    down_window=0,
    max_step_up=1000,
    max_step_down=1,
    cooldown_seconds=0,
    rampup_seconds=0,
    min_results=1,
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def demand(
    rate: float = 1.0,
    took: float | None = 4.0,
    backlog: float = 0.0,
    seen: int = 100,
    results: int = 50,
    when: float = 0,
) -> Demand:
    waited = backlog / rate if rate else 0.0
    return Demand(
        at=at(when),
        results=results,
        rate=rate,
        processing_seconds=took,
        waited_seconds=waited,
        backlog=backlog,
        workers_seen=seen,
    )


def plan(
    workers: int,
    adjusted_ago: float | None = None,
    requested_ago: float | None = None,
    core_count: int = 1,
    memory_per_core: int = 2000,
) -> WorkerPlan:
    size = WorkerSize(
        core_count=core_count,
        memory_per_core=memory_per_core,
        site="BNL-OSG",
        target_worker_count=workers,
    )
    return WorkerPlan(
        initial=size,
        current=size,
        last_adjusted_at=None if adjusted_ago is None else at(-adjusted_ago),
        requested_at=None if requested_ago is None else at(-requested_ago),
    )


def decide(
    policy: ProportionalPolicy, plan: WorkerPlan, seen: Demand, memory: ScalingMemory | None = None
) -> Adjustment | None:
    return policy.decide(plan, Observation(seen.at, None, seen), memory or ScalingMemory()).decision


def target(decision: Adjustment | None) -> int | None:
    return None if decision is None else decision.size.target_worker_count


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        pytest.param(demand(rate=2, took=3), 8, id="2/s x 3s / 0.8 = 7.5"),
        pytest.param(demand(rate=1, took=4), 5, id="1/s x 4s / 0.8 = 5"),
        pytest.param(demand(rate=2, took=3, backlog=60), 9, id="backlog 60 x 3s / 300s adds 0.6"),
        pytest.param(demand(rate=0.1, took=1), 1, id="tiny demand: min_workers"),
        pytest.param(demand(rate=100, took=100), 1000, id="huge demand: max_workers"),
    ],
)
def test_sizes_by_littles_law(seen: Demand, expected: int) -> None:
    assert target(decide(UNDAMPED, plan(3), seen)) == expected


@pytest.mark.parametrize(
    "seen",
    [demand(results=4), demand(took=None), demand(took=0)],
    ids=["too few results", "no processing time", "zero processing time"],
)
def test_no_decision_without_a_trustworthy_demand(seen: Demand) -> None:
    policy = replace(UNDAMPED, min_results=5)
    assert decide(policy, plan(3), seen) is None


def test_nothing_is_asked_for_the_size_already_requested() -> None:
    assert decide(UNDAMPED, plan(5), demand(rate=1, took=4)) is None


@pytest.mark.parametrize(
    ("workers", "expected"), [(10, None), (9, None), (8, 10), (12, None), (13, 10)]
)
def test_tolerance_band(workers: int, expected: int | None) -> None:
    # need 10: from 8 the change (2) is over 20 % of 8; from 12 it is not (2 < 2.4)
    policy = replace(UNDAMPED, tolerance=0.2)
    assert target(decide(policy, plan(workers), demand(rate=2, took=4))) == expected


def test_a_step_is_limited_both_ways() -> None:
    policy = replace(UNDAMPED, max_step_up=0.5, max_step_down=0.25)
    assert target(decide(policy, plan(10), demand(rate=20, took=4))) == 15
    assert target(decide(policy, plan(40), demand(rate=0.5, took=4))) == 30
    assert target(decide(policy, plan(1), demand(rate=20, took=4))) == 2  # at least one


@pytest.mark.parametrize(
    ("bounds", "workers_plan", "expected"),
    [
        (Bounds(min_workers=1, max_workers=20), plan(5), 20),
        (Bounds(max_workers=1000, max_total_cores=64), plan(5, core_count=4), 16),
        (Bounds(max_workers=1000, max_total_memory_mb=96_000), plan(5, core_count=2), 24),
        (Bounds(min_workers=6, max_workers=1000), plan(3), 6),
    ],
    ids=["max workers", "max total cores", "max total memory", "min workers"],
)
def test_bounds(bounds: Bounds, workers_plan: WorkerPlan, expected: int) -> None:
    policy = replace(UNDAMPED, bounds=bounds)
    need = demand(rate=50, took=4) if expected > 6 else demand(rate=0.1, took=1)
    assert target(decide(policy, workers_plan, need)) == expected


def test_a_size_outside_new_bounds_is_brought_inside_even_within_tolerance() -> None:
    policy = replace(UNDAMPED, bounds=Bounds(max_workers=10), tolerance=0.5)
    assert target(decide(policy, plan(12), demand(rate=5, took=4))) == 10


def test_cooldown_between_adjustments() -> None:
    policy = replace(UNDAMPED, cooldown_seconds=60)
    assert decide(policy, plan(3, adjusted_ago=59), demand(rate=2, took=4)) is None
    assert target(decide(policy, plan(3, adjusted_ago=60), demand(rate=2, took=4))) == 10


def test_workers_on_their_way_are_not_asked_for_twice() -> None:
    policy = replace(UNDAMPED, rampup_seconds=300)
    # 8 requested 100 s ago, 4 seen so far: the gap is already asked for.
    assert decide(policy, plan(8, requested_ago=100), demand(rate=4, took=4, seen=4)) is None
    # Past the ramp-up, they are not coming: ask again.
    assert target(decide(policy, plan(8, requested_ago=300), demand(rate=4, took=4, seen=4))) == 20
    # All seen: nothing is on its way.
    assert target(decide(policy, plan(8, requested_ago=100), demand(rate=4, took=4, seen=8))) == 20
    # Shedding workers never waits for arrivals.
    assert target(decide(policy, plan(8, requested_ago=100), demand(rate=0.5, took=4, seen=4))) == 3


def looks(
    policy: ProportionalPolicy, start: WorkerPlan, needs: list[tuple[float, Demand]]
) -> list[int | None]:
    """Targets decided at each look, the plan following each decision."""
    memory, current, targets = ScalingMemory(), start, []
    for when, seen in needs:
        seen = seen.model_copy(update={"at": at(when)})
        verdict = policy.decide(current, Observation(at(when), None, seen), memory)
        memory = verdict.memory
        targets.append(target(verdict.decision))
        if verdict.decision is not None:
            current = replace(current, current=verdict.decision.size, last_adjusted_at=at(when))
    return targets


def test_scale_up_waits_for_the_need_to_hold_for_the_up_window() -> None:
    policy = replace(UNDAMPED, up_window=30)
    low, high = demand(rate=1, took=4), demand(rate=4, took=4)
    # need 5 (current), then 20 from t=10 on: the lowest need of the last 30 s
    # stays 5 until t=40, the first look whose window holds only 20s.
    targets = looks(policy, plan(5), [(0, low), (10, high), (20, high), (30, high), (40, high)])
    assert targets == [None, None, None, None, 20]


def test_scale_down_goes_only_to_the_highest_need_of_the_down_window() -> None:
    policy = replace(UNDAMPED, down_window=60)
    busy, quiet = demand(rate=4, took=4), demand(rate=1, took=4)
    targets = looks(policy, plan(20), [(0, busy), (30, quiet), (60, quiet), (90, quiet)])
    # at 60 the busy need of t=0 is still within 60 s; at 90 it is not
    assert targets == [None, None, None, 5]


def test_nothing_is_shed_before_the_policy_has_watched_for_the_down_window() -> None:
    # A run's first results come before its rate has risen: its need looks low.
    policy = replace(UNDAMPED, down_window=60)
    quiet = demand(rate=1, took=4)
    assert looks(policy, plan(20), [(0, quiet), (30, quiet), (59, quiet), (60, quiet)]) == [
        None,
        None,
        None,
        5,
    ]


def test_the_decision_explains_itself_and_keeps_its_inputs() -> None:
    seen = demand(rate=2, took=3, backlog=60)
    decision = decide(replace(UNDAMPED, max_step_up=0.5), plan(4), seen)
    assert decision is not None and decision.inputs == seen
    assert decision.reason == (
        "2.00 slices/s x p90 3.0s / 0.8 + backlog 60 x 3.0s / 300s -> 4 to 6 workers "
        "(need 9; damped)"
    )


def test_memory_holds_only_the_longest_window() -> None:
    policy = replace(UNDAMPED, up_window=30, down_window=120)
    memory = ScalingMemory()
    for tick in range(0, 3600, 5):
        memory = policy.decide(
            plan(5), Observation(at(tick), None, demand(when=tick)), memory
        ).memory
    assert len(memory.needs) == 120 // 5 + 1


# --- properties ---------------------------------------------------------------

DEFAULT = ProportionalPolicy(
    bounds=Bounds(min_workers=2, max_workers=60, max_total_cores=160), min_results=1
)

demands = st.builds(
    demand,
    rate=st.floats(min_value=0, max_value=500, allow_nan=False),
    took=st.floats(min_value=0.01, max_value=3600, allow_nan=False),
    backlog=st.floats(min_value=0, max_value=1e5, allow_nan=False),
    seen=st.integers(min_value=0, max_value=500),
)
plans = st.builds(
    plan,
    workers=st.integers(min_value=0, max_value=500),
    adjusted_ago=st.none() | st.floats(min_value=0, max_value=1e4),
    requested_ago=st.none() | st.floats(min_value=0, max_value=1e4),
    core_count=st.integers(min_value=1, max_value=8),
)


@given(plans, demands)
def test_a_decision_is_always_within_bounds(start: WorkerPlan, seen: Demand) -> None:
    decision = decide(DEFAULT, start, seen)
    if decision is not None:
        assert decision.size.target_worker_count is not None
        assert DEFAULT.bounds.min_workers <= decision.size.target_worker_count
        assert decision.size.target_worker_count <= DEFAULT.bounds.ceiling(start.current)
        assert decision.size.target_worker_count != start.workers


@given(plans, demands)
def test_never_scales_down_below_what_the_arrival_rate_needs(
    start: WorkerPlan, seen: Demand
) -> None:
    new = target(decide(DEFAULT, start, seen))
    if new is not None and new < start.workers:
        busy = math.ceil(seen.rate * (seen.processing_seconds or 0) - 1e-9)
        assert new >= min(busy, DEFAULT.bounds.ceiling(start.current))


@settings(max_examples=60)
@given(
    workers=st.integers(min_value=1, max_value=60),
    seen=demands,
    every=st.sampled_from([1.0, 5.0, 17.0]),
)
def test_a_steady_demand_never_makes_the_size_change_direction(
    workers: int, seen: Demand, every: float
) -> None:
    targets = looks(DEFAULT, plan(workers), [(i * every, seen) for i in range(400)])
    sizes = [workers, *[t for t in targets if t is not None]]
    steps = [b - a for a, b in itertools.pairwise(sizes)]
    assert all(s > 0 for s in steps) or all(s < 0 for s in steps)
    # and it settles: once there, nothing more is asked
    assert targets[-1] is None
