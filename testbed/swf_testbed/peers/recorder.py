"""A witness on the topics: records every message for tests and the demo.

It subscribes to topics only (auto ack, no selector): a consumer on the
results queue would steal slice results from the service.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swf_panda_workers.adapters.stomp_bus import Delivery, Subscription
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.outbound import stop_run_ids
from swf_testbed.peers._bus import Notifier, PeerBus

# message type -> its column in summary_table
SUMMARY_COLUMNS = {
    "create_workflow_task": "create",
    "created_workflow_task": "created",
    "adjust_worker": "adjust",
    "adjusted_worker": "adjusted",
    "stop_transformer": "stop",
    "close_workflow_task": "close",
    "closed_workflow_task": "closed",
}


@dataclass(frozen=True)
class Recorded:
    destination: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.time)  # when it was received (epoch seconds)

    @property
    def msg_type(self) -> str:
        return str(self.body.get("msg_type", ""))


class BusRecorder:
    """Records (destination, headers, body) of everything on its topics."""

    def __init__(
        self,
        brokers: Brokers,
        topics: tuple[str, ...] = ("/topic/panda.workers", "/topic/panda.transformer"),
    ) -> None:
        for topic in topics:
            if not topic.startswith("/topic/"):
                raise ValueError(f"the recorder only listens to topics, not {topic}")
        self._topics = topics
        self._state = Notifier()
        self._records: list[Recorded] = []  # guarded by self._state.lock
        self._bus = PeerBus(
            brokers,
            name="sim-recorder",
            subscriptions=tuple(Subscription(t, ack="auto") for t in topics),
            handle=self._record,
        )

    def start(self) -> BusRecorder:
        self._bus.start()
        return self

    def stop(self) -> None:
        self._bus.stop()

    def resync(self, timeout: float) -> bool:
        """True once this peer's connection is live again (after a broker restart)."""
        return self._bus.resync(timeout)

    def __enter__(self) -> BusRecorder:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def records(self) -> list[Recorded]:
        with self._state.lock:
            return list(self._records)

    def of_type(self, msg_type: str, run_id: str | int | None = None) -> list[dict[str, Any]]:
        """Bodies of that type (and run: compared as text, whatever was sent)."""
        with self._state.lock:
            return [
                r.body
                for r in self._records
                if r.msg_type == msg_type
                and (run_id is None or str(r.body.get("run_id")) == str(run_id))
            ]

    def stop_forms(self, run_id: str) -> list[int | str]:
        """The run_id of each stop_transformer of the run, as sent. One stop
        is one message per form a real transformer obeys (``[N, "N"]`` for a
        numeric run id: outbound.stop_run_ids)."""
        return [body["run_id"] for body in self.of_type("stop_transformer", run_id)]

    def count(self, msg_type: str, run_id: str) -> int:
        """How many of that type went by for the run; stops counted whole."""
        if msg_type == "stop_transformer":
            return self.stops(run_id)
        return len(self.of_type(msg_type, run_id))

    def stops(self, run_id: str) -> int:
        """How many whole stops of the run went by (each in every form)."""
        forms = self.stop_forms(run_id)
        return min(forms.count(form) for form in stop_run_ids(run_id))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (woken by each new record) until ``predicate`` holds."""
        return self._state.wait_for(predicate, timeout)

    def settle(self, timeout: float) -> bool:
        """True once everything sent to the recorded topics before this call
        has been recorded: a marker sent after it on each topic came back
        (a topic delivers to one subscriber in the order the broker got the
        messages). The marker is a heartbeat naming no run and carrying no
        namespace header, which every peer and the service ignore."""
        marker = f"recorder-marker-{uuid.uuid4().hex}"
        for topic in self._topics:
            body = {
                "msg_type": "heartbeat",
                "internal_id": marker,
                "namespace": None,
                "timestamp": time.time(),
            }
            self._bus.send(topic, body, {"persistent": "false", "msg_type": "heartbeat"})

        def back() -> bool:
            seen = {r.destination for r in self._records if r.body.get("internal_id") == marker}
            return seen >= set(self._topics)

        return self._state.wait_for(back, timeout)

    def counts(self) -> dict[str, int]:
        with self._state.lock:
            return dict(Counter(r.msg_type for r in self._records))

    def summary_table(self, run_ids: Iterable[str]) -> str:
        """Per run, how many of each iDDS/transformer message went by (stops
        counted whole: a stop goes in each form a transformer obeys)."""
        headings = ("run_id", *SUMMARY_COLUMNS.values())
        rows = [headings] + [
            (
                str(run_id),
                *(
                    str(
                        self.stops(str(run_id))
                        if t == "stop_transformer"
                        else len(self.of_type(t, run_id))
                    )
                    for t in SUMMARY_COLUMNS
                ),
            )
            for run_id in run_ids
        ]
        return text_table(rows)

    def _record(self, delivery: Delivery) -> None:
        try:
            body = json.loads(delivery.body)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            # Kept anyway: a test may want to see that garbage went by.
            body = {"msg_type": "", "unparsed": delivery.body[:1000].decode(errors="replace")}
        with self._state.lock:
            self._records.append(Recorded(delivery.destination, delivery.headers, body))
            self._state.notify()


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns, the first row a heading underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
