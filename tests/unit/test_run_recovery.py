"""Which flow runs the runner takes for orphans (deployments/recovery.py), and
how a flow run's process is recognised (RunProcess): decided on real
processes of this machine, no Prefect server needed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import SetStateStatus

from deployments.recovery import (
    UNCLAIMED_GRACE,
    crash_ends_a_cancel,
    orphaned,
    recover_orphans,
)
from swf_panda_workers.adapters.prefect_runs import PROCESS_LABEL, RunProcess
from swf_panda_workers.core.timestamps import utc_now

NOW = utc_now()
LONG_AGO = NOW - timedelta(seconds=UNCLAIMED_GRACE + 1)
JUST_NOW = NOW - timedelta(seconds=1)


def flow_run(
    state: StateType, since: datetime, run_count: int = 1, process: RunProcess | None = None
) -> FlowRun:
    labels = {PROCESS_LABEL: process.label} if process is not None else {}
    return FlowRun(
        flow_id=uuid4(),
        run_count=run_count,
        labels=labels,
        state=State(type=state, timestamp=since, message="exit code -9"),
    )


@pytest.fixture(scope="module")
def dead_process() -> RunProcess:
    """A process of this machine that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        process = RunProcess.of(child.pid, 1)
        assert process.alive()
    finally:
        child.kill()
        child.wait()
    return process


def test_a_crashed_run_is_an_orphan() -> None:
    reason = orphaned(flow_run(StateType.CRASHED, JUST_NOW), NOW)
    assert reason is not None and "crashed" in reason and "exit code -9" in reason


def test_a_run_whose_process_lives_is_left_alone() -> None:
    run = flow_run(StateType.RUNNING, LONG_AGO, process=RunProcess.current(1))
    assert orphaned(run, NOW) is None


def test_a_run_whose_process_is_gone_is_an_orphan_at_once(dead_process: RunProcess) -> None:
    reason = orphaned(flow_run(StateType.RUNNING, JUST_NOW, process=dead_process), NOW)
    assert reason == f"its process {dead_process.pid} on {dead_process.host} is gone"


def test_a_pid_taken_by_a_later_process_is_not_the_run_s_process() -> None:
    me = RunProcess.current(1)
    earlier = replace(me, started=str(int(me.started) - 1))  # same pid, other start
    assert earlier.alive() is False
    assert orphaned(flow_run(StateType.RUNNING, JUST_NOW, process=earlier), NOW) is not None


def test_a_run_on_another_host_is_left_alone(dead_process: RunProcess) -> None:
    elsewhere = replace(dead_process, host=dead_process.host + "-elsewhere")
    assert elsewhere.alive() is None
    assert orphaned(flow_run(StateType.RUNNING, LONG_AGO, process=elsewhere), NOW) is None


@pytest.mark.parametrize("state", [StateType.RUNNING, StateType.PENDING])
def test_a_run_no_process_claimed_is_an_orphan_only_after_the_grace(
    state: StateType, dead_process: RunProcess
) -> None:
    # The label is the previous attempt's: the current one has not claimed it.
    previous = replace(dead_process, attempt=1)
    assert orphaned(flow_run(state, JUST_NOW, run_count=2, process=previous), NOW) is None
    reason = orphaned(flow_run(state, LONG_AGO, run_count=2, process=previous), NOW)
    assert reason is not None and "no process took it up" in reason


def test_a_pending_run_is_judged_by_its_age_not_by_the_last_process(
    dead_process: RunProcess,
) -> None:
    # Rescheduled after its process died, now being started again: the old
    # process being gone says nothing about the new one.
    assert orphaned(flow_run(StateType.PENDING, JUST_NOW, process=dead_process), NOW) is None


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    process = RunProcess.of(child.pid, 1)
    deadline = time.monotonic() + 10
    while process.alive() and time.monotonic() < deadline:  # exits, unreaped: a zombie
        time.sleep(0.05)
    assert process.alive() is False
    child.wait()


@pytest.mark.parametrize("label", [None, "", "host|boot|pid|start|1", "a|b|1|2", "x|y|1|2|z"])
def test_labels_this_module_did_not_write_name_no_process(label: object) -> None:
    assert RunProcess.from_label(label) is None


def test_a_process_label_round_trips() -> None:
    process = RunProcess.current(3)
    assert RunProcess.from_label(process.label) == process


def states(*types: StateType) -> list[State]:
    return [State(type=t) for t in types]


def test_a_crash_that_ends_a_cancel_is_not_recovered() -> None:
    # The in-process runner cancels the run's task; its engine reports Crashed.
    assert crash_ends_a_cancel(
        states(
            StateType.SCHEDULED,
            StateType.PENDING,
            StateType.RUNNING,
            StateType.CANCELLING,
            StateType.CRASHED,
        )
    )


@pytest.mark.parametrize(
    "history",
    [
        (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CRASHED),
        (StateType.CANCELLING, StateType.RUNNING, StateType.CRASHED),  # cancel undone
        (StateType.CANCELLING, StateType.CANCELLED),
        (StateType.CRASHED,),
        (),
    ],
)
def test_other_crashes_are_recovered(history: tuple[StateType, ...]) -> None:
    assert not crash_ends_a_cancel(states(*history))


class RecordingClient:
    """Answers the recovery's reads with ``runs``; records what it reschedules."""

    def __init__(self, runs: list[FlowRun]) -> None:
        self.runs = runs
        self.rescheduled: list[object] = []

    async def read_flow_runs(self, **_: object) -> list[FlowRun]:
        return self.runs

    async def read_flow_run_states(self, _: object) -> list[State]:
        return []

    async def update_flow_run_labels(self, *_: object) -> None:
        return None

    async def set_flow_run_state(
        self, run_id: object, state: State, force: bool = False
    ) -> SimpleNamespace:
        self.rescheduled.append(run_id)
        return SimpleNamespace(status=SetStateStatus.ACCEPT, details=None)


def test_a_run_this_process_executes_is_never_rescheduled() -> None:
    # Running for long without a claim: an orphan by the labels, unless its
    # task runs in this very process (its claim may still be on its way).
    mine = flow_run(StateType.RUNNING, LONG_AGO)
    lost = flow_run(StateType.RUNNING, LONG_AGO)
    client = RecordingClient([mine, lost])
    rescheduled = asyncio.run(
        recover_orphans(
            client,  # type: ignore[arg-type]
            uuid4(),
            timedelta(hours=1),
            executing_here={mine.id},
        )
    )
    assert [run.id for run in rescheduled] == [lost.id]
    assert client.rescheduled == [lost.id]
