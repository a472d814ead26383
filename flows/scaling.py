"""The scaling sub-flow: slice results in, adjust_worker out, until the run ends.

Slice results that arrived before iDDS's ids are held and decided once the
ids are known (the parent starts this sub-flow with the ids, and the run's
stored history replays the early results first). On a retried flow run the
history also holds the adjustments already sent; a decision that asks again
for a size already requested is not sent twice.
"""


from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.idds_requests import ask_idds, gateway_for
from flows.run_inputs import announced_run, settings_for
from flows.run_view import RunView, history_start
from swf_panda_workers.adapters.prefect_events import follow_run, run_resource_id
from swf_panda_workers.adapters.stomp_bus import BusClient
from swf_panda_workers.config import Settings
from swf_panda_workers.idds_gateway import IddsGateway
from swf_panda_workers.messages import SliceResult, WorkerSize, WorkflowIds
from swf_panda_workers.run_state import Adjustment, Effect, initial_state
from swf_panda_workers.scaling import ReferencePolicy, ScalingPolicy
from swf_panda_workers.timestamps import utc_now

# How often the loop wakes when nothing arrives, to check the run's deadline.
IDLE_CHECK_SECONDS = 5.0


class ScalingReport(BaseModel):
    slices_done: int
    slices_failed: int
    adjustments: list[Adjustment]
    end: str  # why the sub-flow returned


@flow(name="swf-scaling", flow_run_name="scaling-{run_id}")
async def scale_workers(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    received_at: datetime | None,
    ids: WorkflowIds,
) -> ScalingReport:
    settings = settings_for(namespace)
    run = announced_run(announcement, run_id)
    policy = ReferencePolicy(
        expected_seconds=run.content.slice_processing_time or settings.slice.processing_time,
        cooldown_seconds=settings.slice.cooldown,
    )
    started = received_at or utc_now()
    deadline = started + timedelta(seconds=settings.timeouts.run_end)

    with BusClient(settings.brokers, name=f"scaling-{run_id}") as bus:
        async with follow_run(run_resource_id(namespace, run_id), history_start(started)) as feed:
            view = RunView(feed, replace(initial_state(run, settings), ids=ids), namespace)
            scaler = Scaler(view, policy, gateway_for(settings, bus), settings)
            end = await scaler.follow_until_end(deadline)
            await view.settle()  # results sent before the end, not yet seen

    final = view.state
    return ScalingReport(
        slices_done=final.slices_done,
        slices_failed=final.slices_failed,
        adjustments=list(final.adjustments),
        end=end,
    )


@dataclass
class Scaler:
    view: RunView
    policy: ScalingPolicy
    idds: IddsGateway
    settings: Settings

    async def follow_until_end(self, deadline: datetime) -> str:
        logger = get_run_logger()
        while not self.view.state.ended:
            if utc_now() >= deadline:
                logger.warning("no end of run %s by %s: ending it here",
                               self.view.state.run_id, deadline)
                return f"no end_run within {self.settings.timeouts.run_end:g}s"
            item = await self.view.next_input(timeout=IDLE_CHECK_SECONDS)
            if isinstance(item, SliceResult):
                await self.consider_last_slice()
        return "end_run received"

    async def consider_last_slice(self) -> None:
        state = self.view.state
        seen = state.last_slice
        if seen is None or state.ids is None:
            return
        decision = self.policy.decide(state.plan, seen)
        if decision is None:
            return
        if self.already_requested(decision.size):
            return  # replaying history: this request went out in an earlier attempt
        answer = await ask_idds(self.settings)("adjust_worker", partial(
            self.idds.adjust_worker, state.run_id, state.ids, decision.size, utc_now()))
        await self.view.record(
            Effect(kind="adjust_sent", size=decision.size, reason=decision.reason), answer)
        get_run_logger().info("adjust_worker for run %s: %s workers (%s)", state.run_id,
                              decision.size.target_worker_count, decision.reason)

    def already_requested(self, size: WorkerSize) -> bool:
        return size in self.view.journaled_sizes
