"""One way for a run to ask iDDS for things, whichever way iDDS is reached.

A run asks iDDS three things: create its workflow and PanDA task, adjust its
workers, close its task. In message mode the request goes on the bus and the
answer comes back later as a bus message, into the run's event feed. In REST
mode the answer is the HTTP response. Either way the run flow sees the same
answer messages (created_workflow_task, adjusted_worker, closed_workflow_task),
so it neither knows nor cares which mode is on.

This module holds the interface and the pure part of REST mode: turning what
the iDDS clients return into those answer messages, or into an error that
carries iDDS's own words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    RunImminent,
    WorkerSize,
    WorkflowIds,
)
from swf_panda_workers.core.timestamps import to_iso

Answer = CreatedWorkflowTask | AdjustedWorker | ClosedWorkflowTask


class IddsRequestFailed(RuntimeError):
    """iDDS did not do what was asked: it answered with an error, timed out,
    could not be reached, or answered something unreadable. The text says what
    iDDS (or its client) answered. Worth retrying: most causes are transient."""


class IddsGateway(Protocol):
    """A run's requests to iDDS. Each method returns iDDS's answer when the
    way of asking gives one at once (REST), or None when it comes later on
    the bus (message mode). Raises IddsRequestFailed, or BusUnavailable.

    ``workflow`` is the run's (``outbound.workflow_for``); its name is unique
    per run, which is how iDDS (and REST mode, after a failed answer) finds
    the run's task."""

    def create_workflow_task(
        self, run: RunImminent, workflow: dict[str, Any], now: datetime
    ) -> CreatedWorkflowTask | None: ...

    def adjust_worker(
        self, run_id: str, ids: WorkflowIds, size: WorkerSize, now: datetime
    ) -> AdjustedWorker | None: ...

    def close_workflow_task(
        self, run_id: str, ids: WorkflowIds | None, workflow_name: str, now: datetime
    ) -> ClosedWorkflowTask | None:
        """``ids`` None: the run's task, whose ids never came, found by the
        run (message mode: iDDS looks it up by run id) or by its workflow name."""
        ...


# --- what the clients return ---------------------------------------------------


def client_result(result: object, request: str) -> object:
    """idds-client's ClientManager returns ``(False, message)`` when a request
    fails (``(-1, message)`` when its own guards refuse it) instead of raising;
    anything else is the server's answer. Relayed through PanDA the pair
    arrives decoded from JSON, as a list."""
    if isinstance(result, tuple | list) and len(result) == 2 and _is_failure_flag(result[0]):
        raise IddsRequestFailed(f"iDDS {request} failed: {_text(result[1])}")
    return result


def _is_failure_flag(flag: object) -> bool:
    # Not ``flag in (False, -1)``: 0 == False, and 0 is no failure flag.
    return flag is False or (type(flag) is int and flag == -1)


def relay_result(result: object, request: str) -> object:
    """Through the PanDA server's relay (panda-client) every answer is
    wrapped: ``(0, [True, answer])`` when PanDA relayed it, where ``answer``
    may itself be ClientManager's ``[False, message]``; ``(0, [False,
    message])`` when the relay refused; ``(255, message)`` when the HTTP
    exchange failed."""
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise IddsRequestFailed(f"iDDS {request} via PanDA: unreadable answer {_text(result)}")
    status, payload = result
    if status != 0:
        raise IddsRequestFailed(
            f"iDDS {request} via PanDA failed (status {status}): {_text(payload)}"
        )
    if not (isinstance(payload, tuple | list) and len(payload) == 2):
        raise IddsRequestFailed(f"iDDS {request} via PanDA: unreadable answer {_text(payload)}")
    ok, answer = payload
    if ok is not True:
        raise IddsRequestFailed(f"iDDS {request} via PanDA failed: {_text(answer)}")
    return client_result(answer, request)


# --- answers as the run sees them ---------------------------------------------


def created_answer(run_id: str, result: object, now: datetime) -> CreatedWorkflowTask:
    """create_workflow_task's REST answer ({request_id, transform_id,
    processing_id, input_coll_id, output_coll_id, workload_id}) as the reply
    message message mode would have received."""
    if not isinstance(result, Mapping):
        raise IddsRequestFailed(
            f"iDDS create_workflow_task answered {_text(result)}, not the task's ids"
        )
    try:
        return CreatedWorkflowTask.model_validate(
            _reply("created_workflow_task", run_id, now, {**result, "run_id": run_id})
        )
    except ValidationError as exc:
        raise IddsRequestFailed(
            f"iDDS create_workflow_task answered without usable ids: {_text(result)} "
            f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})"
        ) from None


def adjusted_answer(
    run_id: str, ids: WorkflowIds, size: WorkerSize, now: datetime
) -> AdjustedWorker:
    """iDDS's REST answer to adjust_worker only says it succeeded; what it
    applied is what was asked."""
    content = {"run_id": run_id, **ids.model_dump(), **size.model_dump(exclude_none=True)}
    return AdjustedWorker.model_validate(_reply("adjusted_worker", run_id, now, content))


def closed_answer(
    run_id: str, ids: WorkflowIds, result: object, now: datetime
) -> ClosedWorkflowTask:
    """The REST answer ({"status": 0, "message": "closed successfully"}) gives
    no ToCancel/NotFound as the bus reply does: the run keeps iDDS's words."""
    message = result.get("message") if isinstance(result, Mapping) else None
    status = str(message) if message else f"closed ({_text(result)})"
    content = {"run_id": run_id, **ids.model_dump(), "status": status}
    return ClosedWorkflowTask.model_validate(_reply("closed_workflow_task", run_id, now, content))


def not_found_answer(run_id: str, now: datetime) -> ClosedWorkflowTask:
    """What iDDS's transceiver answers a close by run id when the run has no
    task: REST mode says the same when it found none to close."""
    content = {
        "run_id": run_id,
        "request_id": None,
        "transform_id": None,
        "workload_id": None,
        "status": "NotFound",
    }
    return ClosedWorkflowTask.model_validate(_reply("closed_workflow_task", run_id, now, content))


def task_of_run(
    requests: object, details_of: Callable[[int], object], name: str, run_id: str
) -> dict[str, Any] | None:
    """The run's task among iDDS's answers: ``requests`` is its answer to
    get_request_id_by_name (``{name: request_id}``; the lookup is a SQL LIKE,
    where ``_`` matches any character, so only the exact name counts), and
    ``details_of(request_id)`` its answer to get_requests(with_detail=True): a
    row per transform of the request (``transform_id``, ``transform_name``,
    ``transform_workload_id``, ...). None: iDDS has no task of that name. The
    transform of that name (one per request and name) is the task.
    (ClientManager.get_transforms would be the plain way, but idds-client
    2.6.21's passes its client an argument it does not take, and always fails.)"""
    if not isinstance(requests, Mapping):
        raise IddsRequestFailed(f"iDDS answered the lookup of {name} with {_text(requests)}")
    request_id = requests.get(name)
    if request_id is None:
        return None
    rows = details_of(int(request_id))
    if not isinstance(rows, list | tuple):
        raise IddsRequestFailed(
            f"iDDS answered the details of request {request_id} with {_text(rows)}"
        )
    for row in rows:
        if (
            isinstance(row, Mapping)
            and row.get("transform_name") == name
            and row.get("transform_id") is not None
        ):
            return {
                "request_id": int(request_id),
                "transform_id": row["transform_id"],
                "workload_id": row.get("transform_workload_id"),
            }
    return None


def _reply(msg_type: str, run_id: str, now: datetime, content: dict[str, Any]) -> dict[str, Any]:
    return {"msg_type": msg_type, "run_id": run_id, "created_at": to_iso(now), "content": content}


def _text(value: object, limit: int = 500) -> str:
    """An answer for an error message: whole when short, cut when huge."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
