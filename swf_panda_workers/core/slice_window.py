"""What a run's recent slice results say about its demand for workers.

The bus does not say how many slices were sent: they travel on a queue only
the transformers read. What the results do say, over the last ``span``
seconds: how fast slices are finished (in a steady run, the rate they
arrive), how long they take, and how long they waited in the queue before a
transformer took them (``processing_start_at - requested_at``). By Little's
law the slices waiting in the queue number about rate x wait: that is the
backlog the policy sizes for. Everything here is pure and bounded by the
window, so a run open for hours costs no more than one open for a minute.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict

from swf_panda_workers.core.messages import SliceResult

# The shortest span a rate is measured over: the first results of a run
# arrive together, and one second keeps their rate finite.
MIN_RATE_SPAN = 1.0


@dataclass(frozen=True)
class SliceObservation:
    """One slice result as the run's state, its window and its policy see it."""

    at: datetime  # when it was received
    processing_seconds: float | None
    waited_seconds: float | None = None  # in the queue, before a transformer took it
    worker: str | None = None
    failed: bool = False

    @classmethod
    def of(cls, result: SliceResult, at: datetime) -> SliceObservation:
        content = result.content
        waited = None
        if content.requested_at is not None and content.processing_start_at is not None:
            # Two hosts' clocks: a skew must not make a negative wait.
            waited = max(0.0, (content.processing_start_at - content.requested_at).total_seconds())
        return cls(
            at=at,
            processing_seconds=result.processing_seconds,
            waited_seconds=waited,
            worker=result.worker,
            failed=content.state == "failed",
        )


class Demand(BaseModel):
    """The window's figures: a scaling decision's inputs, kept with the decision."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    results: int  # slice results in the window, failed ones included
    rate: float  # slices finished per second
    processing_seconds: float | None  # the window's configured percentile
    waited_seconds: float  # mean queue wait (0 when results carry no requested_at)
    backlog: float  # slices waiting in the queue, by Little's law: rate x wait
    workers_seen: int  # transformers that sent a result within the window

    def describe(self) -> str:
        took = "?" if self.processing_seconds is None else f"{self.processing_seconds:.1f}s"
        return (
            f"{self.rate:.2f} slices/s, slices take {took}, wait {self.waited_seconds:.1f}s,"
            f" backlog {self.backlog:.0f}, {self.workers_seen} workers seen"
        )


class SliceWindow:
    """The last ``span`` seconds of one run's slice results."""

    def __init__(self, span: float, percentile: float, backlog_from_waits: bool = True) -> None:
        if span <= 0 or not 0 < percentile <= 100:
            raise ValueError("span must be positive and percentile in (0, 100]")
        self.span = span
        self.percentile = percentile
        self.backlog_from_waits = backlog_from_waits
        self._samples: deque[SliceObservation] = deque()
        self._workers: Counter[str] = Counter()
        self._began: datetime | None = None  # when the run's first slice began processing

    def add(self, sample: SliceObservation) -> None:
        if self._began is None:
            self._began = _began(sample)
        self._samples.append(sample)
        if sample.worker:
            self._workers[sample.worker] += 1
        self._forget_before(sample.at)

    def demand(self, at: datetime) -> Demand:
        self._forget_before(at)
        samples = self._samples
        rate = len(samples) / self._rate_span(at) if samples else 0.0
        waits = [s.waited_seconds for s in samples if s.waited_seconds is not None]
        waited = sum(waits) / len(waits) if waits and self.backlog_from_waits else 0.0
        return Demand(
            at=at,
            results=len(samples),
            rate=rate,
            processing_seconds=percentile(
                [
                    s.processing_seconds
                    for s in samples
                    if s.processing_seconds is not None and not s.failed
                ],
                self.percentile,
            ),
            waited_seconds=waited,
            backlog=rate * waited,
            workers_seen=len(self._workers),
        )

    def _rate_span(self, at: datetime) -> float:
        assert self._began is not None
        since_start = (at - self._began).total_seconds()
        return max(MIN_RATE_SPAN, min(self.span, since_start))

    def _forget_before(self, at: datetime) -> None:
        samples = self._samples
        while samples and (at - samples[0].at).total_seconds() > self.span:
            old = samples.popleft()
            if old.worker:
                self._workers[old.worker] -= 1
                if not self._workers[old.worker]:
                    del self._workers[old.worker]


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _began(sample: SliceObservation) -> datetime:
    return sample.at - timedelta(seconds=sample.processing_seconds or 0.0)
