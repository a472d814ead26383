"""The whole service with the real peers, in message mode: the session's
listener, runner and Prefect server, the real iDDS prompt transceiver
(idds-server 2.6.21) on its own database, and real transformers (idds-prompt
2.6.21's run_prompt, one process per PanDA job, fed the testbed's slices by
the simulated control system). Only PanDA (one HTTP stand-in) and the
payload are simulated.

Each run: iDDS's real ids; every slice processed by a real transformer and
counted by its run; adjusts with the task's ids; the transformers exit on
the stop, not on their idle timeout; every task of the run ToCancel in
iDDS's database. Once with one iDDS worker thread, once with four (each
handles every request: several tasks per run, the extra ones closed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_reads import ids_of, queued
from conftest import once
from prefect_reads import final_flow_run, slices_reported, wait_stored

from swf_panda_workers.adapters.stomp_bus import run_selector
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.idds_agent import IddsRecords
from swf_testbed.peers.peers_venv_scripts.payload_schedule import (
    PayloadSchedule,
    SliceRule,
)
from swf_testbed.peers.real_peers import RealPeers
from swf_testbed.peers.recorder import BusRecorder

pytestmark = pytest.mark.integration

SLICES = 16
WAIT = 60.0
FAILING = 5  # this slice of every run fails in its payload
STOP_WITHIN = 30.0  # well under the transformers' idle timeout (panda.idle_timeout, 120 s)


@pytest.fixture
def recorder(stack: EmbeddedStack) -> Iterator[BusRecorder]:
    brokers = stack.brokers
    with BusRecorder(brokers, topics=(brokers.workers_topic, brokers.transformer_topic)) as r:
        yield r


def real_peers(
    stack: EmbeddedStack, workdir: Path, threads: int, database_url: str | None
) -> RealPeers:
    # iDDS in the service's namespace, as in the testbed; results to the
    # service's results destination.
    brokers = stack.brokers
    return RealPeers(
        brokers,
        workdir,
        namespace=stack.settings.transceiver.namespace,
        num_threads=threads,
        database_url=database_url,
        results_destination=brokers.results_destination,
    )


def schedule_for(runs: list[str]) -> PayloadSchedule:
    # 0.2 s a slice, 1.2 s from slice 3 to 9 (the reference policy asks for
    # more workers: slower than 1.2 x the announced 0.5 s), one failure.
    rules = [
        rule
        for run_id in runs
        for rule in (
            SliceRule(run_id=run_id, first=FAILING, last=FAILING, seconds=0.2, fail="bad slice"),
            SliceRule(run_id=run_id, first=3, last=9, seconds=1.2),
        )
    ]
    return PayloadSchedule(0.2, tuple(rules))


def play(
    stack: EmbeddedStack, peers: RealPeers, recorder: BusRecorder, runs: list[str], workers: int
) -> dict[str, float]:
    """Announce the runs one after the other, send their slices, end each once
    the service has stored all its results; returns when each run ended."""
    control = peers.control
    for run_id in runs:
        control.announce(run_id, "testbed", target_workers=workers, slice_processing_time=0.5)
        assert recorder.wait_for(
            lambda r=run_id: bool(recorder.of_type("created_workflow_task", r)), WAIT
        ), f"the real iDDS never answered run {run_id}'s create"
    senders = [control.send_slices_in_background(run_id, SLICES, rate=8) for run_id in runs]
    for sender in senders:
        sender.join(WAIT)
    ended: dict[str, float] = {}
    namespace = stack.settings.transceiver.namespace
    for run_id in runs:
        # Every slice processed, its result stored by the service, before the end.
        stored = wait_stored(stack.api_url, namespace, run_id, SLICES, WAIT)
        assert stored == SLICES, f"run {run_id}: {stored} of {SLICES} results stored"
        control.end(run_id, "testbed")
        ended[run_id] = time.time()
    return ended


def account(
    stack: EmbeddedStack, peers: RealPeers, recorder: BusRecorder, run_id: str, stop_sent: float
) -> list[float]:
    """The run's end as the issue wants it; returns its transformers' exits
    after the stop, in seconds."""
    namespace = stack.settings.transceiver.namespace
    flow_run = asyncio.run(final_flow_run(stack.api_url, namespace, run_id, wait=WAIT * 2))
    assert flow_run.state_name == "Completed", flow_run.state
    # Every slice counted by its run: one failed (its payload raised).
    assert slices_reported(stack.api_url, namespace, run_id) == (SLICES - 1, 1)
    # Adjusts only ever with the run's (first) task's ids.
    first = recorder.of_type("created_workflow_task", run_id)[0]["content"]
    adjusts = recorder.of_type("adjust_worker", run_id)
    assert adjusts, f"run {run_id}: the slow stretch asked for no workers"
    for adjust in adjusts:
        assert [adjust["content"][k] for k in ("request_id", "transform_id", "workload_id")] == [
            first[k] for k in ("request_id", "transform_id", "workload_id")
        ]
    # The stop in both forms; every transformer of the run obeyed the
    # integer one (idds-prompt's) and exited long before its idle timeout.
    assert recorder.stop_forms(run_id) == [int(run_id), run_id]
    pilots = peers.pilots
    assert pilots.wait_for(lambda: pilots.live(run_id) == 0, STOP_WITHIN), (
        f"run {run_id}: {pilots.live(run_id)} transformers still running"
    )
    for pilot in pilots.of_run(run_id):
        assert pilot.exit_code == 0
        # Kept on the log: exit 0 is the same for the stop and for the idle
        # timeout; only the real transformer's log tells which ended it.
        assert (
            f"Received stop_transformer broadcast for current run_id={run_id}" in pilot.log_text()
        )
    # Every task iDDS made for the run ToCancel in its own database.
    records = peers.idds.database.records(run_id)
    statuses = records.processing_statuses()
    assert statuses and set(statuses) == {"ToCancel"}, tasks_report(
        records, peers, recorder, run_id
    )
    # Nothing of the run left waiting: no slice, no result.
    for queue in (peers.prompt.slices.destination, stack.brokers.results_destination):
        assert queued(stack.brokers, queue, run_selector(run_id)) == 0, queue
    return [round((p.exited_at or 0) - stop_sent, 1) for p in pilots.of_run(run_id)]


def tasks_report(records: IddsRecords, peers: RealPeers, recorder: BusRecorder, run_id: str) -> str:
    """What iDDS holds of the run beside what went by on the bus, and iDDS's
    own log of the run: which task was left open, and why, at a glance."""
    lines = ["iDDS's processings (request, transform, workload, status, updated):"]
    lines += [
        f"  {p['request_id']}, {p['transform_id']}, {p['workload_id']}, {p['status']}, "
        f"{p['updated_at']}"
        for p in records.processings
    ]
    for msg_type in ("created_workflow_task", "close_workflow_task", "closed_workflow_task"):
        seen = [ids_of(body) for body in recorder.of_type(msg_type, run_id)]
        lines.append(f"{msg_type} on the bus: {seen}")
    # iDDS's log is the only view into its threads: its creates, closes and failures.
    log = peers.idds.log_path.read_text(errors="replace").splitlines()
    lines.append("iDDS's log of the run:")
    lines += [
        line[:300]
        for line in log
        if ("workflow_task" in line and str(run_id) in line)
        or "\tERROR\t" in line
        or "publish" in line.lower()
    ][-40:]
    return "\n".join(lines)


def first_stop_at(recorder: BusRecorder, run_id: str) -> float:
    """When the run's first stop_transformer came back to the recorder (it is
    sent as end_run reaches the run's flow, and may still be on its way)."""

    def stops() -> list[float]:
        return [
            r.at
            for r in recorder.records
            if r.msg_type == "stop_transformer" and str(r.body["run_id"]) == run_id
        ]

    assert recorder.wait_for(lambda: bool(stops()), STOP_WITHIN), (
        f"run {run_id}: no stop_transformer within {STOP_WITHIN:g} s of its end"
    )
    return min(stops())


@once("the service's path on PostgreSQL is the lifecycle tests'; iDDS's, test_real_peers'")
def test_two_runs_with_the_real_idds_and_transformers(
    stack: EmbeddedStack,
    recorder: BusRecorder,
    new_run_id: Callable[[], str],
    idds_database_url: str | None,
    tmp_path: Path,
) -> None:
    runs = [new_run_id(), new_run_id()]  # the same day and site: two names
    with real_peers(stack, tmp_path, 1, idds_database_url) as peers:
        peers.set_schedule(schedule_for(runs))
        ended = play(stack, peers, recorder, runs, workers=2)
        exits = {}
        for run_id in runs:
            assert len(recorder.of_type("created_workflow_task", run_id)) == 1
            stop_at = first_stop_at(recorder, run_id)
            exits[run_id] = account(stack, peers, recorder, run_id, stop_at)
            print(
                f"run {run_id}: end_run -> stop {stop_at - ended[run_id]:.2f} s; "
                f"transformers exited {exits[run_id]} s after it"
            )
        assert len(peers.panda.submissions) == 2  # one PanDA task per run


def test_idds_with_four_worker_threads_makes_several_tasks_all_closed(
    stack: EmbeddedStack,
    recorder: BusRecorder,
    new_run_id: Callable[[], str],
    idds_database_url: str | None,
    tmp_path: Path,
) -> None:
    # Each of iDDS's worker threads handles every request: they race, and
    # one to four tasks come of one create (a thread that finds the request
    # made by another fails adding the same transform, without a reply). The
    # run's first task is kept, the others closed at once; at the end every
    # task iDDS made for a run is ToCancel, however many there were.
    runs = [new_run_id(), new_run_id()]
    with real_peers(stack, tmp_path, 4, idds_database_url) as peers:
        peers.set_schedule(schedule_for(runs))
        play(stack, peers, recorder, runs, workers=1)
        tasks = {r: len(recorder.of_type("created_workflow_task", r)) for r in runs}
        assert all(1 <= n <= 4 for n in tasks.values()), tasks
        for run_id in runs:
            stop_at = first_stop_at(recorder, run_id)
            account(stack, peers, recorder, run_id, stop_at)
            created = [c["content"] for c in recorder.of_type("created_workflow_task", run_id)]
            closed = {
                c["content"]["transform_id"]
                for c in recorder.of_type("close_workflow_task", run_id)
            }
            assert {c["transform_id"] for c in created} <= closed
            # Every task iDDS holds for the run was reported, so closed.
            transforms = peers.idds.database.records(run_id).transforms
            assert sorted(t["transform_id"] for t in transforms) == sorted(
                c["transform_id"] for c in created
            )
        print(f"tasks per run with 4 iDDS threads: {tasks}")
        # Its transformers, every task's, all stopped.
        assert peers.pilots.live() == 0
