"""Two listener replicas of one namespace, on the real broker and Prefect
server, with the simulated peers: each effect happens once.

Each replica has its own client-id and durable subscription
(``transceiver.replica``), so both receive every message on the topic and turn
it into the same event (its id comes from the STOMP message id), which Prefect
stores once and a run's feed yields once; the results queue gives each slice
result to one of them; a run announced to both starts one flow run (its
idempotency key). A replica killed mid-run leaves its unacked results to the
broker, which redelivers them to the other; restarted under the same name,
it catches up on its durable subscription without repeating anything.

Each run is accounted for on the bus (one create_workflow_task,
stop_transformer and close_workflow_task, no adjust_worker size asked twice)
and in Prefect (one flow run, Completed; every slice result stored once and
counted in the run's summary)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import artifact_markdown, final_flow_run
from stacks import REPLICA_NAMESPACE, REPLICAS

from swf_panda_workers.adapters.prefect_events.feed import LATE_HISTORY_SWEEPS, follow_run
from swf_panda_workers.adapters.prefect_events.history import run_history
from swf_panda_workers.adapters.prefect_events.journal import until_stored
from swf_panda_workers.adapters.prefect_events.schema import (
    LISTENER_LABEL,
    message_event,
    message_event_name,
    run_resource_id,
)
from swf_panda_workers.core.timestamps import utc_now
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import slowdown_in_the_middle

pytestmark = pytest.mark.integration

NAMESPACE = REPLICA_NAMESPACE  # replica_stack's (stacks.py)
FAIL_EVERY = 7  # some failed slices too: both counts of the summary are checked
SHAPE = "testbed"
WAIT = 180.0  # generous: the machine is shared and busy; waits end when met
# Results handed to a frozen replica before it is killed: with two consumers
# the broker gives it about every other one, so some are surely unacked.
SENT_WHILE_FROZEN = 10


def peers_for(stack: EmbeddedStack, slices: int) -> PeerHarness:
    # Slices slow down in the middle: the run asks for more workers (the
    # seed's policy: 1.2x, then 1.5x the initial size, each once).
    return PeerHarness(
        stack.brokers,
        NAMESPACE,
        slices_per_run=slices,
        fail_every=FAIL_EVERY,
        processing_time=slowdown_in_the_middle(0.3, 1.0, slices // 4, slices // 2),
        idle_timeout=5,
    )


# --- what the replicas and Prefect did ----------------------------------------------

# Two facts are read from a replica's log, for nothing else shows them: that
# a replica received an announcement (the other replica's flow run is the same
# one, by its idempotency key, so Prefect holds no trace of the second), and
# that the broker redelivered results to it (the redelivered result makes the
# same event id as before). Their replicas have no metrics endpoint: both
# would want the one port of their shared configuration.
STARTED = re.compile(r"msg_type=run_imminent\S* run_id=(\S+) -> flow run ([0-9a-f-]{36})")


def runs_started(stack: EmbeddedStack, replica: str) -> dict[str, set[str]]:
    """run id -> the flow run ids a replica's log says run_imminent gave it."""
    started: dict[str, set[str]] = {}
    log = (stack.logs / f"listener-{replica}.log").read_text(errors="replace")
    for run_id, flow_run_id in STARTED.findall(log):
        started.setdefault(run_id, set()).add(flow_run_id)
    return started


def results_taken(stack: EmbeddedStack, replica: str, run_id: str) -> int:
    """Slice results of a run that Prefect stored as handed over by a replica."""
    label = f"swf-panda-workers-{NAMESPACE}-{replica}"
    return sum(
        e.resource.get(LISTENER_LABEL) == label
        for e in stored(stack.api_url, run_id, "slice_result")
    )


REDELIVERED_STREAM = re.compile(r"stream messages -> event \S+: .* \((\d+) redelivered\)")


def redelivered_results(stack: EmbeddedStack, replica: str) -> int:
    """Stream messages the broker redelivered to a replica (which it logs)."""
    log = (stack.logs / f"listener-{replica}.log").read_text(errors="replace")
    return sum(map(int, REDELIVERED_STREAM.findall(log)))


async def _stored(api_url: str, run_id: str) -> list[Event]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        return await run_history(
            run_resource_id(NAMESPACE, run_id), since=utc_now() - timedelta(hours=1)
        )


def stored(api_url: str, run_id: str, msg_type: str) -> list[Event]:
    """The run's events of one bus message type, as the server stored them."""
    return [
        e for e in asyncio.run(_stored(api_url, run_id)) if e.event == message_event_name(msg_type)
    ]


@dataclass
class Run:
    stack: EmbeddedStack
    peers: PeerHarness
    run_id: str
    slices: int

    def announce(self) -> None:
        self.peers.control.announce(self.run_id, SHAPE, target_workers=3, slice_processing_time=0.5)

    def sent(self) -> int:
        farm_run = self.peers.farm.runs.get(self.run_id)
        return farm_run.slices_sent if farm_run is not None else 0

    def wait_sent(self, at_least: int) -> None:
        assert self.peers.farm.wait_for(lambda: self.sent() >= at_least, WAIT), (
            f"run {self.run_id}: {self.sent()} slices sent, waited for {at_least}"
        )

    def finish_and_account(self) -> Counter[str]:
        """Once every slice was sent and its result stored, end the run; check
        nothing was lost or doubled. Returns how many stored results each
        listener handed over."""
        self.wait_sent(self.slices)
        deadline = time.monotonic() + WAIT
        while len(results := stored(self.stack.api_url, self.run_id, "slice_result")) < self.slices:
            assert time.monotonic() < deadline, (
                f"only {len(results)} of {self.slices} slice results stored for run "
                f"{self.run_id} (lost)"
            )
            time.sleep(0.5)
        ids = [e.id for e in results]
        assert len(ids) == len(set(ids)) == self.slices, (
            f"{len(ids)} results stored ({len(set(ids))} distinct) for {self.slices} sent"
        )
        self.peers.control.end(self.run_id, SHAPE)

        flow_run = asyncio.run(
            final_flow_run(self.stack.api_url, NAMESPACE, self.run_id, wait=WAIT)
        )  # one flow run, never two
        assert flow_run.state_name == "Completed", flow_run.state
        self.assert_once()
        farm_run = self.peers.farm.run(self.run_id, 10)
        assert farm_run.failed_sent > 0  # both counts are really exercised
        done, failed = farm_run.slices_sent - farm_run.failed_sent, farm_run.failed_sent
        summary = asyncio.run(
            artifact_markdown(self.stack.api_url, f"run-{NAMESPACE}-{self.run_id}")
        )
        assert f"slices: {done} done, {failed} failed" in summary, summary
        assert self.peers.idds.violations == []
        # Both replicas received each message of the topic: each is stored once.
        recorder = self.peers.recorder
        for msg_type in (
            "created_workflow_task",
            "adjusted_worker",
            "end_run",
            "closed_workflow_task",
        ):
            on_the_bus = recorder.count(msg_type, self.run_id)
            assert on_the_bus >= 1, f"run {self.run_id}: no {msg_type} on the bus"
            # The flow may have seen the last ones streamed, before the
            # server's persister wrote them.
            deadline = time.monotonic() + 30
            while (
                len(in_prefect := stored(self.stack.api_url, self.run_id, msg_type)) < on_the_bus
                and time.monotonic() < deadline
            ):
                time.sleep(0.5)
            assert len(in_prefect) == on_the_bus, (
                f"run {self.run_id}: {msg_type} {on_the_bus} on the bus, {len(in_prefect)} stored"
            )
        return Counter(e.resource.get(LISTENER_LABEL) or "?" for e in results)

    def assert_once(self) -> None:
        """On the bus: one create, stop and close; adjust_worker asked for
        larger sizes only (the policy never asks a size twice), at least once."""
        recorder = self.peers.recorder
        assert recorder.settle(30), "the recorder's marker never came back"
        counts = {
            t: recorder.count(t, self.run_id)
            for t in ("create_workflow_task", "stop_transformer", "close_workflow_task")
        }
        assert counts == dict.fromkeys(counts, 1), f"run {self.run_id}: {counts}"
        sizes = [
            a["content"]["target_worker_count"]
            for a in recorder.of_type("adjust_worker", self.run_id)
        ]
        assert sizes and len(sizes) == len(set(sizes)), (
            f"run {self.run_id}: adjust_worker sizes {sizes}"
        )


# --- the tests ------------------------------------------------------------------------


def test_an_event_sent_by_both_replicas_is_stored_once_and_followed_once(
    replica_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    """What the replicas rely on: the same message makes the same event id
    whichever replica received it, and Prefect (SQLite or PostgreSQL) keeps
    one, which a run's feed yields once."""
    run_id = new_run_id()
    body = {"msg_type": "end_run", "run_id": run_id, "namespace": NAMESPACE}
    stomp_id = f"ID:replicas-{uuid.uuid4().hex}"
    first, second = (
        message_event(
            body,
            "end_run",
            NAMESPACE,
            run_id,
            stomp_id,
            listener=f"swf-panda-workers-{NAMESPACE}-{replica}",
        )
        for replica in REPLICAS
    )
    assert first.id == second.id
    resource = run_resource_id(NAMESPACE, run_id)

    async def twice() -> tuple[list[Event], list[Event]]:
        since = utc_now() - timedelta(minutes=1)
        async with follow_run(resource, since) as feed, get_events_client() as events:
            await events.emit(first)
            await until_stored([first], timeout=WAIT)
            await events.emit(second)  # the other replica, once the first is stored
            followed = [await feed.next(WAIT)]
            # The feed reads the stored history again (twice, within 21 s):
            # once that is done, nothing more may come.
            await asyncio.sleep(sum(LATE_HISTORY_SWEEPS) + 2)
            while (event := await feed.next(2.0)) is not None:
                followed.append(event)
        await asyncio.sleep(3)  # past the server's flush interval (1 s)
        return followed, await run_history(resource, since)

    with temporary_settings({PREFECT_API_URL: replica_stack.api_url}):
        followed, stored = asyncio.run(twice())

    assert [e.id for e in followed] == [first.id]
    assert [e.id for e in stored] == [first.id]
    assert stored[0].resource.get(LISTENER_LABEL) == f"swf-panda-workers-{NAMESPACE}-a"


def test_two_replicas_cause_each_effect_once(
    replica_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    slices = 60
    with peers_for(replica_stack, slices) as peers:
        runs = [Run(replica_stack, peers, new_run_id(), slices) for _ in range(3)]
        for run in runs:
            run.announce()
        handed_over: Counter[str] = Counter()
        for run in runs:
            handed_over += run.finish_and_account()

    # Both received every announcement and got the same (one) flow run.
    started = {replica: runs_started(replica_stack, replica) for replica in REPLICAS}
    for run in runs:
        flow_runs = [started[replica].get(run.run_id) for replica in REPLICAS]
        assert flow_runs[0] is not None and len(flow_runs[0]) == 1, flow_runs
        assert flow_runs[0] == flow_runs[1], f"run {run.run_id}: {flow_runs}"
    # The results queue split the results between them.
    labels = {f"swf-panda-workers-{NAMESPACE}-{replica}" for replica in REPLICAS}
    assert set(handed_over) == labels, handed_over


def test_a_replica_killed_mid_run_leaves_the_run_to_the_other(
    replica_stack: EmbeddedStack, new_run_id: Callable[[], str]
) -> None:
    slices = 120
    survivor, victim = REPLICAS
    redelivered_before = redelivered_results(replica_stack, survivor)
    with peers_for(replica_stack, slices) as peers:
        first = Run(replica_stack, peers, new_run_id(), slices)
        first.announce()
        first.wait_sent(slices // 4)
        # The victim takes results of a run once it follows it (its own
        # subscription to the run's results): only then can it hold some.
        assert peers.wait_until(
            lambda: results_taken(replica_stack, victim, first.run_id) > 0, WAIT
        ), f"the {victim} replica never took a result of run {first.run_id}"
        # Frozen, the victim still takes its share of results from the broker
        # and acks none of them; then it dies with them.
        process = replica_stack.replicas[victim]
        assert process.alive and process.process is not None
        os.killpg(process.process.pid, signal.SIGSTOP)
        frozen_at = first.sent()
        first.wait_sent(frozen_at + SENT_WHILE_FROZEN)
        process.kill()
        killed_at = first.sent()
        # A run announced while the victim is down: only its durable
        # subscription keeps the announcement for it.
        second = Run(replica_stack, peers, new_run_id(), slices)
        second.announce()

        assert killed_at < slices, "the run had drained before the kill: no fault tested"
        first.finish_and_account()
        second.finish_and_account()
        assert redelivered_results(replica_stack, survivor) > redelivered_before, (
            f"no result the {victim} replica held was redelivered to the {survivor} replica"
        )

        # The victim, restarted under its name, catches up on what its durable
        # subscription kept (the second run's announcement among it) and
        # repeats nothing.
        replica_stack.start_replica(victim)
        assert peers.wait_until(
            lambda: second.run_id in runs_started(replica_stack, victim), WAIT
        ), f"the restarted {victim} replica never got run {second.run_id}'s announcement"
        assert (
            runs_started(replica_stack, victim)[second.run_id]
            == runs_started(replica_stack, survivor)[second.run_id]
        )
        for run in (first, second):
            run.assert_once()
            asyncio.run(final_flow_run(replica_stack.api_url, NAMESPACE, run.run_id))
