"""SliceWindow: the demand a run's recent slice results show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swf_panda_workers.core.messages import SliceResult, parse_message
from swf_panda_workers.core.slice_window import SliceObservation, SliceWindow, percentile

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sample(
    when: float,
    took: float | None = 2.0,
    waited: float | None = 0.0,
    worker: str | None = "wn-1",
    failed: bool = False,
) -> SliceObservation:
    return SliceObservation(
        at=at(when), processing_seconds=took, waited_seconds=waited, worker=worker, failed=failed
    )


def test_a_steady_stream_gives_its_rate_time_and_workers() -> None:
    window = SliceWindow(span=60, percentile=90)
    for i in range(240):  # 2 results/s for 120 s, 1 s each, from 4 workers
        window.add(sample(i / 2, took=1.0, worker=f"wn-{i % 4}"))
    seen = window.demand(at(120))
    assert seen.rate == pytest.approx(2.0, rel=0.02)
    assert seen.processing_seconds == 1.0
    assert seen.workers_seen == 4
    assert seen.backlog == 0 and seen.waited_seconds == 0


def test_the_backlog_is_rate_times_wait() -> None:
    window = SliceWindow(span=10, percentile=50)
    for i in range(20):
        window.add(sample(i / 2, waited=30.0))
    seen = window.demand(at(10))
    assert seen.waited_seconds == 30.0
    assert seen.backlog == pytest.approx(seen.rate * 30.0)


def test_waits_can_be_ignored() -> None:
    window = SliceWindow(span=10, percentile=50, backlog_from_waits=False)
    window.add(sample(1, waited=30.0))
    assert window.demand(at(2)).backlog == 0


def test_the_rate_of_a_young_run_is_over_its_age_not_the_whole_span() -> None:
    window = SliceWindow(span=120, percentile=90)
    for i in range(10):  # 10 s slices: the first began at t=8; ten results by t=20
        window.add(sample(18 + i * 0.2, took=10.0))
    assert window.demand(at(28)).rate == pytest.approx(10 / 20)


def test_old_results_and_their_workers_are_forgotten() -> None:
    window = SliceWindow(span=30, percentile=90)
    window.add(sample(0, took=50, worker="old"))
    window.add(sample(40, took=2, worker="new"))
    seen = window.demand(at(45))
    assert seen.results == 1 and seen.workers_seen == 1 and seen.processing_seconds == 2
    assert window.demand(at(500)).results == 0
    assert window.demand(at(500)).rate == 0


def test_failed_slices_count_as_finished_but_not_in_the_time() -> None:
    window = SliceWindow(span=60, percentile=100)
    window.add(sample(1, took=2))
    window.add(sample(2, took=None, failed=True))
    window.add(sample(3, took=900, failed=True))  # a failure's time is not the slices' time
    seen = window.demand(at(4))
    assert seen.results == 3 and seen.processing_seconds == 2


def test_a_sample_from_the_real_transformers_result() -> None:
    result = parse_message(
        {
            "msg_type": "slice_result",
            "run_id": 100123,
            "created_at": "2026-03-01T08:00:40",
            "content": {
                "requested_at": "2026-03-01T08:00:00.000000",
                "processing_start_at": "2026-03-01T08:00:12.500000",
                "processed_at": "2026-03-01T08:00:40.000000",
                "state": "done",
                "hostname": "wn-7",
                "result": {"state": "done"},
            },
        }
    )
    assert isinstance(result, SliceResult)
    seen = SliceObservation.of(result, at(41))
    assert seen == SliceObservation(
        at=at(41), processing_seconds=27.5, waited_seconds=12.5, worker="wn-7", failed=False
    )


def test_clock_skew_never_makes_a_negative_wait() -> None:
    result = parse_message(
        {
            "msg_type": "slice_result",
            "run_id": 1,
            "content": {
                "requested_at": "2026-03-01T08:00:10",
                "processing_start_at": "2026-03-01T08:00:05",
                "processed_at": "2026-03-01T08:00:06",
            },
        }
    )
    assert isinstance(result, SliceResult)
    assert SliceObservation.of(result, at(6)).waited_seconds == 0


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([], 90, None),
        ([5.0], 90, 5.0),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 100, 10),
        ([3, 1, 2], 50, 2),
    ],
)
def test_percentile_is_nearest_rank(
    values: list[float], pct: float, expected: float | None
) -> None:
    assert percentile(values, pct) == expected


@given(
    st.lists(st.tuples(st.floats(0, 1e4), st.floats(0, 1e3), st.sampled_from("abcd")), max_size=200)
)
def test_the_window_holds_only_its_span(results: list[tuple[float, float, str]]) -> None:
    window = SliceWindow(span=60, percentile=90)
    for when, took, worker in sorted(results):
        window.add(sample(when, took=took, worker=worker))
    last = max((when for when, _, _ in results), default=0.0)
    inside = [r for r in results if last - r[0] <= 60]
    seen = window.demand(at(last))
    assert seen.results == len(inside)
    assert seen.workers_seen == len({worker for _, _, worker in inside})
