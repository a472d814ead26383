"""The life of one run, as one Prefect flow run.

    create the iDDS workflow and task -> wait for its ids
    -> scaling sub-flow (slice results -> adjust_worker) until the run ends
    -> stop the transformers -> close the task -> iDDS's close status

The flow's inputs are its run's Prefect events (bus messages the listener
handed over, and the effects this flow journaled), so a retried flow run
rebuilds its state and skips what was already done.
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

from flows.idds_requests import ask_idds, gateway_for
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView, recount
from flows.scaling import ScalingReport, publish_decisions, scale_workers
from flows.tasks import publish
from swf_panda_workers import outbound
from swf_panda_workers.adapters.prefect_events import (
    follow_run,
    history_start,
    message_event_name,
    run_resource_id,
)
from swf_panda_workers.adapters.prefect_runs import claim_run
from swf_panda_workers.adapters.stomp_bus import BusClient, connected_bus
from swf_panda_workers.config import Settings
from swf_panda_workers.idds_gateway import IddsGateway
from swf_panda_workers.messages import RunImminent, WorkflowIds
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


@flow(
    name="swf-run",
    flow_run_name="run-{run_id}",
    retries=1,
    retry_delay_seconds=10,
    description="One data-taking run: iDDS task, worker scaling, stop and close.",
)
async def run_lifecycle(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    received_at: datetime | None = None,
) -> RunOutcome:
    """``announcement`` is the run_imminent message as received (either shape);
    ``received_at`` when the listener got it (events are read from then on)."""
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
        connected_bus(settings.brokers, name=f"run-{run_id}") as bus,
        follow_run(resource, since, exclude=SUB_FLOW_ONLY) as feed,
    ):
        view = RunView(feed, initial_state(run, settings), namespace)
        await view.catch_up()
        idds = gateway_for(settings, bus)
        ids = await create_task(view, idds, run, settings)
        report = await scale_workers(
            run_id=run_id, namespace=namespace, announcement=announcement,
            received_at=received_at, ids=ids,
        )
        state = await stop_and_close(view, bus, idds, ids, settings)

    # Counted from the stored history after the stop and the close, which
    # must not wait for a read of a long run's every result.
    slices = await recount(initial_state(run, settings), resource, since)
    outcome = RunOutcome(
        run_id=run_id, namespace=namespace, status=state.closed_status or "", ids=ids,
        slices_done=slices.slices_done, slices_failed=slices.slices_failed,
        adjustments=len(report.adjustments),
        # From this flow's state: a reply to the sub-flow's last adjust may
        # arrive after the sub-flow has returned, but before the close.
        workers_confirmed=state.applied.target_worker_count if state.applied else None,
        end=report.end,
    )
    await publish_summary(outcome, report)
    await publish_decisions(run_id, namespace, report)
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


async def stop_and_close(view: RunView, bus: BusClient, idds: IddsGateway, ids: WorkflowIds,
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
        raise CloseNotConfirmed(
            f"iDDS did not confirm close_workflow_task of request {ids.request_id} "
            f"(run {run_id}) within {timeout:g}s"
        )
    logger.info("iDDS closed the task of run %s: %s", run_id, view.state.closed_status)
    return view.state


async def publish_summary(outcome: RunOutcome, report: ScalingReport) -> None:
    """A per-run summary in the Prefect UI, under a stable key."""
    rows = "\n".join(
        f"| {a.at:%H:%M:%S} | {a.size.target_worker_count} | {a.reason} |"
        for a in report.adjustments
    ) or "| - | - | no adjustment |"
    ids = outcome.ids
    await create_markdown_artifact(
        key=f"run-{outcome.namespace}-{outcome.run_id}".lower().replace("_", "-"),
        description=f"Run {outcome.run_id}: iDDS status {outcome.status}",
        markdown=(
            f"# Run {outcome.run_id} ({outcome.namespace})\n\n"
            f"- iDDS request {ids.request_id}, transform {ids.transform_id}, "
            f"workload {ids.workload_id}\n"
            f"- close status: **{outcome.status}**\n"
            f"- slices: {outcome.slices_done} done, {outcome.slices_failed} failed\n"
            f"- workers confirmed by iDDS: {outcome.workers_confirmed or 'initial size'}\n"
            f"- end: {outcome.end}\n\n"
            "| time (UTC) | workers requested | reason |\n|---|---|---|\n"
            f"{rows}\n"
        ),
    )
