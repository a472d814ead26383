"""The real peers against the real broker, without the service: the real iDDS
prompt transceiver (idds-server 2.6.21) on its own database and the real
transformers (idds-prompt 2.6.21's run_prompt, one process per PanDA job),
spoken to with messages built by the service's own ``outbound``, as the
service sends them. Only PanDA (one HTTP stand-in) and the payload are
simulated.

iDDS's database is SQLite, or PostgreSQL with SWF_TEST_IDDS_DATABASE (or
SWF_TEST_PREFECT_DATABASE) =postgresql. Each test prints its figures
(``pytest -s``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from swf_panda_workers.config.schema import Brokers, Panda, Settings, Transceiver
from swf_panda_workers.core import outbound
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    RunImminent,
    SliceResult,
    WorkerSize,
    parse_message,
)
from swf_testbed.peers._bus import PeerBus
from swf_testbed.peers.peers_venv_scripts.payload_schedule import (
    PayloadSchedule,
    SliceRule,
)
from swf_testbed.peers.real_peers import RealPeers
from swf_testbed.peers.recorder import BusRecorder

pytestmark = pytest.mark.integration

WAIT = 30.0  # seconds: generous; every wait returns as soon as its condition holds
IDLE_TIMEOUT = 10  # the transformers' --idle_timeout (panda.idle_timeout)
STOP_IDLE = 5  # a stopped transformer exits once its slice queue was idle this long


@pytest.fixture
def namespace() -> str:
    return f"rp{uuid.uuid4().hex[:8]}"


@pytest.fixture
def brokers(namespace: str, broker_port: int) -> Brokers:
    """Destinations of this test alone (the broker may be shared)."""
    return Brokers(
        host="127.0.0.1",
        port=broker_port,
        heartbeat_ms=0,
        workers_topic=f"/topic/panda.workers.{namespace}",
        transformer_topic=f"/topic/panda.transformer.{namespace}",
        results_destination=f"/queue/panda.results.worker.{namespace}",
    )


@pytest.fixture
def settings(brokers: Brokers, namespace: str) -> Settings:
    """The service's settings: its namespace is iDDS's."""
    return Settings(
        transceiver=Transceiver(namespace=namespace),
        brokers=brokers,
        panda=Panda(idle_timeout=IDLE_TIMEOUT),
    )


class Service:
    """What the service does on the bus, done by hand: sends outbound's
    messages and watches the replies on the workers topic."""

    def __init__(self, brokers: Brokers, settings: Settings) -> None:
        self.settings = settings
        self.recorder = BusRecorder(brokers, topics=(brokers.workers_topic,))
        self._bus = PeerBus(brokers, name="service-by-hand")
        self.sent_at: dict[tuple[str, str], float] = {}  # (msg_type, run_id) -> when

    def __enter__(self) -> Service:
        self.recorder.start()
        self._bus.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._bus.stop()
        self.recorder.stop()

    def send(self, message: outbound.Outgoing) -> None:
        self.sent_at[(message.msg_type, str(message.body["run_id"]))] = time.time()
        self._bus.send(message.destination, message.body, message.headers)

    def create(self, run_id: str, workers: int) -> None:
        run = parse_message(
            {
                "msg_type": "run_imminent_worker",
                "run_id": run_id,
                "content": {"target_worker_count": workers, "core_count": 1},
            }
        )
        assert isinstance(run, RunImminent)
        self.send(outbound.create_workflow_task(run, self.settings, now()))

    def replies(self, msg_type: str, run_id: str) -> list[tuple[float, dict]]:
        return [
            (r.at, r.body)
            for r in self.recorder.records
            if r.msg_type == msg_type and str(r.body.get("run_id")) == run_id
        ]

    def wait_replies(self, msg_type: str, run_id: str, count: int = 1) -> list:
        assert self.recorder.wait_for(lambda: len(self.replies(msg_type, run_id)) >= count, WAIT), (
            f"no {msg_type} for run {run_id}"
        )
        return [parse_message(body) for _, body in self.replies(msg_type, run_id)]

    def latency(self, sent: str, reply: str, run_id: str) -> float:
        return self.replies(reply, run_id)[0][0] - self.sent_at[(sent, run_id)]


@dataclass
class Run:
    run_id: str
    created: CreatedWorkflowTask


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def service(brokers: Brokers, settings: Settings) -> Iterator[Service]:
    with Service(brokers, settings) as by_hand:
        yield by_hand


def results_of(peers: RealPeers, run_id: str) -> list[SliceResult]:
    assert peers.results is not None
    messages = [r.message for r in peers.results.of_run(run_id)]
    assert all(isinstance(m, SliceResult) for m in messages), [
        r.error for r in peers.results.of_run(run_id) if r.error
    ]
    return [m for m in messages if isinstance(m, SliceResult)]


def slice_ids(results: list[SliceResult]) -> list[int]:
    return sorted(
        r.content.result.result["slice_id"]
        for r in results
        if r.content.result is not None and r.content.result.result
    )


def test_one_idds_worker_two_runs_from_create_to_close(
    brokers: Brokers,
    namespace: str,
    service: Service,
    new_run_id: Callable[[], str],
    idds_database_url: str | None,
    tmp_path: Path,
) -> None:
    """The whole life of two runs with the real iDDS (one worker thread) and
    two real transformers each. Run ``a`` is stopped as the service stops a
    numeric run (a JSON integer); run ``b`` with the run id as a string, which
    the transformers ignore (``==`` against their integer): they leave only
    on their idle timeout."""
    a, b = new_run_id(), new_run_id()
    schedule = PayloadSchedule(0.2, (SliceRule(a, 3, 3, fail="simulated reconstruction error"),))
    figures: dict[str, object] = {"database": "postgresql" if idds_database_url else "sqlite"}
    with RealPeers(
        brokers,
        tmp_path,
        namespace=namespace,
        num_threads=1,
        database_url=idds_database_url,
        slices_destination=f"/queue/panda.transformer.slices.{namespace}",
        results_destination=brokers.results_destination,
        schedule=schedule,
        collect_results=True,
    ) as peers:
        figures["idds_started_in_s"] = round(peers.idds.started_in or 0, 2)

        # --- create: real ids, one PanDA task of nEvents = the workers asked for
        for run_id in (a, b):
            service.create(run_id, workers=2)
        runs = {}
        for run_id in (a, b):
            created = service.wait_replies("created_workflow_task", run_id)
            assert len(created) == 1 and isinstance(created[0], CreatedWorkflowTask)
            runs[run_id] = Run(run_id, created[0])
            figures[f"create_to_created_s_{run_id}"] = round(
                service.latency("create_workflow_task", "created_workflow_task", run_id), 3
            )
        for run in runs.values():
            ids = run.created.content
            assert all(
                isinstance(v, int)
                for v in (ids.request_id, ids.transform_id, ids.processing_id, ids.workload_id)
            )
            submitted = peers.panda.submissions_for(run.run_id)
            assert [s.task_id for s in submitted] == [ids.workload_id]
            task = submitted[0]
            assert task.task_parameters["nEvents"] == 2 and task.jobs == 2
            assert task.job_arguments == [
                "--run_id",
                run.run_id,
                "--idle_timeout",
                str(IDLE_TIMEOUT),
            ]
            assert task.task_name == f"EIC_{now():%Y}_fastproc_BNL-OSG_{now():%Y%m%d}_{run.run_id}"

        # --- the transformers: one per job, broker info through PanDA's relay
        assert peers.pilots.wait_for(lambda: len(peers.pilots.pilots) == 4, WAIT)
        assert {p.run_id for p in peers.pilots.pilots} == {a, b}
        assert peers.panda.wait_for(lambda: len(peers.panda.metainfo_calls()) == 4, WAIT)
        assert all(
            c.manager
            and c.kwargs == {"name": "prompt_broker"}
            and c.answer[0] is True
            and c.answer[1][0] is True
            for c in peers.panda.metainfo_calls()
        )

        # --- slices: a all at once, b at 20/s; every one comes back
        peers.control.send_slices(a, 10)
        peers.control.send_slices(b, 10, rate=20)
        assert peers.results.wait_for(
            lambda: len(peers.results.of_run(a)) == 10 and len(peers.results.of_run(b)) == 10, WAIT
        )
        results_a, results_b = results_of(peers, a), results_of(peers, b)
        assert slice_ids(results_b) == list(range(10))
        failed = [r for r in results_a if r.content.state == "failed"]
        assert len(failed) == 1 and failed[0].content.result is not None
        assert failed[0].content.result.state is False
        assert failed[0].content.result.error == "simulated reconstruction error"
        assert slice_ids(results_a) == [i for i in range(10) if i != 3]
        for run_id, results in ((a, results_a), (b, results_b)):
            pilots = {str(p.panda_id) for p in peers.pilots.of_run(run_id)}
            assert {str(r.content.panda_id) for r in results} <= pilots
            assert {str(r.content.panda_task_id) for r in results} == {
                str(runs[run_id].created.content.workload_id)
            }
        first = {}
        for pilot in peers.pilots.pilots:
            mine = [
                r.at
                for r in peers.results.received
                if str(r.body["content"].get("panda_id")) == str(pilot.panda_id)
            ]
            if mine:
                first[pilot.panda_id] = round(min(mine) - pilot.started_at, 2)
        figures["pilot_start_to_first_result_s"] = first
        figures["transformer_rss_mb"] = [
            round((p.rss_kb() or 0) / 1024, 1) for p in peers.pilots.pilots
        ]
        figures["idds_rss_mb"] = round((peers.idds.rss_kb() or 0) / 1024, 1)

        # --- adjust: answered, but 2.6.21 starts no more jobs
        settings = service.settings
        ids_a = runs[a].created.ids
        service.send(
            outbound.adjust_worker(
                a,
                ids_a,
                WorkerSize(
                    core_count=2, memory_per_core=3000, site="BNL-OSG", target_worker_count=4
                ),
                settings,
                now(),
            )
        )
        adjusted = service.wait_replies("adjusted_worker", a)
        assert isinstance(adjusted[0], AdjustedWorker)
        assert adjusted[0].content.core_count == 2  # echoed...
        # ... but stored nowhere: iDDS's update_transform drops transform_metadata.
        metadata = peers.idds.database.records(a).transforms[0]["transform_metadata"]
        assert (metadata["core_count"], metadata["worker_count"]) == (1, 2)

        # --- stop: a (integer) ends within seconds; b (string) is ignored
        last_b = max(r.at for r in peers.results.of_run(b))
        as_int, _ = outbound.stop_transformers(a, settings, now())
        _, as_string = outbound.stop_transformers(b, settings, now())
        assert (as_int.body["run_id"], as_string.body["run_id"]) == (int(a), b)
        service.send(as_int)
        service.send(as_string)  # idds-prompt compares == with its integer: no match
        stop_sent = time.time()
        assert peers.pilots.wait_for(lambda: peers.pilots.live(a) == 0, STOP_IDLE + WAIT)
        figures["stop_to_exit_s"] = [
            round((p.exited_at or 0) - stop_sent, 1) for p in peers.pilots.of_run(a)
        ]
        assert all(p.exit_code == 0 for p in peers.pilots.of_run(a))
        assert peers.pilots.live(b) == 2, "a stop whose run_id is a string stopped run b"
        # Kept on the log: that b's transformers received the stop and ignored
        # it (rather than never received it) shows only in the real
        # idds-prompt transformer's own log.
        for pilot in peers.pilots.of_run(b):
            assert f"Ignoring stop_transformer broadcast for run_id={b}" in pilot.log_text()
        assert peers.pilots.wait_for(lambda: peers.pilots.live(b) == 0, IDLE_TIMEOUT + WAIT)
        for pilot in peers.pilots.of_run(b):
            assert pilot.exit_code == 0
            assert (pilot.exited_at or 0) - last_b >= IDLE_TIMEOUT - 1  # the idle timeout
        assert len(peers.panda.submissions) == 2  # the adjust to 4 started nothing

        # --- close: ToCancel, in the reply and in iDDS's database
        for run in runs.values():
            service.send(outbound.close_workflow_task(run.run_id, run.created.ids, settings, now()))
        for run in runs.values():
            closed = service.wait_replies("closed_workflow_task", run.run_id)
            assert isinstance(closed[0], ClosedWorkflowTask)
            assert closed[0].content.status == "ToCancel"
        everything = peers.idds.database.records()
        for run in runs.values():
            records = everything.of_run(run.run_id)
            assert records.processing_statuses() == ["ToCancel"]
            assert [t["transform_id"] for t in records.transforms] == [
                run.created.content.transform_id
            ]
    figures["idds_stop_s"] = round(peers.idds.stopped_in or 0, 2)
    assert not peers.idds.alive and peers.pilots.live() == 0
    print(f"\nreal peers, one iDDS worker: {figures}")


class HandlerEnds:
    """Counts how iDDS's workers ended with one kind of request, from its
    log: a success line, or the handler's exception line. Kept on the log: a
    real iDDS worker that fails sends no reply and writes nothing, so its
    log is the only count of the ends to wait for."""

    def __init__(self, peers: RealPeers, msg_type: str, success: str) -> None:
        self.idds = peers.idds
        self.success = success
        self.failure = f"worker_message_handler exception for msg_type={msg_type}"
        self.before = (self.idds.count_in_log(success), self.idds.count_in_log(self.failure))

    def wait(self, ends: int) -> int:
        """Wait for ``ends`` more ends; the successes among them."""
        assert self.idds.wait_for_log(
            (self.success, self.failure), sum(self.before) + ends, WAIT
        ), f"iDDS's workers did not all end: {self.success}"
        return self.idds.count_in_log(self.success) - self.before[0]


def test_four_idds_workers_each_handle_every_request(
    brokers: Brokers,
    namespace: str,
    service: Service,
    new_run_id: Callable[[], str],
    idds_database_url: str | None,
    tmp_path: Path,
) -> None:
    """iDDS with its sample configuration's 4 worker threads: each subscribes
    on its own, so each handles every request. Two runs, one after the other
    (the first on a fresh database, where the workers also race to create the
    campaign's request group). What comes of it is recorded, not forced; every
    task created must be closed. Results go to a topic here."""
    runs = [new_run_id(), new_run_id()]
    observed: dict[str, object] = {"database": "postgresql" if idds_database_url else "sqlite"}
    settings = service.settings
    with RealPeers(
        brokers,
        tmp_path,
        namespace=namespace,
        num_threads=4,
        database_url=idds_database_url,
        slices_destination=f"/queue/panda.transformer.slices.{namespace}",
        results_destination=f"/topic/panda.results.{namespace}",
        schedule=PayloadSchedule(0.1),
        collect_results=True,
    ) as peers:
        observed["idds_started_in_s"] = round(peers.idds.started_in or 0, 2)
        created: dict[str, list[CreatedWorkflowTask]] = {}
        for run_id in runs:
            handled = HandlerEnds(
                peers, "create_workflow_task", success="create_workflow_task: request_id="
            )
            service.create(run_id, workers=1)
            # Each worker logs its end (success or failure) before its reply:
            # wait for all four, then for a reply per success.
            successes = handled.wait(4)
            assert successes >= 1, f"every iDDS worker failed the create of run {run_id}"
            assert service.recorder.wait_for(
                lambda run_id=run_id, successes=successes: (
                    len(service.replies("created_workflow_task", run_id)) >= successes
                ),
                WAIT,
            )
            created[run_id] = [
                m
                for m in (
                    parse_message(body)
                    for _, body in service.replies("created_workflow_task", run_id)
                )
                if isinstance(m, CreatedWorkflowTask)
            ]
            assert len(created[run_id]) == successes
        everything = peers.idds.database.records()
        for run_id in runs:
            transforms = everything.of_run(run_id).transforms
            tasks = peers.panda.submissions_for(run_id)
            observed[f"run {run_id}"] = {
                "created_replies": len(created[run_id]),
                "transforms": len(transforms),
                "panda_tasks": len(tasks),
            }
            assert {m.content.transform_id for m in created[run_id]} == {
                t["transform_id"] for t in transforms
            }
            assert {m.content.workload_id for m in created[run_id]} == {s.task_id for s in tasks}
        observed["handler_failures"] = peers.idds.count_in_log(
            "worker_message_handler exception for msg_type=create_workflow_task"
        )

        # Every task's jobs run; a run's slices are shared by all its
        # transformers (one slice queue, a run_id selector), each processed once.
        jobs = sum(s.jobs for s in peers.panda.submissions)
        assert peers.pilots.wait_for(lambda: len(peers.pilots.pilots) == jobs, WAIT)
        for run_id in runs:
            peers.control.send_slices(run_id, 6)
        assert peers.results.wait_for(
            lambda: all(len(peers.results.of_run(r)) >= 6 for r in runs), WAIT
        )
        for run_id in runs:
            assert slice_ids(results_of(peers, run_id)) == list(range(6))
            for stop in outbound.stop_transformers(run_id, settings, now()):
                service.send(stop)
        assert peers.pilots.wait_for(lambda: peers.pilots.live() == 0, STOP_IDLE + WAIT)

        handled = HandlerEnds(peers, "close_workflow_task", success="close_workflow_task: run_id=")
        closes = 0
        for run_id in runs:
            for message in created[run_id]:
                service.send(outbound.close_workflow_task(run_id, message.ids, settings, now()))
                closes += 1
        successes = handled.wait(4 * closes)
        assert service.recorder.wait_for(
            lambda: sum(len(service.replies("closed_workflow_task", r)) for r in runs) >= successes,
            WAIT,
        )
        everything = peers.idds.database.records()
        for run_id in runs:
            assert set(everything.of_run(run_id).processing_statuses()) == {"ToCancel"}
        observed["closes"] = closes
        observed["closed_replies"] = successes
    observed["idds_stop_s"] = round(peers.idds.stopped_in or 0, 2)
    assert not peers.idds.alive and peers.pilots.live() == 0
    print(f"\nreal peers, four iDDS workers: {observed}")
