"""Scaling decisions: pure functions of a run's worker plan, what it observes,
and what the policy remembers. Two policies, chosen by ``scaling.policy``.

``reference`` is the seed agent's rule: a slice slower than 1.2x the expected
time asks for 1.2x the run's initial size, slower than 1.5x for 1.5x. It
scales from the initial size (so it never compounds) and only up. Two guards
are added so a burst of slow slices yields one request, not one per slice: no
request that does not change the size, and a cooldown between requests.

``proportional`` sizes the run from its demand (slice_window.Demand), by
Little's law: workers busy = arrival rate x processing time, so

    needed = rate x p90 / target utilisation + backlog x p90 / drain deadline

then holds that within bounds and damps it: a tolerance band, stabilisation
windows (scale up to the lowest need of the last ``up_window`` seconds, down
to the highest of the last ``down_window``), a limit on each step, a cooldown
between requests, and no new request while workers already asked for have
not shown up yet (they are capacity on the way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from swf_panda_workers.core.effects import Adjustment
from swf_panda_workers.core.messages import WorkerSize
from swf_panda_workers.core.slice_window import Demand, SliceObservation


@dataclass(frozen=True)
class Observation:
    """One look at the run: after a slice result (``slice``), or on a tick."""

    at: datetime
    slice: SliceObservation | None = None
    demand: Demand | None = None


@dataclass(frozen=True)
class WorkerPlan:
    """A run's worker size: where it started and what was last requested."""

    initial: WorkerSize
    current: WorkerSize
    last_adjusted_at: datetime | None = None  # the last adjust_worker
    requested_at: datetime | None = None  # the last request of a size (create or adjust)

    @property
    def workers(self) -> int:
        """The worker count last requested (0 is a count, not a gap)."""
        for count in (self.current.target_worker_count, self.initial.target_worker_count):
            if count is not None:
                return count
        return 0

    def adjusted(self, adjustment: Adjustment, sent_at: datetime) -> WorkerPlan:
        """The plan once ``adjustment`` was sent: its size, asked at ``sent_at``;
        the cooldown runs from when it was decided."""
        return replace(
            self,
            current=adjustment.size,
            requested_at=sent_at,
            last_adjusted_at=adjustment.decided_at,
        )

    def created(self, sent_at: datetime) -> WorkerPlan:
        """The plan once the run's task was asked for: workers requested then."""
        return replace(self, requested_at=self.requested_at or sent_at)


@dataclass(frozen=True)
class ScalingMemory:
    """What a policy keeps between looks: its recent needs, for stabilisation,
    and since when it has been looking."""

    needs: tuple[tuple[datetime, int], ...] = ()
    since: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    decision: Adjustment | None
    memory: ScalingMemory = field(default_factory=ScalingMemory)


class ScalingPolicy(Protocol):
    @property
    def tick_seconds(self) -> float:
        """Seconds between looks when no slice result arrives; 0: look only on results."""
        ...

    def decide(self, plan: WorkerPlan, seen: Observation, memory: ScalingMemory) -> Verdict:
        """A new size for the run (or None), and what to remember."""
        ...


@dataclass(frozen=True)
class ReferencePolicy:
    """The seed agent's rule, with a cooldown and no no-op requests."""

    expected_seconds: float
    cooldown_seconds: float = 60.0
    steps: tuple[tuple[float, float], ...] = ((1.5, 1.5), (1.2, 1.2))
    tick_seconds: float = 0.0

    def decide(self, plan: WorkerPlan, seen: Observation, memory: ScalingMemory) -> Verdict:
        return Verdict(self._decide(plan, seen.slice) if seen.slice else None, memory)

    def _decide(self, plan: WorkerPlan, seen: SliceObservation) -> Adjustment | None:
        if seen.failed or seen.processing_seconds is None:
            return None
        factor = self._factor(seen.processing_seconds)
        if factor is None:
            return None
        size = _scaled(plan.initial, factor)
        if not _grows(plan.current, size):
            return None
        if _cooling(plan, seen.at, self.cooldown_seconds):
            return None
        return Adjustment(
            size=size,
            decided_at=seen.at,
            reason=(
                f"slice took {seen.processing_seconds:.1f}s, over "
                f"{factor:g}x the expected {self.expected_seconds:g}s: "
                f"{factor:g}x the initial size"
            ),
        )

    def _factor(self, seconds: float) -> float | None:
        for over, factor in self.steps:
            if seconds > self.expected_seconds * over:
                return factor
        return None


@dataclass(frozen=True)
class Bounds:
    """Limits on a run's size: workers, and all its workers' cores and memory."""

    min_workers: int = 1
    max_workers: int = 100
    max_total_cores: int | None = None
    max_total_memory_mb: int | None = None

    def ceiling(self, size: WorkerSize) -> int:
        cores = size.core_count or 1
        top = self.max_workers
        if self.max_total_cores is not None:
            top = min(top, self.max_total_cores // cores)
        if self.max_total_memory_mb is not None and size.memory_per_core:
            top = min(top, self.max_total_memory_mb // (cores * size.memory_per_core))
        return max(self.min_workers, top)

    def clamp(self, workers: int, size: WorkerSize) -> int:
        return min(max(workers, self.min_workers), self.ceiling(size))


@dataclass(frozen=True)
class ProportionalPolicy:
    """Sizes the run from its demand; see the module docstring."""

    bounds: Bounds = Bounds()
    target_utilisation: float = 0.8
    drain_seconds: float = 300.0  # the backlog is to be drained within this
    tolerance: float = 0.1  # relative change inside which nothing is asked
    up_window: float = 30.0
    down_window: float = 300.0
    max_step_up: float = 1.0  # at most +100% of the current size per request
    max_step_down: float = 0.5  # at most -50%
    cooldown_seconds: float = 60.0
    rampup_seconds: float = 300.0  # how long requested workers may take to show up
    min_results: int = 5  # results in the window before the demand is trusted
    tick_seconds: float = 5.0
    percentile: float = 90.0  # the demand's percentile of processing time, for the reason

    def needed(self, demand: Demand) -> float:
        """Workers the demand needs, before bounds and damping."""
        took = demand.processing_seconds or 0.0
        return (
            demand.rate * took / self.target_utilisation
            + demand.backlog * took / self.drain_seconds
        )

    def decide(self, plan: WorkerPlan, seen: Observation, memory: ScalingMemory) -> Verdict:
        demand = seen.demand
        if demand is None or demand.results < self.min_results or not demand.processing_seconds:
            return Verdict(None, memory)
        need = self.bounds.clamp(math.ceil(self.needed(demand) - 1e-9), plan.current)
        memory = self._remember(memory, seen.at, need)
        current = plan.workers
        target = self._stabilised(memory, seen.at, need, current)
        target = self.bounds.clamp(self._stepped(current, target), plan.current)
        if not self._worth_asking(plan, demand, current, target):
            return Verdict(None, memory)
        return Verdict(
            Adjustment(
                size=plan.current.model_copy(update={"target_worker_count": target}),
                decided_at=seen.at,
                reason=self._reason(demand, need, current, target),
                inputs=demand,
            ),
            memory,
        )

    def _remember(self, memory: ScalingMemory, at: datetime, need: int) -> ScalingMemory:
        keep = max(self.up_window, self.down_window)
        recent = tuple((t, n) for t, n in memory.needs if (at - t).total_seconds() <= keep)
        return replace(memory, needs=(*recent, (at, need)), since=memory.since or at)

    def _stabilised(self, memory: ScalingMemory, at: datetime, need: int, current: int) -> int:
        """Up only as far as the need held for ``up_window``; down only as far
        as the highest need of ``down_window``, and only once the policy has
        watched that long: one quiet minute does not shed workers, and the
        first few results of a run (its rate still rising) shed none."""

        def within(window: float) -> list[int]:
            return [n for t, n in memory.needs if (at - t).total_seconds() <= window]

        if need > current:
            return max(current, min(within(self.up_window)))
        watched = (at - (memory.since or at)).total_seconds()
        if need < current and watched >= self.down_window:
            return min(current, max(within(self.down_window)))
        return current

    def _stepped(self, current: int, target: int) -> int:
        up = max(1, math.ceil(current * self.max_step_up))
        down = max(1, math.floor(current * self.max_step_down))
        return min(max(target, current - down), current + up)

    def _worth_asking(self, plan: WorkerPlan, demand: Demand, current: int, target: int) -> bool:
        if target == current:
            return False
        outside_bounds = current != self.bounds.clamp(current, plan.current)
        if not outside_bounds and abs(target - current) <= self.tolerance * current:
            return False
        if _cooling(plan, demand.at, self.cooldown_seconds):
            return False
        # Workers asked for but not yet seen are capacity on the way: asking
        # again before they could have come would ask twice for one gap.
        arriving = (
            demand.workers_seen < current
            and plan.requested_at is not None
            and ((demand.at - plan.requested_at).total_seconds() < self.rampup_seconds)
        )
        return not (target > current and arriving)

    def _reason(self, demand: Demand, need: int, current: int, target: int) -> str:
        took = demand.processing_seconds or 0.0
        because = (
            f"{demand.rate:.2f} slices/s x p{self.percentile:g} {took:.1f}s"
            f" / {self.target_utilisation:g}"
        )
        if demand.backlog >= 0.5:
            because += f" + backlog {demand.backlog:.0f} x {took:.1f}s / {self.drain_seconds:g}s"
        limited = "" if target == need else f" (need {need}; damped)"
        return f"{because} -> {current} to {target} workers{limited}"


def _cooling(plan: WorkerPlan, at: datetime, cooldown: float) -> bool:
    return plan.last_adjusted_at is not None and (
        (at - plan.last_adjusted_at).total_seconds() < cooldown
    )


def _scaled(initial: WorkerSize, factor: float) -> WorkerSize:
    # The seed multiplied core_count. In the testbed core_count is cores per
    # worker and iDDS reads target_worker_count as the number of PanDA jobs,
    # so the worker count is what scales; cores per worker stay as asked.
    return initial.model_copy(
        update={"target_worker_count": _times(initial.target_worker_count, factor)}
    )


def _times(value: int | None, factor: float) -> int | None:
    return None if value is None else max(value, math.ceil(value * factor))


def _grows(current: WorkerSize, proposed: WorkerSize) -> bool:
    """True when the proposal asks for more than what was last requested."""
    new, old = proposed.target_worker_count, current.target_worker_count
    return new is not None and new > (old or 0)
