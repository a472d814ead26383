"""A scaling policy at work on one run: it keeps the run's slice window and the
policy's memory, says when the policy is due a look, and draws the run's
timeline. The live scaling sub-flow and the offline replay drive the same
object, so a replay decides exactly as the service would. Pure: every time
comes from the caller."""

from __future__ import annotations

from datetime import datetime

from swf_panda_workers.config import Settings
from swf_panda_workers.core.messages import RunImminent
from swf_panda_workers.core.policies import (
    Bounds,
    Observation,
    ProportionalPolicy,
    ReferencePolicy,
    ScalingDecision,
    ScalingMemory,
    ScalingPolicy,
    SliceObservation,
    WorkerPlan,
)
from swf_panda_workers.core.slice_window import Demand, SliceSample, SliceWindow
from swf_panda_workers.core.timeline import Timeline, TimelinePoint

DEMAND_REUSE = 1.0  # s a per-result policy reuses the window's reading


def policy_for(settings: Settings, run: RunImminent | None = None) -> ScalingPolicy:
    """The configured policy, with what the run's announcement says it needs."""
    spec = run.content if run is not None else None
    scaling = settings.scaling
    if scaling.policy == "reference":
        expected = (spec.slice_processing_time if spec else None) or settings.slice.processing_time
        return ReferencePolicy(expected_seconds=expected,
                               cooldown_seconds=settings.slice.cooldown)
    rampup = spec.worker_rampup_time if spec and spec.worker_rampup_time is not None else None
    return ProportionalPolicy(
        bounds=Bounds(min_workers=scaling.min_workers, max_workers=scaling.max_workers,
                      max_total_cores=scaling.max_total_cores,
                      max_total_memory_mb=scaling.max_total_memory_mb),
        target_utilisation=scaling.target_utilisation,
        drain_seconds=scaling.drain_deadline,
        tolerance=scaling.tolerance,
        up_window=scaling.up_window,
        down_window=scaling.down_window,
        max_step_up=scaling.max_step_up,
        max_step_down=scaling.max_step_down,
        cooldown_seconds=settings.slice.cooldown,
        rampup_seconds=scaling.rampup if rampup is None else rampup,
        min_results=scaling.min_results,
        tick_seconds=scaling.tick,
        percentile=scaling.percentile,
    )


def window_for(settings: Settings) -> SliceWindow:
    scaling = settings.scaling
    return SliceWindow(scaling.window, scaling.percentile, scaling.backlog_from_waits)


class Autoscaler:
    def __init__(self, policy: ScalingPolicy, window: SliceWindow) -> None:
        self.policy = policy
        self.window = window
        self.memory = ScalingMemory()
        self.timeline = Timeline()
        self._last_look: datetime | None = None
        self._demand: Demand | None = None  # the window's last reading

    def observe(self, sample: SliceSample) -> None:
        self.window.add(sample)

    def due(self, at: datetime, after_result: bool) -> bool:
        """Whether to look now: a policy without a tick looks at every result;
        one with a tick at most once per tick, results or not."""
        tick = self.policy.tick_seconds
        if tick <= 0:
            return after_result
        return self._last_look is None or (at - self._last_look).total_seconds() >= tick

    def seconds_to_next_look(self, at: datetime) -> float | None:
        tick = self.policy.tick_seconds
        if tick <= 0 or self._last_look is None:
            return None
        return max(0.0, tick - (at - self._last_look).total_seconds())

    def look(self, plan: WorkerPlan, at: datetime,
             last_slice: SliceObservation | None = None) -> ScalingDecision | None:
        demand, fresh = self._read_window(at)
        verdict = self.policy.decide(plan, Observation(at, last_slice, demand), self.memory)
        self.memory = verdict.memory
        self._last_look = at
        if fresh:
            self.timeline.add(TimelinePoint(
                at=at, requested=plan.workers, workers_seen=demand.workers_seen,
                processing_seconds=demand.processing_seconds, backlog=demand.backlog,
                rate=demand.rate))
        return verdict.decision

    def _read_window(self, at: datetime) -> tuple[Demand, bool]:
        """The window's demand, and whether it was read just now. A policy
        that looks at every result (no tick) reuses a reading for up to
        DEMAND_REUSE seconds: reading costs a pass over the whole window,
        which at tens of results a second was the runner's hottest spot."""
        last = self._demand
        if (last is None or self.policy.tick_seconds > 0
                or (at - last.at).total_seconds() >= DEMAND_REUSE):
            self._demand = self.window.demand(at)
            return self._demand, True
        return last, False
