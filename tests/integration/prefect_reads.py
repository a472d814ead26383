"""Reading back from the Prefect server what the integration tests assert on:
a run's flow run once final, and its summary artifact."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from swf_panda_workers.adapters.prefect_events.history import run_history
from swf_panda_workers.adapters.prefect_events.schema import message_event_name, run_resource_id
from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_panda_workers.core.timestamps import utc_now


def _settings(api_url: str, auth_string: str | None) -> dict[object, object]:
    return {
        PREFECT_API_URL: api_url,
        **({PREFECT_API_AUTH_STRING: auth_string} if auth_string else {}),
    }


async def final_flow_run(
    api_url: str, namespace: str, run_id: str, wait: float = 120.0, auth_string: str | None = None
) -> FlowRun:
    """The run's flow run once its state is final (the flow's retries
    included); a run has one (top-level) flow run, never two."""
    deadline = time.monotonic() + wait
    with temporary_settings(_settings(api_url, auth_string)):  # type: ignore[arg-type]
        async with get_client() as client:
            while True:
                found = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=run_tags(namespace, run_id)),
                        parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
                    )
                )
                assert len(found) <= 1, f"run {run_id} has {len(found)} flow runs"
                if found and found[0].state is not None and found[0].state.is_final():
                    return found[0]
                if time.monotonic() > deadline:
                    state = found[0].state_name if found else "no flow run"
                    raise AssertionError(f"run {run_id}: not final after {wait}s ({state})")
                await asyncio.sleep(0.5)


async def final_state_name(api_url: str, flow_run_id: UUID, wait: float = 180.0) -> str:
    """The name of the flow run's state once final, else what it is after ``wait``."""
    deadline = time.monotonic() + wait
    with temporary_settings(_settings(api_url, None)):  # type: ignore[arg-type]
        async with get_client() as client:
            while True:
                flow_run = await client.read_flow_run(flow_run_id)
                if (
                    flow_run.state is not None and flow_run.state.is_final()
                ) or time.monotonic() > deadline:
                    return flow_run.state_name or "no state"
                await asyncio.sleep(0.5)


async def artifact_markdown(api_url: str, key: str, auth_string: str | None = None) -> str:
    """The markdown of the artifact ``key`` (a run's summary: run-<ns>-<id>)."""
    with temporary_settings(_settings(api_url, auth_string)):  # type: ignore[arg-type]
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
    assert artifacts, f"no artifact {key}"
    return str(artifacts[0].data)


def slices_reported(api_url: str, namespace: str, run_id: str) -> tuple[int, int]:
    """(done, failed) as the run's summary artifact reports them."""
    key = f"run-{namespace}-{run_id}".lower().replace("_", "-")
    summary = asyncio.run(artifact_markdown(api_url, key))
    found = re.search(r"slices: (\d+) done, (\d+) failed", summary)
    assert found, f"no slice counts in the summary of run {run_id}:\n{summary}"
    return int(found[1]), int(found[2])


async def stored_slice_results(api_url: str, namespace: str, run_id: str) -> int:
    """Distinct slice_result events the server stored for the run (the
    listener acks a result only once its event is stored)."""
    with temporary_settings({PREFECT_API_URL: api_url}):  # type: ignore[dict-item]
        events = await run_history(
            run_resource_id(namespace, run_id), since=utc_now() - timedelta(hours=1)
        )
    return len({e.id for e in events if e.event == message_event_name("slice_result")})


def wait_stored(
    api_url: str, namespace: str, run_id: str, count: int, timeout: float = 120.0
) -> int:
    """Wait until the server holds ``count`` results of the run; what it holds then."""
    deadline = time.monotonic() + timeout
    while True:
        stored = asyncio.run(stored_slice_results(api_url, namespace, run_id))
        if stored >= count or time.monotonic() > deadline:
            return stored
        time.sleep(0.5)
