"""Several namespaces on one broker, as the testbed runs one per developer:
each gets every result of its own runs and none of another's, whether the
transformers send their results to a queue the namespaces share (each
listener takes its runs' results by selector) or to a topic (each listener
has its own durable subscription). One namespace also talks to an iDDS in
another namespace, which answers in its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from conftest import once
from prefect_reads import final_flow_run, slices_reported
from stacks import IDDS_ELSEWHERE, RESULTS_TOPIC

from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness

pytestmark = [
    pytest.mark.integration,
    once("the broker's selectors and subscriptions between namespaces"),
]

SLICES = 60
WAIT = 120.0


def harness(stack: EmbeddedStack, idds_namespace: str | None = None) -> PeerHarness:
    # Every fifth slice fails: both counts are exercised.
    return PeerHarness(
        stack.brokers,
        stack.settings.transceiver.namespace,
        slices_per_run=SLICES,
        processing_time=lambda _: 0.05,
        fail_every=5,
        idle_timeout=3,
        idds_namespace=idds_namespace,
    )


def run_side_by_side(
    stacks: list[EmbeddedStack], peers: list[PeerHarness], new_run_id: Callable[[], str]
) -> list[str]:
    """One run per namespace at once; each ended once its slices are sent.
    Returns the run ids; asserts every result counted by its own run."""
    runs = [new_run_id() for _ in stacks]
    for harness_, run_id in zip(peers, runs, strict=True):
        harness_.control.announce(run_id, "testbed", target_workers=2)
    failures: list[str] = []

    def finish(one: PeerHarness, run_id: str) -> None:
        farm = one.farm
        if not farm.wait_for(
            lambda: run_id in farm.runs and farm.runs[run_id].slices_sent >= SLICES, WAIT
        ):
            failures.append(f"run {run_id}: its slices were never all sent")
            return
        one.control.end(run_id, "testbed")

    threads = [threading.Thread(target=finish, args=pair) for pair in zip(peers, runs, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT + 10)
    assert not failures, failures
    for one_stack, one, run_id in zip(stacks, peers, runs, strict=True):
        namespace = one_stack.settings.transceiver.namespace
        flow_run = asyncio.run(final_flow_run(one_stack.api_url, namespace, run_id))
        assert flow_run.state_name == "Completed", flow_run.state
        farm_run = one.farm.runs[run_id]
        assert farm_run.failed_sent > 0
        # Every result counted by its own run, once: none lost to the other
        # namespace's listener, none counted twice.
        assert slices_reported(one_stack.api_url, namespace, run_id) == (
            farm_run.slices_sent - farm_run.failed_sent,
            farm_run.failed_sent,
        )
    return runs


def test_two_namespaces_share_the_results_queue(
    stack: EmbeddedStack, scaling_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    stacks = [stack, scaling_stack]
    assert {s.brokers.results_destination for s in stacks} == {"/queue/panda.results.worker"}
    with harness(stack) as first, harness(scaling_stack) as second:
        run_side_by_side(stacks, [first, second], new_run_id)


def test_two_namespaces_take_results_from_a_topic_one_with_idds_elsewhere(
    topic_stacks: tuple[EmbeddedStack, EmbeddedStack], new_run_id: Callable[[], str]
) -> None:
    mine, elsewhere = topic_stacks
    with harness(mine) as first, harness(elsewhere, IDDS_ELSEWHERE) as second:
        assert first.farm.results_queue == second.farm.results_queue == RESULTS_TOPIC
        _, run_b = run_side_by_side([mine, elsewhere], [first, second], new_run_id)
        # The second namespace's requests went in iDDS's namespace, and iDDS
        # answered in its own, not the requester's.
        recorded = [r for r in second.recorder.records if str(r.body.get("run_id")) == run_b]
        requests = [
            r
            for r in recorded
            if r.msg_type in ("create_workflow_task", "adjust_worker", "close_workflow_task")
        ]
        replies = [
            r for r in recorded if r.msg_type in ("created_workflow_task", "closed_workflow_task")
        ]
        assert requests and replies
        assert {r.headers.get("namespace") for r in requests + replies} == {IDDS_ELSEWHERE}
        assert {r.body.get("namespace") for r in requests} == {"itopicb"}
