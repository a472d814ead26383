"""A run's state as a pure function of what the run has seen.

Inputs are the run's bus messages and the effects the run flow recorded
(create sent, adjust sent, ...), each with the time it was received. The same
inputs in the same order give the same state, so a retried flow run rebuilds
exactly where the previous attempt was, and the run's event history doubles as
its replay log. Dispatch is by input type (``apply.register``), not by
comparing message-type strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import singledispatch

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.effects import AdjustSent, CloseSent, CreateSent, StopSent
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    Heartbeat,
    RunEnd,
    RunImminent,
    SliceResult,
    TransformerHeartbeat,
    WorkerSize,
    WorkflowIds,
)
from swf_panda_workers.core.outbound import cores_per_worker
from swf_panda_workers.core.policies import WorkerPlan
from swf_panda_workers.core.slice_window import SliceObservation


@dataclass(frozen=True)
class RunState:
    run_id: str
    plan: WorkerPlan
    ids: WorkflowIds | None = None  # the run's task: the first iDDS reported
    # Further tasks iDDS made for this one run (its transceiver may handle one
    # request on several threads): each is closed as soon as it is known.
    extra_tasks: tuple[WorkflowIds, ...] = ()
    ended_at: datetime | None = None
    closed_status: str | None = None  # iDDS's answer to the close of the run's task
    applied: WorkerSize | None = None  # the size iDDS last confirmed
    create_sent: bool = False
    stop_sent: bool = False
    closes_sent: tuple[WorkflowIds | None, ...] = ()  # None: by run id
    adjustments: tuple[AdjustSent, ...] = ()
    slices_done: int = 0
    slices_failed: int = 0
    slowest_slice: float | None = None
    workers_seen: frozenset[str] = field(default_factory=frozenset)
    last_slice: SliceObservation | None = None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def closed(self) -> bool:
        return self.closed_status is not None

    @property
    def close_sent(self) -> bool:
        """The run's task has been asked to close (by its ids, or by run id)."""
        return None in self.closes_sent or (self.ids is not None and self.ids in self.closes_sent)

    @property
    def open_tasks(self) -> tuple[WorkflowIds, ...]:
        """Tasks of the run known by their ids and not yet asked to close."""
        known = (self.ids, *self.extra_tasks) if self.ids is not None else ()
        return tuple(task for task in known if task not in self.closes_sent)

    @property
    def open_extra_tasks(self) -> tuple[WorkflowIds, ...]:
        return tuple(task for task in self.open_tasks if task != self.ids)

    def is_run_task(self, reply: ClosedWorkflowTask) -> bool:
        """Whether a close confirmation is for the run's task (not an extra)."""
        transform_id = reply.content.transform_id
        return self.ids is None or transform_id is None or transform_id == self.ids.transform_id


def initial_state(run: RunImminent, settings: Settings) -> RunState:
    """A new run, sized from run_imminent, with configured defaults for gaps."""
    spec, panda = run.content, settings.panda
    size = WorkerSize(
        core_count=cores_per_worker(run, settings),
        memory_per_core=spec.memory_per_core or panda.ram_count,
        site=spec.site or panda.site,
        target_worker_count=spec.target_worker_count or panda.num_workers,
    )
    return RunState(run_id=run.run_id, plan=WorkerPlan(initial=size, current=size))


@singledispatch
def apply(item: object, state: RunState, at: datetime) -> RunState:
    """Inputs the run does not act on (e.g. our own echoed requests)."""
    return state


@apply.register
def _created(item: CreatedWorkflowTask, state: RunState, at: datetime) -> RunState:
    # The first task iDDS reports is the run's. A reply heard twice names it
    # again; another task for the same run (iDDS handled the request on
    # several threads) is an extra, to be closed.
    ids = item.ids
    if state.ids is None:
        return replace(state, ids=ids)
    if ids == state.ids or ids in state.extra_tasks:
        return state
    return replace(state, extra_tasks=(*state.extra_tasks, ids))


@apply.register
def _adjusted(item: AdjustedWorker, state: RunState, at: datetime) -> RunState:
    return replace(
        state,
        applied=WorkerSize.model_validate(
            item.content.model_dump(include=set(WorkerSize.model_fields))
        ),
    )


@apply.register
def _closed(item: ClosedWorkflowTask, state: RunState, at: datetime) -> RunState:
    if state.closed or not state.is_run_task(item):
        return state  # an extra task's confirmation, or a repeat
    return replace(state, closed_status=item.content.status)


@apply.register
def _ended(item: RunEnd, state: RunState, at: datetime) -> RunState:
    # end_run arrives on two topics: the first one ends the run.
    return state if state.ended else replace(state, ended_at=at)


@apply.register
def _slice(item: SliceResult, state: RunState, at: datetime) -> RunState:
    failed = item.content.state == "failed"
    seconds = item.processing_seconds
    slowest = state.slowest_slice
    if seconds is not None and not failed:
        slowest = seconds if slowest is None else max(slowest, seconds)
    return replace(
        state,
        slices_done=state.slices_done + (0 if failed else 1),
        slices_failed=state.slices_failed + (1 if failed else 0),
        slowest_slice=slowest,
        workers_seen=_with_worker(state.workers_seen, item.worker),
        last_slice=SliceObservation.of(item, at),
    )


@apply.register
def _seed_heartbeat(item: TransformerHeartbeat, state: RunState, at: datetime) -> RunState:
    return replace(state, workers_seen=_with_worker(state.workers_seen, item.worker))


@apply.register
def _heartbeat(item: Heartbeat, state: RunState, at: datetime) -> RunState:
    return replace(state, workers_seen=_with_worker(state.workers_seen, item.worker))


@apply.register
def _create_sent(item: CreateSent, state: RunState, at: datetime) -> RunState:
    return replace(state, create_sent=True, plan=state.plan.created(at))


@apply.register
def _adjust_sent(item: AdjustSent, state: RunState, at: datetime) -> RunState:
    return replace(
        state, plan=state.plan.adjusted(item, at), adjustments=(*state.adjustments, item)
    )


@apply.register
def _stop_sent(item: StopSent, state: RunState, at: datetime) -> RunState:
    return replace(state, stop_sent=True)


@apply.register
def _close_sent(item: CloseSent, state: RunState, at: datetime) -> RunState:
    return replace(state, closes_sent=(*state.closes_sent, item.ids))


def _with_worker(seen: frozenset[str], worker: str | None) -> frozenset[str]:
    return seen if not worker or worker in seen else seen | {worker}
