"""iDDS as it is, with the simulated iDDS made to do on cue what the real one
does now and then (the real transceiver runs in test_real_peers.py): handle
one create on two threads at once (two tasks for one run), answer late, or
fail every adjust. Whatever it does, a run ends with every task iDDS made
for it closed and its transformers stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from broker_reads import ids_of
from conftest import once
from prefect_reads import final_flow_run, slices_reported

from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.recorder import BusRecorder
from swf_testbed.peers.scenario import slowdown_in_the_middle

pytestmark = [
    pytest.mark.integration,
    once("the run flow's logic about iDDS; the lifecycle tests run on both databases"),
]

SLICES = 20
WAIT = 60.0


def sent_at(recorder: BusRecorder, msg_type: str, run_id: str) -> list[float]:
    return [
        r.at
        for r in recorder.records
        if r.msg_type == msg_type and str(r.body.get("run_id")) == run_id
    ]


def test_two_tasks_for_one_run_the_extra_is_closed_at_once(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    run_id = new_run_id()
    with PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=SLICES,
        idds_copies=2,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        idle_timeout=3,
    ) as peers:
        recorder = peers.recorder
        peers.control.announce(run_id, "testbed", target_workers=3, slice_processing_time=0.5)
        assert recorder.wait_for(
            lambda: len(recorder.of_type("created_workflow_task", run_id)) == 2, WAIT
        )
        first, extra = (ids_of(b) for b in recorder.of_type("created_workflow_task", run_id))
        assert first != extra
        # The extra task is closed while the run goes on.
        assert recorder.wait_for(
            lambda: any(
                ids_of(c) == extra for c in recorder.of_type("close_workflow_task", run_id)
            ),
            WAIT,
        )
        farm_run = peers.farm.run(run_id, WAIT)
        assert peers.farm.wait_for(lambda: farm_run.slices_sent >= SLICES, WAIT)
        extra_closed_at = sent_at(recorder, "close_workflow_task", run_id)[0]
        peers.control.end(run_id, "testbed")
        flow_run = asyncio.run(final_flow_run(stack.api_url, namespace, run_id))
        assert flow_run.state_name == "Completed", flow_run.state

        # Adjusts only ever named the run's (first) task; the run's own close
        # came after end_run, the extra's before it.
        assert recorder.of_type("adjust_worker", run_id)
        assert {ids_of(a) for a in recorder.of_type("adjust_worker", run_id)} == {first}
        closes = [ids_of(c) for c in recorder.of_type("close_workflow_task", run_id)]
        assert closes == [extra, first]
        end_at = sent_at(recorder, "end_run", run_id)[0]
        assert extra_closed_at < end_at
        assert recorder.stops(run_id) == 1
        assert peers.idds.wait_for(
            lambda: all(t.status == "ToCancel" for t in peers.idds.tasks_of(run_id)), WAIT
        )
        assert len(peers.idds.tasks_of(run_id)) == 2
        assert slices_reported(stack.api_url, namespace, run_id) == (
            farm_run.slices_sent - farm_run.failed_sent,
            farm_run.failed_sent,
        )
        assert peers.idds.violations == []


def test_an_end_before_idds_answers_stops_and_closes_by_run_id(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    # iDDS makes the task but its reply never comes (its handler failed after
    # the commit, say): the run's end must still close it.
    run_id = new_run_id()
    with PeerHarness(stack.brokers, namespace, answer_create=False, idle_timeout=3) as peers:
        recorder = peers.recorder
        peers.control.announce(run_id, "testbed", target_workers=2, slice_processing_time=0.5)
        assert peers.idds.wait_for(lambda: bool(peers.idds.tasks_of(run_id)), WAIT)
        peers.control.end(run_id, "testbed")
        assert recorder.wait_for(
            lambda: (
                recorder.stops(run_id) == 1
                and bool(recorder.of_type("close_workflow_task", run_id))
            ),
            WAIT,
        )
        (close,) = recorder.of_type("close_workflow_task", run_id)
        assert close["content"]["run_id"] == run_id
        assert ids_of(close) == (None, None, None)
        flow_run = asyncio.run(final_flow_run(stack.api_url, namespace, run_id))
        assert flow_run.state_name == "Completed", flow_run.state
        assert [t.status for t in peers.idds.tasks_of(run_id)] == ["ToCancel"]
        assert recorder.of_type("adjust_worker", run_id) == []
        end_at = sent_at(recorder, "end_run", run_id)[0]
        stop_at = min(sent_at(recorder, "stop_transformer", run_id))
        close_at = sent_at(recorder, "close_workflow_task", run_id)[0]
        # Measured, not asserted (timings depend on the machine's load).
        print(f"end_run -> stop {stop_at - end_at:.3f} s, -> close {close_at - end_at:.3f} s")


def test_a_failing_scaling_sub_flow_still_stops_and_closes(
    rest_stack: EmbeddedStack, rest_idds_port: int, rest_token: str, new_run_id: Callable[[], str]
) -> None:
    # iDDS fails every adjust: the scaling sub-flow fails on its first, in
    # both of the flow's attempts; the last stops the run and closes its task
    # before the flow run fails.
    namespace = rest_stack.settings.transceiver.namespace
    run_id = new_run_id()
    with PeerHarness(
        rest_stack.brokers,
        namespace,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 2, 20),
        idle_timeout=30,
        idds_mode="rest",
        rest_port=rest_idds_port,
        rest_token=rest_token,
        rest_vo="eic",
    ) as peers:
        server = peers.idds_rest
        assert server is not None
        server.fail_next(1000, endpoint="adjust", message="adjustments are switched off")
        started = time.monotonic()
        # 1.0 s slices against the 0.2 s announced: the reference policy asks.
        peers.control.announce(run_id, "testbed", target_workers=2, slice_processing_time=0.2)
        flow_run = asyncio.run(final_flow_run(rest_stack.api_url, namespace, run_id, wait=180))
        assert flow_run.state_name == "Failed", flow_run.state
        assert "adjustments are switched off" in (flow_run.state.message or "")
        assert flow_run.run_count == 2
        # No end_run was ever sent: the failure ended the run.
        assert peers.recorder.wait_for(lambda: peers.recorder.stops(run_id) == 1, WAIT)
        assert server.wait_for(
            lambda: [t.status for t in server.tasks_of(run_id)] == ["ToCancel"], WAIT
        )
        assert server.calls_to("adjust"), "no adjust was tried: nothing failed"
        assert peers.farm.wait_idle(WAIT, run_id), "the transformers ignored the stop"
        print(f"failed and closed after {time.monotonic() - started:.1f} s")
