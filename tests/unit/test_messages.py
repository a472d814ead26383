"""parse_message: every shape of PROTOCOL.md is accepted, and bad input is an
InvalidMessage whose text names the offending field."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    Heartbeat,
    InvalidMessage,
    RunEnd,
    RunImminent,
    SliceResult,
    StopTransformer,
    TransformerHeartbeat,
    WorkflowIds,
    parse_message,
)

NOON = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)

TESTBED_RUN_CONTENT = {
    "execution_id": "exec-42",
    "run_id": "100123",
    "state": "run",
    "substate": "physics",
    "timestamp": "2026-01-20T12:00:00",
    "simulation_tick": 17,
    "sender": "daq-simulator",
    "core_count": 2,
    "target_worker_count": 30,
    "slice_processing_time": 30,
    "worker_rampup_time": 300,
    "worker_rampdown_time": 60,
}
SEED_RUN_CONTENT = {
    "num_workers": 4,
    "num_cores_per_worker": 8,
    "num_ram_per_core": 2000,
    "site": "CERN",
}


def wire(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- accepted shapes -------------------------------------------------------


@pytest.mark.parametrize("msg_type", ["run_imminent_worker", "run_imminent"])
def test_run_imminent_with_testbed_content(msg_type: str) -> None:
    msg = parse_message(wire(msg_type=msg_type, run_id="100123", content=TESTBED_RUN_CONTENT))

    assert isinstance(msg, RunImminent)
    assert msg.msg_type == msg_type
    assert msg.run_id == "100123"
    spec = msg.content
    assert (spec.target_worker_count, spec.core_count, spec.memory_per_core) == (30, 2, None)
    assert spec.slice_processing_time == 30.0
    assert (spec.worker_rampup_time, spec.worker_rampdown_time) == (300.0, 60.0)
    # the upstream run_imminent fields are kept, not dropped
    assert spec.model_extra is not None
    assert spec.model_extra["execution_id"] == "exec-42"
    assert spec.model_extra["simulation_tick"] == 17


@pytest.mark.parametrize("msg_type", ["run_imminent_worker", "run_imminent"])
def test_run_imminent_with_seed_content(msg_type: str) -> None:
    msg = parse_message(wire(msg_type=msg_type, run_id="7", content=SEED_RUN_CONTENT))

    assert isinstance(msg, RunImminent)
    spec = msg.content
    assert spec.target_worker_count == 4
    assert spec.cores_per_worker == 8 and spec.core_count is None
    assert spec.memory_per_core == 2000
    assert spec.site == "CERN"


def test_run_imminent_without_content_has_an_empty_spec() -> None:
    msg = parse_message({"msg_type": "run_imminent", "run_id": "7"})

    assert isinstance(msg, RunImminent)
    assert msg.content.target_worker_count is None
    assert msg.content.core_count is None
    assert msg.content.site is None


@pytest.mark.parametrize("msg_type", ["end_run", "run_end", "run_stop"])
def test_every_end_of_run_name_is_a_run_end(msg_type: str) -> None:
    msg = parse_message(wire(msg_type=msg_type, run_id="100123", content={"state": "end"}))

    assert isinstance(msg, RunEnd)
    assert msg.msg_type == msg_type
    assert msg.run_id == "100123"
    assert msg.content == {"state": "end"}


@pytest.mark.parametrize(
    ("workload_id", "expected"),
    [
        (None, WorkflowIds(request_id=11, transform_id=22, workload_id=None)),
        (33, WorkflowIds(request_id=11, transform_id=22, workload_id=33)),
    ],
)
def test_created_workflow_task_ids(workload_id: int | None, expected: WorkflowIds) -> None:
    content = {
        "run_id": "100123",
        "request_id": 11,
        "transform_id": 22,
        "processing_id": 5,
        "input_coll_id": 6,
        "output_coll_id": 7,
        "workload_id": workload_id,
    }
    msg = parse_message(wire(msg_type="created_workflow_task", run_id="100123", content=content))

    assert isinstance(msg, CreatedWorkflowTask)
    assert msg.ids == expected
    assert (msg.content.processing_id, msg.content.output_coll_id) == (5, 7)


def test_adjusted_worker() -> None:
    content = {
        "run_id": "100123",
        "request_id": 11,
        "transform_id": 22,
        "workload_id": 33,
        "core_count": 4,
        "memory_per_core": 2000,
        "site": "BNL-OSG",
    }
    msg = parse_message(wire(msg_type="adjusted_worker", run_id="100123", content=content))

    assert isinstance(msg, AdjustedWorker)
    assert msg.content.request_id == 11
    assert (msg.content.core_count, msg.content.memory_per_core) == (4, 2000)
    assert msg.content.site == "BNL-OSG"
    assert msg.content.target_worker_count is None


@pytest.mark.parametrize("status", ["ToCancel", "NotFound"])
def test_closed_workflow_task(status: str) -> None:
    content = {
        "run_id": "100123",
        "request_id": None,
        "transform_id": None,
        "workload_id": None,
        "status": status,
    }
    msg = parse_message(wire(msg_type="closed_workflow_task", run_id="100123", content=content))

    assert isinstance(msg, ClosedWorkflowTask)
    assert msg.content.status == status


def slice_result(**content: Any) -> SliceResult:
    msg = parse_message(wire(msg_type="slice_result", run_id="100123", content=content))
    assert isinstance(msg, SliceResult)
    return msg


@pytest.mark.parametrize(
    ("content", "seconds"),
    [
        pytest.param({"processing_time": 41.5}, 41.5, id="seed processing_time"),
        pytest.param(
            {
                "processing_time": 12,
                "processing_start_at": "2026-01-20T12:00:00",
                "processed_at": "2026-01-20T12:01:00",
            },
            12.0,
            id="processing_time wins over the timestamps",
        ),
        pytest.param(
            {
                "processing_start_at": "2026-01-20T12:00:00",
                "processed_at": "2026-01-20T12:00:42.500Z",
            },
            42.5,
            id="naive start, Z end",
        ),
        pytest.param(
            {
                "processing_start_at": "Tue, 20 Jan 2026 12:00:00 UTC",
                "processed_at": "2026-01-20T14:00:30+02:00",
            },
            30.0,
            id="rfc1123 start, offset end",
        ),
        pytest.param(
            {"processing_start_at": "2026-01-20T12:00:10", "processed_at": "2026-01-20T12:00:00"},
            0.0,
            id="end before start is zero, not negative",
        ),
        pytest.param(
            {
                "processing_start_at": "2026-01-20T12:00:00",
                "result": {"state": "done", "result": {"actual_processing_time": 17.5}},
            },
            17.5,
            id="half the timestamps: falls back to actual_processing_time",
        ),
        pytest.param(
            {"result": {"state": "done", "result": {"actual_processing_time": 9}}},
            9.0,
            id="only actual_processing_time (int)",
        ),
        pytest.param(
            {"result": {"state": "done", "result": {"actual_processing_time": True}}},
            None,
            id="boolean actual_processing_time is no time",
        ),
        pytest.param(
            {"result": {"state": "done", "result": {"actual_processing_time": "9"}}},
            None,
            id="text actual_processing_time is no time",
        ),
        pytest.param({"result": {"state": "done", "result": None}}, None, id="null inner result"),
        pytest.param({}, None, id="no time at all"),
    ],
)
def test_slice_result_processing_seconds(content: dict[str, Any], seconds: float | None) -> None:
    msg = slice_result(**content)
    assert msg.processing_seconds == seconds


def test_real_transformer_slice_result() -> None:
    msg = slice_result(
        requested_at="2026-01-20T11:59:58",
        processing_start_at="2026-01-20T12:00:00",
        processed_at="2026-01-20T12:00:31",
        state="done",
        hostname="wn-01",
        panda_task_id=123,
        panda_id="456",
        harvester_id="h-1",
        result={"state": "done", "result": {"actual_processing_time": 30.9}, "error": None},
    )

    assert msg.content.state == "done"
    assert msg.content.hostname == "wn-01"
    assert (msg.content.panda_task_id, msg.content.panda_id) == (123, "456")
    assert msg.content.requested_at == datetime(2026, 1, 20, 11, 59, 58, tzinfo=UTC)
    assert msg.processing_seconds == 31.0


def test_failed_slice_without_identity() -> None:
    msg = slice_result(state="failed", result={"state": "failed", "result": None, "error": "boom"})

    assert msg.content.state == "failed"
    assert msg.content.hostname is None
    assert msg.content.panda_id is None
    assert msg.content.result is not None and msg.content.result.error == "boom"
    assert msg.processing_seconds is None


def test_seed_transformer_heartbeat() -> None:
    msg = parse_message(
        wire(
            msg_type="transformer_heartbeat",
            created_at="2026-01-20T12:00:00Z",
            content={"id": "tf-7", "hostname": "wn-07"},
        )
    )

    assert isinstance(msg, TransformerHeartbeat)
    assert msg.run_id is None
    assert msg.worker == "tf-7"
    assert msg.seen_at == NOON


def test_seed_heartbeat_falls_back_to_hostname() -> None:
    msg = parse_message(wire(msg_type="transformer_heartbeat", content={"hostname": "wn-07"}))
    assert isinstance(msg, TransformerHeartbeat)
    assert msg.worker == "wn-07"


def test_real_transformer_heartbeat_with_epoch_and_no_run_id() -> None:
    msg = parse_message(
        wire(msg_type="heartbeat", internal_id="abc-123", namespace=None, timestamp=1768910400.25)
    )

    assert isinstance(msg, Heartbeat)
    assert msg.run_id is None
    assert msg.worker == "abc-123"
    assert msg.seen_at == NOON.replace(microsecond=250000)


def test_heartbeat_without_timestamp_is_seen_at_created_at() -> None:
    msg = parse_message(wire(msg_type="heartbeat", internal_id=9, created_at="2026-01-20T12:00:00"))
    assert isinstance(msg, Heartbeat)
    assert msg.worker == "9"
    assert msg.seen_at == NOON


@pytest.mark.parametrize(
    ("run_id", "expected"),
    [
        ("100123", "100123"),
        (100123, "100123"),
        ("run-7_a.b", "run-7_a.b"),
        (0, "0"),
        ("x" * 64, "x" * 64),
    ],
)
def test_run_id_is_text_whether_sent_as_str_or_int(run_id: str | int, expected: str) -> None:
    msg = parse_message(wire(msg_type="end_run", run_id=run_id))
    assert msg.run_id == expected


@pytest.mark.parametrize(
    "created_at",
    [
        "2026-01-20T12:00:00",
        "2026-01-20T12:00:00.000Z",
        "2026-01-20T12:00:00+00:00",
        "Tue, 20 Jan 2026 12:00:00 UTC",
        1768910400,
    ],
)
def test_created_at_in_every_shape(created_at: str | int) -> None:
    msg = parse_message(wire(msg_type="end_run", run_id="1", created_at=created_at))

    assert msg.created_at == NOON
    assert msg.model_dump(mode="json")["created_at"] == "2026-01-20T12:00:00+00:00"


@pytest.mark.parametrize(
    "body",
    [
        b'{"msg_type": "end_run", "run_id": "1"}',
        '{"msg_type": "end_run", "run_id": "1"}',
        {"msg_type": "end_run", "run_id": "1"},
    ],
)
def test_body_as_bytes_text_or_dict(body: bytes | str | dict[str, Any]) -> None:
    assert parse_message(body) == RunEnd(msg_type="end_run", run_id="1")


def test_unknown_envelope_fields_are_kept_and_messages_are_frozen() -> None:
    msg = parse_message(
        wire(
            msg_type="end_run",
            run_id="1",
            namespace="dev",
            instance="i",
            sender="agent",
            brand_new="x",
        )
    )

    assert isinstance(msg, RunEnd)
    assert (msg.namespace, msg.instance, msg.sender) == ("dev", "i", "agent")
    assert msg.model_extra == {"brand_new": "x"}
    with pytest.raises(ValueError):
        msg.run_id = "2"  # type: ignore[misc]


def test_stop_transformer_keeps_the_run_id_type() -> None:
    numeric = parse_message(wire(msg_type="stop_transformer", run_id=100123, content={}))
    textual = parse_message(wire(msg_type="stop_transformer", run_id="run-7", content={}))

    assert isinstance(numeric, StopTransformer) and isinstance(textual, StopTransformer)
    assert numeric.run_id == 100123
    assert textual.run_id == "run-7"


# --- rejected input ----------------------------------------------------------


def names_field(text: str, field: str) -> bool:
    """The field is named at the start of one of the '; '-joined problems."""
    return re.search(rf"(^|; ){re.escape(field)}: ", text) is not None


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(b"{not json", "not JSON", id="malformed JSON"),
        pytest.param(b"", "not JSON", id="empty body"),
        pytest.param(b'{"msg_type": "end_run", "run_id": "1"', "not JSON", id="truncated"),
        pytest.param(b"[1, 2]", "JSON list, not an object", id="array body"),
        pytest.param(b'"end_run"', "JSON str, not an object", id="string body"),
        pytest.param(b"null", "JSON NoneType, not an object", id="null body"),
        pytest.param(b'{"msg_type": "end_run", "run_id": "\xff"}', "not UTF-8", id="bad UTF-8"),
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep nesting"),
    ],
)
def test_unusable_bodies(body: bytes, says: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(body)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param({"run_id": "1"}, "msg_type", id="missing msg_type"),
        pytest.param({"msg_type": "bogus", "run_id": "1"}, "msg_type", id="unknown msg_type"),
        pytest.param({"msg_type": None, "run_id": "1"}, "msg_type", id="null msg_type"),
        pytest.param({"msg_type": ["end_run"], "run_id": "1"}, "msg_type", id="list msg_type"),
        pytest.param({"msg_type": "end_run"}, "run_id", id="missing run_id"),
        pytest.param({"msg_type": "end_run", "run_id": ""}, "run_id", id="empty run_id"),
        pytest.param({"msg_type": "end_run", "run_id": "   "}, "run_id", id="blank run_id"),
        pytest.param({"msg_type": "end_run", "run_id": None}, "run_id", id="null run_id"),
        pytest.param(
            {"msg_type": "end_run", "run_id": "1' OR namespace='prod"},
            "run_id",
            id="selector injection",
        ),
        pytest.param({"msg_type": "end_run", "run_id": '1"2'}, "run_id", id="double quote"),
        pytest.param({"msg_type": "end_run", "run_id": "10 23"}, "run_id", id="space"),
        pytest.param({"msg_type": "end_run", "run_id": "../etc/passwd"}, "run_id", id="path"),
        pytest.param({"msg_type": "end_run", "run_id": "a/b"}, "run_id", id="slash"),
        pytest.param({"msg_type": "end_run", "run_id": "a\\b"}, "run_id", id="backslash"),
        pytest.param({"msg_type": "end_run", "run_id": "a\nb"}, "run_id", id="newline"),
        pytest.param({"msg_type": "end_run", "run_id": "-5"}, "run_id", id="leading dash"),
        pytest.param({"msg_type": "end_run", "run_id": "x" * 65}, "run_id", id="too long"),
        pytest.param({"msg_type": "end_run", "run_id": True}, "run_id", id="boolean run_id"),
        pytest.param({"msg_type": "end_run", "run_id": 1.5}, "run_id", id="float run_id"),
        pytest.param({"msg_type": "end_run", "run_id": ["1"]}, "run_id", id="list run_id"),
        pytest.param(
            {"msg_type": "end_run", "run_id": "1", "created_at": "soon"},
            "created_at",
            id="bad created_at",
        ),
        pytest.param(
            {"msg_type": "run_imminent", "run_id": "1", "content": "x"},
            "content",
            id="content not an object",
        ),
        pytest.param(
            {"msg_type": "run_imminent", "run_id": "1", "content": {"target_worker_count": -1}},
            "content.target_worker_count",
            id="negative workers",
        ),
        pytest.param(
            {"msg_type": "run_imminent", "run_id": "1", "content": {"num_workers": "many"}},
            "content.num_workers",
            id="seed name, wrong type",
        ),
        pytest.param(
            {
                "msg_type": "run_imminent_worker",
                "run_id": "1",
                "content": {"slice_processing_time": 0},
            },
            "content.slice_processing_time",
            id="zero slice time",
        ),
        pytest.param(
            {"msg_type": "created_workflow_task", "run_id": "1"},
            "content",
            id="missing content",
        ),
        pytest.param(
            {
                "msg_type": "created_workflow_task",
                "run_id": "1",
                "content": {"request_id": "abc", "transform_id": 2},
            },
            "content.request_id",
            id="text request_id",
        ),
        pytest.param(
            {"msg_type": "created_workflow_task", "run_id": "1", "content": {"request_id": 1}},
            "content.transform_id",
            id="missing transform_id",
        ),
        pytest.param(
            {
                "msg_type": "created_workflow_task",
                "run_id": "1",
                "content": {"request_id": 1, "transform_id": 2, "workload_id": "w"},
            },
            "content.workload_id",
            id="text workload_id",
        ),
        pytest.param(
            {"msg_type": "adjusted_worker", "run_id": "1", "content": {"core_count": "four"}},
            "content.core_count",
            id="text core_count",
        ),
        pytest.param(
            {"msg_type": "closed_workflow_task", "run_id": "1", "content": {"status": ""}},
            "content.status",
            id="empty status",
        ),
        pytest.param(
            {"msg_type": "closed_workflow_task", "run_id": "1", "content": {}},
            "content.status",
            id="missing status",
        ),
        pytest.param(
            {"msg_type": "slice_result", "run_id": "1", "content": {"state": "running"}},
            "content.state",
            id="unknown slice state",
        ),
        pytest.param(
            {"msg_type": "slice_result", "run_id": "1", "content": {"processing_time": -1}},
            "content.processing_time",
            id="negative processing_time",
        ),
        pytest.param(
            {"msg_type": "slice_result", "run_id": "1", "content": {"processed_at": "yesterday"}},
            "content.processed_at",
            id="bad processed_at",
        ),
        pytest.param(
            {"msg_type": "slice_result", "run_id": "1", "content": {"result": "ok"}},
            "content.result",
            id="result not an object",
        ),
        pytest.param(
            {"msg_type": "slice_result", "content": {"state": "done"}},
            "run_id",
            id="slice without run_id",
        ),
        pytest.param(
            {"msg_type": "heartbeat", "timestamp": "whenever"},
            "timestamp",
            id="bad timestamp",
        ),
        pytest.param(
            {"msg_type": "heartbeat", "timestamp": 1e20},
            "timestamp",
            id="epoch out of range",
        ),
        pytest.param(
            {"msg_type": "heartbeat", "run_id": "a b"},
            "run_id",
            id="heartbeat bad run_id",
        ),
        pytest.param(
            # int | str: pydantic names the union member after the field
            {"msg_type": "stop_transformer", "run_id": [1]},
            "run_id.int",
            id="stop list run_id",
        ),
    ],
)
def test_invalid_messages_name_the_field(data: dict[str, Any], field: str) -> None:
    for body in (data, json.dumps(data).encode()):
        with pytest.raises(InvalidMessage) as caught:
            parse_message(body)
        text = str(caught.value)
        assert names_field(text, field), text
        # the discriminated union's tag is not part of the field name
        assert not text.startswith(f"{data.get('msg_type')}.")


def test_unknown_msg_type_is_quoted() -> None:
    with pytest.raises(InvalidMessage, match=r"^msg_type: unknown message type 'bogus'$"):
        parse_message({"msg_type": "bogus", "run_id": "1"})


def test_invalid_message_is_a_value_error() -> None:
    assert issubclass(InvalidMessage, ValueError)


# --- properties --------------------------------------------------------------

TAGS = [
    "run_imminent",
    "run_imminent_worker",
    "end_run",
    "run_end",
    "run_stop",
    "created_workflow_task",
    "adjusted_worker",
    "closed_workflow_task",
    "create_workflow_task",
    "adjust_worker",
    "close_workflow_task",
    "stop_transformer",
    "slice_result",
    "transformer_heartbeat",
    "heartbeat",
]
FIELDS = [
    "run_id",
    "created_at",
    "request_id",
    "transform_id",
    "workload_id",
    "status",
    "state",
    "processing_time",
    "processing_start_at",
    "processed_at",
    "requested_at",
    "result",
    "actual_processing_time",
    "target_worker_count",
    "num_workers",
    "core_count",
    "memory_per_core",
    "site",
    "slice_processing_time",
    "id",
    "hostname",
    "workflow",
    "timestamp",
]
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["2026-01-20T12:00:00", "Fri, 02 Jan 2026 03:04:05 UTC", "100123", ""])
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
MESSAGES = st.fixed_dictionaries(
    {"msg_type": st.sampled_from(TAGS) | JSON_SCALARS},
    optional={
        "run_id": JSON,
        "created_at": JSON,
        "timestamp": JSON,
        "internal_id": JSON,
        "namespace": JSON,
        "content": st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), JSON),
    },
)


def parses_or_is_invalid(body: object) -> None:
    """Either a typed message of the type the body names, or a rejection that
    says why; any other exception fails the test."""
    try:
        message = parse_message(body)  # type: ignore[arg-type]
    except InvalidMessage as exc:
        assert str(exc).strip(), "a rejection must give its reason"
        return
    assert isinstance(body, bytes | str | dict)  # parse_message took it
    named = body.get("msg_type") if isinstance(body, dict) else json.loads(body)["msg_type"]
    assert message.msg_type == named


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_invalid_message(body: bytes) -> None:
    parses_or_is_invalid(body)


@settings(max_examples=400, deadline=None)
@given(MESSAGES)
def test_arbitrary_json_dicts_never_raise_anything_but_invalid_message(
    data: dict[str, Any],
) -> None:
    parses_or_is_invalid(data)
    parses_or_is_invalid(json.dumps(data).encode())


TIME_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    value=TIME_VALUES,
    where=st.sampled_from(
        [
            ("heartbeat", "timestamp", False),
            ("end_run", "created_at", False),
            ("slice_result", "processed_at", True),
            ("slice_result", "processing_start_at", True),
            ("slice_result", "requested_at", True),
        ]
    ),
)
def test_any_timestamp_value_parses_or_is_invalid(
    value: object,
    where: tuple[str, str, bool],
) -> None:
    msg_type, field, in_content = where
    data: dict[str, Any] = {"msg_type": msg_type, "run_id": "1", "content": {}}
    (data["content"] if in_content else data)[field] = value
    parses_or_is_invalid(data)
