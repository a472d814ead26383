"""The simulated transformers' slice results at a steady total rate, sent
over several connections (one sender thread each), as the testbed's many
transformers would. A result has swf-transform's shape (PROTOCOL.md,
tests/real_messages): no namespace header, the slice's run id (a string), a
boolean ``result.state``, PanDA ids as strings, and no processing_time field
(the service reads processed_at - processing_start_at)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.plan import LoadPlan, SliceSend
from swf_panda_workers.config.schema import Brokers
from swf_testbed.peers._bus import PeerBus, naive_iso, peer_headers

WORKERS_PER_RUN = 10  # distinct transformer host names a run's results come from


def slice_result(run_id: str, send: SliceSend, workload_id: int | None) -> dict[str, Any]:
    done = datetime.now(UTC)
    started = done - timedelta(seconds=send.seconds)
    return {
        "msg_type": "slice_result",
        "run_id": run_id,
        "created_at": naive_iso(done, timespec="microseconds"),
        "content": {
            "requested_at": naive_iso(started, timespec="microseconds"),
            "processing_start_at": naive_iso(started, timespec="microseconds"),
            "processed_at": naive_iso(done, timespec="microseconds"),
            "state": "done",
            "hostname": f"bench-{run_id}-{send.index % WORKERS_PER_RUN}",
            "panda_task_id": None if workload_id is None else str(workload_id),
            "panda_id": str(7_000_000 + send.index),
            "harvester_id": "bench-harvester",
            "result": {
                "state": True,
                "error": None,
                "result": {
                    "run_id": run_id,
                    "slice_id": send.index,
                    "processed": True,
                    "actual_processing_time": send.seconds,
                },
            },
        },
    }


class SliceLoad:
    """Sends a plan's results to ``queue``, for one set of runs after another
    (``run``); ``workload(run_id)`` is the PanDA task iDDS created. What was
    sent, and when, adds up over the sets."""

    def __init__(
        self,
        brokers: Brokers,
        queue: str,
        plan: LoadPlan,
        workload: Callable[[str], int | None],
        connections: int = 4,
    ) -> None:
        self.plan = plan
        self._queue = queue
        self._run_ids: Sequence[str] = ()
        self._workload = workload
        self._brokers = brokers
        self._connections = connections
        self._lock = threading.Lock()
        self.sent = 0
        self.slow_sent: dict[str, list[float]] = {}
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.sent_at: list[float] = []  # when each result went out (for the plot)

    def run(self, run_ids: Sequence[str]) -> None:
        """Send the plan's results for ``run_ids`` (the plan's run i is
        run_ids[i]); returns when the last is sent."""
        self._run_ids = run_ids
        for run_id in run_ids:
            self.slow_sent.setdefault(run_id, [])
        # New connections for each set: a stopped one does not start again.
        buses = [PeerBus(self._brokers, name=f"bench-load-{k}") for k in range(self._connections)]
        for bus in buses:
            bus.start()
        sends = list(self.plan.sends())
        began = time.time()
        threads = [
            threading.Thread(
                target=self._send_share, args=(bus, sends[k :: len(buses)], began), daemon=True
            )
            for k, bus in enumerate(buses)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for bus in buses:
            bus.stop()

    @property
    def achieved_rate(self) -> float:
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return (self.sent - 1) / (self.last_at - self.first_at)

    def _send_share(self, bus: PeerBus, sends: list[SliceSend], began: float) -> None:
        for send in sends:
            delay = began + send.at - time.time()
            if delay > 0:
                time.sleep(delay)
            run_id = self._run_ids[send.run]
            body = slice_result(run_id, send, self._workload(run_id))
            at = time.time()
            bus.send(self._queue, body, peer_headers("slice_result", run_id))
            with self._lock:
                self.sent += 1
                self.sent_at.append(at)
                self.first_at = at if self.first_at is None else min(self.first_at, at)
                self.last_at = at if self.last_at is None else max(self.last_at, at)
                if send.slow:
                    self.slow_sent[run_id].append(at)
