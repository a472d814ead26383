"""A run's timeline: what was requested and what its slice window showed at
each look of its policy, for the plots (adapters/plots.py) of the live run
and of each policy of a replay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict

# A timeline keeps at most this many points: past it, every other point is
# dropped, so an hours-long run's timeline costs what a short one's does.
TIMELINE_POINTS = 2000


class TimelinePoint(BaseModel):
    """The run at one look: what was requested, and what the window showed."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    requested: int
    workers_seen: int
    processing_seconds: float | None
    backlog: float
    rate: float


@dataclass
class Timeline:
    points: list[TimelinePoint] = field(default_factory=list)
    limit: int = TIMELINE_POINTS

    def add(self, point: TimelinePoint) -> None:
        self.points.append(point)
        if len(self.points) > self.limit:
            self.points = self.points[::2]


@dataclass(frozen=True)
class Trace:
    """One policy's timeline, and when it asked for a new size."""

    label: str
    points: Sequence[TimelinePoint]
    adjustments: Sequence[datetime] = ()
