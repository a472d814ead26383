"""The transformers (swf-transform) that PanDA jobs run: each takes slices of
its run, "processes" them, and sends slice_result to the results destination.

The integration tests and the demo run the real idds-prompt transformer
(``peers.pilots``); this simulator is for the benchmark's hundreds of workers
and the fault tests. It sends what swf-transform sends
(tests/real_messages/slice_result_*.swf-transform-HEAD.json): the slice's run
id (a string), ``result.state`` a JSON boolean, panda ids as strings from the
pilot's environment, naive ISO times with microseconds, no namespace header
(transformers started by iDDS have none) and, in the testbed shape, no
processing_time field; its heartbeat is the bare ``heartbeat`` with no
run_id, sent to its results destination and to the transformer topic, never
to the workers topic. ``stop_transformer`` is obeyed only when its run_id
``==`` the integer the transformer was started with, so a string "100123"
does not stop run 100123.
A stopped transformer finishes its current slice and exits; the slices left
in the run's queue stay unprocessed. An unstopped one exits after
``idle_timeout`` seconds without work.

Slices are queued all at once when the run starts, or over time (``arrival``:
slice i arrives ``arrival(i)`` seconds after the start, as data comes off the
detector); a slice's result carries the moment it was queued as
``requested_at``, so ``processing_start_at - requested_at`` is its queue wait.
While more slices are still to arrive a run's transformers are not idle, so a
gap between arrivals never ends them; a stop or the farm's shutdown does, and
slices not yet arrived at a stop never arrive. ``set_target`` sets how many
transformers a run should have: more are started, or the surplus exit once
their current slice is done (PanDA jobs ending without replacement).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from swf_panda_workers.adapters.stomp_bus import BusUnavailable, Delivery, Subscription
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.messages import InvalidMessage, StopTransformer, parse_message
from swf_testbed.peers._bus import Notifier, PeerBus, naive_iso

log = logging.getLogger(__name__)

HARVESTER_ID = "48211"  # HARVESTER_WORKER_ID, text as the pilot's environment has it
PANDA_SERVER_URL = "https://pandaserver.example:25443/server/panda"
RESULT_TTL_MS = 12 * 3600 * 1000  # the real publisher's timetolive


@dataclass
class RunSlices:
    """One run's shared slice queue and what its transformers did.
    Guarded by the farm's lock; tests read the counters."""

    run_id: str
    started_with: int | str  # what the transformer's config holds: an integer
    processing_time: Callable[[int], float]
    seed_shape: bool
    fail_every: int | None
    namespace: str | None
    panda_task_id: int | None
    slices: int  # all the run will ever queue
    pending: deque[int] = field(default_factory=deque)
    queued_at: dict[int, str] = field(default_factory=dict)  # slice -> its requested_at
    feeding: bool = False  # a feeder still has slices to queue
    target: int | None = None  # transformers wanted (set_target); None: no limit
    slices_sent: int = 0
    failed_sent: int = 0
    stopped: bool = False
    stop_messages_seen: int = 0
    ignored_stops: int = 0
    started: int = 0
    live: int = 0

    @property
    def queued(self) -> int:
        """Slices queued so far (arrived), taken or not."""
        return len(self.queued_at)

    @property
    def unprocessed(self) -> list[int]:
        """Slices queued that no transformer took (left behind by a stop)."""
        return list(self.pending)

    @property
    def arriving(self) -> bool:
        """More slices are still to be queued: work pending, not idleness."""
        return self.feeding and not self.stopped

    @property
    def surplus(self) -> bool:
        """More transformers are live than the run's target."""
        return self.target is not None and self.live > self.target


class TransformerFarm:
    """Transformer threads for any number of runs, one bus connection."""

    def __init__(
        self,
        brokers: Brokers,
        results_queue: str = "/queue/panda.results.worker",
        transformer_topic: str = "/topic/panda.transformer",
        workers_topic: str = "/topic/panda.workers",
        heartbeat_every: float = 30.0,
        idle_timeout: float = 5.0,
        result_ttl_ms: int | None = None,
    ) -> None:
        self.results_queue = results_queue
        self.transformer_topic = transformer_topic
        self.workers_topic = workers_topic
        self.heartbeat_every = heartbeat_every
        self.idle_timeout = idle_timeout
        # The real transformer sets no expiry; tests may, so that results no
        # consumer took do not pile up on the queue across test runs.
        self.result_ttl_ms = result_ttl_ms
        self._state = Notifier()
        self._closing = threading.Event()
        self._panda_ids = itertools.count(7_000_001)
        self._client_id = f"None.ResultPublisher.sim.{uuid.uuid4().hex[:8]}"
        # Guarded by self._state.lock.
        self.runs: dict[str, RunSlices] = {}
        self.stop_messages: list[StopTransformer] = []
        self.invalid: list[str] = []
        self._heartbeats: dict[str, str | None] = {}  # internal_id -> namespace, live ones
        self._holding = False  # results wait before their send (hold_results)
        self._sending = 0  # results being sent now
        self._threads: list[threading.Thread] = []
        self._handlers: dict[type, Callable[[Any], None]] = {StopTransformer: self._on_stop}
        self._bus = PeerBus(
            brokers,
            name="sim-transformers",
            subscriptions=(Subscription(transformer_topic, ack="auto"),),
            handle=self._on_delivery,
        )
        self._ticker = threading.Thread(
            target=self._beat, name="sim-transformers-heartbeat", daemon=True
        )

    def start(self) -> TransformerFarm:
        self._bus.start()
        self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop every transformer now (a slice in progress is dropped)."""
        with self._state.lock:
            self._closing.set()
            self._state.notify()
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        self._bus.stop()

    def resync(self, timeout: float) -> bool:
        """True once the farm's connection is live again (after a broker restart)."""
        return self._bus.resync(timeout)

    def __enter__(self) -> TransformerFarm:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- driving the farm ----------------------------------------------------

    def start_run(
        self,
        run_id: str,
        workers: int,
        slices: int,
        processing_time: Callable[[int], float],
        seed_shape: bool = False,
        fail_every: int | None = None,
        namespace: str | None = None,
        panda_task_id: int | None = None,
        arrival: Callable[[int], float] | None = None,
    ) -> RunSlices:
        """Queue ``slices`` slices for the run and start ``workers`` transformers.
        ``fail_every=n`` makes every n-th slice fail. ``arrival``: slice i is
        queued ``arrival(i)`` seconds after now instead of at once."""
        with self._state.lock:
            if run_id in self.runs:
                raise ValueError(f"run {run_id} already has transformers: use add_workers")
            run = RunSlices(
                run_id=run_id,
                # The real transformer is configured with int(run_id); keep
                # non-numeric test ids as text rather than crash.
                started_with=int(run_id) if run_id.isdigit() else run_id,
                processing_time=processing_time,
                seed_shape=seed_shape,
                fail_every=fail_every,
                namespace=namespace,
                panda_task_id=panda_task_id,
                slices=slices,
            )
            self.runs[run_id] = run
            if arrival is None:
                queued_at = naive_iso(timespec="microseconds")
                for index in range(slices):
                    self._queue(run, index, queued_at)
            else:
                self._start_feeder(run, arrival)
            self._spawn(run, workers)
            return run

    def add_workers(self, run_id: str, n: int) -> None:
        """Start ``n`` more transformers for a run (a stopped run gets none)."""
        with self._state.lock:
            run = self.runs[run_id]
            if run.target is not None:
                # Without this, a target set earlier would retire them at once.
                run.target = max(run.target, run.live + n)
            if not run.stopped:
                self._spawn(run, n)

    def set_target(self, run_id: str, n: int) -> None:
        """The run should have ``n`` transformers: start the missing ones (a
        stopped run gets none), or let the surplus exit, each after its
        current slice (a slice in progress is never abandoned)."""
        with self._state.lock:
            run = self.runs[run_id]
            run.target = max(n, 0)
            if not run.stopped and run.live < run.target:
                self._spawn(run, run.target - run.live)
            self._state.notify()  # idle surplus transformers leave now

    def live_workers(self, run_id: str) -> int:
        with self._state.lock:
            run = self.runs.get(run_id)
            return run.live if run is not None else 0

    # --- for tests -----------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self._state.wait_for(predicate, timeout)

    def run(self, run_id: str, timeout: float) -> RunSlices:
        """The run's slices, once its transformers have started. iDDS starts
        them just after its created reply, so a test that has seen the reply
        may still be ahead of the farm."""
        if not self._state.wait_for(lambda: run_id in self.runs, timeout):
            raise LookupError(f"no transformers started for run {run_id} within {timeout:g} s")
        with self._state.lock:
            return self.runs[run_id]

    def hold_results(self, timeout: float) -> bool:
        """Keep finished slices' results from being sent, until ``release_results``;
        True once no result is being sent any more. For stopping the broker
        without a send in flight, whose fate (stored or not) nobody could
        tell: a real transformer would lose or resend it, and the run's slice
        count could not be checked exactly."""
        with self._state.lock:
            self._holding = True
            return self._state.wait_for(lambda: self._sending == 0, timeout)

    def release_results(self) -> None:
        with self._state.lock:
            self._holding = False
            self._state.notify()

    def wait_idle(self, timeout: float, run_id: str | None = None) -> bool:
        """Wait until no transformer (of ``run_id``, or at all) is running."""

        def idle() -> bool:
            if run_id is not None:
                run = self.runs.get(run_id)
                return run is None or run.live == 0
            return all(run.live == 0 for run in self.runs.values())

        return self._state.wait_for(idle, timeout)

    # --- slice arrivals ------------------------------------------------------

    def _queue(self, run: RunSlices, index: int, queued_at: str) -> None:
        """Call with the lock held."""
        run.queued_at[index] = queued_at
        run.pending.append(index)
        self._state.notify()

    def _start_feeder(self, run: RunSlices, arrival: Callable[[int], float]) -> None:
        """Call with the lock held."""
        run.feeding = True
        feeder = threading.Thread(
            target=self._feed,
            args=(run, arrival, time.monotonic()),
            name=f"sim-{run.run_id}-feeder",
            daemon=True,
        )
        self._threads.append(feeder)
        feeder.start()

    def _feed(self, run: RunSlices, arrival: Callable[[int], float], began: float) -> None:
        """Queue each slice at its arrival time, in arrival order, until all
        are queued, the run is stopped or the farm closes."""

        def halted() -> bool:
            return run.stopped or self._closing.is_set()

        try:
            due = sorted((began + arrival(index), index) for index in range(run.slices))
            for at, index in due:
                with self._state.lock:
                    # Waiting on the condition, so that a stop or the farm's
                    # shutdown cuts the wait short.
                    self._state.wait_for(halted, max(at - time.monotonic(), 0.0))
                    if halted():
                        return  # slices not arrived yet never arrive
                    self._queue(run, index, naive_iso(timespec="microseconds"))
        except Exception:  # a broken arrival function: the log says what broke
            log.exception("run %s: feeding slices failed", run.run_id)
        finally:
            with self._state.lock:
                # However it ended: waiting transformers may idle again.
                run.feeding = False
                self._state.notify()

    # --- transformer threads -------------------------------------------------

    def _spawn(self, run: RunSlices, n: int) -> None:
        for _ in range(n):
            run.started += 1
            run.live += 1
            hostname = f"sim-{run.run_id}-{run.started}"  # its socket.getfqdn()
            thread = threading.Thread(
                target=self._transform, args=(run, hostname), name=hostname, daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _transform(self, run: RunSlices, hostname: str) -> None:
        internal_id = f"{hostname}.{uuid.uuid4().hex[:8]}"  # as swf-transform names them
        panda_id = next(self._panda_ids)
        with self._state.lock:
            self._heartbeats[internal_id] = run.namespace
        try:
            while (index := self._next_slice(run, internal_id)) is not None:
                self._process(run, index, hostname, panda_id)
        finally:
            with self._state.lock:
                self._leave(run, internal_id)  # after an error: not done yet

    def _next_slice(self, run: RunSlices, internal_id: str) -> int | None:
        """A slice to process, or None (the transformer has left): stopped,
        farm closing, surplus to the run's target, or idle too long."""
        with self._state.lock:

            def ready() -> bool:
                return run.stopped or self._closing.is_set() or run.surplus or bool(run.pending)

            # While slices are still to arrive the transformer is not idle:
            # the idle clock starts once the last one has arrived.
            self._state.wait_for(lambda: ready() or not run.arriving, None)
            self._state.wait_for(ready, self.idle_timeout)
            if run.stopped or self._closing.is_set() or run.surplus or not run.pending:
                self._leave(run, internal_id)
                return None
            return run.pending.popleft()

    def _leave(self, run: RunSlices, internal_id: str) -> None:
        """Call with the lock held; once per transformer, however it ends.
        Counted out in the same hold as the decision to leave, so that two
        surplus transformers never both leave for one too many."""
        if internal_id not in self._heartbeats:
            return
        del self._heartbeats[internal_id]
        run.live -= 1
        self._state.notify()

    def _process(self, run: RunSlices, index: int, hostname: str, panda_id: int) -> None:
        started_at = datetime.now(UTC)
        began = time.monotonic()
        if self._closing.wait(run.processing_time(index)):
            return  # the farm is shutting down: the slice is abandoned
        seconds = round(time.monotonic() - began, 6)
        failed = run.fail_every is not None and (index + 1) % run.fail_every == 0
        slice_content = {
            "run_id": run.run_id,
            "slice_id": index,
            "state": "queued",
            "substate": "new",
        }
        content: dict[str, Any] = {
            "requested_at": run.queued_at[index],
            "processing_start_at": naive_iso(started_at, timespec="microseconds"),
            "processed_at": naive_iso(timespec="microseconds"),
            "state": "failed" if failed else "done",
            "hostname": hostname,
            "panda_server_url": PANDA_SERVER_URL,
            # From the pilot's environment: text, or null.
            "panda_task_id": None if run.panda_task_id is None else str(run.panda_task_id),
            "panda_id": str(panda_id),
            "harvester_id": HARVESTER_ID,
            "result": (
                # A failed slice carries no slice identity.
                {"state": False, "result": None, "error": f"simulated failure of slice {index}"}
                if failed
                else {
                    "state": True,
                    "result": {
                        **slice_content,
                        "processed": True,
                        "actual_processing_time": seconds,
                    },
                    "error": None,
                }
            ),
        }
        if run.seed_shape:
            content["processing_time"] = seconds
        body = {
            "msg_type": "slice_result",
            "run_id": run.run_id,  # the slice's, a string as the testbed sends it
            "created_at": naive_iso(timespec="microseconds"),
            "content": content,
        }
        # No namespace, as from iDDS jobs; a ttl, which ActiveMQ Classic ignores.
        headers = {
            "persistent": "true",
            "ttl": str(RESULT_TTL_MS),
            "vo": "eic",
            "msg_type": "slice_result",
            "run_id": run.run_id,
            "client-id": self._client_id,
            "id": self._client_id,
            "ack": "auto",
        }
        if self.result_ttl_ms is not None:
            headers["expires"] = str(int(time.time() * 1000) + self.result_ttl_ms)
        with self._state.lock:
            # Held after the slice is timed, so holding slows no slice down.
            self._state.wait_for(lambda: not self._holding or self._closing.is_set(), None)
            if self._holding:
                return  # the farm is shutting down while holding: the result is dropped
            self._sending += 1
        try:
            self._bus.send(self.results_queue, body, headers)
        finally:
            with self._state.lock:
                self._sending -= 1
                self._state.notify()
        with self._state.lock:
            run.slices_sent += 1
            run.failed_sent += int(failed)
            self._state.notify()

    def _beat(self) -> None:
        # swf-transform: each of a transformer's broker objects beats to its
        # own destination (results, broadcast topic, slice queue, the last
        # internal here), never to the workers topic; not persistent, and the
        # namespace header empty when the transformer has none.
        while not self._closing.wait(self.heartbeat_every):
            with self._state.lock:
                live = list(self._heartbeats.items())
            for transformer, namespace in live:
                for name, destination in (
                    ("ResultPublisher", self.results_queue),
                    ("TFBroadcastSubscriber", self.transformer_topic),
                ):
                    internal_id = f"{namespace}.{name}.{transformer}"
                    body = {
                        "msg_type": "heartbeat",
                        "internal_id": internal_id,
                        "namespace": namespace,
                        "timestamp": time.time(),
                    }
                    headers = {
                        "persistent": "false",
                        "vo": "eic",
                        "msg_type": "heartbeat",
                        "namespace": namespace or "",
                        "client-id": internal_id,
                        "id": internal_id,
                        "ack": "auto",
                    }
                    try:
                        self._bus.send(destination, body, headers)
                    except BusUnavailable as exc:  # a missed beat is what a real one would do
                        log.warning("heartbeat of %s not sent: %s", internal_id, exc)

    # --- stop_transformer (inbox worker thread) ------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = parse_message(delivery.body)
        except InvalidMessage as exc:
            with self._state.lock:
                self.invalid.append(str(exc))
            return
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(message)

    def _on_stop(self, message: StopTransformer) -> None:
        with self._state.lock:
            self.stop_messages.append(message)
            for run in self.runs.values():
                if str(message.run_id) != run.run_id:
                    continue  # another run's stop
                run.stop_messages_seen += 1
                # The real transformer: `if msg['run_id'] == self.run_id` with
                # an integer self.run_id. No coercion, on purpose.
                if message.run_id == run.started_with:
                    run.stopped = True
                else:
                    run.ignored_stops += 1
            self._state.notify()
