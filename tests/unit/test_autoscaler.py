"""Autoscaler: when the policy looks, what it is given, and the run's timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from swf_panda_workers.config import settings_from
from swf_panda_workers.core.messages import RunImminent, WorkerSize, parse_message
from swf_panda_workers.core.policies import (
    Bounds,
    ProportionalPolicy,
    ReferencePolicy,
    SliceObservation,
    WorkerPlan,
)
from swf_panda_workers.core.scaling_loop import Autoscaler, policy_for
from swf_panda_workers.core.slice_window import SliceSample, SliceWindow
from swf_panda_workers.core.timeline import Timeline, TimelinePoint

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
SIZE = WorkerSize(core_count=1, memory_per_core=2000, site="BNL-OSG", target_worker_count=2)
PLAN = WorkerPlan(initial=SIZE, current=SIZE)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def announcement(**content: object) -> RunImminent:
    message = parse_message({"msg_type": "run_imminent_worker", "run_id": "100123",
                             "content": content})
    assert isinstance(message, RunImminent)
    return message


def test_the_configured_policy_with_the_runs_own_figures() -> None:
    settings = settings_from({"scaling": {"policy": "reference"}, "slice": {
        "processing_time": 30, "cooldown": 20}}, {})
    assert policy_for(settings, announcement(slice_processing_time=12)) == ReferencePolicy(
        expected_seconds=12, cooldown_seconds=20)

    settings = settings_from({"scaling": {"max_workers": 40, "max_total_cores": 64,
                                          "rampup": 300, "tick": 2}}, {})
    policy = policy_for(settings, announcement(worker_rampup_time=120))
    assert isinstance(policy, ProportionalPolicy)
    assert policy.bounds == Bounds(min_workers=1, max_workers=40, max_total_cores=64)
    assert policy.rampup_seconds == 120 and policy.tick_seconds == 2
    assert policy_for(settings, announcement()).rampup_seconds == 300


def test_a_ticking_policy_looks_once_per_tick_with_or_without_results() -> None:
    scaler = Autoscaler(ProportionalPolicy(tick_seconds=5), SliceWindow(60, 90))
    assert scaler.due(at(0), after_result=False)
    scaler.look(PLAN, at(0))
    assert not scaler.due(at(4.9), after_result=True)
    assert scaler.seconds_to_next_look(at(3)) == 2
    assert scaler.due(at(5), after_result=False)


def test_the_reference_policy_looks_at_every_result_only() -> None:
    scaler = Autoscaler(ReferencePolicy(expected_seconds=10), SliceWindow(60, 90))
    assert scaler.due(at(0), after_result=True)
    scaler.look(PLAN, at(0))
    assert scaler.due(at(0.1), after_result=True)
    assert not scaler.due(at(100), after_result=False)
    assert scaler.seconds_to_next_look(at(1)) is None


def test_a_look_decides_from_the_window_and_draws_the_timeline() -> None:
    policy = ProportionalPolicy(bounds=Bounds(max_workers=50), tolerance=0, up_window=0,
                                cooldown_seconds=0, min_results=3, tick_seconds=1)
    scaler = Autoscaler(policy, SliceWindow(60, 90))
    for i in range(40):  # 2 results/s of 4 s: 8 busy workers, 10 at 80 %
        scaler.observe(SliceSample(at=at(4 + i / 2), processing_seconds=4.0, waited_seconds=0,
                                   worker=f"wn-{i % 2}"))
    decision = scaler.look(PLAN, at(24), SliceObservation(at(24), 4.0))
    assert decision is not None and decision.size.target_worker_count == 4  # +100 % a step
    assert decision.inputs is not None and decision.inputs.workers_seen == 2
    (point,) = scaler.timeline.points
    assert point == TimelinePoint(at=at(24), requested=2, workers_seen=2, processing_seconds=4.0,
                                  backlog=0.0, rate=decision.inputs.rate)


def test_a_long_timeline_is_thinned_not_grown() -> None:
    timeline = Timeline(limit=100)
    for i in range(10_000):
        timeline.add(TimelinePoint(at=at(i), requested=1, workers_seen=1,
                                   processing_seconds=1.0, backlog=0, rate=1))
    assert 50 <= len(timeline.points) <= 100
    assert timeline.points[0].at == at(0)
    assert timeline.points[-1].at >= at(9_900)


def test_a_per_result_policy_reads_the_window_at_most_once_a_second() -> None:
    scaler = Autoscaler(ReferencePolicy(expected_seconds=10), SliceWindow(60, 90))
    for i in range(50):  # 50 results in 0.98 s, each looked at
        moment = at(i * 0.02)
        scaler.observe(SliceSample(at=moment, processing_seconds=1.0, waited_seconds=0.0,
                                   worker="wn-1"))
        scaler.look(PLAN, moment, SliceObservation(at=moment, processing_seconds=1.0))
    assert len(scaler.timeline.points) == 1
    scaler.observe(SliceSample(at=at(1.0), processing_seconds=1.0, waited_seconds=0.0,
                                worker="wn-1"))
    scaler.look(PLAN, at(1.0), SliceObservation(at=at(1.0), processing_seconds=1.0))
    assert [p.at for p in scaler.timeline.points] == [at(0), at(1.0)]
    assert scaler.timeline.points[-1].rate > 0


def test_a_ticking_policy_reads_the_window_at_every_look() -> None:
    scaler = Autoscaler(ProportionalPolicy(tick_seconds=0.01), SliceWindow(60, 90))
    for i in range(5):
        scaler.look(PLAN, at(i * 0.02))
    assert len(scaler.timeline.points) == 5
