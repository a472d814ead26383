"""One log line per input a run flow takes in: ``msg_type=... run_id=...``
and what matters of it, so the run's log in the Prefect UI reads as the run's
story, and a line is found by grepping either key."""

from __future__ import annotations

from functools import singledispatch

from swf_panda_workers.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    Message,
    SliceResult,
)
from swf_panda_workers.run_state import Effect


def input_line(item: Message | Effect, run_id: str) -> str:
    kind = f"effect={item.kind}" if isinstance(item, Effect) else f"msg_type={item.msg_type}"
    detail = _detail(item)
    return f"{kind} run_id={run_id}" + (f" {detail}" if detail else "")


@singledispatch
def _detail(item: object) -> str:
    return ""


@_detail.register
def _slice(item: SliceResult) -> str:
    c, seconds = item.content, item.processing_seconds
    took = "-" if seconds is None else f"{seconds:.2f}s"
    return f"state={c.state} took={took} worker={item.worker or '-'}"


@_detail.register
def _created(item: CreatedWorkflowTask) -> str:
    ids = item.ids
    return f"request_id={ids.request_id} transform_id={ids.transform_id} " \
           f"workload_id={ids.workload_id}"


@_detail.register
def _adjusted(item: AdjustedWorker) -> str:
    return f"workers={item.content.target_worker_count}"


@_detail.register
def _closed(item: ClosedWorkflowTask) -> str:
    return f"status={item.content.status}"


@_detail.register
def _effect(item: Effect) -> str:
    return "" if item.size is None else f"workers={item.size.target_worker_count}"
