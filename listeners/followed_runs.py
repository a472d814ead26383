"""Which runs a listener follows, decided without I/O.

A run is followed from its start (or from the moment the listener learns it
is one of its namespace's) until ``grace`` seconds after its flow run was
first seen finished: results of stopped transformers still trickle in after
the run's end, and on a shared results queue a run's results reach this
listener only while it holds that run's subscription (``run_id = '<id>'``).
After that the run is forgotten: a late message about it is looked up in
Prefect like any run this listener did not start.
"""

from __future__ import annotations

from collections.abc import Collection


class FollowedRuns:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._runs: set[str] = set()
        self._finished_at: dict[str, float] = {}  # run id -> when first seen finished

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def follow(self, run_id: str) -> bool:
        """Follow ``run_id``; True if it was not followed yet."""
        self._finished_at.pop(run_id, None)
        if run_id in self._runs:
            return False
        self._runs.add(run_id)
        return True

    def still_active(self, active: Collection[str], now: float) -> list[str]:
        """Given the runs whose flow runs are in progress now, the followed
        runs to forget: finished for longer than ``grace``."""
        for run_id in self._runs:
            if run_id in active:
                self._finished_at.pop(run_id, None)
            else:
                self._finished_at.setdefault(run_id, now)
        done = sorted(r for r, at in self._finished_at.items() if now - at >= self.grace)
        for run_id in done:
            self._runs.discard(run_id)
            del self._finished_at[run_id]
        return done
