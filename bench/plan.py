"""What the benchmark sends, and when: a pure schedule.

Slice results of all runs are interleaved at a constant total rate: result
``j`` of run ``i`` goes out ``(j * runs + i) / rate`` seconds after the load
starts. Two results of each run are slow, at a third and two thirds of its
slices: the first over 1.2x the expected processing time, the second over
1.5x, so the reference policy answers each with one adjust_worker (to 1.2x,
then 1.5x the initial size). Every other result is fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

FAST = 0.2  # x the expected processing time
SLOW = (1.3, 2.0)  # x the expected time: over the 1.2x step, then over the 1.5x step


@dataclass(frozen=True)
class SliceSend:
    at: float  # seconds after the load starts
    run: int  # index of the run
    index: int  # the slice's index within its run
    seconds: float  # its processing time
    slow: bool


@dataclass(frozen=True)
class LoadPlan:
    runs: int
    slices: int  # per run
    rate: float  # slice results per second, all runs together
    expected_seconds: float  # slice.processing_time of the service under test

    def __post_init__(self) -> None:
        if self.runs < 1 or self.slices < 3 or self.rate <= 0 or self.expected_seconds <= 0:
            raise ValueError(
                "a plan needs at least 1 run, 3 slices per run and a positive "
                "rate and expected processing time"
            )

    @property
    def duration(self) -> float:
        """Seconds from the first result to the last."""
        return (self.runs * self.slices - 1) / self.rate

    @property
    def slow_indexes(self) -> tuple[int, ...]:
        return (self.slices // 3, 2 * self.slices // 3)

    def sends(self) -> Iterator[SliceSend]:
        slow = dict(zip(self.slow_indexes, SLOW, strict=True))
        for j in range(self.slices):
            factor = slow.get(j, FAST)
            for i in range(self.runs):
                yield SliceSend(
                    at=(j * self.runs + i) / self.rate,
                    run=i,
                    index=j,
                    seconds=factor * self.expected_seconds,
                    slow=j in slow,
                )
