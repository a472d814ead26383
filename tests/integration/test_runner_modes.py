"""Where the runner executes flow runs (``prefect.flow_runs``).

In its own process (``in_process``, the session stack's setting): several runs
at once in that one process, each with its effects exactly once; a failing
run and a cancelled run beside them, which leave them alone; and the runner
killed or stopped with several runs in flight, all of which its next start
runs again. In a subprocess each (``subprocess``, Prefect's runner): runs
still complete once each, each in a process of its own. Real broker,
listener and Prefect server, simulated peers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import pytest
from conftest import once
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling
from prefect_reads import artifact_markdown, final_flow_run
from stacks import SUBPROCESS_NAMESPACE

from deployments.recovery import RECOVERY_EVERY
from swf_panda_workers.adapters.prefect_runs import PROCESS_LABEL, RunProcess, run_tags
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness

pytestmark = pytest.mark.integration

SHAPE = "testbed"
FAIL_EVERY = 7  # some failed slices, so both counts of each summary are checked
WAIT = 120.0  # generous: the machine is shared and busy; waits end when met


@pytest.fixture(autouse=True)
def runner_restored(stack: EmbeddedStack) -> Iterator[None]:
    """Later tests share the session's runner: leave it up."""
    yield
    if stack.runner is not None and not stack.runner.alive:
        stack.start_runner()


def peers_for(stack: EmbeddedStack, namespace: str, slices: int) -> PeerHarness:
    # Uniform slices, faster than the announced 0.5 s: nothing to adjust.
    return PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=slices,
        fail_every=FAIL_EVERY,
        processing_time=lambda _: 0.2,
        idle_timeout=3,
    )


def announce(peers: PeerHarness, runs: list[str]) -> None:
    for run_id in runs:
        peers.control.announce(run_id, SHAPE, target_workers=3, slice_processing_time=0.5)
    assert peers.wait_until(lambda: all(map(peers.task_created, runs)), WAIT), (
        "iDDS never created every run's task"
    )


def sent(peers: PeerHarness, run_id: str) -> int:
    run = peers.farm.runs.get(run_id)
    return run.slices_sent if run is not None else 0


def end_and_account(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, runs: list[str], slices: int
) -> list[FlowRun]:
    """Once every slice went out, end the runs; each must complete with one
    create, one stop and one close on the bus and every result counted."""
    assert peers.farm.wait_for(lambda: all(sent(peers, r) >= slices for r in runs), WAIT)
    for run_id in runs:
        peers.control.end(run_id, SHAPE)
    flow_runs = [asyncio.run(final_flow_run(stack.api_url, namespace, r)) for r in runs]
    assert {r: f.state_name for r, f in zip(runs, flow_runs, strict=True)} == dict.fromkeys(
        runs, "Completed"
    )
    assert peers.recorder.settle(30), "the recorder's marker never came back"
    for run_id in runs:
        counts = {
            t: peers.recorder.count(t, run_id)
            for t in ("create_workflow_task", "stop_transformer", "close_workflow_task")
        }
        assert set(counts.values()) == {1}, f"run {run_id}: {counts}"
        farm_run = peers.farm.run(run_id, 10)
        assert farm_run.failed_sent > 0  # else the failed count proves nothing
        done = farm_run.slices_sent - farm_run.failed_sent
        summary = asyncio.run(artifact_markdown(stack.api_url, f"run-{namespace}-{run_id}"))
        assert f"slices: {done} done, {farm_run.failed_sent} failed" in summary, summary
    assert peers.idds.violations == []
    return flow_runs


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# --- the tests ---------------------------------------------------------------------


def test_several_runs_at_once_in_the_runner_process_each_once(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    assert stack.settings.prefect.flow_runs == "in_process"
    runner = stack.runner
    assert runner is not None and runner.process is not None
    slices = 40
    runs = [new_run_id() for _ in range(5)]
    with peers_for(stack, namespace, slices) as peers:
        announce(peers, runs)
        # All five under way together, each claimed by the runner's own
        # process, and no process started for any of them.
        flow_runs = asyncio.run(top_level_runs(stack.api_url, namespace, runs))
        assert {f.state_name for f in flow_runs} == {"Running"}
        claims = {RunProcess.from_label(f.labels.get(PROCESS_LABEL)) for f in flow_runs}
        assert {(c.pid, c.alive()) for c in claims if c is not None} == {
            (runner.process.pid, True)
        }, claims
        assert children_of(runner.process.pid) == []
        end_and_account(stack, peers, namespace, runs, slices)
    assert runner.alive


@once("the runner's handling of one run's end; the same through Prefect's API on both databases")
def test_a_failing_run_and_a_cancelled_run_leave_the_others_alone(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    runner = stack.runner
    assert runner is not None and runner.process is not None
    pid = runner.process.pid
    slices = 60
    runs, cancelled, failing = [new_run_id(), new_run_id()], new_run_id(), new_run_id()
    with peers_for(stack, namespace, slices) as peers:
        announce(peers, [*runs, cancelled])
        # A flow run whose announcement is not its run's: the flow raises,
        # Prefect retries it once (in this process), and it fails.
        asyncio.run(
            start_flow_run(
                stack, namespace, failing, announcement={"msg_type": "end_run", "run_id": failing}
            )
        )
        assert peers.farm.wait_for(lambda: sent(peers, cancelled) > 0, WAIT)
        asyncio.run(cancel(stack.api_url, namespace, cancelled))

        failed = asyncio.run(final_flow_run(stack.api_url, namespace, failing, wait=WAIT))
        assert failed.state_name == "Failed", failed.state
        assert "announcement must be the run_imminent" in (failed.state.message or "")
        assert failed.run_count == 2, "the flow's retry did not run"
        # Its engine reports Crashed as its task is cancelled, the runner then Cancelled.
        stopped = asyncio.run(flow_run_in_state(stack.api_url, namespace, cancelled, "Cancelled"))

        end_and_account(stack, peers, namespace, runs, slices)
        # The cancelled run stays cancelled: the recovery has looked at it
        # twice since, and it was never run again.
        time.sleep(max(0.0, 2 * RECOVERY_EVERY + 2 - seconds_since(stopped)))
        states = asyncio.run(states_of(stack.api_url, stopped.id))
        assert states[-1].name == "Cancelled", [s.name for s in states]
        assert [s.name for s in states].count("Running") == 1
        assert len(peers.recorder.of_type("create_workflow_task", cancelled)) == 1
        assert len(peers.recorder.of_type("create_workflow_task", failing)) == 0
    assert runner.alive and runner.process.pid == pid


@once("the runner's recovery of its runs; the same through Prefect's API on both databases")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_runner_gone_with_several_runs_in_flight_has_them_all_run_again(
    how: str, stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    """Killed (SIGKILL) or stopped (SIGTERM): either way the runs in flight
    stay unfinished, not Cancelled, and the next start reruns every one."""
    runner = stack.runner
    assert runner is not None and runner.process is not None
    slices = 90
    runs = [new_run_id() for _ in range(3)]
    with peers_for(stack, namespace, slices) as peers:
        announce(peers, runs)
        assert peers.farm.wait_for(lambda: all(sent(peers, r) >= 15 for r in runs), WAIT)
        if how == "killed":
            runner.kill()
        else:
            runner.stop()
            assert runner.process.returncode == 0, "the runner did not stop on SIGTERM"
        try:
            left = asyncio.run(top_level_runs(stack.api_url, namespace, runs))
            assert {f.state_name for f in left} == {"Running"}
        finally:
            stack.start_runner()
        flow_runs = end_and_account(stack, peers, namespace, runs, slices)
    for flow_run in flow_runs:
        assert flow_run.run_count >= 2, f"{flow_run.name} was not run again"
        states = asyncio.run(states_of(stack.api_url, flow_run.id))
        assert any((s.message or "").startswith("Rescheduled by the runner") for s in states), [
            f"{s.name}: {s.message}" for s in states
        ]


@once("the runner's processes; the same through Prefect's API on both databases")
def test_the_subprocess_mode_runs_each_flow_run_in_a_process_of_its_own(
    subprocess_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    runner = subprocess_stack.runner
    assert runner is not None and runner.process is not None
    slices = 30
    runs = [new_run_id(), new_run_id()]
    with peers_for(subprocess_stack, SUBPROCESS_NAMESPACE, slices) as peers:
        announce(peers, runs)
        # Each flow-run process records itself beside its run's start, not
        # before it: the records may trail the creates by a moment.
        deadline = time.monotonic() + 30
        while True:
            flow_runs = asyncio.run(
                top_level_runs(subprocess_stack.api_url, SUBPROCESS_NAMESPACE, runs)
            )
            claims = [RunProcess.from_label(f.labels.get(PROCESS_LABEL)) for f in flow_runs]
            if all(claims) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pids = {c.pid for c in claims if c is not None and c.alive()}
        assert len(pids) == len(runs) and runner.process.pid not in pids, claims
        assert pids <= set(children_of(runner.process.pid))
        end_and_account(subprocess_stack, peers, SUBPROCESS_NAMESPACE, runs, slices)


# --- Prefect ---------------------------------------------------------------------


async def top_level_runs(api_url: str, namespace: str, runs: list[str]) -> list[FlowRun]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            found = []
            for run_id in runs:
                found += await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=run_tags(namespace, run_id)),
                        parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
                    )
                )
    assert len(found) == len(runs), [f.name for f in found]
    return found


async def flow_run_in_state(
    api_url: str, namespace: str, run_id: str, state: str, wait: float = WAIT
) -> FlowRun:
    deadline = time.monotonic() + wait
    while True:
        (flow_run,) = await top_level_runs(api_url, namespace, [run_id])
        if flow_run.state_name == state:
            return flow_run
        assert time.monotonic() < deadline, f"run {run_id}: {flow_run.state}, not {state}"
        await asyncio.sleep(0.5)


async def start_flow_run(
    stack: EmbeddedStack, namespace: str, run_id: str, announcement: dict[str, object]
) -> None:
    """A flow run of the deployment, as the listener would start it."""
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(stack.settings.prefect.deployment)
            await client.create_flow_run_from_deployment(
                deployment.id,
                name=f"run-{run_id}",
                tags=run_tags(namespace, run_id),
                parameters={"run_id": run_id, "namespace": namespace, "announcement": announcement},
            )


async def cancel(api_url: str, namespace: str, run_id: str) -> None:
    """What the UI's Cancel does: the flow run goes Cancelling."""
    (flow_run,) = await top_level_runs(api_url, namespace, [run_id])
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            await client.set_flow_run_state(flow_run.id, Cancelling())


async def states_of(api_url: str, flow_run_id: UUID) -> list[State]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            states = await client.read_flow_run_states(flow_run_id)
    return sorted(states, key=lambda s: s.timestamp)


def seconds_since(flow_run: FlowRun) -> float:
    assert flow_run.state is not None
    return time.time() - flow_run.state.timestamp.timestamp()
