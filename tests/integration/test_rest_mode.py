"""REST mode end to end: the same service with ``transceiver.mode: rest``
talks to a simulated iDDS REST server through the real idds-client
ClientManager over HTTP, while the control system, the transformers and the
stop still travel on the real broker. Counted on the server and on the bus,
read back from Prefect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import final_flow_run

from swf_panda_workers.embedded.stack import EmbeddedStack
from swf_panda_workers.peers.harness import PeerHarness
from swf_panda_workers.peers.idds_rest import SimulatedIDDSRest
from swf_panda_workers.peers.scenario import play_session, slowdown_in_the_middle

pytestmark = pytest.mark.integration

SLICES = 30
NAMESPACE = "itestrest"  # the rest_stack's (conftest)
# Two flow-run attempts (the flow retries once), each trying a request once
# plus once per idds.retry_delays entry (two in REST_CONFIG).
ATTEMPTS = 2 * (1 + 2)


def harness(stack: EmbeddedStack, port: int, token: str) -> PeerHarness:
    """The peers, with the iDDS REST server where the runner expects it,
    requiring ``token``."""
    return PeerHarness(stack.brokers, NAMESPACE, slices_per_run=SLICES,
                       processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
                       idle_timeout=3, heartbeat_every=2, idds_mode="rest",
                       rest_port=port, rest_token=token, rest_vo="eic")


@pytest.fixture
def peers(rest_stack: EmbeddedStack, rest_idds_port: int,
          rest_token: str) -> Iterator[PeerHarness]:
    with harness(rest_stack, rest_idds_port, rest_token) as started:
        yield started


def rest_server(peers: PeerHarness) -> SimulatedIDDSRest:
    assert peers.idds_rest is not None
    return peers.idds_rest


def test_two_concurrent_runs_go_through_their_whole_life_over_rest(
    rest_stack: EmbeddedStack, peers: PeerHarness, new_run_id: Callable[[], str],
    rest_token: str,
) -> None:
    server = rest_server(peers)
    runs = [new_run_id(), new_run_id()]
    session = play_session(peers, runs, "testbed", SLICES)
    assert session.created and session.closed and session.stopped, session

    for run_id in runs:
        task = server.tasks[run_id]
        # As iDDS 2.6.21: the create answered 500 after making the task,
        # which the run then found by its workflow name.
        (create,) = server.calls_for("create", run_id)
        assert create.status == 500
        assert create.body["workflow"]["content"]["target_worker_count"] == 3
        assert create.headers["X-IDDS-Auth-Type"] == "oidc"
        name = create.body["workflow"]["name"]
        assert name.endswith(f"_{run_id}") and task.name == name
        lookups = [c for c in server.calls_to("lookup") if c.path.endswith(f"/{name}")]
        assert [c.status for c in lookups] == [200, 200]  # before the create, and after

        # The slow stretch asks for more workers, always with the task's ids.
        adjusts = server.calls_for("adjust", run_id)
        assert adjusts, f"run {run_id} saw slow slices but asked for no workers"
        ids_path = f"/{task.request_id}/{task.transform_id}/{task.workload_id}/adjust"
        for adjust in adjusts:
            assert adjust.path.endswith(ids_path)
            assert adjust.body["parameters"]["content"]["target_worker_count"] > 3

        (close,) = server.calls_for("close", run_id)
        assert close.path.endswith(f"/workflow_task/{task.request_id}/close")
        parameters = close.body["parameters"]
        assert (parameters["request_id"], parameters["transform_id"], parameters["workload_id"]) \
            == (task.request_id, task.transform_id, task.workload_id)
        assert server.closed[run_id] == "ToCancel"

        # Nothing for iDDS went on the bus; the stop did, as an integer run id.
        for msg_type in ("create_workflow_task", "adjust_worker", "close_workflow_task"):
            assert peers.recorder.of_type(msg_type, run_id) == []
        assert peers.recorder.stop_forms(run_id) == [int(run_id), run_id]
        assert peers.farm.wait_for(lambda r=run_id: peers.farm.runs[r].stopped, 10)

    assert server.duplicate_creates == {}
    assert server.violations == []
    assert peers.idds.requests == []  # the bus iDDS heard no request at all
    flow_runs = {r: asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, r)) for r in runs}
    assert {r: f.state_name for r, f in flow_runs.items()} == dict.fromkeys(runs, "Completed")
    for flow_run in flow_runs.values():
        assert_no_token_in(rest_stack, flow_run, rest_token)


def test_a_transient_idds_failure_is_retried_and_the_run_goes_on(
    rest_stack: EmbeddedStack, peers: PeerHarness, new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.fail_next(2, status=500, message="database is restarting", endpoint="create")
    run_id = new_run_id()

    session = play_session(peers, [run_id], "testbed", SLICES)

    assert session.closed, session
    # Two failures that made nothing, then iDDS 2.6.21's 500 after making the task.
    assert [c.outcome for c in server.calls_for("create", run_id)] == [
        "injected", "injected", "error"]
    assert list(server.tasks) == [run_id] and len(server.tasks_of(run_id)) == 1
    assert len(server.calls_for("close", run_id)) == 1
    flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id))
    assert flow_run.state_name == "Completed"


def test_idds_errors_end_in_a_failed_run_that_says_what_idds_answered(
    rest_stack: EmbeddedStack, peers: PeerHarness, new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.fail_next(100, status=500, message="PanDA refused the task: quota exceeded",
                     endpoint="create")
    run_id = new_run_id()

    peers.control.announce(run_id, "testbed", target_workers=3)
    flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id, wait=90))

    assert flow_run.state_name == "Failed"
    assert flow_run.state is not None and flow_run.state.message is not None
    assert "PanDA refused the task: quota exceeded" in flow_run.state.message
    assert len(server.calls_for("create", run_id)) == ATTEMPTS  # bounded
    # No ids, so nothing to adjust or close: never a request without them.
    assert server.calls_to("adjust") == [] and server.calls_to("close") == []
    assert server.tasks == {}


def test_a_create_that_times_out_is_found_not_made_twice(
    rest_stack: EmbeddedStack, peers: PeerHarness, new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.delay(5, endpoint="create")  # the client gives up after idds.timeout = 3 s
    run_id = new_run_id()

    # The slow server carries out the create the client gave up on: the
    # run's next look finds that task, and uses it.
    session = play_session(peers, [run_id], "testbed", SLICES)

    assert session.ok, session
    flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id, wait=120))
    assert flow_run.state_name == "Completed", flow_run.state
    assert len(server.tasks_of(run_id)) == 1  # a second create, if any, was refused
    assert server.closed[run_id] == "ToCancel"


def test_a_refused_credential_fails_the_run_with_idds_reason(
    rest_stack: EmbeddedStack, new_run_id: Callable[[], str], rest_idds_port: int,
    rest_token: str,
) -> None:
    with harness(rest_stack, rest_idds_port, "a-token-the-runner-does-not-have") as peers:
        server = rest_server(peers)
        run_id = new_run_id()
        peers.control.announce(run_id, "testbed", target_workers=3)
        flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id, wait=90))

        assert flow_run.state_name == "Failed"
        assert flow_run.state is not None
        # iDDS's own reason, from the look for the run's task that comes first.
        assert "Failed to verify oidc token" in (flow_run.state.message or "")
        lookups = server.calls_to("lookup")
        assert len(lookups) >= ATTEMPTS and {c.status for c in lookups} == {401}
        assert server.calls_to("create") == []  # never sent blind
        assert all(rest_token not in repr(c) for c in lookups)
        assert server.tasks == {}
    assert_no_token_in(rest_stack, flow_run, rest_token)


# --- reading Prefect ------------------------------------------------------------


def assert_no_token_in(stack: EmbeddedStack, flow_run: FlowRun, token: str) -> None:
    """The iDDS credential is in the runner's environment only: never in a
    flow run's parameters, its logs (sub-flows included), or a service log."""
    parameters, logs = asyncio.run(_parameters_and_logs(stack.api_url, flow_run))
    assert logs, "no logs read back: the check below would prove nothing"
    assert token not in parameters
    assert not [line for line in logs if token in line]
    for log in stack.logs.glob("*.log"):
        assert token not in log.read_text(errors="replace"), log.name


async def _parameters_and_logs(api_url: str, flow_run: FlowRun) -> tuple[str, list[str]]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
            runs: list[Any] = [flow_run, *children]
            fresh = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[r.id for r in runs])))
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])), limit=200)
    return repr([r.parameters for r in fresh]), [log.message for log in logs]
