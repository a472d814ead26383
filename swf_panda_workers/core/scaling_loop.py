"""The scaling loop of one run: what it observes, when its policy looks, what
it asks for, and when a drained run is over. Pure, fed inputs and a clock:
the live scaling sub-flow (flows/scaling_subflow.py), the dry run (the same
sub-flow on a recorded history) and the offline replay (core/replay.py) all
drive this one object, so they decide alike, and unit tests drive it with a
fake clock.

Its inputs: each slice result the run receives (``observe``), each
adjustment an earlier attempt of the sub-flow journaled, as the history
replays it (``journaled``), and the time. Its outputs: an ``Adjustment`` to
send (``after_result``, ``on_idle``), how long to wait for the next input
(``wait``), and, once the run has ended, whether its queue has drained
(``drain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.adjustment_journal import AdjustmentJournal
from swf_panda_workers.core.effects import Adjustment, AdjustSent
from swf_panda_workers.core.messages import RunImminent
from swf_panda_workers.core.policies import (
    Bounds,
    Observation,
    ProportionalPolicy,
    ReferencePolicy,
    ScalingMemory,
    ScalingPolicy,
    WorkerPlan,
)
from swf_panda_workers.core.slice_window import Demand, SliceObservation, SliceWindow
from swf_panda_workers.core.timeline import Timeline, TimelinePoint

DEMAND_REUSE = 1.0  # s a per-result policy reuses the window's reading
# How long the loop waits at most for an input, so that it sees its
# deadlines (the run's end, a tick) even when nothing arrives.
IDLE_CHECK_SECONDS = 5.0


def policy_for(settings: Settings, run: RunImminent | None = None) -> ScalingPolicy:
    """The configured policy, with what the run's announcement says it needs."""
    spec = run.content if run is not None else None
    scaling = settings.scaling
    if scaling.policy == "reference":
        expected = (spec.slice_processing_time if spec else None) or settings.slice.processing_time
        return ReferencePolicy(expected_seconds=expected, cooldown_seconds=settings.slice.cooldown)
    rampup = spec.worker_rampup_time if spec and spec.worker_rampup_time is not None else None
    return ProportionalPolicy(
        bounds=Bounds(
            min_workers=scaling.min_workers,
            max_workers=scaling.max_workers,
            max_total_cores=scaling.max_total_cores,
            max_total_memory_mb=scaling.max_total_memory_mb,
        ),
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


@dataclass(frozen=True)
class DrainRule:
    """When a run that has ended is drained (``scaling.end: drain``): no slice
    result for ``quiet`` seconds, or twice the slices' processing time if
    longer (every transformer is idle by then); given up ``timeout`` seconds
    after the end."""

    quiet: float
    timeout: float

    @classmethod
    def of(cls, settings: Settings) -> DrainRule:
        return cls(quiet=settings.scaling.drain_quiet, timeout=settings.scaling.drain_timeout)


@dataclass(frozen=True)
class Drained:
    """The drain is over, and why."""

    why: str


class ScalingLoop:
    def __init__(
        self,
        policy: ScalingPolicy,
        window: SliceWindow,
        journal: AdjustmentJournal | None = None,
        drain: DrainRule | None = None,
    ) -> None:
        self.policy = policy
        self.window = window
        # The adjustments an earlier attempt journaled, not replayed yet.
        self.journal = journal or AdjustmentJournal()
        # Without one, the configuration's defaults (a replay never drains this way).
        self.drain_rule = drain or DrainRule.of(Settings())
        self.memory = ScalingMemory()
        self.timeline = Timeline()
        self.last_result_at: datetime | None = None
        self._last_look: datetime | None = None
        self._demand: Demand | None = None  # the window's last reading

    @classmethod
    def for_run(
        cls,
        settings: Settings,
        run: RunImminent | None = None,
        journal: AdjustmentJournal | None = None,
    ) -> ScalingLoop:
        """The loop the configuration asks for, sized by the run's announcement."""
        return cls(policy_for(settings, run), window_for(settings), journal, DrainRule.of(settings))

    # -- inputs

    def observe(self, seen: SliceObservation) -> None:
        """A slice result of the run."""
        self.window.add(seen)
        self.last_result_at = seen.at

    def journaled(self, sent: AdjustSent) -> None:
        """An adjustment an earlier attempt sent, met again in the history:
        from here on a decision for its size is no longer its replay."""
        self.journal = self.journal.read(sent)

    # -- decisions

    def after_result(self, plan: WorkerPlan, seen: SliceObservation) -> Adjustment | None:
        """Observe a slice result, and look if the policy is due a look."""
        self.observe(seen)
        return self._look(plan, seen.at, seen) if self._due(seen.at, after_result=True) else None

    def on_idle(self, plan: WorkerPlan, now: datetime) -> Adjustment | None:
        """No input came within ``wait``: look if the policy is due on its tick."""
        return self._look(plan, now, None) if self._due(now, after_result=False) else None

    def wait(self, now: datetime) -> float:
        """Seconds to wait for the next input before ``on_idle``."""
        tick = self.policy.tick_seconds
        if tick <= 0 or self._last_look is None:
            return IDLE_CHECK_SECONDS
        return min(IDLE_CHECK_SECONDS, self.seconds_to_next_look(now))

    def seconds_to_next_look(self, now: datetime) -> float:
        """Seconds until the policy is due on its tick (0: due now)."""
        if self._last_look is None:
            return 0.0
        return max(0.0, self.policy.tick_seconds - (now - self._last_look).total_seconds())

    def drain(self, ended_at: datetime, now: datetime) -> Drained | float:
        """After the run's end: over (and why), or seconds to wait for the
        next input before asking again."""
        rule = self.drain_rule
        took = self.window.demand(now).processing_seconds or 0.0
        quiet = max(rule.quiet, 2 * took)
        last = max(ended_at, self.last_result_at or ended_at)
        silent = (now - last).total_seconds()
        if silent >= quiet:
            return Drained(f"drained: no slice result for {quiet:g}s")
        if now >= ended_at + timedelta(seconds=rule.timeout):
            return Drained(f"drain given up after {rule.timeout:g}s")
        return min(IDLE_CHECK_SECONDS, quiet - silent)

    def _due(self, at: datetime, after_result: bool) -> bool:
        """A policy without a tick looks at every result; one with a tick at
        most once per tick, results or not."""
        tick = self.policy.tick_seconds
        if tick <= 0:
            return after_result
        return self._last_look is None or (at - self._last_look).total_seconds() >= tick

    def _look(
        self, plan: WorkerPlan, at: datetime, last_slice: SliceObservation | None
    ) -> Adjustment | None:
        demand, fresh = self._read_window(at)
        verdict = self.policy.decide(plan, Observation(at, last_slice, demand), self.memory)
        self.memory = verdict.memory
        self._last_look = at
        if fresh:
            self.timeline.add(
                TimelinePoint(
                    at=at,
                    requested=plan.workers,
                    workers_seen=demand.workers_seen,
                    processing_seconds=demand.processing_seconds,
                    backlog=demand.backlog,
                    rate=demand.rate,
                )
            )
        decision = verdict.decision
        if decision is not None and self.journal.replays(decision.size):
            # An earlier attempt sent it: its journal entry, a little further
            # on in the history, applies it to the run.
            return None
        return decision

    def _read_window(self, at: datetime) -> tuple[Demand, bool]:
        """The window's demand, and whether it was read just now. A policy
        that looks at every result (no tick) reuses a reading for up to
        DEMAND_REUSE seconds: reading costs a pass over the whole window,
        which at tens of results a second was the runner's hottest spot."""
        last = self._demand
        if (
            last is None
            or self.policy.tick_seconds > 0
            or (at - last.at).total_seconds() >= DEMAND_REUSE
        ):
            self._demand = self.window.demand(at)
            return self._demand, True
        return last, False
