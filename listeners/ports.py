"""What the listener needs of each collaborator it is given, as Protocols:
the real ones (``BusClient``, ``RunStarter``, Prefect's events client and
client) fit them, and so do the unit tests' fakes, with no cast or ignore.
Only the calls the listener makes are here; the clients do more.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from prefect.events import Event

from swf_panda_workers.adapters.prefect_events.journal import EventReader
from swf_panda_workers.adapters.stomp_bus import Delivery, Subscription
from swf_panda_workers.core.messages import RunImminent

__all__ = ["Bus", "EventReader", "EventSink", "RunStarts"]


class Bus(Protocol):
    """The STOMP connection, once started (``BusClient``). Its calls block:
    the listener makes them off the event loop, on a worker thread."""

    @property
    def connected(self) -> threading.Event:
        """Set while the connection is up (the health check reads it)."""
        ...

    def send_raw(self, destination: str, body: bytes, headers: dict[str, str]) -> None:
        """Send ``body`` as is (the dead-letter copy); raises BusUnavailable."""
        ...

    def ack(self, delivery: Delivery) -> None: ...

    def subscribe(self, sub: Subscription) -> None: ...

    def unsubscribe(self, sub_id: str) -> None: ...


class RunStarts(Protocol):
    """Prefect's flow runs of the run deployment (``RunStarter``)."""

    async def start(
        self, run: RunImminent, namespace: str, announcement: dict[str, Any], received_at: datetime
    ) -> UUID:
        """The run's flow run, made once whatever the number of calls."""
        ...

    async def find(self, namespace: str, run_id: str) -> UUID | None:
        """The run's flow run, if some listener of the namespace started it."""
        ...

    async def active_runs(self, namespace: str) -> dict[str, UUID]:
        """Run id -> flow run, for the namespace's runs not yet finished."""
        ...


class EventSink(Protocol):
    """Prefect's events client (``get_events_client()``): sends one event."""

    async def emit(self, event: Event) -> None: ...
