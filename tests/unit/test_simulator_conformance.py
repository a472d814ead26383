"""The simulated peers send what the real peers send: each message a
simulator builds has the shape (keys, JSON types, time formats, headers) of
the real message of its kind in tests/real_messages/. A simulator that
differs from the real peer proves nothing: ours once sent result.state as a
string where the real transformer sends a boolean, and every real result
would have been rejected while the suite stayed green.

No broker: each simulator's sending is captured where it hands a message to
its bus."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from swf_panda_workers.adapters.stomp_bus import Delivery
from swf_panda_workers.config.schema import Brokers, Settings
from swf_panda_workers.core import outbound, sample_messages
from swf_panda_workers.core.messages import RunImminent, WorkerSize, WorkflowIds, parse_message
from swf_testbed.peers.idds import SimulatedIDDS
from swf_testbed.peers.transformers import TransformerFarm

REAL = Path(__file__).resolve().parents[1] / "real_messages"
NOW = datetime(2026, 12, 3, 13, 10, 41, 935000, tzinfo=UTC)
Sent = tuple[str, dict[str, Any], dict[str, str]]  # destination, body, headers


def real(name: str) -> dict[str, Any]:
    return json.loads((REAL / name).read_text())


_TIME_SHAPES = (
    ("iso naive, microseconds", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")),
    ("iso naive, seconds", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")),
    ("iso, milliseconds, Z", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")),
    ("rfc 1123, UTC", re.compile(r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]{8} UTC$")),
)


def shape(value: Any) -> Any:
    """The JSON type of every value, recursively; for text that is a time,
    which of the peers' time formats."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    if isinstance(value, str):
        return next((name for name, pattern in _TIME_SHAPES if pattern.match(value)), "text")
    return {bool: "bool", int: "int", float: "float", type(None): "null"}[type(value)]


def prune(value: Any, paths: tuple[str, ...], at: str = "") -> Any:
    """``value`` without the dotted ``paths`` (what legitimately differs:
    a payload's own result, say)."""
    if not isinstance(value, dict):
        return value
    return {
        key: prune(item, paths, f"{at}{key}.")
        for key, item in value.items()
        if f"{at}{key}" not in paths
    }


def assert_conforms(
    sent: Sent,
    real_name: str,
    *,
    ignore: tuple[str, ...] = (),
    ignore_headers: tuple[str, ...] = (),
) -> None:
    destination, body, headers = sent
    reference = real(real_name)
    assert shape(prune(body, ignore)) == shape(prune(reference["body"], ignore)), real_name
    # Header names, and their values where they are fixed by the peer's code.
    expected = {k for k in reference["headers"] if k != "destination"} - set(ignore_headers)
    assert set(headers) - set(ignore_headers) == expected, real_name
    for fixed in ("persistent", "vo", "msg_type", "ttl", "ack"):
        if fixed in expected:
            assert headers[fixed] == reference["headers"][fixed], (real_name, fixed)
    # Always readable by the service's own models (a slice is not for it).
    if body.get("msg_type") != "slice":
        parse_message(json.dumps(body))
    assert isinstance(destination, str) and destination.startswith(("/topic/", "/queue/"))


def capture(bus: Any) -> list[Sent]:
    """What a simulator's PeerBus is handed to send, instead of sending it."""
    sent: list[Sent] = []
    lock = threading.Lock()

    def send(destination: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with lock:
            sent.append((destination, json.loads(json.dumps(body)), dict(headers)))

    bus.send = send
    return sent


# --- iDDS's replies ---------------------------------------------------------------


def _announced() -> RunImminent:
    run = parse_message(
        {
            "msg_type": "run_imminent_worker",
            "run_id": "100123",
            "content": {"target_worker_count": 3},
        }
    )
    assert isinstance(run, RunImminent)
    return run


RUN = _announced()
SETTINGS = Settings()


def delivered(out: outbound.Outgoing) -> Delivery:
    return Delivery(
        {**out.headers, "destination": out.destination, "message-id": "ID:1"},
        json.dumps(out.body).encode(),
        "sub",
        1,
    )


@pytest.fixture
def idds() -> tuple[SimulatedIDDS, list[Sent]]:
    sim = SimulatedIDDS(Brokers(), "dev")
    return sim, capture(sim._bus)


def test_idds_replies_are_the_real_transceivers(idds: tuple[SimulatedIDDS, list[Sent]]) -> None:
    sim, sent = idds
    sim._on_delivery(delivered(outbound.create_workflow_task(RUN, SETTINGS, NOW)))
    (created,) = sent
    assert_conforms(
        created, "created_workflow_task.idds-2.6.21.json", ignore_headers=("client-id", "id")
    )
    assert created[2]["namespace"] == "dev"

    ids = WorkflowIds.model_validate(created[1]["content"])
    size = WorkerSize(core_count=1, memory_per_core=4000, site="BNL-OSG", target_worker_count=6)
    sim._on_delivery(delivered(outbound.adjust_worker("100123", ids, size, SETTINGS, NOW)))
    sim._on_delivery(delivered(outbound.close_workflow_task("100123", ids, SETTINGS, NOW)))
    _, adjusted, closed = sent
    assert_conforms(
        adjusted, "adjusted_worker.idds-2.6.21.json", ignore_headers=("client-id", "id")
    )
    assert "target_worker_count" not in adjusted[1]["content"]  # 2.6.21 reads none
    assert_conforms(
        closed, "closed_workflow_task.idds-2.6.21.json", ignore_headers=("client-id", "id")
    )


def test_a_close_by_run_id_of_a_run_without_task_is_not_found(
    idds: tuple[SimulatedIDDS, list[Sent]],
) -> None:
    sim, sent = idds
    sim._on_delivery(delivered(outbound.close_workflow_task("100123", None, SETTINGS, NOW)))
    (closed,) = sent
    assert_conforms(
        closed, "closed_workflow_task_notfound.idds-2.6.21.json", ignore_headers=("client-id", "id")
    )
    assert closed[1]["content"]["status"] == "NotFound"


def test_idds_without_a_namespace_answers_without_one() -> None:
    sim = SimulatedIDDS(Brokers(), None)
    sent = capture(sim._bus)
    sim._on_delivery(delivered(outbound.create_workflow_task(RUN, SETTINGS, NOW)))
    (created,) = sent
    assert_conforms(
        created,
        "created_workflow_task_no_namespace.idds-2.6.21.json",
        ignore_headers=("client-id", "id"),
    )


def test_idds_answers_a_pending_submission_with_a_null_workload() -> None:
    sim = SimulatedIDDS(Brokers(), "dev", workload_pending=True)
    sent = capture(sim._bus)
    sim._on_delivery(delivered(outbound.create_workflow_task(RUN, SETTINGS, NOW)))
    assert_conforms(
        sent[0],
        "created_workflow_task_workload_null.idds-2.6.21.json",
        ignore_headers=("client-id", "id"),
    )


# --- the transformers -----------------------------------------------------------------


def farm_output(fail_every: int | None, heartbeats: bool = False) -> list[Sent]:
    farm = TransformerFarm(Brokers(), heartbeat_every=0.05)
    sent = capture(farm._bus)
    if heartbeats:
        farm._ticker.start()
    farm.start_run(
        "100123",
        workers=1,
        slices=2,
        processing_time=lambda _: 0.01,
        fail_every=fail_every,
        panda_task_id=31870,
    )
    wanted = 2 + (2 if heartbeats else 0)
    assert farm.wait_for(lambda: len(sent) >= wanted, 10)
    with farm._state.lock:
        farm._closing.set()
        farm._state.notify()
    for thread in farm._threads:
        thread.join(5)
    if heartbeats:
        farm._ticker.join(5)
    return sent


def results(sent: list[Sent]) -> list[Sent]:
    return [s for s in sent if s[1]["msg_type"] == "slice_result"]


def test_slice_results_are_swf_transforms() -> None:
    done, failed = results(farm_output(fail_every=2))
    # The payload's own result differs by payload; its presence does not.
    assert_conforms(
        done,
        "slice_result_done.swf-transform-HEAD.json",
        ignore=("content.result.result",),
        ignore_headers=("client-id", "id"),
    )
    assert isinstance(done[1]["content"]["result"]["result"], dict)
    assert_conforms(
        failed, "slice_result_failed.swf-transform-HEAD.json", ignore_headers=("client-id", "id")
    )
    for _, body, headers in (done, failed):
        assert body["run_id"] == headers["run_id"] == "100123"
        assert "namespace" not in headers


def test_transformer_heartbeats_go_where_swf_transforms_do() -> None:
    beats = [
        s for s in farm_output(fail_every=None, heartbeats=True) if s[1]["msg_type"] == "heartbeat"
    ]
    destinations = {destination for destination, _, _ in beats}
    assert destinations == {"/queue/panda.results.worker", "/topic/panda.transformer"}
    by_destination = {
        destination: (destination, body, headers) for destination, body, headers in beats
    }
    assert_conforms(
        by_destination["/queue/panda.results.worker"],
        "heartbeat_on_results.swf-transform-HEAD.json",
        ignore_headers=("client-id", "id"),
    )
    assert_conforms(
        by_destination["/topic/panda.transformer"],
        "heartbeat_on_transformer_topic.swf-transform-HEAD.json",
        ignore_headers=("client-id", "id"),
    )


# --- what `swf-panda-workers send` sends -------------------------------------------------

SAMPLES: list[tuple[str, Callable[[], sample_messages.Sample], str]] = [
    (
        "announcement",
        lambda: sample_messages.run_imminent("100123", "dev", Brokers(), NOW, workers=30),
        "run_imminent_worker.testbed.json",
    ),
    (
        "end",
        lambda: sample_messages.end_run("100123", "dev", Brokers(), NOW),
        "end_run.testbed.json",
    ),
    (
        "result",
        lambda: sample_messages.slice_result("100123", Brokers(), NOW, seconds=2.5),
        "slice_result_done.swf-transform-HEAD.json",
    ),
]


@pytest.mark.parametrize(("what", "build", "real_name"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_hand_sent_messages_are_the_real_senders(
    what: str, build: Callable[[], sample_messages.Sample], real_name: str
) -> None:
    sample = build()
    # The announcement's content: the upstream run document, whose fields
    # vary with the workflow runner; what the service reads must be there.
    ignore = (
        "content.result.result",
        "content.execution_id",
        "content.simulation_tick",
        "content.total_stf_files",
        "content.state",
        "content.substate",
        "content.slice_processing_time",
        "content.worker_rampup_time",
        "content.worker_rampdown_time",
        "content.panda_server_url",
        # Not from a pilot: no PanDA ids in its environment, so nulls.
        "content.panda_task_id",
        "content.panda_id",
        "content.harvester_id",
    )
    assert_conforms(
        (sample.destination, sample.body, sample.headers),
        real_name,
        ignore=ignore,
        ignore_headers=("client-id", "id", "ack"),
    )
    if what == "announcement":
        content = sample.body["content"]
        assert content["core_count"] == content["target_worker_count"] == 30  # as the testbed
