"""All simulated peers wired together, as in the testbed: iDDS starts one
transformer per requested worker when it creates a task. iDDS 2.6.21 does not
act on adjust_worker's worker count, and by default neither does this one;
with ``applies_worker_count`` (a what-if, for the scaling tests and the demo)
an adjust sets the run's target, so more transformers start when it rises
(``worker_rampup`` seconds later, the time a PanDA pilot takes to start) and
the surplus end, each after its current slice, when it falls. Slices arrive all at once or
over time (``arrival``, see ``transformers``). The control system drives
runs; the recorder watches the topics. With ``idds_mode="rest"`` iDDS is also served over REST
(``idds_rest``), wired to the transformers the same way; the bus iDDS keeps
running, so a test can check it heard nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.messages import WorkerSize
from swf_testbed.peers._bus import poll_until
from swf_testbed.peers.control_system import ControlSystem
from swf_testbed.peers.idds import SimulatedIDDS, TaskInfo
from swf_testbed.peers.idds_rest.server import SimulatedIDDSRest
from swf_testbed.peers.recorder import BusRecorder
from swf_testbed.peers.transformers import TransformerFarm


def _fifth_of_a_second(_: int) -> float:
    return 0.2


class PeerHarness:
    """Start with ``start()`` or ``with``; use ``control``, ``idds``,
    ``idds_rest`` (rest mode; else None), ``farm`` and ``recorder`` directly.
    ``rest_token``/``rest_vo``: what the REST server demands (oidc);
    ``workload_pending``: iDDS answers creates with workload_id null;
    ``worker_rampup``: seconds before transformers added by an adjust start;
    ``arrival``: slice i of a run arrives ``arrival(i)`` seconds after its
    task is created (None: all at once). ``idds_namespace``: iDDS's own
    (default: ``namespace``, as in the testbed); ``idds_copies``: iDDS
    handles each create that many times at once (several tasks for a run)."""

    def __init__(
        self,
        brokers: Brokers,
        namespace: str,
        processing_time: Callable[[int], float] = _fifth_of_a_second,
        slices_per_run: int = 20,
        idle_timeout: float = 5.0,
        heartbeat_every: float = 30.0,
        reply_delay: float = 0.0,
        answer_create: bool = True,
        workers_before_reply: bool = False,
        seed_shape_results: bool = False,
        fail_every: int | None = None,
        result_ttl_ms: int | None = None,
        idds_mode: Literal["message", "rest"] = "message",
        rest_port: int = 0,
        rest_token: str | None = None,
        rest_vo: str | None = None,
        workload_pending: bool = False,
        worker_rampup: float = 0.0,
        arrival: Callable[[int], float] | None = None,
        idds_namespace: str | None = None,
        idds_copies: int = 1,
        applies_worker_count: bool = False,
    ) -> None:
        if idds_mode not in ("message", "rest"):
            raise ValueError(f"idds_mode must be 'message' or 'rest', not {idds_mode!r}")
        self.idds_mode = idds_mode
        self.processing_time = processing_time
        self.slices_per_run = slices_per_run
        self.seed_shape_results = seed_shape_results
        self.fail_every = fail_every
        self.worker_rampup = worker_rampup
        self.arrival = arrival
        self.applies_worker_count = applies_worker_count
        # Adjusts waiting for their ramp-up, one per run: a later adjust
        # replaces the pending one. Guarded by _rampup_lock.
        self._rampup_lock = threading.Lock()
        self._rampups: dict[str, threading.Timer] = {}
        self.recorder = BusRecorder(
            brokers, topics=(brokers.workers_topic, brokers.transformer_topic)
        )
        self.farm = TransformerFarm(
            brokers,
            results_queue=brokers.results_destination,
            transformer_topic=brokers.transformer_topic,
            workers_topic=brokers.workers_topic,
            heartbeat_every=heartbeat_every,
            idle_timeout=idle_timeout,
            result_ttl_ms=result_ttl_ms,
        )
        self.idds = SimulatedIDDS(
            brokers,
            namespace if idds_namespace is None else idds_namespace,
            on_task_created=self._task_created,
            on_adjust=self._adjusted,
            reply_delay=reply_delay,
            answer_create=answer_create,
            workers_before_reply=workers_before_reply,
            workers_topic=brokers.workers_topic,
            workload_pending=workload_pending,
            copies=idds_copies,
            applies_worker_count=applies_worker_count,
        )
        self.idds_rest: SimulatedIDDSRest | None = None
        if idds_mode == "rest":
            self.idds_rest = SimulatedIDDSRest(
                port=rest_port,
                token=rest_token,
                vo=rest_vo,
                workload_pending=workload_pending,
                on_task_created=self._task_created,
                on_adjust=self._adjusted,
                applies_worker_count=applies_worker_count,
            )
        self.control = ControlSystem(brokers, namespace, workers_topic=brokers.workers_topic)

    def start(self) -> PeerHarness:
        # The recorder first, so it sees everything the others cause.
        self.recorder.start()
        self.farm.start()
        self.idds.start()
        if self.idds_rest is not None:
            self.idds_rest.start()
        self.control.start()
        return self

    def stop(self) -> None:
        with self._rampup_lock:
            for timer in self._rampups.values():
                timer.cancel()
            self._rampups.clear()
        if self.idds_rest is not None:
            self.idds_rest.stop()
        for part in (self.control, self.idds, self.farm, self.recorder):
            part.stop()

    def resync(self, timeout: float) -> bool:
        """After a broker restart: True once every peer is connected (and
        subscribed) again; each reconnects by itself, with backoff."""
        deadline = time.monotonic() + timeout
        parts = (self.recorder, self.farm, self.idds, self.control)
        return all(part.resync(max(deadline - time.monotonic(), 0.1)) for part in parts)

    def __enter__(self) -> PeerHarness:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- what iDDS did, whichever way it was asked -----------------------------

    def task_created(self, run_id: str) -> bool:
        """iDDS created the run's task (and, on the bus, replied)."""
        if self.idds_rest is not None:
            return run_id in self.idds_rest.tasks
        return bool(self.recorder.of_type("created_workflow_task", run_id))

    def task_closed(self, run_id: str) -> bool:
        """iDDS closed the run's task (and, on the bus, replied)."""
        if self.idds_rest is not None:
            return run_id in self.idds_rest.closed
        return bool(self.recorder.of_type("closed_workflow_task", run_id))

    @staticmethod
    def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
        """Poll ``condition`` (it may read several peers' records)."""
        return poll_until(condition, timeout)

    def _task_created(self, run_id: str, task: TaskInfo) -> None:
        # iDDS submits target_worker_count PanDA jobs, one transformer each;
        # they run without a namespace.
        self.farm.start_run(
            run_id,
            workers=task.target_worker_count or 1,
            slices=self.slices_per_run,
            processing_time=self.processing_time,
            seed_shape=self.seed_shape_results,
            fail_every=self.fail_every,
            panda_task_id=task.workload_id,
            arrival=self.arrival,
        )

    def _adjusted(self, run_id: str, size: WorkerSize) -> None:
        # iDDS/PanDA (what-if): more jobs when the target rises, jobs that end
        # are not replaced when it falls.
        target = size.target_worker_count
        if not self.applies_worker_count or target is None or run_id not in self.farm.runs:
            return
        with self._rampup_lock:
            pending = self._rampups.pop(run_id, None)
            if pending is not None:
                pending.cancel()  # superseded: the latest target is what counts
            if self.worker_rampup <= 0 or target <= self.farm.live_workers(run_id):
                # Nothing to start: no pilot to wait for.
                self.farm.set_target(run_id, target)
                return
            timer = threading.Timer(self.worker_rampup, self._ramped_up, (run_id, target))
            timer.name = f"rampup-{run_id}"
            timer.daemon = True
            self._rampups[run_id] = timer
            timer.start()

    def _ramped_up(self, run_id: str, target: int) -> None:
        with self._rampup_lock:
            timer = self._rampups.get(run_id)
            if timer is None or timer is not threading.current_thread():
                return  # cancelled or superseded after it had already fired
            del self._rampups[run_id]
            self.farm.set_target(run_id, target)
