"""Whole runs through the real broker, the listener, a real Prefect server and
its served deployment, and the simulated peers. Everything asserted is
counted on the bus or read back from Prefect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import artifact_markdown

from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_testbed.demo import flow_run_states
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.control_system import Shape
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.recorder import BusRecorder
from swf_testbed.peers.scenario import play_session, slowdown_in_the_middle

pytestmark = pytest.mark.integration

SLICES = 30
WORKFLOW_KEYS = {
    "scope",
    "name",
    "requester",
    "username",
    "transform_tag",
    "cloud",
    "campaign",
    "campaign_scope",
    "campaign_group",
    "campaign_tag",
    "content",
}


@pytest.fixture(params=["testbed", "seed"])
def shape(request: pytest.FixtureRequest) -> Shape:
    return request.param


@pytest.fixture
def peers(stack: EmbeddedStack, shape: Shape, namespace: str) -> Iterator[PeerHarness]:
    # The seed's transformers report processing_time; the real ones do not.
    with PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        seed_shape_results=shape == "seed",
        idle_timeout=3,
        heartbeat_every=2,
    ) as harness:
        yield harness


def one(recorder: BusRecorder, msg_type: str, run_id: str) -> dict[str, Any]:
    found = recorder.of_type(msg_type, run_id)
    assert len(found) == 1, f"{msg_type} for run {run_id}: {len(found)} messages, not one"
    return found[0]


def headers_of(recorder: BusRecorder, msg_type: str, run_id: str) -> dict[str, str]:
    return next(
        r.headers
        for r in recorder.records
        if r.msg_type == msg_type and str(r.body.get("run_id")) == run_id
    )


def reply_ids(recorder: BusRecorder, run_id: str) -> dict[str, Any]:
    content = one(recorder, "created_workflow_task", run_id)["content"]
    return {k: content[k] for k in ("request_id", "transform_id", "workload_id")}


def test_two_concurrent_runs_go_through_their_whole_life(
    stack: EmbeddedStack,
    peers: PeerHarness,
    shape: Shape,
    namespace: str,
    new_run_id: Callable[[], str],
) -> None:
    runs = [new_run_id(), new_run_id()]
    session = play_session(peers, runs, shape, SLICES)
    assert session.created, "iDDS never saw/answered create_workflow_task for every run"
    assert session.closed, "not every run was closed"
    assert session.stopped, "no stop_transformer for every run"
    recorder = peers.recorder

    for run_id in runs:
        ids = reply_ids(recorder, run_id)
        create = one(recorder, "create_workflow_task", run_id)
        assert set(create["content"]) == {"run_id", "created_at", "workflow"}
        workflow = create["content"]["workflow"]
        assert set(workflow) == WORKFLOW_KEYS
        assert workflow["content"]["run_id"] == run_id
        assert workflow["content"]["target_worker_count"] == 3
        assert set(workflow["content"]["panda_attributes"]) >= {"vo", "queue", "site", "priority"}
        headers = headers_of(recorder, "create_workflow_task", run_id)
        assert headers["persistent"] == "true" and headers["vo"] == "eic"
        assert headers["namespace"] == namespace and headers["run_id"] == run_id
        assert int(headers["expires"]) > 0 and headers["ttl"].isdigit()

        # The slow stretch asks for more workers, only ever with the reply's ids.
        adjusts = recorder.of_type("adjust_worker", run_id)
        assert adjusts, f"run {run_id} saw slow slices but asked for no workers"
        for adjust in adjusts:
            sent = {k: adjust["content"][k] for k in ("request_id", "transform_id", "workload_id")}
            assert sent == ids
            assert adjust["content"]["target_worker_count"] > 3

        # Once as a JSON integer (idds-prompt compares == with its int), once
        # as the string (swf-transform, with its first slice's run id).
        assert recorder.stop_forms(run_id) == [int(run_id), run_id]
        close = one(recorder, "close_workflow_task", run_id)
        assert {k: close["content"][k] for k in ids} == ids
        assert one(recorder, "closed_workflow_task", run_id)["content"]["status"] == "ToCancel"
        # The farm hears the stop on its own connection: wait for it, briefly.
        farm_run = peers.farm.run(run_id, 10)
        assert peers.farm.wait_for(lambda r=farm_run: r.stopped, 10), (
            "the transformers ignored stop_transformer"
        )

    assert peers.idds.violations == []
    states = asyncio.run(flow_run_states(stack.api_url, runs, namespace))
    assert states == {run_id: "Completed" for run_id in runs}

    # The summary an operator reads in the UI, with what iDDS confirmed.
    for run_id in runs:
        summary = asyncio.run(artifact_markdown(stack.api_url, f"run-{namespace}-{run_id}"))
        requested = recorder.of_type("adjust_worker", run_id)[-1]["content"]
        assert (
            "target_worker_count" not in recorder.of_type("adjusted_worker", run_id)[-1]["content"]
        )
        assert "close status: **ToCancel**" in summary
        assert f"request {reply_ids(recorder, run_id)['request_id']}," in summary
        # What was asked, and that iDDS (2.6.21) confirmed no worker count.
        assert (
            f"workers requested: {requested['target_worker_count']}; confirmed by iDDS: "
            "none (this iDDS does not act on a worker count)"
        ) in summary


@pytest.mark.parametrize("shape", ["testbed"])
def test_duplicated_run_imminent_and_end_run_act_once(
    stack: EmbeddedStack,
    peers: PeerHarness,
    shape: Shape,
    namespace: str,
    new_run_id: Callable[[], str],
) -> None:
    run_id = new_run_id()
    session = play_session(peers, [run_id], shape, SLICES, duplicate_messages=True)
    assert session.closed and session.stopped
    recorder = peers.recorder
    assert len(recorder.of_type("run_imminent_worker", run_id)) == 2
    assert len(recorder.of_type("end_run", run_id)) == 2  # plus one on the other topic
    for msg_type in ("create_workflow_task", "close_workflow_task"):
        one(recorder, msg_type, run_id)
    assert recorder.stops(run_id) == 1
    assert asyncio.run(count_flow_runs(stack.api_url, namespace, run_id)) == 1


@pytest.mark.parametrize("shape", ["testbed"])
def test_a_second_run_imminent_for_a_finished_run_starts_nothing(
    stack: EmbeddedStack,
    peers: PeerHarness,
    shape: Shape,
    namespace: str,
    new_run_id: Callable[[], str],
) -> None:
    run_id = new_run_id()
    assert play_session(peers, [run_id], shape, SLICES).ok
    peers.control.announce(run_id, shape)
    # The listener handles messages in order: once a later run's create goes
    # out, the repeated announcement has been handled.
    later = new_run_id()
    peers.control.announce(later, shape)
    assert peers.recorder.wait_for(
        lambda: bool(peers.recorder.of_type("create_workflow_task", later)), 30
    )
    one(peers.recorder, "create_workflow_task", run_id)
    assert asyncio.run(count_flow_runs(stack.api_url, namespace, run_id)) == 1
    peers.control.end(later, shape)


def test_slice_results_before_the_ids_are_held_until_the_ids_come(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    # Three slow slices first; iDDS's reply comes 4 s after its transformers
    # started, by when every result is out.
    with PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=12,
        reply_delay=4.0,
        workers_before_reply=True,
        idle_timeout=3,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 0, 3),
    ) as peers:
        run_id = new_run_id()
        peers.control.announce(run_id, "testbed", slice_processing_time=0.5)
        recorder = peers.recorder
        assert recorder.wait_for(
            lambda: bool(recorder.of_type("created_workflow_task", run_id)), 30
        )
        assert peers.farm.run(run_id, 30).slices_sent == 12, "results were not all before the ids"
        assert recorder.wait_for(lambda: bool(recorder.of_type("adjust_worker", run_id)), 30)
        adjust = one(recorder, "adjust_worker", run_id)["content"]
        assert {k: adjust[k] for k in ("request_id", "transform_id", "workload_id")} == reply_ids(
            recorder, run_id
        )
        peers.control.end(run_id, "testbed")
        assert recorder.wait_for(lambda: bool(recorder.of_type("closed_workflow_task", run_id)), 30)


async def count_flow_runs(api_url: str, namespace: str, run_id: str) -> int:
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            flow_runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=run_tags(namespace, run_id))
                )
            )
    return len(flow_runs)
