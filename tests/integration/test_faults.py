"""Faults under a run: the listener killed, the broker restarted, iDDS silent or
slow. Each run goes through the real broker, listener, Prefect server and
runner, with the simulated peers, and is then accounted for on the bus (one
create_workflow_task, one stop_transformer, one close_workflow_task per run)
and in Prefect (every slice result the transformers sent is stored once and
counted once in the run's summary): nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import once
from prefect.client.schemas.objects import FlowRun
from prefect_reads import final_flow_run, slices_reported, stored_slice_results
from stacks import FAULT_CREATE_TIMEOUT, FAULT_NAMESPACE

from swf_testbed.launchers.activemq import ActiveMQ
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness

pytestmark = pytest.mark.integration

# fault_stack (stacks.py): a second runner and listener beside the
# session's, with a short wait for iDDS's ids.
# Longer than FAULT_CREATE_TIMEOUT with a wide margin, so the flow's first
# attempt has surely given up when the reply comes.
BEYOND_TIMEOUT_DELAY = 15.0
# Well inside the session's 30 s, well beyond the flow's start of its wait.
WITHIN_TIMEOUT_DELAY = 5.0

SLICES = 60
# The listener test: a burst (ten transformers, 0.05 s a slice) large enough
# that the restarted listener is still working through its backlog when it
# is killed a second time.
BURST_SLICES = 600
BURST_WORKERS = 10
FAIL_EVERY = 7  # some failed slices too: both counts are checked
SHAPE = "testbed"
WAIT = 120.0  # generous: the machine is shared and busy; waits end when met


def harness(
    stack: EmbeddedStack,
    namespace: str,
    slices: int = SLICES,
    slice_seconds: float = 0.2,
    reply_delay: float = 0.0,
    answer_create: bool = True,
) -> PeerHarness:
    # Uniform slices, faster than the announced 0.5 s: no adjust_worker, whose
    # reply would queue behind a delayed one in the simulated iDDS.
    return PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=slices,
        fail_every=FAIL_EVERY,
        processing_time=lambda _: slice_seconds,
        idle_timeout=3,
        reply_delay=reply_delay,
        answer_create=answer_create,
    )


# --- what Prefect holds ------------------------------------------------------


# --- one run, from the announcement to the accounting --------------------------


@dataclass
class Run:
    stack: EmbeddedStack
    peers: PeerHarness
    namespace: str
    run_id: str
    slices: int = SLICES

    def announce(self, workers: int = 3) -> None:
        self.peers.control.announce(
            self.run_id, SHAPE, target_workers=workers, slice_processing_time=0.5
        )

    def wait_created(self) -> None:
        recorder = self.peers.recorder
        assert recorder.wait_for(
            lambda: bool(recorder.of_type("created_workflow_task", self.run_id)), WAIT
        ), f"iDDS never answered create_workflow_task of run {self.run_id}"
        # iDDS starts the transformers right after its reply.
        self.peers.farm.run(self.run_id, 30)

    def slices_sent(self) -> int:
        return self.peers.farm.runs[self.run_id].slices_sent

    def wait_sent(self, at_least: int) -> None:
        farm = self.peers.farm
        assert farm.wait_for(lambda: self.slices_sent() >= at_least, WAIT), (
            f"run {self.run_id}: {self.slices_sent()} slices sent, waited for {at_least}"
        )

    def finish_and_account(self, outcome: str = "Completed") -> FlowRun:
        """Let the slices drain, end the run, then check nothing was lost or
        doubled, on the bus and in Prefect."""
        self.wait_sent(self.slices)
        # Every result the transformers sent is stored once before the run
        # ends: results arriving after end_run are not the run's to count.
        stored = self._wait_stored(self.slices)
        assert stored == self.slices, (
            f"{stored} slice results stored for {self.slices} sent (doubled)"
        )
        self.peers.control.end(self.run_id, SHAPE)

        flow_run = asyncio.run(final_flow_run(self.stack.api_url, self.namespace, self.run_id))
        assert flow_run.state_name == outcome, flow_run.state
        self.assert_once("create_workflow_task", "stop_transformer", "close_workflow_task")
        farm_run = self.peers.farm.runs[self.run_id]
        sent = (farm_run.slices_sent - farm_run.failed_sent, farm_run.failed_sent)
        assert farm_run.failed_sent > 0  # both counts are really exercised
        assert slices_reported(self.stack.api_url, self.namespace, self.run_id) == sent
        # The close carried the ids of iDDS's (one) reply.
        (created,) = self.peers.recorder.of_type("created_workflow_task", self.run_id)
        (close,) = self.peers.recorder.of_type("close_workflow_task", self.run_id)
        for key in ("request_id", "transform_id", "workload_id"):
            assert close["content"][key] == created["content"][key]
        assert self.peers.idds.violations == []
        return flow_run

    def _wait_stored(self, expected: int) -> int:
        deadline = time.monotonic() + WAIT
        while (
            stored := asyncio.run(
                stored_slice_results(self.stack.api_url, self.namespace, self.run_id)
            )
        ) < expected:
            assert time.monotonic() < deadline, (
                f"only {stored} of {expected} slice results stored for run {self.run_id} "
                f"within {WAIT:g}s (lost)"
            )
            time.sleep(0.5)
        return stored

    def assert_once(self, *msg_types: str) -> None:
        """Each message type went out exactly once for the run, counted on the
        bus once everything sent so far has reached the recorder."""
        assert self.peers.recorder.settle(30), "the recorder's marker never came back"
        counts = {t: self.peers.recorder.count(t, self.run_id) for t in msg_types}
        assert counts == dict.fromkeys(msg_types, 1), counts

    def count(self, msg_type: str) -> int:
        return self.peers.recorder.count(msg_type, self.run_id)


# --- the tests ---------------------------------------------------------------


def test_listener_killed_mid_run_loses_and_doubles_nothing(
    stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    assert stack.listener is not None
    with harness(stack, namespace, slices=BURST_SLICES, slice_seconds=0.05) as peers:
        run = Run(stack, peers, namespace, new_run_id(), slices=BURST_SLICES)
        run.announce(workers=BURST_WORKERS)
        run.wait_created()
        # Killed while results flow: some handed over and acked, some emitted
        # to Prefect but unacked, the rest still to come.
        run.wait_sent(BURST_SLICES // 10)
        stack.listener.kill()
        sent_at_kill = run.slices_sent()
        try:
            assert not stack.listener.alive
            # The rest piles up on the queue; the restarted listener gets it
            # all at once (prefetch) and is killed again while working
            # through it: received, unacked, some not even emitted yet.
            run.wait_sent(BURST_SLICES)
            stack.start_listener()
            stack.listener.kill()
        finally:
            stack.start_listener()
        assert sent_at_kill < BURST_SLICES, "the run drained before the kill: no fault tested"
        run.finish_and_account()


@once("the broker restarting; the listener's dedupe on the database is the listener-killed test's")
def test_broker_restarted_mid_run_loses_and_doubles_nothing(
    broker: ActiveMQ, stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    assert stack.listener is not None
    listener_pid = stack.listener.pid
    with harness(stack, namespace) as peers:
        run = Run(stack, peers, namespace, new_run_id())
        run.announce()
        run.wait_created()
        run.wait_sent(SLICES // 3)
        # The broker goes while the listener still holds unacked results, but
        # with no transformer's send in flight, whose fate could not be told.
        assert peers.farm.hold_results(30)
        sent_at_stop = run.slices_sent()
        try:
            broker.stop()
        finally:
            broker.start()
            # Everyone reconnects by themselves; the results held meanwhile
            # go out once the transformers are connected again.
            assert peers.resync(60), "a simulated peer did not reconnect"
            peers.farm.release_results()
        assert sent_at_stop < SLICES, "the run had drained before the restart: no fault tested"
        run.finish_and_account()
        # The same listener process took the run to its end: it came through
        # the broker's restart by itself, not by being started again.
        assert stack.listener.alive and stack.listener.pid == listener_pid


@once("the run flow's waits on iDDS")
def test_idds_never_answers_create_the_run_fails_and_is_closed_by_run_id(
    fault_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    with harness(fault_stack, FAULT_NAMESPACE, answer_create=False) as peers:
        run = Run(fault_stack, peers, FAULT_NAMESPACE, new_run_id())
        run.announce()
        flow_run = asyncio.run(final_flow_run(fault_stack.api_url, FAULT_NAMESPACE, run.run_id))
        assert flow_run.state is not None
        assert flow_run.state_name == "Failed", flow_run.state
        message = flow_run.state.message or ""
        assert f"did not answer create_workflow_task for run {run.run_id}" in message, message
        assert f"within {FAULT_CREATE_TIMEOUT:g}s" in message, message
        # One create, across the flow's attempts; no ids, so nothing to
        # adjust. But iDDS may have made the task without answering (this one
        # did): the last attempt stopped the run and closed it by its run id.
        run.assert_once("create_workflow_task", "stop_transformer", "close_workflow_task")
        for msg_type in ("created_workflow_task", "adjust_worker"):
            assert run.count(msg_type) == 0, f"{msg_type} sent for run {run.run_id}"
        (close,) = peers.recorder.of_type("close_workflow_task", run.run_id)
        assert close["content"]["run_id"] == run.run_id
        assert [close["content"][k] for k in ("request_id", "transform_id", "workload_id")] == [
            None,
            None,
            None,
        ]
        assert peers.idds.wait_for(lambda: peers.idds.closed.get(run.run_id) == "ToCancel", 30)
        assert [task.status for task in peers.idds.tasks_of(run.run_id)] == ["ToCancel"]
        assert peers.idds.violations == []
        assert run.run_id not in peers.farm.runs  # its creator never heard of the task


@once("the run flow's waits on iDDS")
@pytest.mark.parametrize("late", ["within_the_wait", "after_the_first_attempt_gave_up"])
def test_idds_answers_create_late_the_reply_is_used_once(
    late: str, request: pytest.FixtureRequest, namespace: str, new_run_id: Callable[[], str]
) -> None:
    if late == "within_the_wait":
        stack, delay = request.getfixturevalue("stack"), WITHIN_TIMEOUT_DELAY
    else:
        stack, namespace, delay = (
            request.getfixturevalue("fault_stack"),
            FAULT_NAMESPACE,
            BEYOND_TIMEOUT_DELAY,
        )
    # Every reply is late (the close's too); the transformers start with the reply.
    with harness(stack, namespace, reply_delay=delay) as peers:
        run = Run(stack, peers, namespace, new_run_id())
        run.announce()
        run.wait_created()
        flow_run = run.finish_and_account()
        assert run.count("created_workflow_task") == 1
        # The first attempt waited the reply out, or gave up and its retry
        # found the reply: either way, the create was not sent again.
        assert flow_run.run_count == (1 if late == "within_the_wait" else 2)
