"""Outbound messages are built exactly as PROTOCOL.md says the peers read them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.messages import (
    AdjustWorker,
    CloseWorkflowTask,
    CreateWorkflowTask,
    RunImminent,
    StopTransformer,
    WorkerSize,
    WorkflowIds,
    parse_message,
)
from swf_panda_workers.core.outbound import (
    Outgoing,
    UnsafeMessage,
    adjust_worker,
    close_workflow_task,
    create_workflow_task,
    headers_for,
    stop_run_ids,
    stop_transformers,
    wire_run_id,
    workflow_name,
)

NOW = datetime(2026, 3, 5, 12, 0, 0, 250000, tzinfo=UTC)
NOW_ISO = "2026-03-05T12:00:00.250000+00:00"
NOW_MS = 1772712000250
TTL = 43_200_000
SETTINGS = Settings()
IDS = WorkflowIds(request_id=11, transform_id=22, workload_id=33)

ENVELOPE_KEYS = {"msg_type", "run_id", "created_at", "namespace", "content"}
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
PANDA_ATTRIBUTE_KEYS = {
    "vo",
    "queue",
    "site",
    "cloud",
    "working_group",
    "priority",
    "core_count",
    "ram_count",
    "num_workers",
    "max_walltime",
    "max_attempt",
    "idle_timeout",
    "username",
    "task_type",
    "processing_type",
    # the names iDDS 2.6.21 reads for max_walltime and ram_count
    "walltime",
    "memory_per_core",
}
TESTBED_CONTENT = {
    "execution_id": "exec-42",
    "run_id": "100123",
    "state": "run",
    "substate": "physics",
    "timestamp": "2026-03-05T11:59:00",
    "simulation_tick": 3,
    "sender": "daq",
    "core_count": 2,
    "target_worker_count": 30,
    "slice_processing_time": 30,
    "worker_rampup_time": 300,
    "worker_rampdown_time": 60,
}


def run_imminent(content: dict[str, object], run_id: str = "100123") -> RunImminent:
    msg = parse_message({"msg_type": "run_imminent_worker", "run_id": run_id, "content": content})
    assert isinstance(msg, RunImminent)
    return msg


def on_the_wire(out: Outgoing) -> dict[str, object]:
    return json.loads(json.dumps(out.body))


# --- create_workflow_task ----------------------------------------------------


def test_create_workflow_task_envelope_and_content() -> None:
    out = create_workflow_task(run_imminent(TESTBED_CONTENT), SETTINGS, NOW)

    assert out.destination == "/topic/panda.workers"
    assert out.msg_type == "create_workflow_task"
    assert set(out.body) == ENVELOPE_KEYS
    assert out.body["run_id"] == "100123"
    assert out.body["created_at"] == NOW_ISO
    assert out.body["namespace"] == "dev"
    assert set(out.body["content"]) == {"run_id", "created_at", "workflow"}
    assert out.body["content"]["run_id"] == "100123"
    assert out.body["content"]["created_at"] == NOW_ISO


def test_workflow_names_and_campaign() -> None:
    workflow = create_workflow_task(run_imminent(TESTBED_CONTENT), SETTINGS, NOW).body["content"][
        "workflow"
    ]

    assert set(workflow) == WORKFLOW_KEYS
    assert workflow["scope"] == "EIC_2026"
    assert workflow["name"] == "EIC_2026_fastproc_BNL-OSG_20260305_100123"
    assert workflow["campaign"] == "testbed"
    assert workflow["campaign_scope"] == "testbed_2026"
    assert workflow["campaign_group"] == "testbed_2026_03"
    assert workflow["campaign_tag"] == "test"
    assert workflow["requester"] == "panda-worker"
    assert workflow["username"] == "EICFast"
    assert workflow["transform_tag"] == "fastproc"
    assert workflow["cloud"] == "US"


def test_workflow_uses_the_run_site_and_a_configured_scope() -> None:
    settings = settings_from(
        {"panda": {"scope": "EIC_TEST", "transform_tag": "tag", "campaign": "camp"}}, {}
    )
    run = run_imminent({**TESTBED_CONTENT, "site": "CERN"})

    workflow = create_workflow_task(run, settings, NOW).body["content"]["workflow"]

    assert workflow["scope"] == "EIC_TEST"
    assert workflow["name"] == "EIC_TEST_tag_CERN_20260305_100123"
    assert workflow["campaign_scope"] == "camp_2026"
    assert workflow["campaign_group"] == "camp_2026_03"
    assert workflow["content"]["site"] == "CERN"


def test_workflow_content_is_the_run_content_plus_the_task_fields() -> None:
    content = create_workflow_task(run_imminent(TESTBED_CONTENT), SETTINGS, NOW).body["content"][
        "workflow"
    ]["content"]

    # the inbound run content, all of it
    for key in ("execution_id", "state", "substate", "timestamp", "simulation_tick", "sender"):
        assert content[key] == TESTBED_CONTENT[key]
    assert content["slice_processing_time"] == 30
    assert content["worker_rampup_time"] == 300
    assert content["worker_rampdown_time"] == 60
    # plus what iDDS and PanDA need
    assert content["run_id"] == "100123"
    assert content["created_at"] == NOW_ISO
    # Not the announced core_count (the testbed copies its worker count there):
    # the configured cores per worker.
    assert content["core_count"] == SETTINGS.panda.core_count == 1
    assert content["memory_per_core"] == 4000  # configured ram_count: the run named none
    assert content["site"] == "BNL-OSG"
    assert content["target_worker_count"] == 30
    assert set(content["panda_attributes"]) == PANDA_ATTRIBUTE_KEYS
    assert content["panda_attributes"] == SETTINGS.panda.task_attributes()
    assert content["panda_attributes"]["walltime"] == SETTINGS.panda.max_walltime
    assert content["panda_attributes"]["memory_per_core"] == SETTINGS.panda.ram_count


def test_two_runs_of_a_day_and_site_have_two_names() -> None:
    # iDDS looks its request up by the exact name and keeps one task per
    # name: the second run of the day would get no task without its run id.
    first = create_workflow_task(run_imminent(TESTBED_CONTENT, "100123"), SETTINGS, NOW)
    second = create_workflow_task(run_imminent(TESTBED_CONTENT, "100124"), SETTINGS, NOW)
    assert first.body["content"]["workflow"]["name"] != second.body["content"]["workflow"]["name"]


def test_the_name_is_dated_by_the_announcement() -> None:
    # A retry after midnight names the same task as the first attempt.
    announced = datetime(2026, 3, 4, 23, 59, 59, tzinfo=UTC)
    run = run_imminent(TESTBED_CONTENT)
    workflow = create_workflow_task(run, SETTINGS, NOW, workflow=None).body["content"]["workflow"]
    assert workflow["name"].endswith("_20260305_100123")
    assert workflow_name(run, SETTINGS, announced) == "EIC_2026_fastproc_BNL-OSG_20260304_100123"


def test_workflow_content_from_the_seed_shape() -> None:
    run = run_imminent(
        {"num_workers": 4, "num_cores_per_worker": 8, "num_ram_per_core": 2000, "site": "CERN"}
    )

    content = create_workflow_task(run, SETTINGS, NOW).body["content"]["workflow"]["content"]

    assert content["target_worker_count"] == 4
    assert content["core_count"] == 8
    assert content["memory_per_core"] == 2000
    assert content["site"] == "CERN"


def test_workflow_content_defaults_from_the_configuration() -> None:
    content = create_workflow_task(run_imminent({}), SETTINGS, NOW).body["content"]["workflow"][
        "content"
    ]

    assert content["target_worker_count"] == SETTINGS.panda.num_workers
    assert content["core_count"] == SETTINGS.panda.core_count
    assert content["memory_per_core"] == SETTINGS.panda.ram_count
    assert content["site"] == SETTINGS.panda.site


# --- adjust_worker and close_workflow_task -------------------------------------


def test_adjust_worker_content() -> None:
    size = WorkerSize(core_count=2, memory_per_core=4000, site="BNL-OSG", target_worker_count=36)

    out = adjust_worker("100123", IDS, size, SETTINGS, NOW)

    assert out.destination == "/topic/panda.workers"
    assert set(out.body) == ENVELOPE_KEYS
    assert out.body["msg_type"] == "adjust_worker"
    assert out.body["content"] == {
        "run_id": "100123",
        "created_at": NOW_ISO,
        "request_id": 11,
        "transform_id": 22,
        "workload_id": 33,
        "core_count": 2,
        "memory_per_core": 4000,
        "site": "BNL-OSG",
        "target_worker_count": 36,
    }


def test_adjust_worker_without_a_target_and_with_a_null_workload() -> None:
    ids = WorkflowIds(request_id=11, transform_id=22, workload_id=None)
    size = WorkerSize(core_count=2, memory_per_core=4000, site="BNL-OSG")

    content = adjust_worker("100123", ids, size, SETTINGS, NOW).body["content"]

    assert set(content) == {
        "run_id",
        "created_at",
        "request_id",
        "transform_id",
        "workload_id",
        "core_count",
        "memory_per_core",
        "site",
    }
    assert content["workload_id"] is None


def test_adjust_worker_without_ids_is_unsafe() -> None:
    with pytest.raises(UnsafeMessage, match="100123"):
        adjust_worker("100123", None, WorkerSize(target_worker_count=36), SETTINGS, NOW)


def test_close_workflow_task_by_run_id() -> None:
    # Before iDDS's ids came: iDDS's transceiver finds the task by the run id
    # (or answers NotFound).
    out = close_workflow_task("100123", None, SETTINGS, NOW)
    assert out.body["content"] == {
        "run_id": "100123",
        "created_at": NOW_ISO,
        "request_id": None,
        "transform_id": None,
        "workload_id": None,
    }


def test_close_workflow_task_with_ids() -> None:
    out = close_workflow_task("100123", IDS, SETTINGS, NOW)

    assert out.destination == "/topic/panda.workers"
    assert set(out.body) == ENVELOPE_KEYS
    assert out.body["msg_type"] == "close_workflow_task"
    assert out.body["content"] == {
        "run_id": "100123",
        "created_at": NOW_ISO,
        "request_id": 11,
        "transform_id": 22,
        "workload_id": 33,
    }


def test_close_without_ids_nor_run_id_is_unsafe() -> None:
    # Given nothing to filter on, iDDS would cancel every processing it has.
    with pytest.raises(UnsafeMessage, match="without ids and without run id"):
        close_workflow_task("", None, SETTINGS, NOW)


def test_unsafe_message_is_a_value_error() -> None:
    assert issubclass(UnsafeMessage, ValueError)


# --- stop_transformer ----------------------------------------------------------


@pytest.mark.parametrize(
    ("run_id", "on_wire"),
    [
        ("100123", 100123),
        ("7", 7),
        ("007", 7),
        ("run-7", "run-7"),
        ("12a", "12a"),
        ("1.5", "1.5"),
        ("-3", "-3"),
    ],
)
def test_wire_run_id(run_id: str, on_wire: int | str) -> None:
    assert wire_run_id(run_id) == on_wire
    assert type(wire_run_id(run_id)) is type(on_wire)


def test_stop_transformer_in_both_forms() -> None:
    # idds-prompt compares with == against the integer of --run_id;
    # swf-transform against the string of its first slice.
    as_int, as_text = stop_transformers("100123", SETTINGS, NOW)

    for out in (as_int, as_text):
        assert out.destination == "/topic/panda.transformer"
        assert out.headers["run_id"] == "100123"
        assert out.body["content"] == {"requested_at": NOW_ISO}
    assert as_int.body == {
        "msg_type": "stop_transformer",
        "run_id": 100123,
        "created_at": NOW_ISO,
        "content": {"requested_at": NOW_ISO},
    }
    assert '"run_id": 100123' in json.dumps(as_int.body)
    assert '"run_id": "100123"' in json.dumps(as_text.body)


def test_stop_transformer_with_a_text_run_id_goes_once() -> None:
    (out,) = stop_transformers("run-7", SETTINGS, NOW)

    assert out.body["run_id"] == "run-7"
    assert '"run_id": "run-7"' in json.dumps(out.body)


@pytest.mark.parametrize(
    ("run_id", "forms"),
    [("100123", (100123, "100123")), ("007", (7, "007")), ("run-7", ("run-7",))],
)
def test_stop_run_ids(run_id: str, forms: tuple[int | str, ...]) -> None:
    assert stop_run_ids(run_id) == forms


# --- headers -------------------------------------------------------------------

BUILDERS: list[tuple[str, Callable[[Settings], Outgoing]]] = [
    ("create_workflow_task", lambda s: create_workflow_task(run_imminent(TESTBED_CONTENT), s, NOW)),
    (
        "adjust_worker",
        lambda s: adjust_worker("100123", IDS, WorkerSize(target_worker_count=36), s, NOW),
    ),
    ("close_workflow_task", lambda s: close_workflow_task("100123", IDS, s, NOW)),
    ("stop_transformer", lambda s: stop_transformers("100123", s, NOW)[0]),
]


@pytest.mark.parametrize(("msg_type", "build"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_headers(msg_type: str, build: Callable[[Settings], Outgoing]) -> None:
    out = build(SETTINGS)

    assert out.headers == {
        "persistent": "true",
        "vo": "eic",
        "msg_type": msg_type,
        "run_id": "100123",
        "namespace": "dev",
        "ttl": str(TTL),
        "expires": str(NOW_MS + TTL),
    }
    assert out.msg_type == msg_type


@pytest.mark.parametrize(("msg_type", "build"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_headers_follow_the_configured_namespace_and_ttl(
    msg_type: str, build: Callable[[Settings], Outgoing]
) -> None:
    settings = settings_from({"transceiver": {"timetolive": 5000}}, {"SWF_NAMESPACE": "prod"})

    out = build(settings)

    assert out.headers["namespace"] == "prod"
    if msg_type != "stop_transformer":
        # iDDS's prompt transceiver selects on its own namespace.
        to_idds = settings_from(
            {"transceiver": {"idds_namespace": "idds-dev"}}, {"SWF_NAMESPACE": "prod"}
        )
        assert build(to_idds).headers["namespace"] == "idds-dev"
        assert build(to_idds).body["namespace"] == "prod"
    assert out.headers["ttl"] == "5000"
    assert out.headers["expires"] == str(NOW_MS + 5000)
    if msg_type != "stop_transformer":
        assert out.body["namespace"] == "prod"


def test_headers_for_a_text_run_id_are_strings() -> None:
    headers = headers_for("adjust_worker", "run-7", SETTINGS, NOW)

    assert headers["run_id"] == "run-7"
    assert all(isinstance(value, str) for value in headers.values())


# --- our own messages read back ----------------------------------------------


@pytest.mark.parametrize(
    ("build", "model"),
    [
        (BUILDERS[0][1], CreateWorkflowTask),
        (BUILDERS[1][1], AdjustWorker),
        (BUILDERS[2][1], CloseWorkflowTask),
        (BUILDERS[3][1], StopTransformer),
    ],
    ids=[b[0] for b in BUILDERS],
)
def test_outbound_bodies_parse_as_their_own_models(
    build: Callable[[Settings], Outgoing], model: type
) -> None:
    msg = parse_message(json.dumps(on_the_wire(build(SETTINGS))))

    assert isinstance(msg, model)
    assert msg.created_at == NOW


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_a_naive_time_is_utc_for_expires_as_for_created_at() -> None:
    # Read as local time, a naive time would shift expires by hours.
    settings = Settings()
    aware = datetime(2026, 1, 20, 12, 0, tzinfo=UTC)
    naive = aware.replace(tzinfo=None)
    assert (
        headers_for("adjust_worker", "1", settings, naive)["expires"]
        == headers_for("adjust_worker", "1", settings, aware)["expires"]
    )
    assert headers_for("adjust_worker", "1", settings, aware)["expires"] == str(
        int(aware.timestamp() * 1000) + settings.transceiver.timetolive
    )
