"""Conformance: every message in tests/real_messages/, built by a real peer's
own code, is read by the service's models and routed as the service must
route it. A file added there without a row here fails ``test_every_file_has_a_row``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from listeners.routing import Ignore, Inbox, LookUpRun, Record, SetAside, StartRun, decide
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    Heartbeat,
    RunEnd,
    RunImminent,
    SliceResult,
    UnroutedSliceResult,
    parse_message,
)

REAL = Path(__file__).resolve().parents[1] / "real_messages"
NAMESPACE = "dev"
RESULTS = "/queue/panda.results.worker"
RUN = "100123"


def real(name: str) -> dict[str, Any]:
    return json.loads((REAL / name).read_text())


def routed(
    name: str,
    results: str = RESULTS,
    owned: frozenset[str] = frozenset({RUN}),
    namespace: str = NAMESPACE,
    idds_namespace: str | None = None,
) -> Any:
    message = real(name)
    headers = {**message["headers"], "destination": message["destination"]}
    return decide(
        json.dumps(message["body"]).encode(),
        headers,
        Inbox(namespace, results, idds_namespace),
        owned,
    )


# file -> (model, what the listener does with it)
EXPECTED: dict[str, tuple[type | None, type]] = {
    "adjusted_worker.idds-2.6.21.json": (AdjustedWorker, Record),
    "closed_workflow_task.idds-2.6.21.json": (ClosedWorkflowTask, Record),
    "closed_workflow_task_notfound.idds-2.6.21.json": (ClosedWorkflowTask, Record),
    "created_workflow_task.idds-2.6.21.json": (CreatedWorkflowTask, Record),
    "created_workflow_task_no_namespace.idds-2.6.21.json": (CreatedWorkflowTask, Record),
    "created_workflow_task_workload_null.idds-2.6.21.json": (CreatedWorkflowTask, Record),
    "created_workflow_task_workload_pair.idds-2.6.21.json": (CreatedWorkflowTask, Record),
    "end_run.testbed.json": (RunEnd, Record),
    "heartbeat_on_results.swf-transform-HEAD.json": (Heartbeat, Record),
    "heartbeat_on_results_with_namespace.swf-transform-HEAD.json": (Heartbeat, Record),
    # Destinations the service does not take from: were they delivered to it,
    # they would name no namespace of its own.
    "heartbeat_on_slice_queue.swf-transform-HEAD.json": (Heartbeat, Ignore),
    "heartbeat_on_transformer_topic.swf-transform-HEAD.json": (Heartbeat, Ignore),
    "run_imminent_worker.testbed.json": (RunImminent, StartRun),
    # For the transformers, not for us: never subscribed to, set aside if it came.
    "slice.testbed.json": (None, SetAside),
    "slice_result_done.idds-prompt-2.6.21.json": (SliceResult, Record),
    "slice_result_done.swf-transform-HEAD.json": (SliceResult, Record),
    "slice_result_done_no_requested_at.idds-prompt-2.6.21.json": (SliceResult, Record),
    "slice_result_failed.idds-prompt-2.6.21.json": (SliceResult, Record),
    "slice_result_failed.swf-transform-HEAD.json": (SliceResult, Record),
    "slice_result_from_heartbeat.swf-transform-HEAD.json": (UnroutedSliceResult, Ignore),
}


def test_every_file_has_a_row() -> None:
    assert sorted(p.name for p in REAL.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_read_and_routed(name: str) -> None:
    model, decision = EXPECTED[name]
    message = real(name)
    # Results are taken from wherever the transformers send them (a queue or
    # a topic): route each where it was sent.
    where = message["destination"] if message["body"].get("msg_type") == "slice_result" else RESULTS
    outcome = routed(name, results=where)
    assert isinstance(outcome, decision), outcome
    if model is not None:
        assert type(parse_message(json.dumps(message["body"]).encode())) is model


@pytest.mark.parametrize(
    ("name", "workload_id"),
    [
        ("created_workflow_task.idds-2.6.21.json", 31870),
        ("created_workflow_task_no_namespace.idds-2.6.21.json", 31870),
        ("created_workflow_task_workload_null.idds-2.6.21.json", None),
        # iDDS's PanDA client returned (task_id, None): the task id is the first.
        ("created_workflow_task_workload_pair.idds-2.6.21.json", 31871),
    ],
)
def test_workload_id_in_every_shape(name: str, workload_id: int | None) -> None:
    created = parse_message(json.dumps(real(name)["body"]).encode())
    assert isinstance(created, CreatedWorkflowTask)
    assert created.ids.workload_id == workload_id
    assert (created.ids.request_id, created.run_id) == (4711, RUN)


@pytest.mark.parametrize(
    ("name", "failed", "seconds"),
    [
        # idds-prompt writes whole seconds: a fast slice took 0 s by its clock.
        ("slice_result_done.idds-prompt-2.6.21.json", False, 0.0),
        ("slice_result_done_no_requested_at.idds-prompt-2.6.21.json", False, 0.0),
        ("slice_result_failed.idds-prompt-2.6.21.json", True, 0.0),
        ("slice_result_done.swf-transform-HEAD.json", False, 0.011514),
        ("slice_result_failed.swf-transform-HEAD.json", True, 0.00089),
    ],
)
def test_slice_results_as_the_transformers_send_them(
    name: str, failed: bool, seconds: float
) -> None:
    result = parse_message(json.dumps(real(name)["body"]).encode())
    assert isinstance(result, SliceResult)
    assert result.run_id == RUN
    assert (result.content.state == "failed") is failed
    assert result.content.result is not None
    assert result.content.result.state is (not failed)  # a JSON boolean, kept as one
    assert result.processing_seconds == pytest.approx(seconds, abs=1e-6)
    assert isinstance(result.content.panda_id, str)  # from the pilot's environment


def test_idds_prompt_time_format() -> None:
    result = parse_message(
        json.dumps(real("slice_result_done.idds-prompt-2.6.21.json")["body"]).encode()
    )
    assert isinstance(result, SliceResult)
    assert result.content.processed_at == datetime(2026, 12, 3, 13, 10, 41, tzinfo=UTC)
    assert result.created_at == datetime(2026, 12, 3, 13, 10, 41, tzinfo=UTC)


def test_requested_at_may_be_null() -> None:
    result = parse_message(
        json.dumps(
            real("slice_result_done_no_requested_at.idds-prompt-2.6.21.json")["body"]
        ).encode()
    )
    assert isinstance(result, SliceResult)
    assert result.content.requested_at is None


def test_a_result_naming_no_run_is_dropped_not_set_aside() -> None:
    outcome = routed(
        "slice_result_from_heartbeat.swf-transform-HEAD.json", results="/topic/panda.results"
    )
    assert isinstance(outcome, Ignore)
    assert isinstance(outcome.message, UnroutedSliceResult)
    assert "heartbeat" in outcome.why


def test_heartbeats_name_no_run() -> None:
    for name in (
        "heartbeat_on_results.swf-transform-HEAD.json",
        "heartbeat_on_results_with_namespace.swf-transform-HEAD.json",
    ):
        outcome = routed(name)
        assert isinstance(outcome, Record)
        assert outcome.run_id is None
        assert isinstance(outcome.message, Heartbeat)
        assert outcome.message.worker == real(name)["body"]["internal_id"]


IDDS_REPLY_FILES = [
    name
    for name in EXPECTED
    if name.split(".")[0].endswith(
        (
            "created_workflow_task",
            "adjusted_worker",
            "closed_workflow_task",
            "closed_workflow_task_notfound",
            "created_workflow_task_no_namespace",
            "created_workflow_task_workload_null",
            "created_workflow_task_workload_pair",
        )
    )
]


@pytest.mark.parametrize("name", IDDS_REPLY_FILES)
def test_idds_replies_in_its_own_namespace_are_taken_for_our_runs(name: str) -> None:
    # iDDS answers in its own namespace ("dev" here), or none: not the
    # requester's. A service in namespace "alice" talking to it takes the
    # replies that name its runs, and looks up the others in Prefect.
    assert len(IDDS_REPLY_FILES) == 7
    mine = routed(name, namespace="alice", idds_namespace="dev")
    assert isinstance(mine, Record) and mine.run_id == RUN
    theirs = routed(name, namespace="alice", idds_namespace="dev", owned=frozenset())
    assert isinstance(theirs, LookUpRun)


def test_only_replies_are_taken_from_idds_namespace() -> None:
    # The control system's messages in iDDS's namespace are another service's runs.
    for name in ("run_imminent_worker.testbed.json", "end_run.testbed.json"):
        assert isinstance(routed(name, namespace="alice", idds_namespace="dev"), Ignore)


def test_the_worker_is_the_pilots_panda_job_not_its_host() -> None:
    # Every pilot on a node reports the same host name: the PanDA job tells
    # the transformers apart; a result without one falls back to the host.
    body = real("slice_result_done.idds-prompt-2.6.21.json")["body"]
    result = parse_message(json.dumps(body).encode())
    assert isinstance(result, SliceResult) and result.worker == "panda-7000123"
    body["content"]["panda_id"] = None
    no_job = parse_message(json.dumps(body).encode())
    assert isinstance(no_job, SliceResult) and no_job.worker == "localhost"
