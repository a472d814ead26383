"""The control system (the testbed's fast-processing agent): announces runs
and ends them on /topic/panda.workers, and sends the transformers their
slices.

Two shapes (PROTOCOL.md): ``testbed`` is what the testbed really sends
(tests/real_messages/*.testbed.json: run_imminent_worker / end_run carrying
the upstream run message as content, naive timestamps with microseconds,
``persistent: false`` and no ttl, end_run also on a second topic, and the
announcement's ``core_count`` set from ``target_worker_count``, as the agent
does); ``seed`` is what the seed documents (run_imminent / run_end, ``Z``
timestamps). Run ids always go out as strings, as the testbed sends them.

Slices are always in the testbed's shape (slice.testbed.json): to the
transformers' destination (iDDS's transformer_broker; the testbed agent's own
constant names /topic/panda.slices, iDDS's sample configuration
/queue/panda.transformer.slices), ``persistent: true`` with a 12 h ttl and
the run id header the transformers select on.

The messages are built by pure methods (``announcement``, ``ending``,
``slice_message``), so tests compare them with the real ones field by field.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from swf_panda_workers.config.schema import Brokers
from swf_testbed.peers._bus import PeerBus, naive_iso, peer_headers, zulu_iso

Shape = Literal["testbed", "seed"]

SENDER = "fast_processing-agent-sim"  # the agent that sends (the body's sender)
UPSTREAM_SENDER = "workflow_runner-agent-sim"  # the run's origin (the content's sender)
SLICES_DESTINATION = "/queue/panda.transformer.slices"
SLICE_TTL_MS = 12 * 3600 * 1000  # the agent's ttl on slices
TFS_PER_SLICE = 2  # time frames per slice, as in the agent's example


@dataclass(frozen=True)
class ControlMessage:
    """A message as the control system sends it."""

    destination: str
    headers: dict[str, str]
    body: dict[str, Any]


def _microseconds() -> str:
    return naive_iso(timespec="microseconds")


class ControlSystem:
    """Sends run announcements, ends and slices; subscribes to nothing."""

    def __init__(
        self,
        brokers: Brokers,
        namespace: str,
        workers_topic: str = "/topic/panda.workers",
        extra_end_topic: str = "/topic/epictopic",
        slices_destination: str = SLICES_DESTINATION,
    ) -> None:
        self.namespace = namespace
        self.workers_topic = workers_topic
        self.extra_end_topic = extra_end_topic
        self.slices_destination = slices_destination
        self._bus = PeerBus(brokers, name=f"sim-control-{namespace}")
        self._ticks = itertools.count(1)

    def start(self) -> ControlSystem:
        self._bus.start()
        return self

    def stop(self) -> None:
        self._bus.stop()

    def resync(self, timeout: float) -> bool:
        """True once this peer's connection is live again (after a broker restart)."""
        return self._bus.resync(timeout)

    def __enter__(self) -> ControlSystem:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- sending ----------------------------------------------------------------

    def announce(
        self,
        run_id: str,
        shape: Shape,
        target_workers: int = 3,
        core_count: int = 1,
        memory_per_core: int = 2000,
        site: str = "BNL-OSG",
        slice_processing_time: float = 30,
    ) -> dict[str, Any]:
        """Announce a run; returns the body sent. In the testbed shape
        ``core_count`` is not sent: the agent sends target_workers there."""
        return self._send(
            self.announcement(
                run_id,
                shape,
                target_workers,
                core_count,
                memory_per_core,
                site,
                slice_processing_time,
            )
        )

    def end(self, run_id: str, shape: Shape, duplicate: bool = False) -> dict[str, Any]:
        """End a run; returns the (last) body sent. The testbed sends end_run
        to the workers topic and to ``extra_end_topic``; ``duplicate`` sends it
        twice to the workers topic, to exercise the receiver's dedupe."""
        message = self.ending(run_id, shape)
        body = self._send(message)
        if shape == "seed":
            return body
        if duplicate:
            self._send(message)
        self._send(ControlMessage(self.extra_end_topic, message.headers, message.body))
        return body

    def send_slices(
        self,
        run_id: str,
        count: int,
        *,
        rate: float | None = None,
        first: int = 0,
        slices_per_stf: int | None = None,
        destination: str | None = None,
    ) -> list[dict[str, Any]]:
        """Send slices ``first``..``first+count-1`` of a run, all at once
        (``rate`` None) or ``rate`` per second (paced from the first send, so
        slow sends do not stretch the run); returns the bodies sent. Slices
        number from 0 within each super-time-frame of ``slices_per_stf``
        (None: all in one, so slice_id is the slice's number in the run)."""
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        started = time.monotonic()
        bodies = []
        for i in range(count):
            if rate is not None and i:
                wait = started + i / rate - time.monotonic()
                if wait > 0 and not self._bus.pause(wait):
                    break  # stopped
            number = first + i
            stf, slice_id = divmod(number, slices_per_stf) if slices_per_stf else (0, number)
            bodies.append(
                self._send(
                    self.slice_message(run_id, slice_id, stf=stf + 1, destination=destination)
                )
            )
        return bodies

    def send_slices_in_background(
        self,
        run_id: str,
        count: int,
        *,
        rate: float,
        first: int = 0,
        slices_per_stf: int | None = None,
        destination: str | None = None,
    ) -> threading.Thread:
        """``send_slices`` on a thread of its own (join it to wait for the last)."""
        thread = threading.Thread(
            target=self.send_slices,
            args=(run_id, count),
            kwargs={
                "rate": rate,
                "first": first,
                "slices_per_stf": slices_per_stf,
                "destination": destination,
            },
            name=f"slices-{run_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _send(self, message: ControlMessage) -> dict[str, Any]:
        self._bus.send(message.destination, message.body, message.headers)
        return message.body

    # --- the messages (pure but for the clock, the tick and req_id) -----------------

    def announcement(
        self,
        run_id: str,
        shape: Shape,
        target_workers: int = 3,
        core_count: int = 1,
        memory_per_core: int = 2000,
        site: str = "BNL-OSG",
        slice_processing_time: float = 30,
    ) -> ControlMessage:
        if shape == "testbed":
            # The agent forwards the whole upstream run_imminent and adds the
            # worker fields, core_count from target_worker_count; it has no
            # memory or site fields.
            content: dict[str, Any] = {
                **self._upstream("run_imminent", run_id, state="beam", substate="not_ready"),
                "core_count": target_workers,
                "target_worker_count": target_workers,
                "slice_processing_time": slice_processing_time,
                "worker_rampup_time": 300,
                "worker_rampdown_time": 60,
            }
            return self._testbed(self.workers_topic, "run_imminent_worker", run_id, content)
        content = {
            "num_workers": target_workers,
            "num_cores_per_worker": core_count,
            "num_ram_per_core": memory_per_core,
            "site": site,
        }
        return self._seed(self.workers_topic, "run_imminent", run_id, content)

    def ending(self, run_id: str, shape: Shape) -> ControlMessage:
        if shape == "seed":
            return self._seed(self.workers_topic, "run_end", run_id, {"run_id": run_id})
        # The upstream end_run carries no state, and the run's count of files.
        content = {**self._upstream("end_run", run_id), "total_stf_files": 10}
        return self._testbed(self.workers_topic, "end_run", run_id, content)

    def slice_message(
        self, run_id: str, slice_id: int, *, stf: int = 1, destination: str | None = None
    ) -> ControlMessage:
        """Slice ``slice_id`` of super-time-frame ``stf`` of a run, as the
        fast-processing agent sends it."""
        start = slice_id * TFS_PER_SLICE
        stf_file = f"swf.{run_id}.{stf:06d}.stf"
        content = {
            "run_id": run_id,
            "execution_id": self._execution_id(run_id),
            "req_id": str(uuid.uuid4()),
            "filename": stf_file,
            "tf_filename": f"swf.{run_id}.{stf:06d}_tf_001_slice_{slice_id:03d}.tf",
            "slice_id": slice_id,
            "start": start,
            "end": start + TFS_PER_SLICE - 1,
            "tf_count": TFS_PER_SLICE,
            "state": "queued",
            "substate": "new",
        }
        where = destination or self.slices_destination
        return self._testbed(where, "slice", run_id, content, persistent=True, ttl_ms=SLICE_TTL_MS)

    def _upstream(self, msg_type: str, run_id: str, **state: str) -> dict[str, Any]:
        """The upstream run message the testbed agent forwards as content."""
        return {
            "msg_type": msg_type,
            "namespace": self.namespace,
            "execution_id": self._execution_id(run_id),
            "run_id": run_id,
            "timestamp": _microseconds(),
            **state,
            "simulation_tick": float(next(self._ticks)),
            "sender": UPSTREAM_SENDER,
        }

    @staticmethod
    def _execution_id(run_id: str) -> str:
        return f"sim-exec-{run_id}"

    def _testbed(
        self,
        destination: str,
        msg_type: str,
        run_id: str,
        content: dict[str, Any],
        persistent: bool = False,
        ttl_ms: int | None = None,
    ) -> ControlMessage:
        # The agent's send_message: persistent false and no ttl unless asked.
        headers = {
            "persistent": "true" if persistent else "false",
            "vo": "eic",
            "msg_type": msg_type,
            "namespace": self.namespace,
            "run_id": run_id,
        }
        if ttl_ms is not None:
            headers["ttl"] = str(ttl_ms)
        body = {
            "msg_type": msg_type,
            "run_id": run_id,
            "created_at": _microseconds(),
            "content": content,
            "sender": SENDER,
            "namespace": self.namespace,
        }
        return ControlMessage(destination, headers, body)

    def _seed(
        self, destination: str, msg_type: str, run_id: str, content: dict[str, Any]
    ) -> ControlMessage:
        body = {
            "msg_type": msg_type,
            "run_id": run_id,
            "created_at": zulu_iso(),
            "namespace": self.namespace,
            "sender": SENDER,
            "content": content,
        }
        return ControlMessage(destination, peer_headers(msg_type, run_id, self.namespace), body)
