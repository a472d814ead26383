"""The workers each run last asked iDDS for, as the listener hears it on the
bus, kept bounded for a metric labelled by run id.

In message mode our own requests come back to the listener on the topic:
``create_workflow_task`` carries a run's initial size, each ``adjust_worker``
its new one. A run's entry is dropped ``grace`` seconds after the run ended
(its end_run, run_end or run_stop) and after the last request since, so a
last adjustment during the drain is still seen; at most ``kept`` runs are held
(those longest without news go first), for runs whose end never comes.

No I/O: times are passed in (monotonic seconds). Updated on the listener's
event loop and read by the metrics endpoint's thread, hence the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

GRACE = 300.0  # s an ended run's size stays visible: several scrape intervals
KEPT = 1000  # runs at most: far above the runs of one namespace at once


@dataclass
class _Entry:
    workers: int
    touched: float  # the last request, or the end, whichever came last
    ended: bool = False


@dataclass
class RequestedWorkers:
    grace: float = GRACE
    kept: int = KEPT
    _runs: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)  # oldest news first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def requested(self, run_id: str, workers: int, now: float) -> None:
        with self._lock:
            entry = self._runs.pop(run_id, None)
            ended = entry.ended if entry is not None else False
            self._runs[run_id] = _Entry(workers, now, ended)
            while len(self._runs) > self.kept:
                self._runs.popitem(last=False)

    def ended(self, run_id: str, now: float) -> None:
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is not None:  # no size known: nothing to drop later
                entry.ended, entry.touched = True, now
                self._runs.move_to_end(run_id)

    def current(self, now: float) -> dict[str, int]:
        """run id -> workers requested, less the runs past their grace."""
        with self._lock:
            expired = [
                run_id
                for run_id, entry in self._runs.items()
                if entry.ended and now - entry.touched > self.grace
            ]
            for run_id in expired:
                del self._runs[run_id]
            return {run_id: entry.workers for run_id, entry in self._runs.items()}
