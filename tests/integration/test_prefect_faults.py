"""Prefect failing under a running run: the server stopped for 30 s while
slice results flow, and the runner killed (with its flow-run process) while
they flow. Real broker, real Prefect server, runner and listener (the
session's, restored afterwards), simulated peers.

Each run must still end Completed with, counted on the bus, exactly one
create_workflow_task, stop_transformer and close_workflow_task, and a summary
that accounts for every slice result the transformers sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import artifact_markdown, final_flow_run

from swf_panda_workers.adapters.prefect_runs import PROCESS_LABEL, RunProcess, run_tags
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import slowdown_in_the_middle

pytestmark = pytest.mark.integration

SLICES = 150
FAIL_EVERY = 7  # some results are failures, so both counts of the summary are checked
SENT_BEFORE_FAULT = 30  # the fault strikes once this many results went out
OUTAGE_SECONDS = 30.0


@pytest.fixture
def peers(stack: EmbeddedStack, namespace: str) -> Iterator[PeerHarness]:
    # 3 workers, then 5 once the slow stretch asks for more: about 15 results
    # a second, so results keep coming for several seconds after the fault.
    with PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=SLICES,
        fail_every=FAIL_EVERY,
        processing_time=slowdown_in_the_middle(0.3, 1.0, 5, 10),
        idle_timeout=5,
        heartbeat_every=2,
    ) as harness:
        yield harness


def test_a_prefect_server_outage_mid_run_loses_and_doubles_nothing(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, new_run_id: Callable[[], str]
) -> None:
    server = stack.server
    assert server is not None
    run_id = new_run_id()
    start_run(peers, run_id)

    server.stop()
    stopped = time.monotonic()
    at_stop = results_sent(peers, run_id)
    try:
        # Results keep arriving while Prefect is away: the listener must hold them.
        assert peers.farm.wait_for(lambda: results_sent(peers, run_id) > at_stop, OUTAGE_SECONDS), (
            "no result was sent during the outage"
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))  # the outage itself
    finally:
        server.start()

    finish_run(peers, run_id)
    flow_run = completed_once_and_accounted(stack, peers, namespace, run_id)
    # The flow-run process waited the outage out: its one and only attempt.
    assert flow_run.run_count == 1, f"the flow run took {flow_run.run_count} attempts"


def test_a_runner_killed_mid_run_is_replaced_and_the_run_goes_on(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, new_run_id: Callable[[], str]
) -> None:
    runner = stack.runner
    assert runner is not None
    run_id = new_run_id()
    start_run(peers, run_id)
    before = asyncio.run(flow_run_of(stack.api_url, namespace, run_id))
    process = RunProcess.from_label(before.labels.get(PROCESS_LABEL))
    assert process is not None and process.alive(), "no live flow-run process claimed the run"

    runner.kill()  # SIGKILL of the runner's process group
    try:
        at_kill = results_sent(peers, run_id)
        assert peers.wait_until(lambda: process.alive() is False, 10), (
            "the flow-run process outlived its runner"
        )
        orphan = asyncio.run(flow_run_of(stack.api_url, namespace, run_id))
        assert orphan.state_name == "Running", "Prefect noticed by itself: nothing to prove"
        assert peers.farm.wait_for(lambda: results_sent(peers, run_id) > at_kill, 30), (
            "no result was sent while no runner ran"
        )
    finally:
        if not runner.alive:
            stack.start_runner()

    finish_run(peers, run_id)
    flow_run = completed_once_and_accounted(stack, peers, namespace, run_id)
    assert flow_run.run_count >= 2, "the flow run was not run again"
    states = asyncio.run(flow_run_states(stack.api_url, flow_run))
    assert any((s.message or "").startswith("Rescheduled by the runner") for s in states), [
        f"{s.name}: {s.message}" for s in states
    ]


# --- the run, as the control system and the transformers play it ----------------


def results_sent(peers: PeerHarness, run_id: str) -> int:
    run = peers.farm.runs.get(run_id)
    return run.slices_sent if run is not None else 0


def start_run(peers: PeerHarness, run_id: str) -> None:
    """Announce the run and return once its results are flowing."""
    peers.control.announce(run_id, "testbed", target_workers=3, slice_processing_time=0.5)
    assert peers.wait_until(lambda: peers.task_created(run_id), 60), "iDDS never created the task"
    assert peers.farm.wait_for(lambda: results_sent(peers, run_id) >= SENT_BEFORE_FAULT, 60)


def finish_run(peers: PeerHarness, run_id: str) -> None:
    """Once every slice is processed, end the run and wait for iDDS's close."""
    assert peers.farm.wait_for(lambda: results_sent(peers, run_id) >= SLICES, 120), (
        f"only {results_sent(peers, run_id)} of {SLICES} results were sent"
    )
    peers.control.end(run_id, "testbed")
    assert peers.wait_until(lambda: peers.task_closed(run_id), 180), "the task was never closed"
    recorder = peers.recorder
    # Topics are delivered independently: the stop may trail the close reply.
    assert recorder.wait_for(lambda: bool(recorder.of_type("stop_transformer", run_id)), 30)


def completed_once_and_accounted(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, run_id: str
) -> FlowRun:
    flow_run = asyncio.run(final_flow_run(stack.api_url, namespace, run_id))
    assert flow_run.state_name == "Completed", flow_run.state
    for msg_type in ("create_workflow_task", "stop_transformer", "close_workflow_task"):
        sent = peers.recorder.count(msg_type, run_id)
        assert sent == 1, f"{msg_type} for run {run_id}: {sent} messages, not one"
    # The policy only ever asks for a larger size: a size asked twice is a repeat.
    sizes = [
        a["content"]["target_worker_count"] for a in peers.recorder.of_type("adjust_worker", run_id)
    ]
    assert sizes and len(sizes) == len(set(sizes)), f"adjust_worker sizes: {sizes}"
    farm_run = peers.farm.run(run_id, 10)
    assert farm_run.failed_sent > 0  # else the failed count below proves nothing
    done, failed = farm_run.slices_sent - farm_run.failed_sent, farm_run.failed_sent
    summary = asyncio.run(artifact_markdown(stack.api_url, f"run-{namespace}-{run_id}"))
    assert f"slices: {done} done, {failed} failed" in summary, summary
    return flow_run


# --- reading Prefect ------------------------------------------------------------


async def flow_run_of(api_url: str, namespace: str, run_id: str) -> FlowRun:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            (found,) = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=run_tags(namespace, run_id))
                )
            )
    return found


async def flow_run_states(api_url: str, flow_run: FlowRun) -> list[State]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            return await client.read_flow_run_states(flow_run.id)


@pytest.fixture(autouse=True)
def stack_restored(stack: EmbeddedStack) -> Iterator[None]:
    """Later tests share the session's server and runner: leave them up."""
    yield
    if stack.server is not None and not stack.server.process.alive:
        stack.server.start()
    if stack.runner is not None and not stack.runner.alive:
        stack.start_runner()
