"""Scaling decisions: pure functions of a run's worker size and one observation.

The reference policy is the seed agent's: a slice slower than 1.2x the
expected time asks for 1.2x the run's initial size, slower than 1.5x for 1.5x.
It scales from the initial size (so it never compounds) and only up. Two
guards are added so a burst of slow slices yields one request, not one per
slice: no request that does not change the size, and a cooldown between
requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from swf_panda_workers.messages import WorkerSize


@dataclass(frozen=True)
class SliceObservation:
    """What the policy sees of one slice result."""

    at: datetime
    processing_seconds: float | None
    failed: bool = False


@dataclass(frozen=True)
class WorkerPlan:
    """A run's worker size: where it started and what was last requested."""

    initial: WorkerSize
    current: WorkerSize
    last_adjusted_at: datetime | None = None


@dataclass(frozen=True)
class ScalingDecision:
    size: WorkerSize
    reason: str


class ScalingPolicy(Protocol):
    def decide(self, plan: WorkerPlan, seen: SliceObservation) -> ScalingDecision | None:
        """A new size for the run, or None to leave it as it is."""
        ...


@dataclass(frozen=True)
class ReferencePolicy:
    """The seed agent's rule, with a cooldown and no no-op requests."""

    expected_seconds: float
    cooldown_seconds: float = 60.0
    steps: tuple[tuple[float, float], ...] = ((1.5, 1.5), (1.2, 1.2))

    def decide(self, plan: WorkerPlan, seen: SliceObservation) -> ScalingDecision | None:
        if seen.failed or seen.processing_seconds is None:
            return None
        factor = self._factor(seen.processing_seconds)
        if factor is None:
            return None
        size = _scaled(plan.initial, factor)
        if not _grows(plan.current, size):
            return None
        if plan.last_adjusted_at is not None and (
            (seen.at - plan.last_adjusted_at).total_seconds() < self.cooldown_seconds
        ):
            return None
        return ScalingDecision(
            size=size,
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
