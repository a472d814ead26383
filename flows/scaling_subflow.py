"""The scaling sub-flow: slice results in, adjust_worker out, until the run ends
(and, with ``scaling.end: drain``, until its queue has drained).

Tasks iDDS made for the run besides its first (its transceiver may handle one
request on several threads) are closed here as soon as they are known.

Slice results that arrived before iDDS's ids are held and decided once the
ids are known (the parent starts this sub-flow with the ids, and the run's
stored history replays the early results first). On a retried flow run the
history also holds the adjustments already sent; the scaling loop does not
send a decision replaying one of them twice (core/adjustment_journal.py), and
any size may be asked for again later. Every decision is the loop's
(core/scaling_loop.py); this module does its I/O. Every adjustment is
journaled with the figures it was decided on; at the end they are shown in
the Prefect UI as a table and a plot of the run's workers and processing
time.
"""

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from pydantic import BaseModel

from flows.connections import run_bus, run_events
from flows.idds_requests import ask_idds, close_extra_tasks, gateway_for
from flows.progress_watch import progress_of
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView
from swf_panda_workers.adapters.plots import markdown_image, timeline_png
from swf_panda_workers.adapters.prefect_events.history import history_start
from swf_panda_workers.adapters.prefect_events.schema import run_resource_id
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.effects import Adjustment, AdjustSent, CreateSent
from swf_panda_workers.core.idds_gateway import IddsGateway
from swf_panda_workers.core.messages import CreatedWorkflowTask, SliceResult, WorkflowIds
from swf_panda_workers.core.run_report import artifact_key
from swf_panda_workers.core.run_state import apply, initial_state
from swf_panda_workers.core.scaling_loop import Drained, ScalingLoop
from swf_panda_workers.core.timeline import TimelinePoint, Trace
from swf_panda_workers.core.timestamps import utc_now


class SliceCount(BaseModel):
    done: int
    failed: int


class ScalingReport(BaseModel):
    adjustments: list[AdjustSent]
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
    started = received_at or utc_now()
    deadline = started + timedelta(seconds=settings.timeouts.run_end)
    state = replace(initial_state(run, settings), ids=ids)
    if dry_run:
        # The recorded create is left out with the rest of the recorded
        # flow's journal; the ramp-up after it still counts from about then.
        state = apply(CreateSent(), state, started)

    async with (
        run_bus(settings, f"scaling-{run_id}", dry_run) as bus,
        run_events(run_resource_id(namespace, run_id), history_start(started), dry_run) as feed,
    ):
        view = RunView(feed, state, namespace, dry_run)
        # The parent's record: a stall of this sub-flow is the run's.
        view.progress = progress_of(namespace, run_id)
        view.waits_for("slice results and end_run", expected=False)
        loop = ScalingLoop.for_run(settings, run, view.journaled_adjustments())
        scaler = Scaler(
            view,
            loop,
            gateway_for(settings, bus, dry_run),
            settings,
            outbound.workflow_name(run, settings, started),
        )
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
        timeline=loop.timeline.points,
        slices=SliceCount(done=view.state.slices_done, failed=view.state.slices_failed),
    )


@dataclass
class Scaler:
    """The scaling loop's I/O: inputs from the run's feed in, its adjustments
    out to iDDS and into the journal. Every decision is the loop's."""

    view: RunView
    loop: ScalingLoop
    idds: IddsGateway
    settings: Settings
    workflow_name: str

    async def follow_until_end(self, deadline: datetime) -> str:
        logger = get_run_logger()
        while not self.view.state.ended:
            if self.view.exhausted:
                return "the recorded run ends here, without end_run"
            if not self.view.dry_run and utc_now() >= deadline:
                logger.warning(
                    "no end of run %s by %s: ending it here", self.view.state.run_id, deadline
                )
                return f"no end_run within {self.settings.timeouts.run_end:g}s"
            await self.step()
        return "end_run received"

    async def step(self) -> None:
        """Take the next input (or wait for one up to the next look) and send
        what the loop decides on it."""
        item = await self.view.next_input(timeout=self.loop.wait(utc_now()))
        state = self.view.state
        adjustment = None
        match item:
            case SliceResult():
                assert state.last_slice is not None, "a slice result was just applied"
                adjustment = self.loop.after_result(state.plan, state.last_slice)
            case AdjustSent():
                self.loop.journaled(item)
            case CreatedWorkflowTask() if state.open_extra_tasks:
                await close_extra_tasks(self.view, self.idds, self.settings, self.workflow_name)
            case None if not self.view.replaying:
                adjustment = self.loop.on_idle(state.plan, utc_now())
        if adjustment is not None:
            await self.send(adjustment)

    async def drain(self) -> str:
        """Keep the transformers until the run's queue is empty (the loop's
        DrainRule says when)."""
        ended_at = self.view.state.ended_at or utc_now()
        while True:
            if self.view.exhausted:
                return "drained: the recorded run ends here"
            verdict = self.loop.drain(ended_at, utc_now())
            if isinstance(verdict, Drained):
                return verdict.why
            if isinstance(await self.view.next_input(timeout=verdict), SliceResult):
                assert self.view.state.last_slice is not None
                self.loop.observe(self.view.state.last_slice)

    async def send(self, adjustment: Adjustment) -> None:
        state = self.view.state
        assert state.ids is not None, "the sub-flow starts with the run's ids"
        answer = await ask_idds(self.settings)(
            "adjust_worker",
            partial(self.idds.adjust_worker, state.run_id, state.ids, adjustment.size, utc_now()),
        )
        await self.view.record(AdjustSent.of(adjustment, sent_at=self.view.clock()), answer)
        get_run_logger().info(
            "adjust_worker for run %s: %s workers (%s)",
            state.run_id,
            adjustment.size.target_worker_count,
            adjustment.reason,
        )


async def publish_decisions(
    run_id: str, namespace: str, report: ScalingReport, dry_run: bool = False
) -> None:
    """The run's scaling decisions, as a table and a plot, under stable keys."""
    key = artifact_key("scaling", namespace, run_id, dry_run)
    await acreate_table_artifact(
        key=key,
        table=decision_rows(report.adjustments),
        description=f"Run {run_id}: every adjust_worker, with what it was decided on",
    )
    # Drawn in a thread: the event loop may be shared with other runs.
    png = await asyncio.to_thread(
        timeline_png,
        f"Run {run_id}: workers and processing time",
        [
            Trace(
                label="this run",
                points=report.timeline,
                adjustments=[a.sent_at for a in report.adjustments],
            )
        ],
    )
    await acreate_markdown_artifact(
        key=f"{key}-plot",
        markdown=markdown_image(png, f"run {run_id} workers over time"),
        description=f"Run {run_id}: workers requested and seen, processing time, backlog",
    )


def decision_rows(adjustments: Iterable[AdjustSent]) -> list[dict[str, Any]]:
    rows = []
    for adjustment in adjustments:
        demand = adjustment.inputs
        rows.append(
            {
                "time (UTC)": f"{adjustment.sent_at:%H:%M:%S}",
                "workers": adjustment.size.target_worker_count,
                "slices/s": None if demand is None else round(demand.rate, 3),
                "processing (s)": None
                if demand is None or demand.processing_seconds is None
                else round(demand.processing_seconds, 2),
                "backlog": None if demand is None else round(demand.backlog, 1),
                "workers seen": None if demand is None else demand.workers_seen,
                "reason": adjustment.reason,
            }
        )
    return rows
