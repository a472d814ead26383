"""ReferencePolicy: slower than 1.2x expected asks for 1.2x the initial size,
slower than 1.5x for 1.5x; never a no-op, never within the cooldown, never down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swf_panda_workers.core.effects import Adjustment
from swf_panda_workers.core.messages import WorkerSize
from swf_panda_workers.core.policies import (
    Observation,
    ReferencePolicy,
    ScalingMemory,
    WorkerPlan,
)
from swf_panda_workers.core.slice_window import SliceObservation

T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
POLICY = ReferencePolicy(expected_seconds=30, cooldown_seconds=60)


def size(workers: int | None) -> WorkerSize:
    return WorkerSize(
        core_count=2, memory_per_core=4000, site="BNL-OSG", target_worker_count=workers
    )


def plan(initial: int | None, current: int | None, adjusted_ago: float | None = None) -> WorkerPlan:
    last = None if adjusted_ago is None else T0 - timedelta(seconds=adjusted_ago)
    return WorkerPlan(initial=size(initial), current=size(current), last_adjusted_at=last)


def decide(
    policy: ReferencePolicy, plan: WorkerPlan, slice_seen: SliceObservation
) -> Adjustment | None:
    verdict = policy.decide(plan, Observation(slice_seen.at, slice_seen), ScalingMemory())
    assert verdict.memory == ScalingMemory()  # the reference policy remembers nothing
    return verdict.decision


def seen(seconds: float | None, failed: bool = False) -> SliceObservation:
    return SliceObservation(at=T0, processing_seconds=seconds, failed=failed)


@pytest.mark.parametrize(
    ("seconds", "current", "adjusted_ago", "expected"),
    [
        # (slice seconds, current target, seconds since the last adjust, new target)
        pytest.param(0, 30, None, None, id="instant slice"),
        pytest.param(30, 30, None, None, id="as expected"),
        pytest.param(36, 30, None, None, id="exactly 1.2x is not over"),
        pytest.param(36.1, 30, None, 36, id="over 1.2x"),
        pytest.param(45, 30, None, 36, id="exactly 1.5x is the 1.2x step"),
        pytest.param(45.1, 30, None, 45, id="over 1.5x"),
        pytest.param(3000, 30, None, 45, id="far over: still 1.5x"),
        pytest.param(40, 36, None, None, id="1.2x already asked: no-op"),
        pytest.param(50, 36, None, 45, id="1.2x asked, now 1.5x"),
        pytest.param(50, 45, None, None, id="1.5x already asked: no-op"),
        pytest.param(40, 45, None, None, id="never scales down"),
        pytest.param(31, 45, None, None, id="fast again: never scales down"),
        pytest.param(50, 36, 0, None, id="cooldown: just adjusted"),
        pytest.param(50, 36, 59.9, None, id="cooldown: not yet"),
        pytest.param(50, 36, 60, 45, id="cooldown: exactly over"),
        pytest.param(50, 36, 3600, 45, id="cooldown: long over"),
        pytest.param(40, 30, -5, None, id="adjusted after the slice: still cooling down"),
        pytest.param(40, None, None, 36, id="no current target yet"),
    ],
)
def test_reference_policy_table(
    seconds: float, current: int | None, adjusted_ago: float | None, expected: int | None
) -> None:
    decision = decide(POLICY, plan(30, current, adjusted_ago), seen(seconds))

    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert decision.size == size(expected)


@pytest.mark.parametrize(
    ("initial", "seconds", "expected"),
    [
        (1, 40, 2),  # ceil(1.2) - never below, and rounded up
        (1, 50, 2),  # ceil(1.5)
        (2, 40, 3),  # ceil(2.4)
        (3, 40, 4),  # ceil(3.6)
        (3, 50, 5),  # ceil(4.5)
        (5, 40, 6),
        (10, 40, 12),
        (10, 50, 15),
        (0, 50, None),  # 0 workers stay 0: nothing to grow
        (None, 50, None),  # no worker count to scale
    ],
)
def test_scales_the_initial_worker_count_rounded_up(
    initial: int | None, seconds: float, expected: int | None
) -> None:
    decision = decide(POLICY, plan(initial, initial), seen(seconds))

    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert decision.size.target_worker_count == expected


def test_only_the_worker_count_scales() -> None:
    initial = WorkerSize(core_count=8, memory_per_core=2000, site="CERN", target_worker_count=30)

    decision = decide(POLICY, WorkerPlan(initial=initial, current=initial), seen(50))

    assert decision is not None
    assert decision.size == WorkerSize(
        core_count=8, memory_per_core=2000, site="CERN", target_worker_count=45
    )


def test_decision_explains_itself() -> None:
    decision = decide(POLICY, plan(30, 30), seen(40))

    assert decision is not None
    assert decision.reason == (
        "slice took 40.0s, over 1.2x the expected 30s: 1.2x the initial size"
    )


@pytest.mark.parametrize(
    "observation",
    [seen(500, failed=True), seen(None), seen(None, failed=True)],
    ids=["failed slow slice", "unknown time", "failed, unknown time"],
)
def test_failed_or_unknown_time_slices_are_ignored(observation: SliceObservation) -> None:
    assert decide(POLICY, plan(30, 30), observation) is None


def test_custom_steps_and_cooldown() -> None:
    policy = ReferencePolicy(expected_seconds=10, cooldown_seconds=0, steps=((2.0, 3.0),))

    assert decide(policy, plan(10, 10), seen(20)) is None
    decision = decide(policy, plan(10, 10, adjusted_ago=0), seen(21))
    assert decision is not None and decision.size.target_worker_count == 30


def exact_ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@given(
    initial=st.integers(min_value=0, max_value=100_000),
    current=st.none() | st.integers(min_value=0, max_value=200_000),
    seconds=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
    failed=st.booleans(),
    adjusted_ago=st.none() | st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
)
def test_never_below_the_initial_size_nor_above_one_and_a_half_times_it(
    initial: int,
    current: int | None,
    seconds: float | None,
    failed: bool,
    adjusted_ago: float | None,
) -> None:
    decision = decide(POLICY, plan(initial, current, adjusted_ago), seen(seconds, failed))

    if decision is None:
        return
    target = decision.size.target_worker_count
    assert target is not None
    assert initial <= target <= exact_ceil(3 * initial, 2)
    assert target in {exact_ceil(6 * initial, 5), exact_ceil(3 * initial, 2)}
    assert target > (current or 0)
    assert not failed and seconds is not None and seconds > 36
    assert adjusted_ago is None or adjusted_ago >= 60
