"""A run's stored events, read from the Prefect server: a page at a time,
stream batches unpacked into their messages, each message once.

The run flow's state is a fold over its run's events (``fold_history``), so
a retried flow run rebuilds it from what is stored.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta

from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.events.filters import (
    EventAnyResourceFilter,
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
)

from swf_panda_workers.adapters.prefect_events.outage import (
    OUTAGE_TOLERANCE,
    RETRY_EVERY,
    SERVER_ERRORS,
    server_trouble,
)
from swf_panda_workers.adapters.prefect_events.schema import (
    RUN_EVENT_PREFIXES,
    decode,
    unpacked,
)
from swf_panda_workers.core.run_state import RunState, apply
from swf_panda_workers.core.timestamps import plain_utc, utc_now

log = logging.getLogger(__name__)

PAGE_LIMIT = 50  # the most the events API returns per request

# Events are stamped when the listener receives them; a run's history is read
# from a little before its announcement, so clock skew between hosts loses nothing.
HISTORY_MARGIN = timedelta(minutes=10)


def history_start(announced_at: datetime) -> datetime:
    return announced_at - HISTORY_MARGIN


def run_filter(resource_id: str, since: datetime, exclude: tuple[str, ...] = ()) -> EventFilter:
    """The filter of a run's events (``RUN_EVENT_PREFIXES``, its own or stream
    batches related to it) since ``since``, less the names starting with one
    of ``exclude``."""
    return EventFilter(
        any_resource=EventAnyResourceFilter(id=[resource_id]),
        event=EventNameFilter(
            prefix=list(RUN_EVENT_PREFIXES), exclude_prefix=list(exclude) or None
        ),
        occurred=EventOccurredFilter(since=since, until=utc_now() + timedelta(days=3650)),
        order=EventOrder.ASC,
    )


async def stored_events(
    resource_id: str, since: datetime, exclude: tuple[str, ...] = ()
) -> AsyncIterator[list[Event]]:
    """The run's stored events, stream batches unpacked, each message once,
    oldest first, a page at a time (a long run has tens of thousands: never
    all in memory at once), less the event names starting with one of
    ``exclude``."""
    read = _OnceEach(resource_id, exclude)
    async with get_client() as client:
        page = await client.read_events(
            filter=run_filter(resource_id, since, exclude), limit=PAGE_LIMIT
        )
        yield read.new(page.events)
        while page.next_page is not None:
            page = await client.read_events_page(str(page.next_page))
            yield read.new(page.events)


class _OnceEach:
    """A run's events from pages of stored events: batches unpacked, and each
    message once (one redelivered into a second batch is stored twice)."""

    def __init__(self, resource_id: str, exclude: tuple[str, ...]) -> None:
        self.resource_id = resource_id
        self.exclude = exclude
        self.seen: set[uuid.UUID] = set()

    def new(self, events: Iterable[Event]) -> list[Event]:
        found = []
        for stored in events:
            for event in unpacked(stored, self.resource_id):
                if event.id not in self.seen and not event.event.startswith(self.exclude):
                    self.seen.add(event.id)
                    found.append(event)
        return found


async def run_history(
    resource_id: str, since: datetime, exclude: tuple[str, ...] = ()
) -> list[Event]:
    """The run's stored events, oldest first, as one list."""
    return [event async for page in stored_events(resource_id, since, exclude) for event in page]


async def fold_history(state: RunState, resource_id: str, since: datetime) -> RunState:
    """``state`` folded over the run's whole stored history, a page at a time:
    the slices of every message the listener acked, whatever the live streams
    dropped or delivered late (a result sent just before the end)."""
    async for page in stored_events(resource_id, since):
        for event in page:
            item = decode(event)
            if item is not None:
                state = apply(item, state, plain_utc(event.occurred))
    return state


async def history_when_reachable(
    resource_id: str, since: datetime, exclude: tuple[str, ...]
) -> list[Event]:
    """The run's stored history, waiting out a server outage (up to OUTAGE_TOLERANCE)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OUTAGE_TOLERANCE
    while True:
        try:
            return await run_history(resource_id, since, exclude)
        except SERVER_ERRORS as exc:
            if not server_trouble(exc) or loop.time() > deadline:
                raise
            log.warning("history of %s not readable yet (%s); retrying", resource_id, exc)
            await asyncio.sleep(RETRY_EVERY)
