"""A run's live feed: its stored history, then what arrives, each event
once (``RunFeed``, opened by ``follow_run``), the live part through this
process's one event subscription (``RunEventsHub``).

The run flow reads its run's feed, so its state is a fold over the run's
events and a retried flow run rebuilds it.

A Prefect server restart under a running flow (measured with Prefect 3.8.8):
the events websocket drops, and Prefect's subscriber gives up after its few
reconnection attempts (or ends quietly on a clean close), which used to fail
the flow run; its one retry then rebuilt the state. Now ``follow_run`` opens a
new subscription until the server is back (OUTAGE_TOLERANCE at most) and reads
the whole history again, so the flow-run process waits the outage out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

from swf_panda_workers.adapters.prefect_events.history import (
    history_when_reachable,
    stored_events,
)
from swf_panda_workers.adapters.prefect_events.outage import (
    OUTAGE_TOLERANCE,
    RETRY_EVERY,
    SERVER_ERRORS,
    server_trouble,
)
from swf_panda_workers.adapters.prefect_events.schema import RUN_EVENT_PREFIXES, unpacked
from swf_panda_workers.core.timestamps import plain_utc, utc_now

log = logging.getLogger(__name__)

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
            event.id in self._ids
        )

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

    def __init__(
        self, history: list[Event], live: asyncio.Queue[Event] | None = None, finite: bool = False
    ) -> None:
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
                    # Not asyncio.wait_for: before Python 3.12 it drops a
                    # cancel that comes as the event arrives, and a run
                    # cancelled from Prefect would go on (busy streams make
                    # that likely).
                    async with asyncio.timeout(min(left, 1.0)):
                        event = await self._live.get()
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


@asynccontextmanager
async def follow_run(
    resource_id: str, since: datetime, exclude: tuple[str, ...] = ()
) -> AsyncIterator[RunFeed]:
    """Subscribe first, then read the history: an event stored between the
    two shows up in both and is yielded once.

    The live events come through this process's one subscription
    (``RunEventsHub``). It outlives a Prefect server restart: when it drops
    it is opened again, every RETRY_EVERY seconds, and the whole
    history is read again (events stored while it was cut off are in no live
    stream). The feed fails only when the server stayed unreachable for
    OUTAGE_TOLERANCE."""
    opened_at = utc_now()
    live: asyncio.Queue[Event] = asyncio.Queue()
    sweeps: set[asyncio.Task[None]] = set()

    async def sweep(
        start: datetime, delays: tuple[float, ...], first_read: asyncio.Event | None = None
    ) -> None:
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
                except SERVER_ERRORS as exc:
                    # A server just back may not answer yet: this read is what
                    # brings the events it stored meanwhile, so it is tried
                    # again, not skipped (the feed fails once the outage has
                    # lasted OUTAGE_TOLERANCE).
                    if not server_trouble(exc) or loop.time() > give_up:
                        raise
                    log.warning(
                        "history of %s not readable yet (%s); trying again in %gs",
                        resource_id,
                        exc,
                        RETRY_EVERY,
                    )
                    await asyncio.sleep(RETRY_EVERY)

    def start_sweep(
        start: datetime, delays: tuple[float, ...], first_read: asyncio.Event | None = None
    ) -> asyncio.Task[None]:
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
        feed._late = start_sweep(
            max(since, opened_at - timedelta(minutes=1)), LATE_HISTORY_SWEEPS, feed._late_read
        )
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
                name="swf-run-events",
            )
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
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def recorded_run(
    resource_id: str, since: datetime, exclude: tuple[str, ...] = ()
) -> AsyncIterator[RunFeed]:
    """The run's stored history as a finite feed, without subscribing: what a
    dry run replays."""
    yield RunFeed(await history_when_reachable(resource_id, since, exclude), finite=True)


async def _keep_subscribed(
    event_filter: EventFilter,
    deliver: Callable[[Event], None],
    on_subscribed: Callable[[bool], None],
) -> None:
    """Keep one subscription open, opening a new one whenever it drops; raise
    once none could be opened for OUTAGE_TOLERANCE."""
    loop = asyncio.get_running_loop()
    first = True
    cut_off_since: float | None = None
    while True:
        try:
            # A copy: the subscriber rewrites its filter's time window.
            async with get_events_subscriber(
                filter=event_filter.model_copy(deep=True), reconnection_attempts=2
            ) as subscriber:
                if cut_off_since is not None:
                    log.warning(
                        "event subscription open again after %.0fs", loop.time() - cut_off_since
                    )
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
            log.warning(
                "event subscription cut off (%s); subscribing again every %gs", reason, RETRY_EVERY
            )
        else:
            log.debug("event subscription still cut off: %s", reason)
        cut_off_since = cut_off_since or loop.time()
        if loop.time() - cut_off_since > OUTAGE_TOLERANCE:
            raise ConnectionError(
                f"no event subscription for {OUTAGE_TOLERANCE:g}s: Prefect is unreachable"
            )
        await asyncio.sleep(RETRY_EVERY)


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
