"""Whether a run makes progress: what its flow waits for now, and since when
nothing happened. Pure: the flow says what it waits for and when something
happened; a watcher (flows/progress_watch.py) asks, now and then, whether
the run is stalled, and reports it.

A run waiting for a slice result is not stalled however long none comes:
that wait is the run's normal life (``expected`` False). A run waiting for
iDDS's ids, for its scaling sub-flow to start or for a close confirmation
is: something it needs is late, and the operator must hear what."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunProgress:
    run_id: str
    waiting_for: str
    expected: bool  # whether the wait should end soon (no stall report otherwise)
    since: float  # monotonic seconds: the last progress
    reported_at: float | None = None  # when the current stall was reported, if it was

    @classmethod
    def starting(cls, run_id: str, now: float) -> RunProgress:
        return cls(run_id, "the run flow to send create_workflow_task", True, now)

    def moved(self, now: float) -> float | None:
        """Something happened; returns how long the stall it ends lasted,
        when one was reported."""
        stalled = None if self.reported_at is None else now - self.since
        self.since, self.reported_at = now, None
        return stalled

    def waits_for(self, what: str, now: float, expected: bool = True) -> float | None:
        """The flow now waits for ``what``: progress too."""
        self.waiting_for, self.expected = what, expected
        return self.moved(now)

    def stalled_for(self, now: float, limit: float) -> float | None:
        """Seconds without progress, when over ``limit`` in an expected wait
        and not yet reported (each stall is reported once)."""
        idle = now - self.since
        if not self.expected or idle < limit or self.reported_at is not None:
            return None
        self.reported_at = now
        return idle

    def stall_line(self, idle: float) -> str:
        return (
            f"stalled run_id={self.run_id}: no progress for {idle:.0f}s, waiting for "
            f"{self.waiting_for}"
        )
