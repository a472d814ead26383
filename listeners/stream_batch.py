"""The stream messages (slice results, heartbeats) waiting to go to Prefect
together, in one event (``stream_event``).

Prefect's server spends about the same on an event of one message as on one
of a hundred, and a run's stream comes by the hundred a second: a batch is
sent once its first message has waited ``window`` seconds, or at once when
it is full. The window is what a result may wait before its run flow sees
it: tens of milliseconds, under what a slow result may take to be acted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swf_panda_workers.adapters.prefect_events.schema import (
    STREAM_MAX_MESSAGES,
    STREAM_MAX_RUNS,
    StreamMessage,
)
from swf_panda_workers.adapters.stomp_bus import Delivery

WINDOW = 0.05  # s the first message of a batch waits for others


@dataclass
class StreamBatch:
    window: float = WINDOW
    max_messages: int = STREAM_MAX_MESSAGES
    max_runs: int = STREAM_MAX_RUNS
    messages: list[StreamMessage] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    _runs: set[str] = field(default_factory=set)
    _opened: float | None = None  # when its first message came (loop time)

    def __len__(self) -> int:
        return len(self.messages)

    def takes(self, run_id: str) -> bool:
        """Room for one more message of ``run_id``."""
        return len(self.messages) < self.max_messages and (
            run_id in self._runs or len(self._runs) < self.max_runs
        )

    def add(self, message: StreamMessage, delivery: Delivery, now: float) -> None:
        if not self.takes(message.run_id):
            raise ValueError(f"the batch has no room for a message of run {message.run_id}")
        if self._opened is None:
            self._opened = now
        self.messages.append(message)
        self.deliveries.append(delivery)
        self._runs.add(message.run_id)

    @property
    def full(self) -> bool:
        return len(self.messages) >= self.max_messages

    def due_in(self, now: float) -> float | None:
        """Seconds until the batch must go (0: now); None while it is empty."""
        if self._opened is None:
            return None
        if self.full:
            return 0.0
        return max(0.0, self._opened + self.window - now)

    def take(self) -> tuple[list[StreamMessage], list[Delivery]]:
        """Empty the batch, returning what it held."""
        taken = self.messages, self.deliveries
        self.messages, self.deliveries = [], []
        self._runs = set()
        self._opened = None
        return taken
