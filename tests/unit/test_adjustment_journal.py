"""A retried scaling sub-flow keeps the earlier attempt's word: it does not
send again the adjustments that attempt journaled, at the points it
journaled them, and may ask for any size again later (6 -> 4 -> 6).

The decision itself (swf_panda_workers/core/adjustment_journal.py) as a table,
then a retried sub-flow: the real RunFeed, RunView and Scaler replaying a
stored history, with Prefect's run-time (logger, task, event emission) and
iDDS replaced by fakes."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.events import Event

import flows.run_view
import flows.scaling_subflow
from flows.run_view import RunView
from flows.scaling_subflow import Scaler
from swf_panda_workers.adapters.prefect_events.feed import RunFeed
from swf_panda_workers.adapters.prefect_events.schema import effect_event, message_event
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.adjustment_journal import AdjustmentJournal
from swf_panda_workers.core.effects import Adjustment, AdjustSent, CreateSent, StopSent
from swf_panda_workers.core.messages import RunImminent, WorkerSize, WorkflowIds
from swf_panda_workers.core.policies import (
    Observation,
    ScalingMemory,
    Verdict,
    WorkerPlan,
)
from swf_panda_workers.core.run_state import RunState
from swf_panda_workers.core.scaling_loop import ScalingLoop
from swf_panda_workers.core.slice_window import SliceWindow

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
NS, RUN = "unit", "4242"
IDS = WorkflowIds(request_id=1, transform_id=2, workload_id=3)


def size(workers: int) -> WorkerSize:
    return WorkerSize(core_count=1, memory_per_core=4000, site="BNL", target_worker_count=workers)


def adjusted(workers: int, second: float) -> AdjustSent:
    return AdjustSent(
        size=size(workers),
        reason=f"to {workers}",
        decided_at=T0 + timedelta(seconds=second),
        sent_at=T0 + timedelta(seconds=second + 0.01),
    )


# --- the decision ----------------------------------------------------------------


def test_a_decision_for_the_next_journaled_size_replays_it() -> None:
    journal = AdjustmentJournal.of([adjusted(6, 1), StopSent(), adjusted(4, 2)])
    assert journal.replays(size(6))
    assert not journal.replays(size(4))  # not the next one: 6 comes first
    assert not journal.replays(size(5))  # never journaled


def test_a_journaled_adjustment_once_read_is_spent() -> None:
    journal = AdjustmentJournal.of([adjusted(6, 1), adjusted(4, 2)])
    journal = journal.read(adjusted(6, 1))
    assert not journal.replays(size(6)) and journal.replays(size(4))
    journal = journal.read(adjusted(4, 2))
    assert journal == AdjustmentJournal()
    assert not journal.replays(size(6)) and not journal.replays(size(4))


def test_reading_what_is_not_a_journaled_adjustment_changes_nothing() -> None:
    journal = AdjustmentJournal.of([adjusted(6, 1)])
    for item in (CreateSent(), adjusted(6, 9), None, "slice_result"):
        assert journal.read(item) == journal


def test_an_empty_history_replays_nothing() -> None:
    assert not AdjustmentJournal.of([]).replays(size(6))


# --- a retried scaling sub-flow ----------------------------------------------------


class SizeFromSlice:
    """A policy that asks for as many workers as the slice took seconds: the
    history below says which size is decided at which result."""

    tick_seconds = 0.0

    def decide(self, plan: WorkerPlan, seen: Observation, memory: ScalingMemory) -> Verdict:
        assert seen.slice is not None and seen.slice.processing_seconds is not None
        wanted = round(seen.slice.processing_seconds)
        if wanted == plan.workers:
            return Verdict(None, memory)
        return Verdict(
            Adjustment(size=size(wanted), reason=f"slice says {wanted}", decided_at=seen.at), memory
        )


class FakeIdds:
    """An IddsGateway that keeps the sizes asked for; a run being scaled
    asks for nothing else."""

    def __init__(self) -> None:
        self.adjusted: list[int | None] = []

    def create_workflow_task(
        self, run: RunImminent, workflow: dict[str, Any], now: datetime
    ) -> None:
        raise AssertionError("a run being scaled is not created again")

    def adjust_worker(
        self, run_id: str, ids: WorkflowIds, worker_size: WorkerSize, now: datetime
    ) -> None:
        self.adjusted.append(worker_size.target_worker_count)

    def close_workflow_task(
        self, run_id: str, ids: WorkflowIds | None, workflow_name: str, now: datetime
    ) -> None:
        raise AssertionError("this run has no extra task to close")


def result(second: float, workers: int, number: int) -> Event:
    body = {
        "msg_type": "slice_result",
        "run_id": RUN,
        "content": {"state": "done", "processing_time": float(workers), "hostname": "w1"},
    }
    event = message_event(body, "slice_result", NS, RUN, f"result-{number}")
    return event.model_copy(update={"occurred": T0 + timedelta(seconds=second)})


def journaled(effect: AdjustSent, second: float) -> Event:
    event = effect_event(effect, NS, RUN, None)
    return event.model_copy(update={"occurred": T0 + timedelta(seconds=second)})


@pytest.fixture
def prefect_runtime_faked(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """No flow run around: the run logger is a plain logger, the iDDS task
    calls straight through, and emitted events are kept here, stored at once."""
    emitted: list[Event] = []

    def ask_idds(settings: Settings) -> Any:
        async def ask(request: str, call: Any) -> Any:
            return call()

        return ask

    async def until_stored(events: list[Event]) -> None:
        return None

    logger = logging.getLogger("test.scaling")
    monkeypatch.setattr(flows.scaling_subflow, "get_run_logger", lambda: logger)
    monkeypatch.setattr(flows.run_view, "get_run_logger", lambda: logger)
    monkeypatch.setattr(flows.scaling_subflow, "ask_idds", ask_idds)
    monkeypatch.setattr(flows.run_view, "emit", emitted.append)
    monkeypatch.setattr(flows.run_view, "until_stored", until_stored)
    return emitted


def test_a_retried_scaling_sub_flow_goes_6_4_6_sending_only_the_last(
    prefect_runtime_faked: list[Event],
) -> None:
    # What the earlier attempt left: at 1 s a result asked for 6 workers,
    # journaled at 1.05 s, after a second result that says 6 too (replayed
    # while the plan still has 3); at 2 s one asked for 4. Then it died.
    history = [
        result(0.0, 3, 0),
        result(1.0, 6, 1),
        result(1.02, 6, 2),
        journaled(adjusted(6, 1.0), 1.05),
        result(2.0, 4, 3),
        journaled(adjusted(4, 2.0), 2.05),
    ]
    # What arrives once the retry follows the run live.
    live = [result(3.0, 4, 4), result(4.0, 6, 5)]

    async def retry() -> tuple[FakeIdds, RunState]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        feed = RunFeed(history, live=queue)
        state = RunState(run_id=RUN, plan=WorkerPlan(initial=size(3), current=size(3)), ids=IDS)
        view = RunView(feed, state, NS)
        idds = FakeIdds()
        settings = Settings.model_validate({"transceiver": {"namespace": NS}})
        loop = ScalingLoop(SizeFromSlice(), SliceWindow(60, 90), view.journaled_adjustments())
        scaler = Scaler(
            view,
            loop,
            idds,
            settings,
            f"EIC_2026_fastproc_BNL-OSG_20261203_{RUN}",
        )
        while view.replaying:
            await scaler.step()
        assert idds.adjusted == []  # nothing journaled is sent again
        for event in live:
            queue.put_nowait(event)
        for _ in live:
            await scaler.step()
        return idds, view.state

    idds, state = asyncio.run(retry())
    assert idds.adjusted == [6]  # back to 6, asked for again
    assert [a.size.target_worker_count for a in state.adjustments] == [6, 4, 6]
    assert state.plan.current == size(6)
    [sent] = [e for e in prefect_runtime_faked if e.event == "swf.effect.adjust_sent"]
    assert sent.payload["effect"]["size"]["target_worker_count"] == 6
    assert sent.payload["effect"]["decided_at"].startswith("2026-12-01T12:00:04")
