"""The life of one run, as one Prefect flow run.

    create the iDDS workflow and task -> wait for its ids
    -> scaling sub-flow (slice results -> adjust_worker) until the run ends
    -> stop the transformers -> close the task -> iDDS's close status

A run always ends cleanly: an end_run that comes before iDDS's ids ends it at
once (the stop, and a close by run id), and a failure (the scaling sub-flow,
iDDS errors, no answer to the create) still sends the stop and the close
before the flow run fails: on its last attempt, for an attempt that Prefect
will retry goes on with the run where it left off. Every task iDDS made for
the run is closed, the extra ones (iDDS handling one request more than once)
as soon as they are known.

The flow's inputs are its run's Prefect events (bus messages the listener
handed over, and the effects this flow journaled), so a retried flow run
rebuilds its state and skips what was already done.

With ``dry_run`` the flow replays a recorded run: the run's stored messages
are its inputs, it decides as configured now, and it sends nothing (each
message it would send is in its log) and journals nothing. Its summary and
decisions are artifacts of their own, beside the live run's.
"""

import asyncio
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.connections import run_bus, run_events
from flows.idds_requests import ask_idds, close_open_tasks, gateway_for
from flows.progress_watch import watched_run
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView
from flows.scaling_subflow import ScalingReport, SliceCount, publish_decisions, scale_workers
from flows.tasks import publish
from swf_panda_workers.adapters.prefect_events.history import fold_history, history_start
from swf_panda_workers.adapters.prefect_events.outage import SERVER_ERRORS, server_trouble
from swf_panda_workers.adapters.prefect_events.schema import STREAM_EVENTS, run_resource_id
from swf_panda_workers.adapters.prefect_runs import PROCESS_LABEL, RunProcess, claim_run
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.effects import CreateSent, StopSent
from swf_panda_workers.core.idds_gateway import IddsGateway, IddsRequestFailed
from swf_panda_workers.core.messages import RunImminent, WorkflowIds
from swf_panda_workers.core.outbound import Sender
from swf_panda_workers.core.run_report import artifact_key
from swf_panda_workers.core.run_state import RunState, initial_state
from swf_panda_workers.core.timestamps import utc_now

CLAIM_RETRY_EVERY = 2.0  # s between attempts to record the attempt's process
SUB_FLOW_ONLY = STREAM_EVENTS  # slice results and heartbeats, alone or batched


class CreateNotAnswered(RuntimeError):
    """iDDS did not reply to create_workflow_task in time."""


class CloseNotConfirmed(RuntimeError):
    """iDDS did not reply to close_workflow_task in time."""


class RunOutcome(BaseModel):
    run_id: str
    namespace: str
    status: str  # iDDS's close answer: ToCancel or NotFound on the bus; its REST message
    ids: WorkflowIds | None  # None: the run ended before iDDS reported its task
    extra_tasks: list[WorkflowIds] = []  # more tasks iDDS made for the run, all closed
    slices_done: int
    slices_failed: int
    adjustments: int
    workers_requested: int | None  # the worker count last asked of iDDS
    workers_confirmed: int | None  # a worker count in iDDS's last adjusted_worker, if any
    end: str
    dry_run: bool = False


def run_name() -> str:
    parameters = flow_run.parameters
    prefix = "dry-run" if parameters.get("dry_run") else "run"
    return f"{prefix}-{parameters['run_id']}"


@flow(
    name="swf-run",
    flow_run_name=run_name,
    retries=1,
    retry_delay_seconds=10,
    description="One data-taking run: iDDS task, worker scaling, stop and close.",
)
async def run_lifecycle(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    received_at: datetime | None = None,
    dry_run: bool = False,
) -> RunOutcome:
    """``announcement`` is the run_imminent message as received (either shape);
    ``received_at`` when the listener got it (events are read from then on);
    ``dry_run``: replay the recorded run, sending nothing."""
    # Which process runs this attempt: a runner that finds that process gone
    # runs the flow run again (deployments/recovery.py). Recorded beside the
    # run's start, not before it: on SQLite this write may wait seconds for
    # the database when many runs start together, and the create must not.
    claiming = asyncio.create_task(claim_attempt(), name=f"claim-run-{run_id}")
    try:
        outcome = await follow_run_to_end(run_id, namespace, announcement, received_at, dry_run)
    except BaseException:
        claiming.cancel()
        raise
    await claiming
    return outcome


async def follow_run_to_end(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    received_at: datetime | None,
    dry_run: bool,
) -> RunOutcome:
    settings = settings_for(namespace)
    run = announced_run(announcement, run_id)
    since = history_start(received_at or utc_now())
    resource = run_resource_id(namespace, run_id)

    announced_at = received_at or utc_now()
    workflow_name = outbound.workflow_name(run, settings, announced_at)
    # One subscription for the whole run, so nothing falls between two. The
    # stream of slice results and heartbeats is the scaling sub-flow's.
    async with (
        watched_run(namespace, run_id, settings.timeouts.stall) as progress,
        run_bus(settings, f"run-{run_id}", dry_run) as bus,
        run_events(resource, since, dry_run, exclude=SUB_FLOW_ONLY) as feed,
    ):
        view = RunView(feed, initial_state(run, settings), namespace, dry_run)
        view.progress = progress
        await view.catch_up()
        idds = gateway_for(settings, bus, dry_run)
        ending = Ending(view, bus, idds, workflow_name, settings)
        try:
            ids = await create_task(view, idds, run, announced_at, settings)
        except (CreateNotAnswered, IddsRequestFailed):
            # iDDS may have made the task all the same: close it by run.
            await ending.after_failure()
            raise
        if ids is None:
            report = ScalingReport.without_scaling("end_run came before iDDS's ids")
        elif view.state.stop_sent:
            report = ScalingReport.without_scaling("stopped by an earlier attempt")
        else:
            view.waits_for("Prefect to start the scaling sub-flow")
            try:
                report = await ending.scaled(
                    scale_workers(
                        run_id=run_id,
                        namespace=namespace,
                        announcement=announcement,
                        received_at=received_at,
                        ids=ids,
                        dry_run=dry_run,
                    )
                )
            except Exception:
                # Not swallowed: the stop and the close first, then the failure.
                await ending.after_failure()
                raise
        view.waits_for("the stop and the close to be sent")
        state = await ending.stop_and_close(confirm=True)

    slices = report.slices or await count_from_history(
        initial_state(run, settings), resource, since
    )
    outcome = RunOutcome(
        run_id=run_id,
        namespace=namespace,
        status=state.closed_status or "",
        ids=state.ids,
        extra_tasks=list(state.extra_tasks),
        slices_done=slices.done,
        slices_failed=slices.failed,
        adjustments=len(report.adjustments),
        workers_requested=state.plan.current.target_worker_count,
        # From this flow's state: a reply to the sub-flow's last adjust may
        # arrive after the sub-flow has returned, but before the close.
        workers_confirmed=state.applied.target_worker_count if state.applied else None,
        end=report.end,
        dry_run=dry_run,
    )
    await publish_summary(outcome, report)
    await publish_decisions(run_id, namespace, report, dry_run)
    return outcome


async def count_from_history(state: RunState, resource: str, since: datetime) -> SliceCount:
    """The slice results of a run that had no scaling sub-flow (it ended
    before iDDS's ids), from its stored history, once the stop and the close
    are out of the way."""
    folded = await fold_history(state, resource, since)
    return SliceCount(done=folded.slices_done, failed=folded.slices_failed)


async def claim_attempt() -> None:
    """Record this process as the attempt's, however long the server takes;
    nothing to do when the runner that took the run recorded it already
    (deployments/in_process.py)."""
    flow_run_id = flow_run.id
    if flow_run_id is None:
        raise RuntimeError("the run flow runs only as a flow run")
    context = FlowRunContext.get()
    recorded = context.flow_run.labels.get(PROCESS_LABEL) if context and context.flow_run else None
    if RunProcess.from_label(recorded) == RunProcess.current(flow_run.run_count):
        return
    while True:
        try:
            async with get_client() as client:
                await claim_run(client, UUID(flow_run_id), flow_run.run_count)
            return
        except SERVER_ERRORS as exc:
            if not server_trouble(exc):
                raise
            get_run_logger().warning(
                "cannot record this process as the run's yet (%s); trying again in %g s",
                exc,
                CLAIM_RETRY_EVERY,
            )
            await asyncio.sleep(CLAIM_RETRY_EVERY)


async def create_task(
    view: RunView, idds: IddsGateway, run: RunImminent, announced_at: datetime, settings: Settings
) -> WorkflowIds | None:
    """The run's task, once iDDS reports it; None if the run ended first."""
    logger = get_run_logger()
    if view.state.create_sent:
        logger.info("create_workflow_task already sent by an earlier attempt; waiting for ids")
    else:
        now = utc_now()
        workflow = outbound.workflow_for(run, settings, now, announced_at)
        answer = await ask_idds(settings)(
            "create_workflow_task", partial(idds.create_workflow_task, run, workflow, now)
        )
        await view.record(CreateSent(), answer)
        logger.info("create_workflow_task sent for run %s (%s)", run.run_id, workflow["name"])

    timeout = settings.timeouts.created_workflow_task
    view.waits_for("iDDS's created_workflow_task (the run's task ids)")
    if not await view.until(lambda s: s.ids is not None or s.ended, timeout):
        if view.dry_run:
            raise CreateNotAnswered(
                f"the recorded run {run.run_id} holds no answer of iDDS "
                "to create_workflow_task: nothing to replay"
            )
        raise CreateNotAnswered(
            f"iDDS did not answer create_workflow_task for run {run.run_id} within {timeout:g}s; "
            "nothing was closed, since there are no ids to close"
        )
    ids = view.state.ids
    if ids is None:
        logger.warning(
            "end_run came before iDDS reported the task of run %s: ending the run "
            "now, closing the task by the run id",
            run.run_id,
        )
        return None
    logger.info(
        "iDDS created the task: request %s, transform %s, workload %s",
        ids.request_id,
        ids.transform_id,
        ids.workload_id,
    )
    if ids.workload_id is None:
        logger.warning("iDDS reports no workload_id: the PanDA submission failed or is pending")
    return ids


@dataclass
class Ending:
    """How a run ends, whatever ended it: its transformers stopped, every
    task iDDS made for it closed."""

    view: RunView
    bus: Sender
    idds: IddsGateway
    workflow_name: str
    settings: Settings

    async def stop_and_close(self, confirm: bool) -> RunState:
        """Stop and close what is not yet; with ``confirm``, wait for iDDS to
        confirm the close of the run's task, closing any task of the run that
        it reports meanwhile."""
        view, settings = self.view, self.settings
        await view.drain()  # what came meanwhile: a task reported late, say
        if not view.state.stop_sent:
            await self.stop()
        await close_open_tasks(view, self.idds, settings, self.workflow_name)
        if not confirm:
            return view.state
        timeout = settings.timeouts.closed_workflow_task
        view.waits_for("iDDS's closed_workflow_task (the close confirmation)")
        if not await view.until(lambda s: s.closed, timeout, self._close_new_tasks):
            if view.dry_run:
                # The replay's decisions are still worth showing.
                get_run_logger().warning(
                    "the recorded run %s holds no close confirmation of iDDS", view.state.run_id
                )
                return view.state
            raise CloseNotConfirmed(
                f"iDDS did not confirm close_workflow_task of run {view.state.run_id} "
                f"({self.workflow_name}) within {timeout:g}s"
            )
        get_run_logger().info(
            "iDDS closed the task of run %s: %s", view.state.run_id, view.state.closed_status
        )
        return view.state

    async def scaled(self, scaling: Coroutine[Any, Any, ScalingReport]) -> ScalingReport:
        """Await the scaling sub-flow. With ``scaling.end: stop``, the
        transformers are stopped as soon as end_run reaches this flow
        meanwhile: the sub-flow reads the run's results in order and may be
        far behind in them, and a run's end must not wait for its results."""
        if self.settings.scaling.end != "stop":
            return await scaling
        stopping = asyncio.Event()
        stopper = asyncio.create_task(self._stop_at_end_run(stopping))
        try:
            report = await scaling
        finally:
            if stopping.is_set():
                await stopper  # the stop is on its way: let it be sent and journaled
            else:
                stopper.cancel()
                with suppress(asyncio.CancelledError):
                    await stopper
        return report

    async def _stop_at_end_run(self, stopping: asyncio.Event) -> None:
        view = self.view
        await view.until(lambda s: s.ended, self.settings.timeouts.run_end)
        if view.state.ended and not view.state.stop_sent:
            stopping.set()
            await self.stop()

    async def after_failure(self) -> None:
        """On the flow run's last attempt, end the run; an attempt Prefect
        retries leaves it running for the retry to take up."""
        if flow_run.run_count <= (run_lifecycle.retries or 0):
            get_run_logger().warning("this attempt failed; the run goes on with the next")
            return
        get_run_logger().warning(
            "the last attempt failed: stopping the run's transformers "
            "and closing its tasks before the flow run fails"
        )
        await self.stop_and_close(confirm=False)

    async def stop(self) -> None:
        run_id = self.view.state.run_id
        for message in outbound.stop_transformers(run_id, self.settings, utc_now()):
            await publish(self.bus, message)
        await self.view.record(StopSent())
        get_run_logger().info(
            "stop_transformer broadcast for run %s (run_id as %s)",
            run_id,
            " and as ".join(type(form).__name__ for form in outbound.stop_run_ids(run_id)),
        )

    async def _close_new_tasks(self) -> None:
        await close_open_tasks(self.view, self.idds, self.settings, self.workflow_name)


async def publish_summary(outcome: RunOutcome, report: ScalingReport) -> None:
    """A per-run summary in the Prefect UI, under a stable key (a dry run's
    beside the live run's)."""
    rows = (
        "\n".join(
            f"| {a.sent_at:%H:%M:%S} | {a.size.target_worker_count} | {a.reason} |"
            for a in report.adjustments
        )
        or "| - | - | no adjustment |"
    )
    ids = outcome.ids
    extras = "".join(
        f"- extra iDDS task, closed: {task_line(extra)}\n" for extra in outcome.extra_tasks
    )
    # iDDS 2.6.21 applies no worker count: its adjusted_worker carries none.
    confirmed = (
        outcome.workers_confirmed
        if outcome.workers_confirmed is not None
        else "none (this iDDS does not act on a worker count)"
    )
    title = f"Dry run of run {outcome.run_id}" if outcome.dry_run else f"Run {outcome.run_id}"
    note = "Replayed from the recorded run; nothing was sent.\n\n" if outcome.dry_run else ""
    await acreate_markdown_artifact(
        key=artifact_key("run", outcome.namespace, outcome.run_id, outcome.dry_run),
        description=f"{title}: iDDS status {outcome.status or 'not confirmed'}",
        markdown=(
            f"# {title} ({outcome.namespace})\n\n{note}"
            f"- iDDS task: {task_line(ids)}\n"
            f"{extras}"
            f"- close status: **{outcome.status or 'not confirmed'}**\n"
            f"- slices: {outcome.slices_done} done, {outcome.slices_failed} failed\n"
            f"- workers requested: {outcome.workers_requested}; confirmed by iDDS: "
            f"{confirmed}\n"
            f"- end: {outcome.end}\n\n"
            "| time (UTC) | workers requested | reason |\n|---|---|---|\n"
            f"{rows}\n"
        ),
    )


def task_line(ids: WorkflowIds | None) -> str:
    if ids is None:
        return "none reported (the run ended first)"
    return f"request {ids.request_id}, transform {ids.transform_id}, workload {ids.workload_id}"
