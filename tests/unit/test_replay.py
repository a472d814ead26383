"""The replay: recorded runs played through the policies, and what they cost.

The recordings are synthetic (steady streams, a slowdown, a batch) so the
outcomes can be worked out by hand: worker-hours, time over the deadline,
slices processed or abandoned, and which way each policy moves."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from swf_panda_workers.config.loading import ConfigError
from swf_panda_workers.config.policy_specs import settings_with
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.effects import AdjustSent
from swf_panda_workers.core.recording import RecordedSlice, RunRecording
from swf_panda_workers.core.replay import (
    ReplayResult,
    comparison_table,
    replay,
)

T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
BASE = Settings()


def recording(
    arrivals: list[tuple[float, float]],
    end: float | None,
    workers: int = 3,
    failed: frozenset[int] = frozenset(),
) -> RunRecording:
    """A run whose slices arrive at (second, taking seconds), ending at ``end``."""
    slices = []
    for index, (second, took) in enumerate(arrivals):
        queued = T0 + timedelta(seconds=second)
        slices.append(
            RecordedSlice(
                at=queued + timedelta(seconds=took),
                requested_at=queued,
                processing_seconds=None if index in failed else took,
                failed=index in failed,
                worker="recorded-1",
            )
        )
    return RunRecording(
        run_id="100123",
        namespace="test",
        announcement={
            "msg_type": "run_imminent",
            "run_id": "100123",
            "content": {"target_worker_count": workers},
        },
        announced_at=T0,
        ended_at=None if end is None else T0 + timedelta(seconds=end),
        slices=slices,
    )


def steady(
    rate: float, duration: float, took: Callable[[float], float]
) -> list[tuple[float, float]]:
    count = round(rate * duration)
    return [(i / rate, took(i / rate)) for i in range(count)]


def slowdown(second: float) -> float:
    """1 s slices, 4 s from minute 10 to minute 20."""
    return 4.0 if 600 <= second < 1200 else 1.0


SLOWDOWN = recording(steady(2.0, 2400, slowdown), end=2400, workers=3)


def configured(spec: str) -> Settings:
    return settings_with(BASE, spec)[1]


def sizes(result: ReplayResult, initial: int) -> list[int]:
    return [initial, *(new_size(a) for a in result.adjustments)]


def new_size(adjustment: AdjustSent) -> int:
    count = adjustment.size.target_worker_count
    assert count is not None
    return count


def steps(result: ReplayResult, initial: int = 3) -> list[tuple[int, int]]:
    """Each adjustment as (workers before, workers after)."""
    return list(pairwise(sizes(result, initial)))


def directions(values: list[int]) -> list[int]:
    return [1 if b > a else -1 for a, b in pairwise(values) if b != a]


@pytest.mark.parametrize(
    "spec",
    [
        "reference:drain_timeout=3600",
        "reference:drain_timeout=3600,slice.processing_time=1",
        "proportional:drain_timeout=3600",
    ],
)
def test_drain_processes_every_slice(spec: str) -> None:
    result = replay(SLOWDOWN, configured(spec), spec)

    assert result.slices_processed == len(SLOWDOWN.slices)
    assert result.slices_abandoned == 0
    assert result.over_at >= result.ended_at
    assert result.last_result_at is not None and result.last_result_at <= result.over_at


@pytest.mark.parametrize("end", ["stop", "drain"])
def test_constant_size_costs_size_times_duration(end: str) -> None:
    # 1 slice/s of 1 s on 4 workers: the queue is empty at the end, so stop
    # and drain both end then. min = max = 4: the policy cannot move.
    run = recording(steady(1.0, 1800, lambda _: 1.0), end=1800, workers=4)
    spec = f"proportional:min_workers=4,max_workers=4,end={end}"

    result = replay(run, configured(spec), spec)

    assert result.adjustments == ()
    assert result.peak_workers == 4
    assert result.worker_hours == pytest.approx(4 * 1800 / 3600)
    assert result.slices_processed == 1800


def test_proportional_grows_in_the_slowdown_and_shrinks_after_it() -> None:
    spec = "proportional:min_workers=2,max_workers=12"

    result = replay(SLOWDOWN, configured(spec), spec)

    ups = [a for a, (old, new) in zip(result.adjustments, steps(result), strict=True) if new > old]
    downs = [
        a for a, (old, new) in zip(result.adjustments, steps(result), strict=True) if new < old
    ]
    slow_from, slow_to = T0 + timedelta(seconds=600), T0 + timedelta(seconds=1200)
    assert ups and all(slow_from < a.sent_at for a in ups)
    assert any(a.sent_at < slow_to for a in ups), "it reacts during the slowdown"
    assert downs and all(a.sent_at > slow_to for a in downs), "it sheds workers only after it"
    assert max(a.sent_at for a in ups) < min(a.sent_at for a in downs), "up, then down"
    assert all(2 <= new_size(a) <= 12 for a in result.adjustments)
    assert result.peak_workers == 12
    # 1 s slices at 2/s need 2/0.8 -> 3 workers again.
    assert new_size(result.adjustments[-1]) == 3
    assert all(a.reason for a in result.adjustments)


def test_proportional_beats_a_fixed_size_on_the_backlog() -> None:
    fixed = replay(SLOWDOWN, configured("reference"), "reference")
    scaled = replay(SLOWDOWN, configured("proportional"), "proportional")

    assert fixed.adjustments == ()  # 4 s is far below the configured 30 s expected
    assert scaled.backlog_over_deadline < fixed.backlog_over_deadline
    assert scaled.p90_wait is not None and fixed.p90_wait is not None
    assert scaled.p90_wait < fixed.p90_wait


def test_reference_grows_from_the_initial_size_and_never_shrinks() -> None:
    # Expected 1 s: the slowdown's 4 s slices are over 1.5x, so 1.5 x 3 -> 5.
    spec = "reference:slice.processing_time=1"

    result = replay(SLOWDOWN, configured(spec), spec)

    assert steps(result) == [(3, 5)]
    assert all(new > old for old, new in steps(result))
    assert result.peak_workers == 5


def test_stop_abandons_what_drain_processes() -> None:
    # 200 slices of 10 s at once on 2 workers, the run ending after a minute.
    batch = recording([(0.0, 10.0)] * 200, end=60, workers=2)
    fixed = "reference:slice.processing_time=100,drain_timeout=7200"

    stopped = replay(batch, configured(f"{fixed},end=stop"), "stop")
    drained = replay(batch, configured(f"{fixed},end=drain"), "drain")

    # At 60 s: 12 done, 2 in progress (stopped with their workers), 186 queued.
    assert (stopped.slices_processed, stopped.slices_abandoned) == (12, 188)
    assert stopped.over_at == T0 + timedelta(seconds=60)
    assert stopped.worker_hours == pytest.approx(2 * 60 / 3600)
    assert (drained.slices_processed, drained.slices_abandoned) == (200, 0)
    assert drained.over_at == T0 + timedelta(seconds=1000)  # 100 rounds of 10 s
    assert drained.worker_hours == pytest.approx(2 * 1000 / 3600)


def test_drain_timeout_abandons_the_rest() -> None:
    batch = recording([(0.0, 10.0)] * 200, end=60, workers=2)
    spec = "reference:slice.processing_time=100,drain_timeout=100"

    result = replay(batch, configured(spec), spec)

    assert result.over_at == T0 + timedelta(seconds=160)
    assert (result.slices_processed, result.slices_abandoned) == (32, 168)


def test_backlog_over_deadline_and_queue_wait() -> None:
    # 100 slices of 10 s at once on 1 worker: slice i starts at 10 i s. With a
    # 300 s deadline some queued slice is overdue from 300 s until the last
    # one starts, at 990 s.
    batch = recording([(0.0, 10.0)] * 100, end=10, workers=1)
    spec = "reference:slice.processing_time=100,drain_deadline=300,drain_timeout=3600"

    result = replay(batch, configured(spec), spec)

    assert result.backlog_over_deadline == pytest.approx(690)
    assert result.p90_wait == pytest.approx(890)  # the 90th of 0, 10, ..., 990
    assert result.slices_processed == 100


def test_proportional_works_off_a_batch_sooner_at_the_same_cost() -> None:
    # 300 slices of 5 s at once: no worker is ever idle, so either way the
    # worker-hours are the work itself; more workers only finish sooner.
    batch = recording([(0.0, 5.0)] * 300, end=30, workers=2)
    spec = "proportional:max_workers=10,min_results=3"

    fixed = replay(batch, configured("reference"), "reference")
    scaled = replay(batch, configured(spec), spec)

    assert fixed.over_at == T0 + timedelta(seconds=150 * 5)
    assert scaled.over_at < fixed.over_at
    assert scaled.worker_hours == pytest.approx(fixed.worker_hours)
    assert scaled.worker_hours == pytest.approx(300 * 5 / 3600)
    assert 2 < scaled.peak_workers <= 10
    assert scaled.slices_processed == 300


def test_failed_slices_without_a_time_take_the_median() -> None:
    # Slices 1 and 3 failed with no time: they hold the worker for the
    # median, 2 s, so the run is over after 2 + 2 + 2 + 2 + 2 s on 1 worker.
    run = recording(
        [(0.0, 1.0), (0.0, 99.0), (0.0, 2.0), (0.0, 99.0), (0.0, 3.0)],
        end=0,
        workers=1,
        failed=frozenset({1, 3}),
    )
    spec = "reference:slice.processing_time=100"

    result = replay(run, configured(spec), spec)

    assert result.over_at == T0 + timedelta(seconds=1 + 2 + 2 + 2 + 3)
    assert result.slices_processed == 5


def test_an_empty_recording_costs_its_initial_workers() -> None:
    run = recording([], end=600, workers=2)

    result = replay(run, configured("proportional"), "proportional")

    assert (result.slices_processed, result.slices_abandoned) == (0, 0)
    assert result.worker_hours == pytest.approx(2 * 600 / 3600)
    assert result.p90_wait is None


def test_workers_come_up_after_the_startup() -> None:
    # The reference policy asks for 5 workers at the slowdown; started after
    # 30 s they cost more, and started after the run is over they never come.
    spec = "reference:slice.processing_time=1,end=stop"
    three_workers = 3 * 2400 / 3600

    prompt = replay(SLOWDOWN, configured(spec), spec, worker_startup=30)
    never = replay(SLOWDOWN, configured(spec), spec, worker_startup=10_000)

    assert steps(prompt) == [(3, 5)]
    assert prompt.peak_workers == 5
    asked_at = prompt.adjustments[0].sent_at
    up_for = (T0 + timedelta(seconds=2400) - asked_at).total_seconds() - 30
    assert prompt.worker_hours == pytest.approx(three_workers + 2 * up_for / 3600)
    assert never.peak_workers == 3
    assert never.worker_hours == pytest.approx(three_workers)


def test_comparison_table_has_one_column_per_result() -> None:
    results = [
        replay(SLOWDOWN, configured(spec), spec)
        for spec in ("reference", "proportional", "proportional:max_workers=6")
    ]

    table = comparison_table(results).splitlines()

    assert all(spec in table[0] for spec in ("reference", "proportional:max_workers=6"))
    rows = {line.split("  ")[0].strip(): line for line in table[2:]}
    assert set(rows) == {
        "worker-hours",
        "backlog over deadline (s)",
        "adjustments",
        "peak workers",
        "slices processed / abandoned",
        "p90 queue wait (s)",
        "run over after (min)",
    }
    assert len(rows["peak workers"].split()) == 2 + 3  # "peak", "workers", 3 values
    assert rows["adjustments"].split()[1:] == [str(len(r.adjustments)) for r in results]


def test_settings_with_reads_a_spec() -> None:
    spec = "proportional:max_workers=20,up_window=10,slice.cooldown=30,max_total_cores=null"

    label, chosen = settings_with(BASE, f"  {spec} ")

    assert label == spec
    assert chosen.scaling.policy == "proportional"
    assert (chosen.scaling.max_workers, chosen.scaling.up_window) == (20, 10.0)
    assert chosen.slice.cooldown == 30.0
    assert chosen.scaling.max_total_cores is None
    assert chosen.panda == BASE.panda  # the rest as configured
    assert settings_with(BASE, "reference") == (
        "reference",
        BASE.model_copy(
            update={"scaling": BASE.scaling.model_copy(update={"policy": "reference"})}
        ),
    )


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("proportional:max_wrokers=20", "max_wrokers"),
        ("proportional:slice.colldown=3", "colldown"),
        ("proportional:nosuch.key=3", "nosuch"),
        ("proportional:max_workers=many", "max_workers"),
        ("proportional:min_workers=50,max_workers=10", "min_workers is above max_workers"),
        ("proportional:max_workers", "max_workers"),
        ("proportional:policy=reference", "policy"),
        ("adaptive", "policy"),
    ],
)
def test_settings_with_rejects_a_bad_spec(spec: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        settings_with(BASE, spec)


def test_settings_with_keeps_the_password() -> None:
    secret = BASE.model_copy(
        update={"brokers": BASE.brokers.model_copy(update={"password": "s3cret"})}
    )
    chosen = settings_with(secret, "proportional")[1]
    assert chosen.brokers.password == secret.brokers.password


BOUNDS = (1, 30)
STEADY = {"rate": st.floats(0.2, 5.0), "took": st.floats(0.5, 20.0), "initial": st.integers(1, 10)}


def steady_replay(rate: float, took: float, initial: int) -> ReplayResult:
    run = recording(steady(rate, 1200, lambda _: took), end=1200, workers=initial)
    spec = f"proportional:min_workers={BOUNDS[0]},max_workers={BOUNDS[1]}"
    return replay(run, configured(spec), spec)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**STEADY)
def test_proportional_stays_within_bounds(rate: float, took: float, initial: int) -> None:
    result = steady_replay(rate, took, initial)

    assert all(BOUNDS[0] <= new_size(a) <= BOUNDS[1] for a in result.adjustments)
    assert result.peak_workers <= max(initial, BOUNDS[1])
    assert result.slices_processed + result.slices_abandoned == round(rate * 1200)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Once 4 -> 3 at 5 s (the first results under-count the rate), then 3 -> 6, 6 -> 5.
@example(rate=1.875, took=2.0, initial=4)
@given(**STEADY)
def test_proportional_turns_at_most_once_on_a_steady_stream(
    rate: float, took: float, initial: int
) -> None:
    result = steady_replay(rate, took, initial)

    moves = directions(sizes(result, initial))
    turns = sum(1 for a, b in pairwise(moves) if a != b)
    assert turns <= 1, f"oscillates: {steps(result, initial)}"
