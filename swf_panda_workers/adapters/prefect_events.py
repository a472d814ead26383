"""Prefect events as each run's durable inbox and journal.

Every bus message about a run becomes a Prefect event whose resource is the
run (``swf.run.<namespace>.<run_id>``); every effect the run flow performs
(create sent, adjust sent, ...) becomes one too. The run flow reads its run's
events (stored history first, then the live websocket), so its state is a
fold over them and a retried flow run rebuilds it. Operators see the same
events in the Prefect UI, linked to the run's flow run.

Event ids derive from the STOMP message id: a message the broker redelivers
(say, after a listener crash before its ack) maps to the same event, which the
server stores once and the feed yields once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import (
    EventFilter,
    EventIDFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)

from swf_panda_workers.idds_gateway import Answer
from swf_panda_workers.messages import InvalidMessage, Message, parse_message
from swf_panda_workers.run_state import Effect
from swf_panda_workers.timestamps import utc_now

log = logging.getLogger(__name__)

MESSAGE_EVENT = "swf.bus."  # + msg_type
ANSWER_EVENT = "swf.idds."  # + msg_type: iDDS's REST answers, shaped as its bus replies
EFFECT_EVENT = "swf.effect."  # + effect kind
PAGE_LIMIT = 50  # the most the events API returns per request
_IDS = uuid.UUID("5f0c6d8e-9a51-4a8e-9f65-2c1f3b8f2a10")  # namespace for uuid5 event ids


def message_event_name(msg_type: str) -> str:
    return MESSAGE_EVENT + msg_type


def run_resource_id(namespace: str, run_id: str) -> str:
    return f"swf.run.{namespace}.{run_id}"


def namespace_resource_id(namespace: str) -> str:
    return f"swf.namespace.{namespace}"


def _run_resource(namespace: str, run_id: str) -> dict[str, str]:
    return {
        "prefect.resource.id": run_resource_id(namespace, run_id),
        "prefect.resource.name": f"run {run_id}",
        "swf.namespace": namespace,
        "swf.run_id": run_id,
    }


def _flow_run_related(flow_run_id: uuid.UUID | None) -> list[dict[str, str]]:
    if flow_run_id is None:
        return []
    return [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
             "prefect.resource.role": "flow-run"}]


def message_event(
    body: dict[str, Any],
    msg_type: str,
    namespace: str,
    run_id: str | None,
    delivery_key: str,
    flow_run_id: uuid.UUID | None = None,
) -> Event:
    """A received bus message as an event of its run (or of the namespace,
    for heartbeats that name no run)."""
    resource = (
        _run_resource(namespace, run_id) if run_id
        else {"prefect.resource.id": namespace_resource_id(namespace), "swf.namespace": namespace}
    )
    return Event(
        id=uuid.uuid5(_IDS, f"{namespace}|{delivery_key}"),
        occurred=utc_now(),
        event=message_event_name(msg_type),
        resource=resource,
        related=_flow_run_related(flow_run_id),
        payload={"message": body},
    )


def effect_event(effect: Effect, namespace: str, run_id: str,
                 flow_run_id: uuid.UUID | None) -> Event:
    return Event(
        occurred=utc_now(),
        event=EFFECT_EVENT + effect.kind,
        resource=_run_resource(namespace, run_id),
        related=_flow_run_related(flow_run_id),
        payload={"effect": effect.model_dump(mode="json")},
    )


def answer_event(answer: Answer, namespace: str, flow_run_id: uuid.UUID | None) -> Event:
    """iDDS's REST answer, journaled like the reply message mode receives."""
    return Event(
        occurred=utc_now(),
        event=ANSWER_EVENT + answer.msg_type,
        resource=_run_resource(namespace, answer.run_id),
        related=_flow_run_related(flow_run_id),
        payload={"message": answer.model_dump(mode="json", exclude_none=True)},
    )


def decode(event: Event) -> Message | Effect | None:
    """The message or effect an event carries; None (logged) if it carries
    neither, e.g. an event some other tool attached to the run."""
    try:
        if event.event.startswith(EFFECT_EVENT):
            return Effect.model_validate(event.payload["effect"])
        if event.event.startswith((MESSAGE_EVENT, ANSWER_EVENT)):
            return parse_message(event.payload["message"])
    except (KeyError, InvalidMessage, ValueError) as exc:
        log.warning("event %s (%s) is unreadable: %s", event.id, event.event, exc)
        return None
    return None


async def stored_ids(candidates: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these events the server has written to its database: only
    those are safe to acknowledge on the bus."""
    wanted = list(candidates)
    found: set[uuid.UUID] = set()
    async with get_client() as client:
        for start in range(0, len(wanted), PAGE_LIMIT):
            chunk = wanted[start:start + PAGE_LIMIT]
            page = await client.read_events(
                filter=EventFilter(id=EventIDFilter(id=chunk)), limit=len(chunk)
            )
            found.update(event.id for event in page.events)
    return found


def _run_filter(resource_id: str, since: datetime, exclude: tuple[str, ...] = ()) -> EventFilter:
    return EventFilter(
        resource=EventResourceFilter(id=[resource_id]),
        event=EventNameFilter(prefix=[MESSAGE_EVENT, EFFECT_EVENT],
                              exclude_prefix=list(exclude) or None),
        occurred=EventOccurredFilter(since=since, until=utc_now() + timedelta(days=3650)),
        order=EventOrder.ASC,
    )


async def run_history(resource_id: str, since: datetime,
                      exclude: tuple[str, ...] = ()) -> list[Event]:
    """The run's stored events, oldest first, less the event names starting
    with one of ``exclude``."""
    events: list[Event] = []
    async with get_client() as client:
        page = await client.read_events(filter=_run_filter(resource_id, since, exclude),
                                        limit=PAGE_LIMIT)
        events.extend(page.events)
        while page.next_page is not None:
            page = await client.read_events_page(page.next_page)
            events.extend(page.events)
    return events


class RunFeed:
    """A run's events, each once: what was stored before, then what arrives."""

    def __init__(self, history: list[Event]) -> None:
        self.history = tuple(history)
        self._backlog: deque[Event] = deque(history)
        self._seen: set[uuid.UUID] = {event.id for event in history}
        self._live: asyncio.Queue[Event] = asyncio.Queue()
        self._source: asyncio.Task[None] | None = None

    def mark_seen(self, event_id: uuid.UUID) -> None:
        """An event this process emitted itself and has already applied."""
        self._seen.add(event_id)

    @property
    def replaying(self) -> bool:
        return bool(self._backlog)

    async def next(self, timeout: float) -> Event | None:
        """The next unseen event, or None if none arrives within ``timeout``."""
        if self._backlog:
            return self._backlog.popleft()
        deadline = asyncio.get_running_loop().time() + timeout
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            self._raise_if_source_failed()
            try:
                event = await asyncio.wait_for(self._live.get(), min(left, 1.0))
            except TimeoutError:
                continue
            if event.id not in self._seen:
                self._seen.add(event.id)
                return event
        return None

    def _deliver(self, event: Event) -> None:
        self._live.put_nowait(event)

    def _raise_if_source_failed(self) -> None:
        # A subscription that gave up (server gone past its retries) must fail
        # the flow run, so Prefect retries it, rather than leave it waiting.
        if self._source is not None and self._source.done():
            error = None if self._source.cancelled() else self._source.exception()
            raise ConnectionError("the run's event subscription ended") from error


# The server streams an event to subscribers and stores it a few seconds
# later (its persister flushes every 5 s by default). An event that arrived
# just before we subscribed is in neither the live stream nor the first
# history read, so the history is read again once it must be stored.
LATE_HISTORY_SWEEPS = (6.0, 15.0)


@asynccontextmanager
async def follow_run(resource_id: str, since: datetime,
                     exclude: tuple[str, ...] = ()) -> AsyncIterator[RunFeed]:
    """Subscribe first, then read the history: an event stored between the
    two shows up in both and is yielded once."""
    opened_at = utc_now()
    run_filter = _run_filter(resource_id, since, exclude)
    async with get_events_subscriber(filter=run_filter) as subscriber:
        pending: list[Event] = []
        feed_ready = asyncio.Event()
        feed: RunFeed | None = None

        async def pump() -> None:
            async for event in subscriber:
                if feed_ready.is_set() and feed is not None:
                    feed._deliver(event)
                else:
                    pending.append(event)

        async def sweep(target: RunFeed) -> None:
            recent = max(since, opened_at - timedelta(minutes=1))
            for delay in LATE_HISTORY_SWEEPS:
                await asyncio.sleep(delay)
                for event in await run_history(resource_id, recent, exclude):
                    target._deliver(event)  # the feed drops what it has seen

        pumping = asyncio.create_task(pump())
        sweeping: asyncio.Task[None] | None = None
        try:
            feed = RunFeed(await run_history(resource_id, since, exclude))
            feed._source = pumping
            for event in pending:
                feed._deliver(event)
            feed_ready.set()
            sweeping = asyncio.create_task(sweep(feed))
            yield feed
        finally:
            for background in (pumping, sweeping):
                if background is not None:
                    background.cancel()
                    with suppress(asyncio.CancelledError):
                        await background

