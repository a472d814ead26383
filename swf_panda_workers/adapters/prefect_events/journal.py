"""What this process emits to Prefect's events, and the read-back that
proves it stored: the listener acks a bus message only once its event is
stored, and the run flow goes on after an effect only once its journal entry
is (``until_stored``), emitting it again until it is: a server that stops
before its persister flushes loses what it held in memory, and an effect
whose journal entry was lost would be repeated by a later attempt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from typing import Protocol

from prefect.client.orchestration import get_client
from prefect.client.schemas.events import EventPage
from prefect.events import Event, emit_event
from prefect.events.filters import EventFilter, EventIDFilter

from swf_panda_workers.adapters.prefect_events.history import PAGE_LIMIT
from swf_panda_workers.adapters.prefect_events.outage import (
    OUTAGE_TOLERANCE,
    SERVER_ERRORS,
    server_trouble,
)

log = logging.getLogger(__name__)

JOURNAL_CONFIRM_EVERY = 0.5  # s between read-backs of a journal entry
JOURNAL_REEMIT_AFTER = 15.0  # s a journal entry may stay unstored before it is emitted again


class JournalNotStored(RuntimeError):
    """The server did not store a journal event in time: the effect it records
    cannot be proven done, so the flow run must not go on as if it were."""


def emit(event: Event) -> None:
    """Hand an event to this process's events worker (fire and forget)."""
    emit_event(
        event=event.event,
        resource=event.resource.root,
        occurred=event.occurred,
        related=[r.root for r in event.related],
        payload=event.payload,
        id=event.id,
    )


class EventReader(Protocol):
    """What ``stored_ids`` needs of a Prefect client: reading events back."""

    async def read_events(self, filter: EventFilter, limit: int) -> EventPage: ...


async def stored_ids(client: EventReader, candidates: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these events the server has written to its database: only
    those are safe to acknowledge on the bus. ``client`` is reused by the
    caller: a new one per call costs a TLS context, which profiling showed
    was a fifth of the listener's time."""
    wanted = list(candidates)
    found: set[uuid.UUID] = set()
    for start in range(0, len(wanted), PAGE_LIMIT):
        chunk = wanted[start : start + PAGE_LIMIT]
        page = await client.read_events(
            filter=EventFilter(id=EventIDFilter(id=chunk)), limit=len(chunk)
        )
        found.update(event.id for event in page.events)
    return found


async def until_stored(events: list[Event], timeout: float = OUTAGE_TOLERANCE) -> None:
    """Wait until the server has written ``events`` to its database (they read
    back from the events API), emitting again those it has not stored after
    JOURNAL_REEMIT_AFTER: a Prefect server that stops before its persister
    flushes loses what it had only in memory. Raises JournalNotStored after
    ``timeout``, waiting out server outages until then."""
    loop = asyncio.get_running_loop()
    waiting = {event.id: event for event in events}
    deadline = loop.time() + timeout
    emitted_at = loop.time()
    async with get_client() as client:
        while True:
            try:
                for event_id in await stored_ids(client, waiting):
                    waiting.pop(event_id)
            except SERVER_ERRORS as exc:
                if not server_trouble(exc):
                    raise
                log.info("cannot read the journal back yet: %s", exc)
            if not waiting:
                return
            now = loop.time()
            if now > deadline:
                raise JournalNotStored(
                    f"Prefect did not store journal events {sorted(map(str, waiting))} "
                    f"within {timeout:g}s"
                )
            if now - emitted_at > JOURNAL_REEMIT_AFTER:
                emitted_at = now
                for event in waiting.values():
                    emit(event)
            await asyncio.sleep(JOURNAL_CONFIRM_EVERY)
