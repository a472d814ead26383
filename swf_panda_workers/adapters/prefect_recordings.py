"""A run's recording read back from the Prefect server: the announcement its
flow run was started with, and the run's stored events."""

from __future__ import annotations

from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
)
from prefect.client.schemas.sorting import FlowRunSort
from pydantic import TypeAdapter

from swf_panda_workers.adapters.prefect_events import (
    decode,
    history_start,
    run_history,
    run_resource_id,
)
from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_panda_workers.recording import RunRecording, recording_from


class RunNotFound(LookupError):
    """The Prefect server has no flow run for this run."""


async def fetch_recording(run_id: str, namespace: str) -> RunRecording:
    async with get_client() as client:
        found = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=run_tags(namespace, run_id)),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not found:
        raise RunNotFound(f"no flow run of run {run_id} in namespace {namespace} "
                          "on this Prefect server")
    parameters = found[0].parameters
    announced_at = _when(parameters.get("received_at")) or found[0].created
    assert announced_at is not None, "a stored flow run has a creation time"
    events = await run_history(run_resource_id(namespace, run_id), history_start(announced_at))
    inputs = [(event.occurred, item) for event in events if (item := decode(event)) is not None]
    return recording_from(run_id, namespace, parameters["announcement"], announced_at, inputs)


def _when(value: object) -> datetime | None:
    return None if value is None else TypeAdapter(datetime).validate_python(value)
