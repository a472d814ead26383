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

A run's stream (slice results, heartbeats: hundreds a second) comes in
batches: the listener puts the stream messages of its namespace that arrive
within a few tens of milliseconds, of any runs, in one event (``stream_event``)
related to each of those runs. The server's work is per event, whatever its
size, and it was most of the system's cost. Each message in a batch keeps the
id its own event would have had; readers unpack a batch into those per-message
events (``unpacked``) and drop repeats by id, so a message redelivered into
another batch, or received by two replicas, still counts once.

A Prefect server restart under a running flow (measured with Prefect 3.8.8):
the events websocket drops, and Prefect's subscriber gives up after its few
reconnection attempts (or ends quietly on a clean close), which used to fail
the flow run; its one retry then rebuilt the state. Now ``follow_run`` opens a
new subscription until the server is back (OUTAGE_TOLERANCE at most) and reads
the whole history again, so the flow-run process waits the outage out. Each
journal entry is read back before the flow goes on (``until_stored``), and
emitted again until it is: a server that stops before its persister flushes
loses what it held in memory, and an effect whose journal entry was lost
would be repeated by a later attempt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.events import Event, emit_event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import (
    EventAnyResourceFilter,
    EventFilter,
    EventIDFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
)
from prefect.events.schemas.events import Resource
from websockets.exceptions import WebSocketException

from swf_panda_workers.core.idds_gateway import Answer
from swf_panda_workers.core.messages import InvalidMessage, Message, parse_message
from swf_panda_workers.core.run_state import Effect, RunState, apply
from swf_panda_workers.core.timestamps import plain_utc, utc_now

log = logging.getLogger(__name__)

MESSAGE_EVENT = "swf.bus."  # + msg_type
ANSWER_EVENT = "swf.idds."  # + msg_type: iDDS's REST answers, shaped as its bus replies
EFFECT_EVENT = "swf.effect."  # + effect kind
STREAM_EVENT = "swf.stream.batch"  # several stream messages of a namespace
STREAM_PREFIX = "swf.stream."
# The messages that come by the hundred a second, batched (STREAM_EVENT).
STREAM_TYPES = frozenset({"slice_result", "heartbeat", "transformer_heartbeat"})
RUN_ROLE = "swf-run"  # a run's role among a stream batch's related resources
LISTENER_LABEL = "swf.listener"  # resource label: the listener that received the message
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


def message_event_id(namespace: str, delivery_key: str) -> uuid.UUID:
    """The event id of a received message: the same each time it is delivered."""
    return uuid.uuid5(_IDS, f"{namespace}|{delivery_key}")


def message_event(
    body: dict[str, Any],
    msg_type: str,
    namespace: str,
    run_id: str | None,
    delivery_key: str,
    flow_run_id: uuid.UUID | None = None,
    listener: str | None = None,
) -> Event:
    """A received bus message as an event of its run (or of the namespace,
    for heartbeats that name no run). ``listener``: the listener that handed
    it over (a label; it is not part of the id, so replicas that both receive
    a topic message make the same event, stored once)."""
    resource = (
        _run_resource(namespace, run_id) if run_id
        else {"prefect.resource.id": namespace_resource_id(namespace), "swf.namespace": namespace}
    )
    if listener is not None:
        resource[LISTENER_LABEL] = listener
    return Event(
        id=message_event_id(namespace, delivery_key),
        occurred=utc_now(),
        event=message_event_name(msg_type),
        resource=resource,
        related=_flow_run_related(flow_run_id),
        payload={"message": body},
    )


@dataclass(frozen=True)
class StreamMessage:
    """A stream message of a run as the listener received it, for a batch."""

    msg_type: str
    run_id: str
    delivery_key: str  # the broker's message id
    body: dict[str, Any]
    received: datetime
    flow_run_id: uuid.UUID | None = None  # the run's flow run, when the listener knows it


# What the server accepts: at most 100 related resources (two per run: the
# run and its flow run), 1.5 MB of JSON.
STREAM_MAX_RUNS = 40
STREAM_MAX_MESSAGES = 500


def stream_event(messages: Sequence[StreamMessage], namespace: str,
                 listener: str | None = None) -> Event:
    """Stream messages of one or more runs (at most STREAM_MAX_RUNS) in one
    event of the namespace, related to each of the runs and their flow runs
    (the Prefect UI shows it on theirs). It occurred when its first message
    was received: a run's history, read from its announcement on, never
    misses it."""
    flow_runs = {m.run_id: m.flow_run_id for m in messages}
    runs = sorted(flow_runs)
    if len(runs) > STREAM_MAX_RUNS:
        raise ValueError(f"a stream batch holds at most {STREAM_MAX_RUNS} runs, not {len(runs)}")
    resource = {"prefect.resource.id": namespace_resource_id(namespace),
                "swf.namespace": namespace}
    if listener is not None:
        resource[LISTENER_LABEL] = listener
    ids = [message_event_id(namespace, m.delivery_key) for m in messages]
    return Event(
        id=uuid.uuid5(_IDS, "|".join(map(str, ids))),
        occurred=min(m.received for m in messages),
        event=STREAM_EVENT,
        resource=resource,
        related=[related for run_id in runs for related in (
            {"prefect.resource.id": run_resource_id(namespace, run_id),
             "prefect.resource.role": RUN_ROLE}, *_flow_run_related(flow_runs[run_id]))],
        payload={"messages": [
            {"id": str(event_id), "msg_type": m.msg_type, "run_id": m.run_id,
             "received": m.received.isoformat(), "message": m.body}
            for event_id, m in zip(ids, messages, strict=True)]},
    )


def unpacked(event: Event, resource_id: str | None = None) -> list[Event]:
    """``event`` as the per-message events a run reads: a stream batch's
    messages (of the run ``resource_id`` only, if given), each as the event
    the listener would have made of it alone; any other event as it is."""
    if event.event != STREAM_EVENT:
        return [event]
    namespace = event.resource.get("swf.namespace") or ""
    listener = event.resource.get(LISTENER_LABEL)
    found = []
    for item in event.payload.get("messages", ()):
        resource = _run_resource(namespace, str(item["run_id"]))
        if resource_id is not None and resource["prefect.resource.id"] != resource_id:
            continue
        if listener is not None:
            resource[LISTENER_LABEL] = listener
        # Built unchecked: the batch was checked as a whole, and a busy run
        # unpacks hundreds a second.
        found.append(Event.model_construct(
            id=uuid.UUID(item["id"]), occurred=datetime.fromisoformat(item["received"]),
            event=message_event_name(item["msg_type"]),
            resource=Resource.model_construct(root=resource), related=[],
            payload={"message": item["message"]}))
    return found


STALL_EVENT = "swf.run.stalled"  # not among a run's inputs: a report for operators


def stall_event(namespace: str, run_id: str, waiting_for: str, idle_seconds: float,
                flow_run_id: uuid.UUID | None) -> Event:
    """A run that made no progress for ``idle_seconds``, waiting for ``waiting_for``."""
    return Event(
        occurred=utc_now(),
        event=STALL_EVENT,
        resource=_run_resource(namespace, run_id),
        related=_flow_run_related(flow_run_id),
        payload={"waiting_for": waiting_for, "idle_seconds": round(idle_seconds, 1)},
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


async def stored_ids(client: PrefectClient, candidates: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these events the server has written to its database: only
    those are safe to acknowledge on the bus. ``client`` is reused by the
    caller: a new one per call costs a TLS context, which profiling showed
    was a fifth of the listener's time."""
    wanted = list(candidates)
    found: set[uuid.UUID] = set()
    for start in range(0, len(wanted), PAGE_LIMIT):
        chunk = wanted[start:start + PAGE_LIMIT]
        page = await client.read_events(
            filter=EventFilter(id=EventIDFilter(id=chunk)), limit=len(chunk)
        )
        found.update(event.id for event in page.events)
    return found


# Events are stamped when the listener receives them; a run's history is read
# from a little before its announcement, so clock skew between hosts loses nothing.
HISTORY_MARGIN = timedelta(minutes=10)


def history_start(announced_at: datetime) -> datetime:
    return announced_at - HISTORY_MARGIN


# Every event a run's feed is made of: what the listener heard (alone, or in
# stream batches), what the flow did, and iDDS's REST answers (without them a
# retried REST flow run never learns the ids an earlier attempt got, and
# waits for a reply that REST mode never sends).
RUN_EVENT_PREFIXES = (MESSAGE_EVENT, STREAM_PREFIX, EFFECT_EVENT, ANSWER_EVENT)
# A run's stream, alone or batched: what a reader that wants none of it excludes.
STREAM_EVENTS = (*sorted(message_event_name(t) for t in STREAM_TYPES), STREAM_PREFIX)


def run_filter(resource_id: str, since: datetime, exclude: tuple[str, ...] = ()) -> EventFilter:
    """The filter of a run's events (``RUN_EVENT_PREFIXES``, its own or stream
    batches related to it) since ``since``, less the names starting with one
    of ``exclude``."""
    return EventFilter(
        any_resource=EventAnyResourceFilter(id=[resource_id]),
        event=EventNameFilter(prefix=list(RUN_EVENT_PREFIXES),
                              exclude_prefix=list(exclude) or None),
        occurred=EventOccurredFilter(since=since, until=utc_now() + timedelta(days=3650)),
        order=EventOrder.ASC,
    )


async def stored_events(resource_id: str, since: datetime,
                        exclude: tuple[str, ...] = ()) -> AsyncIterator[list[Event]]:
    """The run's stored events, stream batches unpacked, each message once,
    oldest first, a page at a time (a long run has tens of thousands: never
    all in memory at once), less the event names starting with one of
    ``exclude``."""
    read = _OnceEach(resource_id, exclude)
    async with get_client() as client:
        page = await client.read_events(filter=run_filter(resource_id, since, exclude),
                                        limit=PAGE_LIMIT)
        yield read.new(page.events)
        while page.next_page is not None:
            page = await client.read_events_page(page.next_page)
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


async def run_history(resource_id: str, since: datetime,
                      exclude: tuple[str, ...] = ()) -> list[Event]:
    """The run's stored events, oldest first, as one list."""
    return [event async for page in stored_events(resource_id, since, exclude)
            for event in page]


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


class JournalNotStored(RuntimeError):
    """The server did not store a journal event in time: the effect it records
    cannot be proven done, so the flow run must not go on as if it were."""


def emit(event: Event) -> None:
    """Hand an event to this process's events worker (fire and forget)."""
    emit_event(event=event.event, resource=event.resource.root, occurred=event.occurred,
               related=[r.root for r in event.related], payload=event.payload, id=event.id)


# How long a run flow waits out an unreachable Prefect server before giving
# up: its feed fails (the flow run fails and Prefect retries it) and an
# unconfirmed journal entry fails the effect that wrote it.
OUTAGE_TOLERANCE = 900.0
JOURNAL_CONFIRM_EVERY = 0.5  # s between read-backs of a journal entry
JOURNAL_REEMIT_AFTER = 15.0  # s a journal entry may stay unstored before it is emitted again
# What a call to an unreachable or restarting server raises.
SERVER_TROUBLE: tuple[type[BaseException], ...] = (
    httpx.TransportError, OSError, TimeoutError, WebSocketException,
)


def server_trouble(exc: BaseException) -> bool:
    """The server is unreachable, restarting or failing: waiting may cure it."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    if isinstance(exc, SERVER_TROUBLE):
        return True
    # The subscriber reports a socket closed during its handshake as a bare
    # Exception raised from the ConnectionClosed.
    return isinstance(exc.__cause__, WebSocketException)


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
            except (httpx.HTTPError, *SERVER_TROUBLE) as exc:
                if not server_trouble(exc):
                    raise
                log.info("cannot read the journal back yet: %s", exc)
            if not waiting:
                return
            now = loop.time()
            if now > deadline:
                raise JournalNotStored(
                    f"Prefect did not store journal events {sorted(map(str, waiting))} "
                    f"within {timeout:g}s")
            if now - emitted_at > JOURNAL_REEMIT_AFTER:
                emitted_at = now
                for event in waiting.values():
                    emit(event)
            await asyncio.sleep(JOURNAL_CONFIRM_EVERY)


# How far back the feed remembers which events it yielded. Events come again
# only from re-reads of the stored history (the late sweeps at the start, the
# sweeps after a reconnect, which read from this far back), so an event older
# than this is dropped unread: the memory of a run open for hours stays
# bounded. The run flow's final count reads the whole history anyway.
SEEN_HORIZON = timedelta(seconds=OUTAGE_TOLERANCE) + timedelta(minutes=10)


class SeenEvents:
    """Ids of the events yielded within SEEN_HORIZON of the newest one."""

    def __init__(self) -> None:
        self._ids: set[uuid.UUID] = set()
        self._by_time: deque[tuple[datetime, uuid.UUID]] = deque()
        self._forgotten_up_to: datetime | None = None  # events up to it count as seen
        self._newest: datetime | None = None

    def __contains__(self, event: Event) -> bool:
        forgotten = self._forgotten_up_to
        return (forgotten is not None and plain_utc(event.occurred) <= forgotten) or (
            event.id in self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: uuid.UUID, occurred: datetime) -> None:
        if event_id in self._ids:
            return
        self._ids.add(event_id)
        # Plain datetimes: Prefect's event times are pendulum's, whose
        # arithmetic is slow, and this runs at every event.
        occurred = plain_utc(occurred)
        # Events arrive nearly in time order; one out of order only stays a
        # little longer than it must.
        self._by_time.append((occurred, event_id))
        self._newest = newest = occurred if self._newest is None else max(self._newest, occurred)
        while self._by_time and newest - self._by_time[0][0] > SEEN_HORIZON:
            when, oldest = self._by_time.popleft()
            self._ids.discard(oldest)
            self._forgotten_up_to = when


class RunFeed:
    """A run's events, each once: what was stored before, then what arrives.
    A ``finite`` feed is the stored history alone (a dry run of a recorded
    run): once it is read, nothing more comes."""

    def __init__(self, history: list[Event], live: asyncio.Queue[Event] | None = None,
                 finite: bool = False) -> None:
        self.finite = finite
        self._backlog: deque[Event] = deque(history)
        self._seen = SeenEvents()
        for event in history:
            self._seen.add(event.id, event.occurred)
        self._live: asyncio.Queue[Event] = live if live is not None else asyncio.Queue()
        self._source: asyncio.Task[None] | None = None
        self._late: asyncio.Task[None] | None = None  # the late history sweeps
        self._late_read = asyncio.Event()  # set once the first of them is read

    def backlog(self) -> tuple[Event, ...]:
        """The stored events not yielded yet."""
        return tuple(self._backlog)

    def mark_seen(self, event: Event) -> None:
        """An event this process emitted itself and has already applied."""
        self._seen.add(event.id, event.occurred)

    @property
    def remembered(self) -> int:
        """How many event ids the feed holds to drop repeats (bounded)."""
        return len(self._seen)

    @property
    def replaying(self) -> bool:
        return bool(self._backlog)

    @property
    def exhausted(self) -> bool:
        """A finite feed with nothing left to yield."""
        return self.finite and not self._backlog

    async def next(self, timeout: float) -> Event | None:
        """The next unseen event, or None if none arrives within ``timeout``
        (``timeout`` 0: none is waiting already)."""
        if self._backlog:
            return self._backlog.popleft()
        if self.finite:
            return None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._raise_if_source_failed()
            left = deadline - asyncio.get_running_loop().time()
            try:
                if not self._live.empty():
                    event = self._live.get_nowait()
                elif left <= 0:
                    return None
                else:
                    event = await asyncio.wait_for(self._live.get(), min(left, 1.0))
            except TimeoutError:
                continue
            if event not in self._seen:
                self._seen.add(event.id, event.occurred)
                return event
        return None

    async def settled(self) -> None:
        """Return once every event stored before the feed opened is in it: an
        event streamed just before the subscription and stored just after
        the first history read comes with the first late sweep (6 s after the
        feed opened, past the server's persister flush; at once, for a feed
        open longer than that)."""
        late = self._late
        if late is None:
            return
        read = asyncio.create_task(self._late_read.wait())
        try:
            await asyncio.wait({read, late}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            read.cancel()
        if late.done() and not late.cancelled() and late.exception() is not None:
            raise ConnectionError("the run's history could not be read") from late.exception()

    def _deliver(self, event: Event) -> None:
        self._live.put_nowait(event)

    def _raise_if_source_failed(self) -> None:
        # A subscription that gave up (server gone past OUTAGE_TOLERANCE) must
        # fail the flow run, so Prefect retries it, rather than leave it waiting.
        if self._source is not None and self._source.done():
            error = None if self._source.cancelled() else self._source.exception()
            raise ConnectionError("the run's event subscription ended") from error


# The server streams an event to subscribers and stores it a few seconds
# later (its persister flushes every 5 s by default). An event that arrived
# just before we subscribed is in neither the live stream nor the first
# history read, so the history is read again once it must be stored.
LATE_HISTORY_SWEEPS = (6.0, 15.0)
# After the subscription was cut off, the whole history is read again at
# once and then later: the listener emits again what a stopping server lost
# (after its REEMIT_AFTER, 30 s), with the time it first received it, which
# a new subscription's backfill window may not reach.
RECONNECT_HISTORY_SWEEPS = (0.0, 6.0, 15.0, 45.0)
RESUBSCRIBE_EVERY = 2.0  # s between attempts to subscribe again


@asynccontextmanager
async def follow_run(resource_id: str, since: datetime,
                     exclude: tuple[str, ...] = ()) -> AsyncIterator[RunFeed]:
    """Subscribe first, then read the history: an event stored between the
    two shows up in both and is yielded once.

    The live events come through this process's one subscription
    (``RunEventsHub``). It outlives a Prefect server restart: when it drops
    it is opened again, every RESUBSCRIBE_EVERY seconds, and the whole
    history is read again (events stored while it was cut off are in no live
    stream). The feed fails only when the server stayed unreachable for
    OUTAGE_TOLERANCE."""
    opened_at = utc_now()
    live: asyncio.Queue[Event] = asyncio.Queue()
    sweeps: set[asyncio.Task[None]] = set()

    async def sweep(start: datetime, delays: tuple[float, ...],
                    first_read: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        for number, delay in enumerate(delays):
            if number == 1 and first_read is not None:
                first_read.set()
            await asyncio.sleep(delay)
            give_up = loop.time() + OUTAGE_TOLERANCE
            while True:
                try:
                    async for page in stored_events(resource_id, start, exclude):
                        for event in page:
                            live.put_nowait(event)  # the feed drops what it has seen
                    break
                except (httpx.HTTPError, *SERVER_TROUBLE) as exc:
                    # A server just back may not answer yet: this read is what
                    # brings the events it stored meanwhile, so it is tried
                    # again, not skipped (the feed fails once the outage has
                    # lasted OUTAGE_TOLERANCE).
                    if not server_trouble(exc) or loop.time() > give_up:
                        raise
                    log.warning("history of %s not readable yet (%s); trying again in %gs",
                                resource_id, exc, RESUBSCRIBE_EVERY)
                    await asyncio.sleep(RESUBSCRIBE_EVERY)

    def start_sweep(start: datetime, delays: tuple[float, ...],
                    first_read: asyncio.Event | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(sweep(start, delays, first_read))
        sweeps.add(task)
        task.add_done_callback(sweeps.discard)
        return task

    def resubscribed() -> None:
        # What the feed still remembers, not the whole run: older events
        # would be dropped as seen anyway.
        start_sweep(max(since, utc_now() - SEEN_HORIZON), RECONNECT_HISTORY_SWEEPS)

    hub = RunEventsHub.of_this_loop()
    route = Route(resource_id, exclude, live.put_nowait, resubscribed)
    try:
        source = await hub.add(route)
        feed = RunFeed(await history_when_reachable(resource_id, since, exclude), live)
        feed._source = source
        feed._late = start_sweep(max(since, opened_at - timedelta(minutes=1)),
                                 LATE_HISTORY_SWEEPS, feed._late_read)
        yield feed
    finally:
        hub.remove(route)
        for background in list(sweeps):  # each removes itself when done
            background.cancel()
            with suppress(asyncio.CancelledError):
                await background


@dataclass(eq=False)
class Route:
    """Where the hub delivers one run's events: a feed of that run, less the
    event names starting with one of ``exclude``."""

    resource_id: str
    exclude: tuple[str, ...]
    deliver: Callable[[Event], None]
    resubscribed: Callable[[], None]  # the subscription was cut off and is open again

    def takes(self, event: Event) -> bool:
        return not event.event.startswith(self.exclude)


# Every run's events, whatever its namespace, and the stream batches related
# to runs: the hub's one filter.
ALL_RUNS = EventFilter(
    any_resource=EventAnyResourceFilter(id_prefix=["swf.run."]),
    event=EventNameFilter(prefix=list(RUN_EVENT_PREFIXES)),
)


class RunEventsHub:
    """One event subscription for all the runs followed in this process (one
    event loop), its events handed to each run's feeds by resource id.

    Why one: the server matches every event against every open subscription
    and sends it down each that matches. With a subscription per feed (two
    per run) that matching was the Prefect server's largest cost (36 % of
    its CPU with twenty runs at 200 results/s), and each subscription is one
    more websocket to keep open. Events of runs no feed here follows are
    dropped on arrival."""

    def __init__(self) -> None:
        self._routes: dict[str, list[Route]] = {}
        self._subscribed = asyncio.Event()
        self._source: asyncio.Task[None] | None = None

    @classmethod
    def of_this_loop(cls) -> RunEventsHub:
        loop = asyncio.get_running_loop()
        hub = _HUBS.get(loop)
        if hub is None:
            hub = _HUBS[loop] = cls()
        return hub

    async def add(self, route: Route) -> asyncio.Task[None]:
        """Deliver the run's events to ``route`` from now on; returns, once the
        subscription is open, the task that keeps it open (done: it gave up)."""
        self._routes.setdefault(route.resource_id, []).append(route)
        if self._source is None or self._source.done():
            self._subscribed.clear()
            self._source = asyncio.create_task(
                _keep_subscribed(ALL_RUNS, self._dispatch, self._on_subscribed),
                name="swf-run-events")
        try:
            await _first_subscription(self._subscribed, self._source)
        except BaseException:
            self.remove(route)
            raise
        return self._source

    def remove(self, route: Route) -> None:
        routes = self._routes.get(route.resource_id, [])
        if route in routes:
            routes.remove(route)
        if not routes:
            self._routes.pop(route.resource_id, None)

    @property
    def followed(self) -> int:
        """How many feeds take events now."""
        return sum(map(len, self._routes.values()))

    def _dispatch(self, received: Event) -> None:
        for event in unpacked(received):
            for route in self._routes.get(event.resource.id, ()):
                if route.takes(event):
                    route.deliver(event)

    def _on_subscribed(self, first: bool) -> None:
        self._subscribed.set()
        if not first:
            for routes in list(self._routes.values()):
                for route in list(routes):
                    route.resubscribed()


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RunEventsHub] = (
    weakref.WeakKeyDictionary())


@asynccontextmanager
async def recorded_run(resource_id: str, since: datetime,
                       exclude: tuple[str, ...] = ()) -> AsyncIterator[RunFeed]:
    """The run's stored history as a finite feed, without subscribing: what a
    dry run replays."""
    yield RunFeed(await history_when_reachable(resource_id, since, exclude), finite=True)


async def _keep_subscribed(event_filter: EventFilter, deliver: Callable[[Event], None],
                           on_subscribed: Callable[[bool], None]) -> None:
    """Keep one subscription open, opening a new one whenever it drops; raise
    once none could be opened for OUTAGE_TOLERANCE."""
    loop = asyncio.get_running_loop()
    first = True
    cut_off_since: float | None = None
    while True:
        try:
            # A copy: the subscriber rewrites its filter's time window.
            async with get_events_subscriber(filter=event_filter.model_copy(deep=True),
                                             reconnection_attempts=2) as subscriber:
                if cut_off_since is not None:
                    log.warning("event subscription open again after %.0fs",
                                loop.time() - cut_off_since)
                on_subscribed(first)
                first, cut_off_since = False, None
                async for event in subscriber:
                    deliver(event)
            reason: BaseException | str = "the server closed the event stream"
        except Exception as exc:
            if not server_trouble(exc):
                raise
            reason = exc
        if cut_off_since is None:
            log.warning("event subscription cut off (%s); subscribing again every %gs",
                        reason, RESUBSCRIBE_EVERY)
        else:
            log.debug("event subscription still cut off: %s", reason)
        cut_off_since = cut_off_since or loop.time()
        if loop.time() - cut_off_since > OUTAGE_TOLERANCE:
            raise ConnectionError(
                f"no event subscription for {OUTAGE_TOLERANCE:g}s: Prefect is unreachable")
        await asyncio.sleep(RESUBSCRIBE_EVERY)


async def _first_subscription(subscribed: asyncio.Event, source: asyncio.Task[None]) -> None:
    """Wait until the subscription is open (or has given up)."""
    opened = asyncio.create_task(subscribed.wait())
    try:
        await asyncio.wait({opened, source}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        opened.cancel()
    if source.done():
        source.result()  # raises what made it give up
        raise ConnectionError("the run's event subscription ended before it opened")


async def history_when_reachable(resource_id: str, since: datetime,
                                  exclude: tuple[str, ...]) -> list[Event]:
    """The run's stored history, waiting out a server outage (up to OUTAGE_TOLERANCE)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OUTAGE_TOLERANCE
    while True:
        try:
            return await run_history(resource_id, since, exclude)
        except (httpx.HTTPError, *SERVER_TROUBLE) as exc:
            if not server_trouble(exc) or loop.time() > deadline:
                raise
            log.warning("history of %s not readable yet (%s); retrying", resource_id, exc)
            await asyncio.sleep(RESUBSCRIBE_EVERY)
