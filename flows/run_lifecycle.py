"""The life of one run, as one Prefect flow run.

    create the iDDS workflow and task -> wait for its ids
    -> scaling sub-flow (slice results -> adjust_worker) until the run ends
    -> stop the transformers -> close the task -> iDDS's close status

The flow's inputs are its run's Prefect events (bus messages the listener
handed over, and the effects this flow journaled), so a retried flow run
rebuilds its state and skips what was already done.

With ``dry_run`` the flow replays a recorded run: the run's stored messages
are its inputs, it decides as configured now, and it sends nothing (each
message it would send is in its log) and journals nothing. Its summary and
decisions are artifacts of their own, beside the live run's.
"""


from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.connections import run_bus, run_events
from flows.idds_requests import ask_idds, gateway_for
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView
from flows.scaling import ScalingReport, publish_decisions, scale_workers
from flows.tasks import publish
from swf_panda_workers import outbound
from swf_panda_workers.adapters.prefect_events import (
    fold_history,
    history_start,
    message_event_name,
    run_resource_id,
)
from swf_panda_workers.adapters.prefect_runs import claim_run
from swf_panda_workers.config import Settings
from swf_panda_workers.idds_gateway import IddsGateway
from swf_panda_workers.messages import RunImminent, WorkflowIds
from swf_panda_workers.outbound import Sender
from swf_panda_workers.run_report import artifact_key
from swf_panda_workers.run_state import Effect, RunState, initial_state
from swf_panda_workers.timestamps import utc_now

SUB_FLOW_ONLY = tuple(
    message_event_name(t) for t in ("slice_result", "heartbeat", "transformer_heartbeat"))


class CreateNotAnswered(RuntimeError):
    """iDDS did not reply to create_workflow_task in time."""


class CloseNotConfirmed(RuntimeError):
    """iDDS did not reply to close_workflow_task in time."""


class RunOutcome(BaseModel):
    run_id: str
    namespace: str
    status: str  # iDDS's close answer: ToCancel or NotFound on the bus; its REST message
    ids: WorkflowIds
    slices_done: int
    slices_failed: int
    adjustments: int
    workers_confirmed: int | None  # the worker count iDDS last confirmed (adjusted_worker)
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
    # First of all, which process runs this attempt: a runner that finds that
    # process gone runs the flow run again (deployments/recovery.py).
    await claim_attempt()
    settings = settings_for(namespace)
    run = announced_run(announcement, run_id)
    since = history_start(received_at or utc_now())
    resource = run_resource_id(namespace, run_id)

    # One subscription for the whole run, so nothing falls between two. The
    # stream of slice results and heartbeats is the scaling sub-flow's.
    async with (
        run_bus(settings, f"run-{run_id}", dry_run) as bus,
        run_events(resource, since, dry_run, exclude=SUB_FLOW_ONLY) as feed,
    ):
        view = RunView(feed, initial_state(run, settings), namespace, dry_run)
        await view.catch_up()
        idds = gateway_for(settings, bus, dry_run)
        ids = await create_task(view, idds, run, settings)
        report = await scale_workers(
            run_id=run_id, namespace=namespace, announcement=announcement,
            received_at=received_at, ids=ids, dry_run=dry_run,
        )
        state = await stop_and_close(view, bus, idds, ids, settings)

    # Counted from the stored history after the stop and the close, which
    # must not wait for a read of a long run's every result.
    slices = await fold_history(initial_state(run, settings), resource, since)
    outcome = RunOutcome(
        run_id=run_id, namespace=namespace, status=state.closed_status or "", ids=ids,
        slices_done=slices.slices_done, slices_failed=slices.slices_failed,
        adjustments=len(report.adjustments),
        # From this flow's state: a reply to the sub-flow's last adjust may
        # arrive after the sub-flow has returned, but before the close.
        workers_confirmed=state.applied.target_worker_count if state.applied else None,
        end=report.end,
        dry_run=dry_run,
    )
    await publish_summary(outcome, report)
    await publish_decisions(run_id, namespace, report, dry_run)
    return outcome


async def claim_attempt() -> None:
    flow_run_id = flow_run.id
    if flow_run_id is None:
        raise RuntimeError("the run flow runs only as a flow run")
    async with get_client() as client:
        await claim_run(client, UUID(flow_run_id), flow_run.run_count)


async def create_task(view: RunView, idds: IddsGateway, run: RunImminent,
                      settings: Settings) -> WorkflowIds:
    logger = get_run_logger()
    if view.state.create_sent:
        logger.info("create_workflow_task already sent by an earlier attempt; waiting for ids")
    else:
        answer = await ask_idds(settings)(
            "create_workflow_task", partial(idds.create_workflow_task, run, utc_now()))
        await view.record(Effect(kind="create_sent"), answer)
        logger.info("create_workflow_task sent for run %s", run.run_id)

    timeout = settings.timeouts.created_workflow_task
    if not await view.until(lambda s: s.ids is not None, timeout):
        if view.dry_run:
            raise CreateNotAnswered(f"the recorded run {run.run_id} holds no answer of iDDS "
                                    "to create_workflow_task: nothing to replay")
        raise CreateNotAnswered(
            f"iDDS did not answer create_workflow_task for run {run.run_id} within {timeout:g}s; "
            "nothing was closed, since there are no ids to close"
        )
    ids = view.state.ids
    assert ids is not None
    logger.info("iDDS created the task: request %s, transform %s, workload %s",
                ids.request_id, ids.transform_id, ids.workload_id)
    if ids.workload_id is None:
        logger.warning("iDDS reports no workload_id: the PanDA submission failed or is pending")
    return ids


async def stop_and_close(view: RunView, bus: Sender, idds: IddsGateway, ids: WorkflowIds,
                         settings: Settings) -> RunState:
    logger = get_run_logger()
    run_id = view.state.run_id
    if not view.state.stop_sent:
        await publish(bus, outbound.stop_transformer(run_id, settings, utc_now()))
        await view.record(Effect(kind="stop_sent"))
        logger.info("stop_transformer broadcast for run %s", run_id)
    if not view.state.close_sent:
        answer = await ask_idds(settings)(
            "close_workflow_task", partial(idds.close_workflow_task, run_id, ids, utc_now()))
        await view.record(Effect(kind="close_sent"), answer)
        logger.info("close_workflow_task sent for request %s", ids.request_id)

    timeout = settings.timeouts.closed_workflow_task
    if not await view.until(lambda s: s.closed, timeout):
        if view.dry_run:
            # The replay's decisions are still worth showing.
            logger.warning("the recorded run %s holds no close confirmation of iDDS", run_id)
            return view.state
        raise CloseNotConfirmed(
            f"iDDS did not confirm close_workflow_task of request {ids.request_id} "
            f"(run {run_id}) within {timeout:g}s"
        )
    logger.info("iDDS closed the task of run %s: %s", run_id, view.state.closed_status)
    return view.state


async def publish_summary(outcome: RunOutcome, report: ScalingReport) -> None:
    """A per-run summary in the Prefect UI, under a stable key (a dry run's
    beside the live run's)."""
    rows = "\n".join(
        f"| {a.at:%H:%M:%S} | {a.size.target_worker_count} | {a.reason} |"
        for a in report.adjustments
    ) or "| - | - | no adjustment |"
    ids = outcome.ids
    title = f"Dry run of run {outcome.run_id}" if outcome.dry_run else f"Run {outcome.run_id}"
    note = "Replayed from the recorded run; nothing was sent.\n\n" if outcome.dry_run else ""
    await create_markdown_artifact(
        key=artifact_key("run", outcome.namespace, outcome.run_id, outcome.dry_run),
        description=f"{title}: iDDS status {outcome.status or 'not confirmed'}",
        markdown=(
            f"# {title} ({outcome.namespace})\n\n{note}"
            f"- iDDS request {ids.request_id}, transform {ids.transform_id}, "
            f"workload {ids.workload_id}\n"
            f"- close status: **{outcome.status or 'not confirmed'}**\n"
            f"- slices: {outcome.slices_done} done, {outcome.slices_failed} failed\n"
            f"- workers confirmed by iDDS: {outcome.workers_confirmed or 'initial size'}\n"
            f"- end: {outcome.end}\n\n"
            "| time (UTC) | workers requested | reason |\n|---|---|---|\n"
            f"{rows}\n"
        ),
    )
