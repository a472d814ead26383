"""The control system (the testbed's fast-processing agent): announces runs
and ends them on /topic/panda.workers.

Two shapes (PROTOCOL.md): ``testbed`` is what the testbed really sends
(run_imminent_worker / end_run, naive timestamps, end_run also on a second
topic); ``seed`` is what the seed documents (run_imminent / run_end, ``Z``
timestamps). Run ids always go out as strings, as the testbed sends them.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from swf_panda_workers.config import Brokers
from swf_panda_workers.peers._bus import PeerBus, naive_iso, peer_headers, zulu_iso

Shape = Literal["testbed", "seed"]

SENDER = "sim-control-system"


class ControlSystem:
    """Sends run announcements and ends; subscribes to nothing."""

    def __init__(
        self,
        brokers: Brokers,
        namespace: str,
        workers_topic: str = "/topic/panda.workers",
        extra_end_topic: str = "/topic/epictopic",
    ) -> None:
        self.namespace = namespace
        self.workers_topic = workers_topic
        self.extra_end_topic = extra_end_topic
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
        """Announce a run; returns the body sent."""
        if shape == "testbed":
            # The agent forwards the whole upstream run_imminent and adds the
            # worker fields; it has no memory or site fields.
            content: dict[str, Any] = {
                **self._upstream(run_id, state="run", substate="physics"),
                "core_count": core_count,
                "target_worker_count": target_workers,
                "slice_processing_time": slice_processing_time,
                "worker_rampup_time": 300,
                "worker_rampdown_time": 60,
            }
            return self._send(self.workers_topic, "run_imminent_worker", run_id, content, shape)
        content = {
            "num_workers": target_workers,
            "num_cores_per_worker": core_count,
            "num_ram_per_core": memory_per_core,
            "site": site,
        }
        return self._send(self.workers_topic, "run_imminent", run_id, content, shape)

    def end(self, run_id: str, shape: Shape, duplicate: bool = False) -> dict[str, Any]:
        """End a run; returns the (last) body sent. The testbed sends end_run
        to the workers topic and to ``extra_end_topic``; ``duplicate`` sends it
        twice to the workers topic, to exercise the receiver's dedupe."""
        if shape == "seed":
            return self._send(self.workers_topic, "run_end", run_id, {"run_id": run_id}, shape)
        content = self._upstream(run_id, state="end", substate="physics")
        body = self._send(self.workers_topic, "end_run", run_id, content, shape)
        if duplicate:
            self._send(self.workers_topic, "end_run", run_id, content, shape)
        self._send(self.extra_end_topic, "end_run", run_id, content, shape)
        return body

    def _upstream(self, run_id: str, state: str, substate: str) -> dict[str, Any]:
        """The upstream run message the testbed agent forwards as content."""
        return {
            "execution_id": f"sim-exec-{run_id}",
            "run_id": run_id,
            "state": state,
            "substate": substate,
            "timestamp": naive_iso(),
            "simulation_tick": next(self._ticks),
            "sender": SENDER,
        }

    def _send(self, destination: str, msg_type: str, run_id: str, content: dict[str, Any],
              shape: Shape) -> dict[str, Any]:
        body = {
            "msg_type": msg_type,
            "run_id": run_id,
            "created_at": naive_iso() if shape == "testbed" else zulu_iso(),
            "namespace": self.namespace,
            "sender": SENDER,
            "content": content,
        }
        self._bus.send(destination, body, peer_headers(msg_type, run_id, self.namespace))
        return body
