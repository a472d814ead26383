"""The simulated peers against the real broker (started by conftest)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import once

from swf_panda_workers.adapters.stomp_bus import (
    BusClient,
    Delivery,
    Subscription,
    namespace_selector,
)
from swf_panda_workers.config.schema import Brokers, Settings, Transceiver
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
from swf_testbed.peers.control_system import ControlSystem
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.idds import SimulatedIDDS, TaskInfo
from swf_testbed.peers.recorder import BusRecorder
from swf_testbed.peers.transformers import TransformerFarm

pytestmark = [pytest.mark.integration, once("the simulated peers alone, no Prefect at all")]

WAIT = 10.0  # seconds: generous, every wait returns as soon as its condition holds


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def brokers(namespace: str, broker_port: int) -> Brokers:
    """Destinations of this test alone: the session's broker is shared with
    the service under test, whose iDDS simulators and listener must not answer
    us or take our slice results."""
    return Brokers(
        host="127.0.0.1",
        port=broker_port,
        heartbeat_ms=0,
        workers_topic=f"/topic/panda.workers.{namespace}",
        transformer_topic=f"/topic/panda.transformer.{namespace}",
        results_destination=f"/queue/panda.results.worker.{namespace}",
    )


@pytest.fixture
def run_id() -> str:
    # Numeric, as the testbed's; unique so old messages never match.
    return str(100_000_000 + uuid.uuid4().int % 900_000_000)


@pytest.fixture
def settings(brokers: Brokers, namespace: str) -> Settings:
    return Settings(transceiver=Transceiver(namespace=namespace), brokers=brokers)


class Listener:
    """A consumer like the service's: deliveries land in a queue."""

    def __init__(self, brokers: Brokers, subscription: Subscription) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self.client = BusClient(
            brokers, (subscription,), self.deliveries.put, name=f"test-{uuid.uuid4().hex[:6]}"
        )

    def next_of(self, msg_type: str) -> Delivery:
        """The next delivery of that type (others are skipped)."""
        while True:
            delivery = self.deliveries.get(timeout=WAIT)
            self.client.ack(delivery)
            if json.loads(delivery.body).get("msg_type") == msg_type:
                return delivery


@pytest.fixture
def requester(brokers: Brokers, namespace: str) -> Iterator[Listener]:
    """The service's side of the workers topic: namespace selector, acks."""
    listener = Listener(
        brokers, Subscription(brokers.workers_topic, selector=namespace_selector(namespace))
    )
    with listener.client:
        yield listener


def imminent(run_id: str, target: int) -> RunImminent:
    message = parse_message(
        {
            "msg_type": "run_imminent_worker",
            "run_id": run_id,
            "content": {"target_worker_count": target, "core_count": 1},
        }
    )
    assert isinstance(message, RunImminent)
    return message


def now() -> datetime:
    return datetime.now(UTC)


def test_announce_and_end_reach_the_topics(brokers: Brokers, namespace: str, run_id: str) -> None:
    epic = f"/topic/epictopic.{namespace}"
    with (
        BusRecorder(brokers, topics=(brokers.workers_topic, epic)) as recorder,
        ControlSystem(brokers, namespace, brokers.workers_topic, epic) as control,
    ):
        control.announce(run_id, "testbed", target_workers=30)
        control.announce(run_id + "1", "seed", target_workers=4, memory_per_core=3000)
        control.end(run_id, "testbed", duplicate=True)
        assert recorder.wait_for(lambda: len(recorder.of_type("end_run", run_id)) == 3, WAIT)
        assert recorder.wait_for(lambda: bool(recorder.of_type("run_imminent", run_id + "1")), WAIT)

    testbed = next(
        r
        for r in recorder.records
        if r.msg_type == "run_imminent_worker" and r.body["run_id"] == run_id
    )
    assert testbed.headers["namespace"] == namespace
    assert testbed.headers["run_id"] == run_id
    # Sent persistent: false as the agent sends it; ActiveMQ delivers a
    # non-persistent message without the header. And no ttl.
    assert testbed.headers.get("persistent", "false") == "false"
    assert "ttl" not in testbed.headers
    assert testbed.headers["expires"] == "0"  # ActiveMQ's "never" (none sent)
    assert testbed.body["run_id"] == run_id  # a string, as the testbed sends it
    assert "Z" not in testbed.body["created_at"] and "+" not in testbed.body["created_at"]
    parsed = parse_message(testbed.body)
    assert isinstance(parsed, RunImminent)
    assert parsed.content.target_worker_count == 30
    assert parsed.content.core_count == 30  # the agent copies target_worker_count there
    assert parsed.content.worker_rampup_time == 300

    seed = parse_message(recorder.of_type("run_imminent", run_id + "1")[0])
    assert isinstance(seed, RunImminent)
    assert (seed.content.target_worker_count, seed.content.memory_per_core) == (4, 3000)
    assert seed.created_at is not None

    ends = [
        r.destination
        for r in recorder.records
        if r.msg_type == "end_run" and r.body["run_id"] == run_id
    ]
    assert sorted(ends) == sorted([brokers.workers_topic] * 2 + [epic])


def test_idds_answers_in_its_own_namespace(
    brokers: Brokers, settings: Settings, namespace: str, run_id: str, requester: Listener
) -> None:
    # iDDS in the requester's namespace here (the requester's selector takes
    # only it); its replies carry iDDS's own namespace header.
    created: queue.Queue[tuple[str, TaskInfo]] = queue.Queue()
    with SimulatedIDDS(
        brokers,
        namespace,
        on_task_created=lambda r, t: created.put((r, t)),
        workers_topic=brokers.workers_topic,
    ) as idds:
        create = outbound.create_workflow_task(imminent(run_id, 3), settings, now())
        requester.client.send(create)
        reply = requester.next_of("created_workflow_task")
        assert reply.headers["namespace"] == namespace
        assert reply.headers["run_id"] == run_id
        answer = parse_message(reply.body)
        assert isinstance(answer, CreatedWorkflowTask)
        assert answer.run_id == run_id
        assert answer.content.workload_id is not None
        started_run, task = created.get(timeout=WAIT)
        assert (started_run, task.target_worker_count, task.namespace) == (run_id, 3, namespace)

        # A repeated create fails inside iDDS (a task of that name exists):
        # no new task, and no reply.
        requester.client.send(create)
        assert idds.wait_for(lambda: idds.duplicate_creates == {run_id: 1}, WAIT)
        assert len(idds.tasks_of(run_id)) == 1
        assert created.empty()

        size = WorkerSize(core_count=1, memory_per_core=2000, site="BNL-OSG", target_worker_count=5)
        requester.client.send(outbound.adjust_worker(run_id, answer.ids, size, settings, now()))
        adjusted = parse_message(requester.next_of("adjusted_worker").body)
        assert isinstance(adjusted, AdjustedWorker)
        assert adjusted.content.target_worker_count is None  # 2.6.21 reads no count
        assert adjusted.content.request_id == answer.content.request_id

        requester.client.send(outbound.close_workflow_task(run_id, answer.ids, settings, now()))
        closed = parse_message(requester.next_of("closed_workflow_task").body)
        assert isinstance(closed, ClosedWorkflowTask)
        assert closed.content.status == "ToCancel"

        # A close naming only the run (the service's, before iDDS's ids came):
        # iDDS looks the task up by run_id.
        def close_by_run_id(run: str) -> None:
            body = {
                "msg_type": "close_workflow_task",
                "run_id": run,
                "content": {
                    "run_id": run,
                    "request_id": None,
                    "transform_id": None,
                    "workload_id": None,
                },
            }
            requester.client.send_raw(
                brokers.workers_topic,
                json.dumps(body).encode(),
                {"namespace": namespace, "msg_type": "close_workflow_task"},
            )

        other = run_id + "9"
        close_by_run_id(other)
        not_found = parse_message(requester.next_of("closed_workflow_task").body)
        assert isinstance(not_found, ClosedWorkflowTask)
        assert (not_found.run_id, not_found.content.status) == (other, "NotFound")

        # The close that would cancel everything: recorded, never answered.
        danger = {
            "msg_type": "close_workflow_task",
            "run_id": None,
            "content": {
                "run_id": None,
                "request_id": None,
                "transform_id": None,
                "workload_id": None,
            },
        }
        requester.client.send_raw(
            brokers.workers_topic,
            json.dumps(danger).encode(),
            {"namespace": namespace, "msg_type": "close_workflow_task"},
        )
        assert idds.wait_for(lambda: len(idds.violations) == 1, WAIT)
        # iDDS answers in order: a reply to the danger would precede this one.
        last = run_id + "8"
        close_by_run_id(last)
        after = parse_message(requester.next_of("closed_workflow_task").body)
        assert isinstance(after, ClosedWorkflowTask)
        assert after.run_id == last


def test_stop_transformer_needs_the_integer_run_id(
    brokers: Brokers, settings: Settings, run_id: str
) -> None:
    slices = 400
    with (
        TransformerFarm(
            brokers,
            brokers.results_destination,
            brokers.transformer_topic,
            brokers.workers_topic,
            idle_timeout=1.0,
            result_ttl_ms=60_000,
        ) as farm,
        BusClient(brokers, name="test-stopper") as service,
    ):
        run = farm.start_run(run_id, workers=2, slices=slices, processing_time=lambda _: 0.05)
        assert farm.wait_for(lambda: run.slices_sent >= 2, WAIT)

        as_text = {
            "msg_type": "stop_transformer",
            "run_id": run_id,
            "created_at": now().isoformat(),
            "content": {},
        }
        service.send_raw(
            brokers.transformer_topic,
            json.dumps(as_text).encode(),
            {"msg_type": "stop_transformer", "run_id": run_id},
        )
        assert farm.wait_for(lambda: run.ignored_stops == 1, WAIT)
        assert not run.stopped
        assert farm.live_workers(run_id) == 2

        service.send(outbound.stop_transformers(run_id, settings, now())[0])  # the integer
        assert farm.wait_idle(WAIT, run_id)
        assert run.stopped
        assert run.stop_messages_seen == 2
        assert run.unprocessed, "a stop must leave the remaining slices unprocessed"
        assert run.slices_sent + len(run.unprocessed) == slices


def test_slice_results_and_heartbeats(brokers: Brokers, run_id: str) -> None:
    results = Listener(
        brokers, Subscription(brokers.results_destination, selector=f"run_id='{run_id}'")
    )
    with (
        results.client,
        BusRecorder(brokers, (brokers.transformer_topic,)) as recorder,
        TransformerFarm(
            brokers,
            brokers.results_destination,
            brokers.transformer_topic,
            brokers.workers_topic,
            heartbeat_every=0.2,
            idle_timeout=0.5,
            result_ttl_ms=60_000,
        ) as farm,
    ):
        farm.start_run(
            run_id,
            workers=2,
            slices=5,
            processing_time=lambda _: 0.3,
            fail_every=5,
            namespace="ns1",
        )
        got = [results.next_of("slice_result") for _ in range(5)]
        assert recorder.wait_for(lambda: bool(recorder.of_type("heartbeat")), WAIT)
        assert farm.wait_idle(WAIT)

    assert all("namespace" not in d.headers for d in got)
    parsed = [parse_message(d.body) for d in got]
    assert all(isinstance(p, SliceResult) and p.run_id == run_id for p in parsed)
    bodies = [json.loads(d.body) for d in got]
    assert all("processing_time" not in b["content"] for b in bodies)
    assert all(b["run_id"] == run_id for b in bodies)  # the slice's, a string
    assert all(isinstance(b["content"]["result"]["state"], bool) for b in bodies)
    seconds = [p.processing_seconds for p in parsed if isinstance(p, SliceResult)]
    assert all(s is not None and s >= 0.29 for s in seconds)
    failed = [b["content"] for b in bodies if b["content"]["state"] == "failed"]
    # A failed slice carries no slice identity.
    assert len(failed) == 1 and failed[0]["result"]["result"] is None

    # To the transformer topic (and the results destination), never the workers topic.
    beat = recorder.of_type("heartbeat")[0]
    assert "run_id" not in beat and isinstance(beat["timestamp"], float)
    assert beat["namespace"] == "ns1"


def slice_contents(deliveries: list[Delivery]) -> list[dict[str, Any]]:
    """The results' contents, by slice (failed slices carry none: not here)."""
    return sorted((json.loads(d.body)["content"] for d in deliveries), key=slice_of)


def slice_of(content: dict[str, Any]) -> int:
    """The slice a result is for: in the payload's result, as swf-transform sends it."""
    slice_id: int = content["result"]["result"]["slice_id"]
    return slice_id


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def test_slices_arrive_over_time(brokers: Brokers, settings: Settings, run_id: str) -> None:
    idle = 0.5
    # The last gap (2 s) is much longer than the idle timeout.
    offsets = [0.0, 0.3, 0.6, 2.6]
    results = Listener(
        brokers, Subscription(brokers.results_destination, selector=f"run_id='{run_id}'")
    )
    with (
        results.client,
        TransformerFarm(
            brokers,
            brokers.results_destination,
            brokers.transformer_topic,
            brokers.workers_topic,
            idle_timeout=idle,
            result_ttl_ms=60_000,
        ) as farm,
    ):
        began = time.monotonic()
        run = farm.start_run(
            run_id,
            workers=2,
            slices=len(offsets),
            processing_time=lambda _: 0.05,
            arrival=lambda i: offsets[i],
        )
        got = [results.next_of("slice_result") for _ in range(3)]
        # In the gap: the workers have idled longer than idle_timeout, yet
        # they are still there, since a slice is still to come.
        time.sleep(max(began + offsets[2] + 0.05 + idle + 0.4 - time.monotonic(), 0.0))
        assert time.monotonic() - began < offsets[3], "too slow to test inside the gap"
        assert (run.queued, run.unprocessed, farm.live_workers(run_id)) == (3, [], 2)

        got.append(results.next_of("slice_result"))
        assert farm.wait_idle(WAIT, run_id)  # all arrived: idleness ends them now
        assert run.started == 2  # the last slice was done by the original workers

        # Stopped while slices are still to arrive: those never arrive, and
        # neither a stop nor the farm's shutdown waits for them.
        stopped = run_id + "1"
        late = farm.start_run(
            stopped,
            workers=1,
            slices=5,
            processing_time=lambda _: 0.0,
            arrival=lambda i: 0.0 if i < 2 else 600.0,
        )
        assert farm.wait_for(lambda: late.slices_sent == 2, WAIT)
        results.client.send(outbound.stop_transformers(stopped, settings, now())[0])
        assert farm.wait_idle(WAIT, stopped)
        pending = run_id + "2"
        farm.start_run(
            pending, workers=1, slices=2, processing_time=lambda _: 0.0, arrival=lambda i: 600.0 * i
        )
        closing = time.monotonic()
    assert time.monotonic() - closing < 5.0
    assert (late.queued, late.unprocessed, late.feeding) == (2, [], False)

    contents = slice_contents(got)
    assert [slice_of(c) for c in contents] == list(range(len(offsets)))
    assert len({c["requested_at"] for c in contents}) == len(offsets)
    first = contents[0]["requested_at"]
    for content, offset in zip(contents, offsets, strict=True):
        assert abs(seconds_between(first, content["requested_at"]) - offset) < 0.2
        # requested_at is the slice's own queueing: idle workers take it at once.
        assert 0 <= seconds_between(content["requested_at"], content["processing_start_at"]) < 0.2


def test_lowering_the_target_finishes_every_slice(brokers: Brokers, run_id: str) -> None:
    slices = 30
    results = Listener(
        brokers, Subscription(brokers.results_destination, selector=f"run_id='{run_id}'")
    )
    with (
        results.client,
        TransformerFarm(
            brokers,
            brokers.results_destination,
            brokers.transformer_topic,
            brokers.workers_topic,
            idle_timeout=1.0,
            result_ttl_ms=60_000,
        ) as farm,
    ):
        run = farm.start_run(run_id, workers=4, slices=slices, processing_time=lambda _: 0.2)
        assert farm.wait_for(lambda: run.slices_sent >= 4, WAIT)
        farm.set_target(run_id, 1)  # the four are all in the middle of a slice
        assert farm.wait_for(lambda: farm.live_workers(run_id) == 1, WAIT)
        time.sleep(0.5)
        assert farm.live_workers(run_id) == 1, "exactly the surplus leave"
        assert run.started == 4

        farm.set_target(run_id, 2)  # raising again starts new ones
        assert (run.started, farm.live_workers(run_id)) == (5, 2)
        got = [results.next_of("slice_result") for _ in range(slices)]
        assert farm.wait_idle(WAIT, run_id)

    assert run.slices_sent == slices and run.unprocessed == []
    assert [slice_of(c) for c in slice_contents(got)] == list(range(slices))


def test_harness_adjusts_start_transformers_after_the_rampup(
    brokers: Brokers, settings: Settings, namespace: str, run_id: str, requester: Listener
) -> None:
    rampup = 1.5
    # The what-if of an iDDS that applies adjust_worker's count (2.6.21 does not).
    with PeerHarness(
        brokers,
        namespace,
        processing_time=lambda _: 0.1,
        slices_per_run=1000,
        idle_timeout=1.0,
        result_ttl_ms=60_000,
        worker_rampup=rampup,
        applies_worker_count=True,
    ) as peers:
        farm = peers.farm
        requester.client.send(outbound.create_workflow_task(imminent(run_id, 2), settings, now()))
        answer = parse_message(requester.next_of("created_workflow_task").body)
        assert isinstance(answer, CreatedWorkflowTask)
        run = farm.run(run_id, WAIT)
        assert run.started == 2  # the initial ones start at once

        def adjust(target: int) -> float:
            sent = time.monotonic()
            size = WorkerSize(target_worker_count=target)
            requester.client.send(outbound.adjust_worker(run_id, answer.ids, size, settings, now()))
            requester.next_of("adjusted_worker")
            return sent

        sent = adjust(4)
        assert not farm.wait_for(lambda: run.started > 2, sent + rampup - 0.3 - time.monotonic())
        assert farm.wait_for(lambda: run.started == 4, WAIT)
        assert time.monotonic() - sent >= rampup
        assert farm.live_workers(run_id) == 4

        # Lowering starts nothing: it takes effect as the surplus finish their slice.
        adjust(1)
        assert farm.wait_for(lambda: farm.live_workers(run_id) == 1, WAIT)
        assert run.started == 4

        # A later adjust supersedes a pending one: 6 is never reached.
        sent = adjust(6)
        adjust(3)
        assert not farm.wait_for(lambda: run.started > 4, sent + rampup - 0.3 - time.monotonic())
        assert farm.wait_for(lambda: run.started == 6, WAIT)
        time.sleep(rampup)
        assert (run.started, farm.live_workers(run_id)) == (6, 3)

        requester.client.send(outbound.stop_transformers(run_id, settings, now())[0])
        assert farm.wait_idle(WAIT, run_id)


def test_harness_starts_and_adds_transformers(
    brokers: Brokers, settings: Settings, namespace: str, run_id: str, requester: Listener
) -> None:
    with PeerHarness(
        brokers,
        namespace,
        processing_time=lambda _: 0.1,
        slices_per_run=200,
        idle_timeout=1.0,
        result_ttl_ms=60_000,
        applies_worker_count=True,
    ) as peers:  # the what-if, as above
        requester.client.send(outbound.create_workflow_task(imminent(run_id, 2), settings, now()))
        answer = parse_message(requester.next_of("created_workflow_task").body)
        assert isinstance(answer, CreatedWorkflowTask)
        assert peers.farm.run(run_id, WAIT).started == 2

        size = WorkerSize(target_worker_count=4)
        requester.client.send(outbound.adjust_worker(run_id, answer.ids, size, settings, now()))
        requester.next_of("adjusted_worker")
        assert peers.farm.wait_for(lambda: peers.farm.runs[run_id].started == 4, WAIT)

        requester.client.send(outbound.stop_transformers(run_id, settings, now())[0])
        assert peers.farm.wait_idle(WAIT, run_id)
        assert peers.recorder.wait_for(
            lambda: len(peers.recorder.of_type("adjusted_worker", run_id)) == 1, WAIT
        )
        table = peers.recorder.summary_table([run_id])
        assert run_id in table and "adjusted" in table


def test_harness_in_rest_mode_serves_idds_over_http(
    brokers: Brokers,
    settings: Settings,
    namespace: str,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    results = Listener(
        brokers, Subscription(brokers.results_destination, selector=f"run_id='{run_id}'")
    )
    with (
        results.client,
        PeerHarness(
            brokers,
            namespace,
            processing_time=lambda _: 0.1,
            slices_per_run=200,
            idle_timeout=1.0,
            result_ttl_ms=60_000,
            idds_mode="rest",
            rest_token=token,
            rest_vo="eic",
            applies_worker_count=True,
        ) as peers,
    ):
        assert peers.idds_rest is not None
        # The real idds-client, configured as an operator would.
        for name in ("IDDS_CONFIG", "IDDS_OIDC_TOKEN_FILE", "OIDC_AUTH_ID_TOKEN", "OIDC_AUTH_VO"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("IDDS_LOCAL_CONFIG_ROOT", str(tmp_path / "idds"))
        monkeypatch.setenv("IDDS_HOST", peers.idds_rest.url)
        monkeypatch.setenv("IDDS_AUTH_TYPE", "oidc")
        monkeypatch.setenv("IDDS_OIDC_TOKEN", token)
        monkeypatch.setenv("IDDS_VO", "eic")
        # Imported only now: importing the client creates its local config
        # directory (~/.idds unless IDDS_LOCAL_CONFIG_ROOT says otherwise).
        from idds.client.clientmanager import ClientManager

        manager = ClientManager(timeout=10)
        manager.setup_client()
        manager.client.retries = 1

        # As iDDS 2.6.21: a 500 after making the task, found then by its name.
        workflow = outbound.workflow_for(imminent(run_id, 2), settings, now())
        failed, text = manager.create_workflow_task(workflow)
        assert failed is False and "too many values to unpack" in text
        request_id = manager.get_request_id_by_name(workflow["name"])[workflow["name"]]
        (row,) = manager.get_requests(request_id=request_id, with_detail=True)
        ids = {
            "request_id": request_id,
            "transform_id": row["transform_id"],
            "workload_id": row["transform_workload_id"],
        }
        assert peers.farm.run(run_id, WAIT).started == 2
        first = parse_message(results.next_of("slice_result").body)
        assert isinstance(first, SliceResult) and first.run_id == run_id
        assert first.content.panda_task_id == str(ids["workload_id"])  # from the environment

        grow = {"content": {"run_id": run_id, "target_worker_count": 4}}
        adjusted = manager.adjust_worker(
            ids["request_id"], ids["transform_id"], ids["workload_id"], grow
        )
        assert adjusted == {"status": 0, "message": "adjusted successfully"}
        assert peers.farm.wait_for(lambda: peers.farm.runs[run_id].started == 4, WAIT)

        results.client.send(outbound.stop_transformers(run_id, settings, now())[0])
        assert peers.farm.wait_idle(WAIT, run_id)
        closed = manager.close_workflow_task(
            ids["request_id"],
            {"run_id": run_id, **{k: ids[k] for k in ("transform_id", "workload_id")}},
        )
        assert closed == {"status": 0, "message": "closed successfully"}
        assert peers.idds_rest.closed == {run_id: "ToCancel"}

        # The bus iDDS, running all along, heard no request and answered none.
        assert peers.idds.requests == []
        assert peers.recorder.of_type("created_workflow_task", run_id) == []
        assert peers.recorder.of_type("adjusted_worker", run_id) == []
