"""Reports a run flow that makes no progress while it waits for something it
needs (swf_panda_workers/core/run_progress.py): a warning in the run's log, and a
``swf.run.stalled`` event on the run, with what it waits for and for how long.

The run's progress is kept here, in the process running its flow, so that
its scaling sub-flow (which runs in the same process) reports progress to
the same record: a sub-flow that Prefect is slow to start shows as the
parent waiting for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from uuid import UUID

from prefect import get_run_logger
from prefect.runtime import flow_run

from swf_panda_workers.adapters.prefect_events.journal import emit
from swf_panda_workers.adapters.prefect_events.schema import stall_event
from swf_panda_workers.core.run_progress import RunProgress

# The runs whose flows run in this process, by (namespace, run id).
_FOLLOWED: dict[tuple[str, str], RunProgress] = {}
LOOK_EVERY = 5.0  # s between two looks, at most


@asynccontextmanager
async def watched_run(
    namespace: str, run_id: str, stall_after: float
) -> AsyncIterator[RunProgress]:
    """The run's progress record, watched until the block ends."""
    progress = RunProgress.starting(run_id, time.monotonic())
    _FOLLOWED[(namespace, run_id)] = progress
    flow_run_id = UUID(flow_run.id) if flow_run.id else None
    watcher = asyncio.create_task(_watch(progress, namespace, stall_after, flow_run_id))
    try:
        yield progress
    finally:
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
        if _FOLLOWED.get((namespace, run_id)) is progress:
            del _FOLLOWED[(namespace, run_id)]


def progress_of(namespace: str, run_id: str) -> RunProgress | None:
    """The run's record when its flow runs in this process (a sub-flow's parent)."""
    return _FOLLOWED.get((namespace, run_id))


async def _watch(
    progress: RunProgress, namespace: str, stall_after: float, flow_run_id: UUID | None
) -> None:
    logger = get_run_logger()
    while True:
        await asyncio.sleep(min(LOOK_EVERY, stall_after / 4))
        idle = progress.stalled_for(time.monotonic(), stall_after)
        if idle is not None:
            logger.warning(progress.stall_line(idle))
            emit(stall_event(namespace, progress.run_id, progress.waiting_for, idle, flow_run_id))
