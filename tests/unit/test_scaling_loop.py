"""The scaling loop, driven with a fake clock: when its policy looks, what it
is given, what it asks for, which decisions replay journaled adjustments,
when a drained run is over, and the run's timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.core.adjustment_journal import AdjustmentJournal
from swf_panda_workers.core.effects import Adjustment, AdjustSent
from swf_panda_workers.core.messages import RunImminent, WorkerSize, parse_message
from swf_panda_workers.core.policies import (
    Bounds,
    ProportionalPolicy,
    ReferencePolicy,
    WorkerPlan,
)
from swf_panda_workers.core.scaling_loop import (
    IDLE_CHECK_SECONDS,
    Drained,
    DrainRule,
    ScalingLoop,
    policy_for,
)
from swf_panda_workers.core.slice_window import SliceObservation, SliceWindow
from swf_panda_workers.core.timeline import Timeline, TimelinePoint

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
SIZE = WorkerSize(core_count=1, memory_per_core=2000, site="BNL-OSG", target_worker_count=2)
PLAN = WorkerPlan(initial=SIZE, current=SIZE)
# Any slice slower than 1.5 x 10 s asks for 3 workers (1.5 x 2).
REFERENCE = ReferencePolicy(expected_seconds=10, cooldown_seconds=60)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def result(when: float, took: float = 4.0, worker: str = "wn-1") -> SliceObservation:
    return SliceObservation(at=at(when), processing_seconds=took, waited_seconds=0.0, worker=worker)


def workers(count: int) -> WorkerSize:
    return SIZE.model_copy(update={"target_worker_count": count})


def announcement(**content: object) -> RunImminent:
    message = parse_message(
        {"msg_type": "run_imminent_worker", "run_id": "100123", "content": content}
    )
    assert isinstance(message, RunImminent)
    return message


def test_the_configured_policy_with_the_runs_own_figures() -> None:
    settings = settings_from(
        {"scaling": {"policy": "reference"}, "slice": {"processing_time": 30, "cooldown": 20}}, {}
    )
    assert policy_for(settings, announcement(slice_processing_time=12)) == ReferencePolicy(
        expected_seconds=12, cooldown_seconds=20
    )

    settings = settings_from(
        {"scaling": {"max_workers": 40, "max_total_cores": 64, "rampup": 300, "tick": 2}}, {}
    )
    policy = policy_for(settings, announcement(worker_rampup_time=120))
    assert isinstance(policy, ProportionalPolicy)
    assert policy.bounds == Bounds(min_workers=1, max_workers=40, max_total_cores=64)
    assert policy.rampup_seconds == 120 and policy.tick_seconds == 2
    default = policy_for(settings, announcement())
    assert isinstance(default, ProportionalPolicy) and default.rampup_seconds == 300


def test_the_loop_for_a_run_takes_its_drain_rule_from_the_settings() -> None:
    settings = settings_from({"scaling": {"drain_quiet": 12, "drain_timeout": 99}}, {})
    loop = ScalingLoop.for_run(settings, announcement())
    assert loop.drain_rule == DrainRule(quiet=12, timeout=99)


def test_a_ticking_policy_looks_once_per_tick_with_or_without_results() -> None:
    policy = ProportionalPolicy(tick_seconds=5, min_results=1)
    loop = ScalingLoop(policy, SliceWindow(60, 90))
    assert loop.wait(at(0)) == IDLE_CHECK_SECONDS  # never looked: due at once when idle
    loop.on_idle(PLAN, at(0))
    assert len(loop.timeline.points) == 1
    assert loop.after_result(PLAN, result(4.9)) is None
    assert len(loop.timeline.points) == 1  # within the tick: observed, not looked
    assert loop.wait(at(3)) == 2
    loop.on_idle(PLAN, at(5))
    assert [p.at for p in loop.timeline.points] == [at(0), at(5)]


def test_the_reference_policy_looks_at_every_result_only() -> None:
    loop = ScalingLoop(REFERENCE, SliceWindow(60, 90))
    assert loop.on_idle(PLAN, at(100)) is None and not loop.timeline.points
    decision = loop.after_result(PLAN, result(1, took=16))
    assert decision is not None and decision.size == workers(3)
    assert decision.decided_at == at(1)  # on the results' clock, not the reader's
    assert loop.wait(at(2)) == IDLE_CHECK_SECONDS


def test_a_look_decides_from_the_window_and_draws_the_timeline() -> None:
    policy = ProportionalPolicy(
        bounds=Bounds(max_workers=50),
        tolerance=0,
        up_window=0,
        cooldown_seconds=0,
        min_results=3,
        tick_seconds=20,
    )
    loop = ScalingLoop(policy, SliceWindow(60, 90))
    loop.on_idle(PLAN, at(0))  # the first look: nothing in the window yet
    for i in range(40):  # 2 results/s of 4 s: 8 busy workers, 10 at 80 %
        loop.observe(result(4 + i / 2, worker=f"wn-{i % 2}"))
    decision = loop.on_idle(PLAN, at(24))
    assert decision is not None and decision.size.target_worker_count == 4  # +100 % a step
    assert decision.inputs is not None and decision.inputs.workers_seen == 2
    point = loop.timeline.points[-1]
    assert point == TimelinePoint(
        at=at(24),
        requested=2,
        workers_seen=2,
        processing_seconds=4.0,
        backlog=0.0,
        rate=decision.inputs.rate,
    )


def test_a_decision_replaying_a_journaled_adjustment_is_not_sent_again() -> None:
    # The earlier attempt asked for 3 at 1 s; the retried attempt decides it
    # again on the same result, and again a result later (the entry is
    # stored after that result): neither is sent. Once the replay has read
    # the entry, 3 may be asked for again (6 -> 4 -> 6 on a real run).
    sent = AdjustSent(size=workers(3), reason="slow", decided_at=at(1), sent_at=at(1.2))
    loop = ScalingLoop(
        ReferencePolicy(expected_seconds=10, cooldown_seconds=0),
        SliceWindow(60, 90),
        AdjustmentJournal.of([sent]),
    )
    assert loop.after_result(PLAN, result(1, took=16)) is None
    assert loop.after_result(PLAN, result(1.1, took=16)) is None
    loop.journaled(sent)
    again = loop.after_result(PLAN, result(2, took=16))
    assert again is not None and again.size == workers(3)


def test_a_decision_the_earlier_attempt_never_journaled_is_sent() -> None:
    sent = AdjustSent(size=workers(5), reason="other", decided_at=at(1), sent_at=at(1))
    loop = ScalingLoop(REFERENCE, SliceWindow(60, 90), AdjustmentJournal.of([sent]))
    decision = loop.after_result(PLAN, result(1, took=16))
    assert decision is not None and decision.size == workers(3)


def test_an_adjustment_sent_folds_into_the_plan_its_cooldown_from_its_decision() -> None:
    decision = Adjustment(size=workers(3), reason="slow", decided_at=at(1))
    plan = PLAN.adjusted(decision, sent_at=at(4))
    assert plan.current == workers(3) and plan.workers == 3
    assert plan.last_adjusted_at == at(1) and plan.requested_at == at(4)
    loop = ScalingLoop(
        ReferencePolicy(expected_seconds=10, cooldown_seconds=60), SliceWindow(60, 90)
    )
    # 1.5x of 2 is 3 again: asked already; nothing new within the cooldown either.
    assert loop.after_result(plan, result(30, took=100)) is None


def test_a_drain_is_over_after_a_quiet_spell_or_its_timeout() -> None:
    loop = ScalingLoop(REFERENCE, SliceWindow(60, 90), drain=DrainRule(quiet=10, timeout=60))
    ended = at(100)
    loop.observe(result(104, took=2))
    assert loop.drain(ended, at(110)) == 4  # 10 s of quiet from the last result at 104
    assert loop.drain(ended, at(114)) == Drained("drained: no slice result for 10s")
    # Results keep coming: given up at the timeout.
    busy = ScalingLoop(REFERENCE, SliceWindow(60, 90), drain=DrainRule(quiet=10, timeout=60))
    for second in range(100, 161, 5):
        busy.observe(result(second, took=2))
    assert busy.drain(ended, at(160)) == Drained("drain given up after 60s")


def test_slow_slices_stretch_the_quiet_spell_of_a_drain() -> None:
    # Slices of 20 s: a transformer may be busy 20 s without a result, so
    # quiet means twice that.
    loop = ScalingLoop(REFERENCE, SliceWindow(60, 90), drain=DrainRule(quiet=10, timeout=600))
    loop.observe(result(100, took=20))
    assert loop.drain(at(100), at(130)) == IDLE_CHECK_SECONDS
    assert loop.drain(at(100), at(140)) == Drained("drained: no slice result for 40s")


def test_a_long_timeline_is_thinned_not_grown() -> None:
    timeline = Timeline(limit=100)
    for i in range(10_000):
        timeline.add(
            TimelinePoint(
                at=at(i), requested=1, workers_seen=1, processing_seconds=1.0, backlog=0, rate=1
            )
        )
    assert 50 <= len(timeline.points) <= 100
    assert timeline.points[0].at == at(0)
    assert timeline.points[-1].at >= at(9_900)


def test_a_per_result_policy_reads_the_window_at_most_once_a_second() -> None:
    loop = ScalingLoop(REFERENCE, SliceWindow(60, 90))
    for i in range(50):  # 50 results in 0.98 s, each looked at
        loop.after_result(PLAN, result(i * 0.02, took=1.0))
    assert len(loop.timeline.points) == 1
    loop.after_result(PLAN, result(1.0, took=1.0))
    assert [p.at for p in loop.timeline.points] == [at(0), at(1.0)]
    assert loop.timeline.points[-1].rate > 0


def test_a_ticking_policy_reads_the_window_at_every_look() -> None:
    loop = ScalingLoop(ProportionalPolicy(tick_seconds=0.01), SliceWindow(60, 90))
    for i in range(5):
        loop.on_idle(PLAN, at(i * 0.02))
    assert len(loop.timeline.points) == 5
