"""The scaling sub-flow: slice results in, adjust_worker out, until the run ends
(and, with ``scaling.end: drain``, until its queue has drained).

Tasks iDDS made for the run besides its first (its transceiver may handle one
request on several threads) are closed here as soon as they are known.

Slice results that arrived before iDDS's ids are held and decided once the
ids are known (the parent starts this sub-flow with the ids, and the run's
stored history replays the early results first). On a retried flow run the
history also holds the adjustments already sent; a decision replaying one of
them is not sent twice (swf_panda_workers/core/adjustment_journal.py), and any size
may be asked for again later. Every adjustment is journaled with the figures
it was decided on; at the end they are shown in the Prefect UI as a table and
a plot of the run's workers and processing time.
"""

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows.connections import run_bus, run_events
from flows.idds_requests import ask_idds, close_extra_tasks, gateway_for
from flows.progress_watch import progress_of
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView
from swf_panda_workers.adapters.plots import markdown_image, timeline_png
from swf_panda_workers.adapters.prefect_events import history_start, run_resource_id
from swf_panda_workers.config import Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.idds_gateway import IddsGateway
from swf_panda_workers.core.messages import CreatedWorkflowTask, SliceResult, WorkflowIds
from swf_panda_workers.core.policies import SliceObservation
from swf_panda_workers.core.run_report import artifact_key
from swf_panda_workers.core.run_state import Adjustment, Effect, apply, initial_state
from swf_panda_workers.core.scaling_loop import Autoscaler, policy_for, window_for
from swf_panda_workers.core.slice_window import SliceSample
from swf_panda_workers.core.timeline import TimelinePoint, Trace
from swf_panda_workers.core.timestamps import utc_now

# How often the loop wakes when nothing arrives, to check the run's deadline.
IDLE_CHECK_SECONDS = 5.0


class SliceCount(BaseModel):
    done: int
    failed: int


class ScalingReport(BaseModel):
    adjustments: list[Adjustment]
    end: str  # why the sub-flow returned
    timeline: list[TimelinePoint]  # the run at each look of its policy, for the plot
    # The run's slice results, each once, up to the sub-flow's return; None:
    # no sub-flow ran, the parent counts them from the run's stored history.
    slices: SliceCount | None = None

    @classmethod
    def without_scaling(cls, why: str) -> "ScalingReport":
        """A run that ended without a scaling sub-flow."""
        return cls(adjustments=[], end=why, timeline=[])


@flow(name="swf-scaling", flow_run_name="scaling-{run_id}")
async def scale_workers(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    received_at: datetime | None,
    ids: WorkflowIds,
    dry_run: bool = False,
) -> ScalingReport:
    settings = settings_for(namespace)
    run = announced_run(announcement, run_id)
    autoscaler = Autoscaler(policy_for(settings, run), window_for(settings))
    started = received_at or utc_now()
    deadline = started + timedelta(seconds=settings.timeouts.run_end)
    state = replace(initial_state(run, settings), ids=ids)
    if dry_run:
        # The recorded create is left out with the rest of the recorded
        # flow's journal; the ramp-up after it still counts from about then.
        state = apply(Effect(kind="create_sent"), state, started)

    async with (
        run_bus(settings, f"scaling-{run_id}", dry_run) as bus,
        run_events(run_resource_id(namespace, run_id), history_start(started), dry_run) as feed,
    ):
        view = RunView(feed, state, namespace, dry_run)
        # The parent's record: a stall of this sub-flow is the run's.
        view.progress = progress_of(namespace, run_id)
        view.waits_for("slice results and end_run", expected=False)
        scaler = Scaler(view, autoscaler, gateway_for(settings, bus, dry_run), settings,
                        outbound.workflow_name(run, settings, started))
        end = await scaler.follow_until_end(deadline)
        if settings.scaling.end == "drain" and view.state.ended:
            end = f"{end}; {await scaler.drain()}"
        # A sub-flow started late (after its run's end, even) may be given
        # the end before results stored just as its feed opened: counted too.
        await view.settle()

    # The sub-flow took every result of the run, in the order the listener
    # sent them, up to its end: its count is the run's. Read again from the
    # stored history, every result of a run of a busy namespace would be read
    # with the whole namespace's (they share stream batches).
    return ScalingReport(
        adjustments=list(view.state.adjustments),
        end=end,
        timeline=autoscaler.timeline.points,
        slices=SliceCount(done=view.state.slices_done, failed=view.state.slices_failed),
    )


@dataclass
class Scaler:
    view: RunView
    autoscaler: Autoscaler
    idds: IddsGateway
    settings: Settings
    workflow_name: str

    async def follow_until_end(self, deadline: datetime) -> str:
        logger = get_run_logger()
        while not self.view.state.ended:
            if self.view.exhausted:
                return "the recorded run ends here, without end_run"
            if not self.view.dry_run and utc_now() >= deadline:
                logger.warning("no end of run %s by %s: ending it here",
                               self.view.state.run_id, deadline)
                return f"no end_run within {self.settings.timeouts.run_end:g}s"
            await self.step()
        return "end_run received"

    async def drain(self) -> str:
        """Keep the transformers until the run's queue is empty: no result for
        ``drain_quiet`` seconds (or twice the slices' processing time, if
        longer: every transformer is idle), or ``drain_timeout`` passed."""
        scaling = self.settings.scaling
        ended_at = self.view.state.ended_at or utc_now()
        give_up = ended_at + timedelta(seconds=scaling.drain_timeout)
        while True:
            if self.view.exhausted:
                return "drained: the recorded run ends here"
            now = utc_now()
            quiet = max(scaling.drain_quiet, 2 * (self.slice_seconds() or 0.0))
            last = max(ended_at, self.last_result_at() or ended_at)
            if (now - last).total_seconds() >= quiet:
                return f"drained: no slice result for {quiet:g}s"
            if now >= give_up:
                return f"drain given up after {scaling.drain_timeout:g}s"
            item = await self.view.next_input(timeout=min(
                IDLE_CHECK_SECONDS, quiet - (now - last).total_seconds()))
            if isinstance(item, SliceResult):
                self.observe(item)

    async def step(self) -> None:
        """Take the next input (or wait for one up to the next look), and look
        when the policy is due."""
        now = utc_now()
        wait = self.autoscaler.seconds_to_next_look(now)
        item = await self.view.next_input(
            timeout=IDLE_CHECK_SECONDS if wait is None else min(wait, IDLE_CHECK_SECONDS))
        if isinstance(item, CreatedWorkflowTask) and self.view.state.open_extra_tasks:
            await close_extra_tasks(self.view, self.idds, self.settings, self.workflow_name)
        if isinstance(item, SliceResult):
            seen = self.observe(item)
            if self.autoscaler.due(seen.at, after_result=True):
                await self.look(seen.at, seen)
        elif item is None and not self.view.replaying and self.autoscaler.due(
                now := utc_now(), after_result=False):
            await self.look(now, None)

    def observe(self, result: SliceResult) -> SliceObservation:
        seen = self.view.state.last_slice
        assert seen is not None, "a slice result was just applied"
        self.autoscaler.observe(SliceSample.of(result, seen.at))
        return seen

    async def look(self, at: datetime, seen: SliceObservation | None) -> None:
        state = self.view.state
        if state.ids is None:
            return
        decision = self.autoscaler.look(state.plan, at, seen)
        if decision is None:
            return
        if self.view.journal.replays(decision.size):
            return  # replaying history: an earlier attempt sent it, the journal applies it
        answer = await ask_idds(self.settings)("adjust_worker", partial(
            self.idds.adjust_worker, state.run_id, state.ids, decision.size, utc_now()))
        await self.view.record(Effect(kind="adjust_sent", size=decision.size,
                                      reason=decision.reason, inputs=decision.inputs,
                                      decided_at=at), answer)
        get_run_logger().info("adjust_worker for run %s: %s workers (%s)", state.run_id,
                              decision.size.target_worker_count, decision.reason)

    def slice_seconds(self) -> float | None:
        return self.autoscaler.window.demand(utc_now()).processing_seconds

    def last_result_at(self) -> datetime | None:
        seen = self.view.state.last_slice
        return seen.at if seen is not None else None


async def publish_decisions(run_id: str, namespace: str, report: ScalingReport,
                            dry_run: bool = False) -> None:
    """The run's scaling decisions, as a table and a plot, under stable keys."""
    key = artifact_key("scaling", namespace, run_id, dry_run)
    await create_table_artifact(
        key=key, table=decision_rows(report.adjustments),
        description=f"Run {run_id}: every adjust_worker, with what it was decided on")
    # Drawn in a thread: the event loop may be shared with other runs.
    png = await asyncio.to_thread(
        timeline_png, f"Run {run_id}: workers and processing time", [Trace(
            label="this run", points=report.timeline,
            adjustments=[a.at for a in report.adjustments])])
    await create_markdown_artifact(
        key=f"{key}-plot", markdown=markdown_image(png, f"run {run_id} workers over time"),
        description=f"Run {run_id}: workers requested and seen, processing time, backlog")


def decision_rows(adjustments: Iterable[Adjustment]) -> list[dict[str, Any]]:
    rows = []
    for adjustment in adjustments:
        demand = adjustment.inputs
        rows.append({
            "time (UTC)": f"{adjustment.at:%H:%M:%S}",
            "workers": adjustment.size.target_worker_count,
            "slices/s": None if demand is None else round(demand.rate, 3),
            "processing (s)": None if demand is None or demand.processing_seconds is None
            else round(demand.processing_seconds, 2),
            "backlog": None if demand is None else round(demand.backlog, 1),
            "workers seen": None if demand is None else demand.workers_seen,
            "reason": adjustment.reason,
        })
    return rows
