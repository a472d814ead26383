"""Message mode: a run's requests to iDDS go on the bus; iDDS answers on the
bus too, and the listener hands the answers to the run's event feed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    RunImminent,
    WorkerSize,
    WorkflowIds,
)
from swf_panda_workers.core.outbound import Sender


class BusGateway:
    """Sends each request and waits for the broker's receipt, not for iDDS:
    every method returns None, the answer comes later."""

    def __init__(self, bus: Sender, settings: Settings) -> None:
        self._bus = bus
        self._settings = settings

    def create_workflow_task(
        self, run: RunImminent, workflow: dict[str, Any], now: datetime
    ) -> CreatedWorkflowTask | None:
        self._bus.send(outbound.create_workflow_task(run, self._settings, now, workflow))
        return None

    def adjust_worker(
        self, run_id: str, ids: WorkflowIds, size: WorkerSize, now: datetime
    ) -> AdjustedWorker | None:
        self._bus.send(outbound.adjust_worker(run_id, ids, size, self._settings, now))
        return None

    def close_workflow_task(
        self, run_id: str, ids: WorkflowIds | None, workflow_name: str, now: datetime
    ) -> ClosedWorkflowTask | None:
        # Without ids, by run id: iDDS's transceiver looks the task up by it.
        self._bus.send(outbound.close_workflow_task(run_id, ids, self._settings, now))
        return None
