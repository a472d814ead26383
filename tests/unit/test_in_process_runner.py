"""What the in-process runner (deployments/in_process.py) decides by itself:
which scheduled flow runs it takes, and how it ends a run whose task is over.
No Prefect server needed."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.schemas.objects import FlowRun, State, StateType

from deployments.in_process import InProcessRunner, ends_with, runs_to_take
from swf_panda_workers.core.timestamps import utc_now

NOW = utc_now()


def scheduled(
    at: datetime | None, state: StateType = StateType.SCHEDULED, run_id: UUID | None = None
) -> FlowRun:
    return FlowRun(
        id=run_id or uuid4(), flow_id=uuid4(), next_scheduled_start_time=at, state=State(type=state)
    )


def ids(runs: list[FlowRun]) -> list[UUID]:
    return [run.id for run in runs]


def test_due_runs_are_taken_earliest_first() -> None:
    later, earlier, unset = (
        scheduled(NOW - timedelta(seconds=1)),
        scheduled(NOW - timedelta(seconds=30)),
        scheduled(None),
    )
    assert ids(runs_to_take([later, unset, earlier], set(), 10, NOW)) == ids(
        [earlier, later, unset]
    )


def test_a_run_scheduled_for_later_waits() -> None:
    soon = scheduled(NOW + timedelta(seconds=5))
    assert runs_to_take([soon], set(), 10, NOW) == []
    assert ids(runs_to_take([soon], set(), 10, NOW + timedelta(seconds=5))) == ids([soon])


def test_a_run_executing_here_is_not_taken_again() -> None:
    # Its flow failed and waits out its retry delay: Scheduled (AwaitingRetry)
    # again, but its engine, here, runs it again.
    retrying = scheduled(NOW - timedelta(seconds=1))
    other = scheduled(NOW - timedelta(seconds=1))
    assert ids(runs_to_take([retrying, other], {retrying.id}, 10, NOW)) == ids([other])


@pytest.mark.parametrize("free", [0, -1])
def test_no_free_slot_takes_nothing(free: int) -> None:
    assert runs_to_take([scheduled(NOW)], set(), free, NOW) == []


def test_no_more_runs_than_free_slots_the_earliest() -> None:
    runs = [scheduled(NOW - timedelta(seconds=s)) for s in (1, 3, 2)]
    assert ids(runs_to_take(runs, set(), 2, NOW)) == ids([runs[1], runs[2]])


@pytest.mark.parametrize("state", [StateType.PENDING, StateType.RUNNING, StateType.COMPLETED])
def test_only_scheduled_runs_are_taken(state: StateType) -> None:
    # The server's answer may be stale by the time it is read.
    assert runs_to_take([scheduled(NOW, state)], set(), 10, NOW) == []


@pytest.mark.parametrize(
    ("current", "end", "expected"),
    [
        # The engine stopped without a final state (the server was away): Crashed.
        (StateType.RUNNING, StateType.CRASHED, True),
        (StateType.PENDING, StateType.CRASHED, True),
        (StateType.CANCELLING, StateType.CANCELLED, True),
        # The engine reported the end itself.
        (StateType.COMPLETED, StateType.CRASHED, False),
        (StateType.FAILED, StateType.CRASHED, False),
        (StateType.CRASHED, StateType.CRASHED, False),
        # The Crashed the engine reports for a task cancelled on request becomes Cancelled...
        (StateType.CRASHED, StateType.CANCELLED, True),
        # ...but a run that finished before the cancel took effect keeps its end.
        (StateType.COMPLETED, StateType.CANCELLED, False),
        (StateType.CANCELLED, StateType.CANCELLED, False),
        # Scheduled again meanwhile (rescheduled): another attempt's, left alone.
        (StateType.SCHEDULED, StateType.CRASHED, False),
        (StateType.SCHEDULED, StateType.CANCELLED, False),
    ],
)
def test_how_a_run_whose_task_is_over_is_ended(
    current: StateType, end: StateType, expected: bool
) -> None:
    assert ends_with(State(type=current), end) is expected


def test_a_run_without_state_is_left_alone() -> None:
    assert ends_with(None, StateType.CRASHED) is False


def test_a_sync_flow_is_refused() -> None:
    @flow
    def blocking() -> None:
        return None

    with pytest.raises(TypeError, match="not async"):
        InProcessRunner(blocking, "x", 1, [], "")


class CancellingRuns:
    """What cancel_requested reads of Prefect: these runs are Cancelling."""

    def __init__(self, runs: list[FlowRun]) -> None:
        self.runs = runs

    async def read_flow_runs(self, **_: object) -> list[FlowRun]:
        return self.runs


def test_a_cancel_the_flow_swallowed_is_repeated_until_the_engine_ends_on_it() -> None:
    # The flow drops the first cancel, as asyncio.wait_for did before Python
    # 3.12 when its result came with the cancel; the runner's next look
    # cancels again, and once the engine has ended on a cancel it is left be.
    @flow
    async def the_flow() -> None:
        return None

    async def scenario() -> tuple[int, bool]:
        runner = InProcessRunner(the_flow, "x", 1, [], "")
        run = scheduled(NOW, StateType.CANCELLING)
        cancels_seen = 0

        async def engine() -> None:
            nonlocal cancels_seen
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cancels_seen += 1
                    if cancels_seen > 1:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]

        task = asyncio.create_task(engine())
        await asyncio.sleep(0)  # the engine is at its await
        runner._executing[run.id] = task
        client = CancellingRuns([run])
        await runner.cancel_requested(client)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not task.done(), "the first cancel was swallowed"
        await runner.cancel_requested(client)  # type: ignore[arg-type]
        # A guard, not a timing: a cancel not repeated leaves the engine waiting forever.
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(30):
                await task
        runner._cancel_taken.add(run.id)  # as execute() records it
        before = cancels_seen
        await runner.cancel_requested(client)  # type: ignore[arg-type]
        return before, cancels_seen == before

    cancels, left_alone = asyncio.run(scenario())
    assert cancels == 2
    assert left_alone
