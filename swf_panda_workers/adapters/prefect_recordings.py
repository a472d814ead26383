"""A run's record read back from the Prefect server: the flow run the listener
started for it (with the announcement as its parameter), and the run's stored
events. What ``replay``, ``show`` and ``dry-run`` read; ``dry-run`` also starts
a dry run of the recorded run from its parameters."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_UI_URL
from pydantic import TypeAdapter

from swf_panda_workers.adapters.prefect_events.history import (
    fold_history,
    history_start,
    run_history,
)
from swf_panda_workers.adapters.prefect_events.schema import decode, run_resource_id
from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.messages import RunImminent, parse_message
from swf_panda_workers.core.recording import RunRecording, recording_from
from swf_panda_workers.core.run_report import FlowRunSummary, RunReport
from swf_panda_workers.core.run_state import initial_state

DRY_RUN_TAG = "dry-run"


class RunNotFound(LookupError):
    """The Prefect server has no flow run for this run."""


async def recorded_flow_run(client: PrefectClient, namespace: str, run_id: str) -> FlowRun:
    """The run's (top-level) flow run, as the listener started it."""
    found = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=run_tags(namespace, run_id)),
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
        ),
        sort=FlowRunSort.START_TIME_DESC,
        limit=1,
    )
    if not found:
        raise RunNotFound(
            f"no flow run of run {run_id} in namespace {namespace} on this Prefect server"
        )
    return found[0]


async def fetch_recording(run_id: str, namespace: str) -> RunRecording:
    async with get_client() as client:
        flow_run = await recorded_flow_run(client, namespace, run_id)
    announced_at = announced(flow_run)
    events = await run_history(run_resource_id(namespace, run_id), history_start(announced_at))
    inputs = [(event.occurred, item) for event in events if (item := decode(event)) is not None]
    return recording_from(
        run_id, namespace, flow_run.parameters["announcement"], announced_at, inputs
    )


async def run_report(run_id: str, namespace: str, settings: Settings) -> RunReport:
    """The run's flow run and sub-flow runs, and its state folded from its
    whole stored history (journaled effects included)."""
    async with get_client() as client:
        flow_run = await recorded_flow_run(client, namespace, run_id)
        sub_flow_runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])
            )
        )
    run = parse_message(flow_run.parameters["announcement"])
    assert isinstance(run, RunImminent), "the listener starts a run from its announcement"
    state = await fold_history(
        initial_state(run, settings),
        run_resource_id(namespace, run_id),
        history_start(announced(flow_run)),
    )
    return RunReport(
        run_id=run_id,
        namespace=namespace,
        flow_run=summary(flow_run),
        sub_flow_runs=tuple(summary(sub) for sub in sub_flow_runs),
        state=state,
        parameters=dict(flow_run.parameters),
        ui_url=PREFECT_UI_URL.value(),
    )


async def start_dry_run(run_id: str, namespace: str, deployment: str) -> UUID:
    """A new flow run of ``deployment`` with the recorded run's parameters and
    ``dry_run``; tagged apart, so nothing takes it for the run's own."""
    async with get_client() as client:
        recorded = await recorded_flow_run(client, namespace, run_id)
        target = await client.read_deployment_by_name(deployment)
        flow_run = await client.create_flow_run_from_deployment(
            target.id,
            parameters={**recorded.parameters, "dry_run": True},
            tags=["swf-panda-workers", DRY_RUN_TAG, f"dry-run-of:{namespace}:{run_id}"],
        )
    return flow_run.id


async def final_state(flow_run_id: UUID, timeout: float) -> FlowRun:
    """The flow run once its state is final (or as it is when ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run_id)
            if (
                flow_run.state is not None and flow_run.state.is_final()
            ) or time.monotonic() > deadline:
                return flow_run
            await asyncio.sleep(1.0)


async def artifact_text(key: str) -> str | None:
    """The latest markdown of the artifact ``key``, if there is one."""
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
    return str(found[0].data) if found else None


def announced(flow_run: FlowRun) -> datetime:
    value = flow_run.parameters.get("received_at")
    when = None if value is None else TypeAdapter(datetime).validate_python(value)
    moment = when or flow_run.created
    assert moment is not None, "a stored flow run has a creation time"
    return moment


def summary(flow_run: FlowRun) -> FlowRunSummary:
    return FlowRunSummary(
        id=str(flow_run.id),
        name=flow_run.name,
        state=flow_run.state_name or "?",
        started=flow_run.start_time,
        ended=flow_run.end_time,
    )


def parameters_json(parameters: dict[str, Any]) -> str:
    """The parameters as ``prefect deployment run --params`` takes them."""
    return json.dumps(parameters, sort_keys=True, default=str)
