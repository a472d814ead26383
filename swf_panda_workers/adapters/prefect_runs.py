"""Starting a run's flow run, once, and finding the runs a namespace owns."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

from swf_panda_workers.messages import RunImminent
from swf_panda_workers.timestamps import to_iso

_ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]


def idempotency_key(namespace: str, run_id: str) -> str:
    """One flow run per run and namespace, however often run_imminent comes."""
    return f"swf-run:{namespace}:{run_id}"


def run_tags(namespace: str, run_id: str) -> list[str]:
    return ["swf-panda-workers", f"namespace:{namespace}", f"run:{run_id}"]


class RunStarter:
    """Creates run flow runs from the configured deployment, one at a time
    (concurrent creates against SQLite hit 'database is locked')."""

    def __init__(self, client: PrefectClient, deployment_name: str) -> None:
        self._client = client
        self._deployment_name = deployment_name
        self._deployment_id: UUID | None = None

    async def start(self, run: RunImminent, namespace: str, announcement: dict[str, Any],
                    received_at: datetime) -> UUID:
        """Create (or find) the run's flow run; once this returns, it is stored."""
        if self._deployment_id is None:
            deployment = await self._client.read_deployment_by_name(self._deployment_name)
            self._deployment_id = deployment.id
        flow_run = await self._client.create_flow_run_from_deployment(
            self._deployment_id,
            parameters={
                "run_id": run.run_id,
                "namespace": namespace,
                "announcement": announcement,
                "received_at": to_iso(received_at),
            },
            name=f"run-{run.run_id}",
            tags=run_tags(namespace, run.run_id),
            idempotency_key=idempotency_key(namespace, run.run_id),
        )
        return flow_run.id

    async def active_runs(self, namespace: str) -> dict[str, UUID]:
        """run_id -> flow run id of the namespace's runs still in progress."""
        flow_runs = await self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"namespace:{namespace}", "swf-panda-workers"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE)),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),  # not sub-flows
            ),
        )
        return {
            str(fr.parameters["run_id"]): fr.id
            for fr in flow_runs
            if "run_id" in fr.parameters
        }
