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
from conftest import once
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

from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.idds_rest.server import SimulatedIDDSRest
from swf_testbed.peers.scenario import play_session, slowdown_in_the_middle

pytestmark = [pytest.mark.integration, once("the REST gateway against the simulated iDDS")]

SLICES = 30
NAMESPACE = "itestrest"  # the rest_stack's (conftest)
# Two flow-run attempts (the flow retries once), each trying a request once
# plus once per idds.retry_delays entry (two in REST_CONFIG).
TRIES = 1 + 2  # one request's tries within a flow-run attempt
ATTEMPTS = 2 * TRIES


def harness(stack: EmbeddedStack, port: int, token: str) -> PeerHarness:
    """The peers, with the iDDS REST server where the runner expects it,
    requiring ``token``."""
    return PeerHarness(
        stack.brokers,
        NAMESPACE,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        idle_timeout=3,
        heartbeat_every=2,
        idds_mode="rest",
        rest_port=port,
        rest_token=token,
        rest_vo="eic",
    )


@pytest.fixture
def peers(rest_stack: EmbeddedStack, rest_idds_port: int, rest_token: str) -> Iterator[PeerHarness]:
    with harness(rest_stack, rest_idds_port, rest_token) as started:
        yield started


def rest_server(peers: PeerHarness) -> SimulatedIDDSRest:
    assert peers.idds_rest is not None
    return peers.idds_rest


def test_two_concurrent_runs_go_through_their_whole_life_over_rest(
    rest_stack: EmbeddedStack,
    peers: PeerHarness,
    new_run_id: Callable[[], str],
    rest_token: str,
) -> None:
    server = rest_server(peers)
    runs = [new_run_id(), new_run_id()]
    session = play_session(peers, runs, "testbed", SLICES)
    assert session.created and session.closed and session.stopped, session

    for run_id in runs:
        task = server.tasks[run_id]
        (create,) = server.calls_for("create", run_id)
        # iDDS 2.6.21's answer after making the task: the run found it by name.
        assert (create.status, create.outcome) == (500, "error")
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
        assert (
            parameters["request_id"],
            parameters["transform_id"],
            parameters["workload_id"],
        ) == (task.request_id, task.transform_id, task.workload_id)
        assert server.closed[run_id] == "ToCancel"

        # Nothing for iDDS went on the bus; the stop did, as an integer run id.
        for msg_type in ("create_workflow_task", "adjust_worker", "close_workflow_task"):
            assert peers.recorder.of_type(msg_type, run_id) == []
        assert peers.recorder.stop_forms(run_id) == [int(run_id), run_id]
        farm_run = peers.farm.run(run_id, 10)
        assert peers.farm.wait_for(lambda r=farm_run: r.stopped, 10)

    assert server.duplicate_creates == {}
    assert server.violations == []
    assert peers.idds.requests == []  # the bus iDDS heard no request at all
    flow_runs = {r: asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, r)) for r in runs}
    assert {r: f.state_name for r, f in flow_runs.items()} == dict.fromkeys(runs, "Completed")
    for flow_run in flow_runs.values():
        assert_no_token_in(rest_stack, flow_run, rest_token)


def test_a_transient_idds_failure_is_retried_and_the_run_goes_on(
    rest_stack: EmbeddedStack,
    peers: PeerHarness,
    new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.fail_next(2, status=500, message="database is restarting", endpoint="create")
    run_id = new_run_id()

    session = play_session(peers, [run_id], "testbed", SLICES)

    assert session.closed, session
    # Two failures that made nothing, then the create that made the task,
    # answered 500 as iDDS 2.6.21 does: found by name, not created again.
    assert [(c.status, c.outcome) for c in server.calls_for("create", run_id)] == [
        (500, "injected"),
        (500, "injected"),
        (500, "error"),
    ]
    assert list(server.tasks) == [run_id]
    assert len(server.calls_for("close", run_id)) == 1
    flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id))
    assert flow_run.state_name == "Completed"


def test_idds_errors_end_in_a_failed_run_that_says_what_idds_answered(
    rest_stack: EmbeddedStack,
    peers: PeerHarness,
    new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.fail_next(
        100, status=500, message="PanDA refused the task: quota exceeded", endpoint="create"
    )
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


def test_a_create_that_timed_out_but_was_carried_out_is_found_not_made_again(
    rest_stack: EmbeddedStack,
    peers: PeerHarness,
    new_run_id: Callable[[], str],
) -> None:
    server = rest_server(peers)
    server.delay(5, endpoint="create")  # the client gives up after idds.timeout = 3 s
    run_id = new_run_id()

    peers.control.announce(run_id, "testbed", target_workers=3, slice_processing_time=0.5)
    # The slow server carries out the first create after the client gave up;
    # a later attempt's lookup finds that task, and the run goes on with it.
    # The creates still in flight then fail inside iDDS (the name exists).
    assert peers.wait_until(lambda: peers.task_created(run_id), 60)
    assert server.wait_for(lambda: len(server.calls_for("create", run_id)) >= 2, 60)
    peers.control.end(run_id, "testbed")
    flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id, wait=120))

    assert flow_run.state_name == "Completed"
    creates = len(server.calls_for("create", run_id))
    assert creates < ATTEMPTS  # bounded: it stopped creating once it found the task
    assert server.wait_for(lambda: server.duplicate_creates.get(run_id) == creates - 1, 10)
    assert [t.status for t in server.tasks_of(run_id)] == ["ToCancel"]
    (close,) = server.calls_for("close", run_id)
    assert close.status == 200


def test_a_refused_credential_fails_the_run_with_idds_reason(
    rest_stack: EmbeddedStack,
    new_run_id: Callable[[], str],
    rest_idds_port: int,
    rest_token: str,
) -> None:
    with harness(rest_stack, rest_idds_port, "a-token-the-runner-does-not-have") as peers:
        server = rest_server(peers)
        run_id = new_run_id()
        peers.control.announce(run_id, "testbed", target_workers=3)
        flow_run = asyncio.run(final_flow_run(rest_stack.api_url, NAMESPACE, run_id, wait=90))

        assert flow_run.state_name == "Failed"
        assert flow_run.state is not None
        # Each attempt first looks the run's task up, and iDDS refuses that:
        # no create is sent blind after a lookup that failed.
        assert "get_request_id_by_name failed" in (flow_run.state.message or "")
        assert "Failed to verify oidc token" in (flow_run.state.message or "")
        # And the last attempt's close, which looks the task up by name too.
        calls = server.calls_to("lookup")
        assert [c.status for c in calls] == [401] * (ATTEMPTS + TRIES)
        assert server.calls_to("create") == []
        assert all(rest_token not in repr(c) for c in calls)
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
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])
                )
            )
            runs: list[Any] = [flow_run, *children]
            fresh = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
            )
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])),
                limit=200,
            )
    return repr([r.parameters for r in fresh]), [log.message for log in logs]
