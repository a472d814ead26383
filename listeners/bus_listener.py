"""The STOMP listener: parse, route, hand off durably to Prefect, then ack.

- /topic/panda.workers, durably, with the namespace selector the peers use,
  widened to what iDDS answers in (its own namespace, or none);
- the results destination (``brokers.results_destination``), which carries no
  namespace (transformers started by iDDS send none):
  - a queue (the seed's /queue/panda.results.worker) may be shared by several
    namespaces: each listener takes only its own runs' results, one
    subscription per run it follows with the selector ``run_id = '<id>'``, and
    those naming no run (``run_id IS NULL``: heartbeats, and the results a
    transformer sends for a heartbeat it took off its slice queue);
  - a topic (swf-transform's /topic/panda.results) gives every subscriber
    every result: one durable subscription, and results of runs not ours are
    dropped.
  Only what transformers send is taken from it.

What to do with each delivery is decided by ``listeners.routing.decide``,
without I/O; this module carries the decision out.

Several replicas of one namespace may run at once (``transceiver.replica``),
each with its own client-id and durable subscription: each receives every
topic message and maps it to the same event id, which Prefect stores once; the
results queue gives each result to one of them; a run announced twice starts
one flow run (its idempotency key). A result of a run this replica has not
seen start is recorded if Prefect holds the run's flow run.

A message is acked only once what it caused is stored by Prefect: the run's
flow run exists (run_imminent), or the message's event is readable back from
the events API (everything else). The stream of slice results and heartbeats
goes in batches, several messages of the namespace per event
(``listeners.stream_batch``), each acked once its batch is stored; any other
message sends the batch waiting before it, so the events of one listener are
sent in the order their messages came. Until then it stays unacked, so a crash
means redelivery, never loss; redelivered messages map to the same event id.
Bad input is logged with its reason, copied to the dead-letter queue with the
reason in a header, and acked: it never stops the listener or another run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from prefect.events import Event
from websockets.exceptions import WebSocketException

from listeners.followed_runs import FollowedRuns
from listeners.metrics import Handoff, ListenerMetrics
from listeners.ports import Bus, EventReader, EventSink, RunStarts
from listeners.routing import (
    Decision,
    Ignore,
    Inbox,
    LookUpRun,
    Record,
    SetAside,
    StartRun,
    decide,
    one_line,
)
from listeners.stream_batch import StreamBatch
from swf_panda_workers.adapters.prefect_events.journal import stored_ids
from swf_panda_workers.adapters.prefect_events.schema import (
    STREAM_TYPES,
    StreamMessage,
    message_event,
    stream_event,
)
from swf_panda_workers.adapters.prefect_runs import DeploymentMissing, RunStarter
from swf_panda_workers.adapters.stomp_bus import (
    NO_RUN_SELECTOR,
    BusClient,
    BusUnavailable,
    Delivery,
    Subscription,
    run_selector,
    workers_selector,
)
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.timestamps import utc_now

log = logging.getLogger("swf.listener")

# Failures of the hand-off that a later attempt can cure (Prefect restarting,
# the runner not yet serving the run deployment).
HANDOFF_ERRORS: tuple[type[BaseException], ...] = (
    httpx.HTTPError,
    OSError,
    TimeoutError,
    WebSocketException,
    DeploymentMissing,
)
CONFIRM_EVERY = 0.25  # s between read-backs of emitted events
REEMIT_AFTER = 30.0  # s an event may stay unconfirmed before it is sent again
REEMIT_AT_MOST_EVERY = 240.0  # s: each re-send of one event waits twice the one before
FOREIGN_FOR = 30.0  # s a run found to be none of ours is not looked up again
FOREIGN_RUNS_KEPT = 10_000
RUNS_EVERY = 15.0  # s between counts of the namespace's runs in progress
RETRY_AFTER = 2.0  # s before a message whose hand-off failed is tried again
STARTERS = 4  # run starts made at once


@dataclass(frozen=True)
class ListenerHealth:
    """What the listener can say of itself, for health checks, metrics and the
    swf-monitor heartbeat."""

    listening: bool  # subscribed and taking messages (False while starting and stopping)
    bus_connected: bool
    prefect_reachable: bool  # the last count of runs in progress succeeded
    runs_active: int | None  # flow runs of the namespace not yet finished; None: not counted yet


@dataclass
class Pending:
    deliveries: tuple[Delivery, ...]  # acked once the event is stored
    event: Event  # kept to emit it again if the server loses it
    since: float  # when it was last emitted
    wait: float = REEMIT_AFTER  # how long it may stay unconfirmed from ``since``


Action = Callable[[Any, Delivery], Awaitable[None]]  # carries out one kind of Decision


@dataclass
class BusListener:
    """Its collaborators are typed by what it needs of them (``listeners.ports``);
    ``run`` makes the bus connection unless one is given (tests)."""

    settings: Settings
    runs: RunStarts
    events: EventSink
    prefect: EventReader | None = None  # reads emitted events back (the confirm loop)
    bus: Bus | None = None
    metrics: ListenerMetrics = field(default_factory=ListenerMetrics)
    owned: dict[str, UUID] = field(default_factory=dict)
    followed: FollowedRuns = field(init=False)
    _inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    _starts: asyncio.Queue[tuple[StartRun, Delivery]] = field(default_factory=asyncio.Queue)
    _pending: dict[UUID, Pending] = field(default_factory=dict)
    _stream: StreamBatch = field(default_factory=StreamBatch)
    _foreign: dict[str, float] = field(default_factory=dict)  # run id -> ignored until
    _retrying: set[str] = field(default_factory=set)  # message ids back in the inbox
    # message id -> the timer putting a message that waits back in the inbox
    _waiting: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _listening: bool = False
    _prefect_reachable: bool = False
    _runs_active: int | None = None

    def __post_init__(self) -> None:
        self.followed = FollowedRuns(self.settings.brokers.results_grace)

    @property
    def namespace(self) -> str:
        return self.settings.transceiver.namespace

    @property
    def inbox(self) -> Inbox:
        transceiver = self.settings.transceiver
        return Inbox(
            transceiver.namespace,
            self.settings.brokers.results_destination,
            transceiver.idds_namespace,
        )

    @property
    def listener_id(self) -> str:
        return self.settings.transceiver.listener_id

    def subscriptions(self) -> tuple[Subscription, ...]:
        """What the listener subscribes to from the start; on a results queue,
        each followed run's subscription comes and goes with it (``results_of``)."""
        brokers, transceiver = self.settings.brokers, self.settings.transceiver
        # Durable: run messages sent while the listener restarts wait for it.
        workers = Subscription(
            brokers.workers_topic,
            durable_name=self.listener_id,
            selector=workers_selector(transceiver.namespace, transceiver.idds_namespace),
        )
        if brokers.results_on_topic:
            return workers, Subscription(
                brokers.results_destination, durable_name=f"{self.listener_id}.results"
            )
        return workers, Subscription(
            brokers.results_destination, selector=NO_RUN_SELECTOR, name="results.no-run"
        )

    def results_of(self, run_id: str) -> Subscription:
        """One run's results on a shared results queue."""
        return Subscription(
            self.settings.brokers.results_destination,
            selector=run_selector(run_id),
            name=f"results.{run_id}",
        )

    def health(self) -> ListenerHealth:
        """A snapshot; safe to call from any thread."""
        bus = self.bus
        return ListenerHealth(
            listening=self._listening,
            bus_connected=bus is not None and bus.connected.is_set(),
            prefect_reachable=self._prefect_reachable,
            runs_active=self._runs_active,
        )

    def receive(self, delivery: Delivery) -> None:
        """Called on stomp.py's receiver thread: queue it and return."""
        self._loop.call_soon_threadsafe(self._inbox.put_nowait, delivery)

    async def run(self, stopping: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self.owned.update(await self._with_retry(lambda: self.runs.active_runs(self.namespace)))
        log.info(
            "namespace %s owns %d runs in progress: %s",
            self.namespace,
            len(self.owned),
            ", ".join(sorted(self.owned)) or "none",
        )
        for run_id in self.owned:
            self.followed.follow(run_id)
        per_run = (
            ()
            if self.settings.brokers.results_on_topic
            else tuple(self.results_of(run_id) for run_id in sorted(self.owned))
        )
        bus = BusClient(
            self.settings.brokers,
            (*self.subscriptions(), *per_run),
            self.receive,
            name=f"listener-{self.namespace}",
            client_id=self.listener_id,
        )
        self.bus = bus
        await asyncio.to_thread(bus.start)
        confirming = asyncio.create_task(self._confirm_forever())
        counting = asyncio.create_task(self._count_runs_forever())
        starters = [asyncio.create_task(self._start_forever()) for _ in range(STARTERS)]
        log.info("listening for namespace %s as %s", self.namespace, self.listener_id)
        self._listening = True
        try:
            while not stopping.is_set():
                due_in = self._stream.due_in(self._loop.time())
                try:
                    delivery = await asyncio.wait_for(
                        self._inbox.get(), timeout=0.5 if due_in is None else due_in
                    )
                except TimeoutError:
                    pass
                else:
                    await self.dispatch(delivery)
                if self._stream.due_in(self._loop.time()) == 0.0:
                    await self.send_stream()
        finally:
            self._listening = False
            # Starts not made stay unacked: the broker redelivers them.
            for background in (confirming, counting, *starters):
                background.cancel()
            for waiting in self._waiting.values():  # unacked: the broker redelivers them
                waiting.cancel()
            await asyncio.to_thread(bus.stop)

    # --- one message ------------------------------------------------------------

    async def dispatch(self, delivery: Delivery) -> None:
        """What the consumer loop does with a delivery: ``handle`` it, except a
        run start, which is queued for the starter (``_start_forever``). A
        start waits for Prefect to store a flow run, seconds on SQLite when
        runs are announced together, and the messages behind it (iDDS's reply
        to an earlier run's create, a run's end) must not wait with it."""
        decision = self._decided(delivery)
        if isinstance(decision, StartRun):
            self._starts.put_nowait((decision, delivery))
        else:
            await self._carry_out(decision, delivery)

    async def handle(self, delivery: Delivery) -> None:
        """Carry out what ``delivery`` calls for, whatever it is, at once: a
        stream message is sent without waiting for others to join it."""
        await self._carry_out(self._decided(delivery), delivery)
        await self.send_stream()

    def _decided(self, delivery: Delivery) -> Decision:
        decision = decide(delivery.body, delivery.headers, self.inbox, self.owned)
        if delivery.message_id in self._retrying:
            self._retrying.discard(delivery.message_id)  # counted when it first came
        else:
            self.metrics.received(delivery, decision)
        return decision

    async def _start_forever(self) -> None:
        """Start the announced runs in the order they came, STARTERS at once:
        a create mostly waits for SQLite's lock, held by other writers (the
        runner's starting flows), and one after another twenty runs
        announced together took 20 s to start."""
        while True:
            decision, delivery = await self._starts.get()
            await self._carry_out(decision, delivery)

    async def _carry_out(self, decision: Decision, delivery: Delivery) -> None:
        act = self._actions()[type(decision)]
        try:
            await act(decision, delivery)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                await self._retry_later(delivery, decision, exc)
            else:  # Prefect refuses this message: asking again would not help
                await self.set_aside(
                    SetAside(
                        one_line(f"Prefect refused it: {exc.response.text}", 500),
                        "prefect_refused",
                        getattr(decision, "message", None),
                    ),
                    delivery,
                )
        except HANDOFF_ERRORS as exc:
            await self._retry_later(delivery, decision, exc)

    async def _retry_later(
        self, delivery: Delivery, decision: Decision, exc: BaseException
    ) -> None:
        """Keep the message unacked and try it again in RETRY_AFTER seconds."""
        message = getattr(decision, "message", None)
        if isinstance(exc, DeploymentMissing):
            # Only this message must wait (the runner is not serving yet):
            # the loop goes on with the others meanwhile.
            log.warning(
                "msg_type=%s run_id=%s waits: %s; trying again in %g s",
                getattr(message, "msg_type", None),
                getattr(message, "run_id", None),
                exc,
                RETRY_AFTER,
            )
            self._waiting[delivery.message_id] = self._loop.call_later(
                RETRY_AFTER, self._try_again, delivery
            )
            return
        log.warning(
            "hand-off of %s for run %s failed (%s); retrying in %g s",
            getattr(message, "msg_type", None),
            getattr(message, "run_id", None),
            exc,
            RETRY_AFTER,
        )
        await self._pause_then_try_again((delivery,))

    async def _pause_then_try_again(self, deliveries: Iterable[Delivery]) -> None:
        """Prefect unreachable or failing: every other hand-off would fail
        alike, so the loop pauses with these rather than spin through them."""
        await asyncio.sleep(RETRY_AFTER)
        for delivery in deliveries:
            self._try_again(delivery)

    def _try_again(self, delivery: Delivery) -> None:
        self._waiting.pop(delivery.message_id, None)
        self._retrying.add(delivery.message_id)
        self._inbox.put_nowait(delivery)

    def _actions(self) -> dict[type, Action]:
        return {
            StartRun: self.start_run,
            Record: self.record,
            LookUpRun: self.look_up_run,
            Ignore: self.ignore,
            SetAside: self.set_aside,
        }

    async def start_run(self, decision: StartRun, delivery: Delivery) -> None:
        message = decision.message
        flow_run_id = await self.runs.start(message, self.namespace, decision.data, utc_now())
        known = self.owned.setdefault(message.run_id, flow_run_id) == flow_run_id
        log.info(
            "msg_type=%s run_id=%s -> flow run %s%s",
            message.msg_type,
            message.run_id,
            flow_run_id,
            "" if known and not delivery.redelivered else " (already started)",
        )
        # Before the ack: the run's results may come as soon as iDDS has its task.
        await self._follow(message.run_id)
        self._ack(delivery, "flow_run")

    async def _follow(self, run_id: str) -> None:
        """Take the run's results from now on (see ``FollowedRuns``)."""
        if self.followed.follow(run_id) and not self.settings.brokers.results_on_topic:
            assert self.bus is not None
            await asyncio.to_thread(self.bus.subscribe, self.results_of(run_id))

    async def _forget_finished(self, active: dict[str, UUID]) -> None:
        for run_id in self.followed.still_active(active, self._loop.time()):
            self.owned.pop(run_id, None)
            if not self.settings.brokers.results_on_topic:
                assert self.bus is not None
                await asyncio.to_thread(self.bus.unsubscribe, self.results_of(run_id).id)
            log.info(
                "run %s finished %.0fs ago: its results are no longer taken",
                run_id,
                self.followed.grace,
            )

    async def record(self, decision: Record, delivery: Delivery) -> None:
        """Hand the message to its run's flow as a Prefect event: a stream
        message in the next batch, any other alone, after the batch waiting."""
        run_id = decision.run_id
        msg_type = decision.message.msg_type
        if run_id is not None and msg_type in STREAM_TYPES:
            if not self._stream.takes(run_id):
                await self.send_stream()
            message = StreamMessage(
                msg_type,
                run_id,
                delivery.message_id,
                decision.data,
                utc_now(),
                self.owned.get(run_id),
            )
            self._stream.add(message, delivery, self._loop.time())
            return
        await self.send_stream()
        event = message_event(
            decision.data,
            msg_type,
            self.namespace,
            run_id,
            delivery.message_id,
            self.owned.get(run_id or ""),
            listener=self.listener_id,
        )
        await self.events.emit(event)
        self._pending[event.id] = Pending((delivery,), event, self._loop.time())
        # Redelivered: an earlier connection, of this listener or of another
        # replica, had it unacked; the same event id, so it is applied once.
        log.info(
            "msg_type=%s run_id=%s -> event %s%s",
            decision.message.msg_type,
            run_id,
            event.id,
            " (redelivered)" if delivery.redelivered else "",
        )

    async def send_stream(self) -> None:
        """Send the batch of stream messages waiting, if any. If Prefect cannot
        take it, its messages stay unacked and go back to the inbox after
        RETRY_AFTER seconds, the consumer loop pausing meanwhile (every other
        hand-off would fail alike)."""
        if not self._stream:
            return
        messages, deliveries = self._stream.take()
        event = stream_event(messages, self.namespace, listener=self.listener_id)
        try:
            await self.events.emit(event)
        except HANDOFF_ERRORS as exc:
            log.warning(
                "hand-off of %d stream messages failed (%s); retrying in %g s",
                len(messages),
                exc,
                RETRY_AFTER,
            )
            await self._pause_then_try_again(deliveries)
            return
        self._pending[event.id] = Pending(tuple(deliveries), event, self._loop.time())
        per_run = Counter(m.run_id for m in messages)
        redelivered = sum(d.redelivered for d in deliveries)
        # Redelivered: an earlier connection had them unacked; their ids are
        # those of the first time, so each is applied once.
        log.info(
            "%d stream messages -> event %s: %s%s",
            len(messages),
            event.id,
            ", ".join(f"run_id={run_id} x{n}" for run_id, n in per_run.items()),
            f" ({redelivered} redelivered)" if redelivered else "",
        )

    async def look_up_run(self, decision: LookUpRun, delivery: Delivery) -> None:
        """A result or an iDDS reply of a run this listener did not see start:
        record it if another replica of the namespace started the run, else
        ignore it."""
        run_id = decision.message.run_id
        not_ours = Ignore(
            f"{decision.message.msg_type} of run {run_id}, not a run of namespace {self.namespace}"
        )
        now = self._loop.time()
        if self._foreign.get(run_id, 0.0) > now:
            await self.ignore(not_ours, delivery)
            return
        flow_run_id = await self.runs.find(self.namespace, run_id)
        if flow_run_id is None:
            self._remember_foreign(run_id, now)
            await self.ignore(not_ours, delivery)
            return
        self.owned.setdefault(run_id, flow_run_id)
        await self._follow(run_id)
        log.info(
            "run %s: flow run %s, started by another listener of namespace %s",
            run_id,
            flow_run_id,
            self.namespace,
        )
        await self.record(Record(decision.message, decision.data, run_id), delivery)

    def _remember_foreign(self, run_id: str, now: float) -> None:
        """Results of another namespace's run come by the thousand: ask
        Prefect about that run again only after FOREIGN_FOR seconds (its
        results only flow once its task exists, so the answer holds)."""
        if len(self._foreign) >= FOREIGN_RUNS_KEPT:
            self._foreign = {r: t for r, t in self._foreign.items() if t > now}
        self._foreign[run_id] = now + FOREIGN_FOR

    async def ignore(self, decision: Ignore, delivery: Delivery) -> None:
        log.debug(
            "ignored message %s from %s: %s",
            delivery.message_id,
            delivery.destination,
            decision.why,
        )
        self._ack(delivery)

    async def set_aside(self, decision: SetAside, delivery: Delivery) -> None:
        """Copy the message, whole, to the dead-letter queue with the reason,
        then ack it. Whole, not truncated: once acked, the copy is all that is
        left of it, and an operator may replay it once the cause is fixed; and
        the broker, which took it once (ActiveMQ refuses STOMP bodies over
        100 MB on the way in), takes the copy too."""
        log.warning(
            "rejected message %s from %s: %s",
            delivery.message_id,
            delivery.destination,
            decision.reason,
        )
        assert self.bus is not None
        headers = {
            "persistent": "true",
            # Only our own headers: none of the sender's (a forged reason, a
            # stale expiry) is carried over to the copy.
            "swf_reject_reason": decision.reason,
            "swf_original_destination": delivery.destination,
            "swf_original_message_id": delivery.message_id,
        }
        try:
            await asyncio.to_thread(
                self.bus.send_raw, self.settings.brokers.dead_letter_queue, delivery.body, headers
            )
        except BusUnavailable as exc:
            log.warning("dead-letter queue unreachable (%s); message left for redelivery", exc)
            return
        self._ack(delivery)
        self.metrics.set_aside(decision.kind)

    # --- durable acknowledgement ----------------------------------------------

    def _ack(self, delivery: Delivery, stored: Handoff | None = None) -> None:
        """``stored``: what Prefect stored before this ack (None: nothing to store)."""
        assert self.bus is not None
        self.bus.ack(delivery)
        self.metrics.acked(delivery, stored)

    async def _confirm_forever(self) -> None:
        while True:
            await asyncio.sleep(CONFIRM_EVERY)
            if not self._pending:
                continue
            batch = list(itertools.islice(self._pending, 200))
            assert self.prefect is not None, "confirming needs a Prefect client"
            try:
                stored = await stored_ids(self.prefect, batch)
            except HANDOFF_ERRORS as exc:
                log.warning("cannot confirm events with Prefect yet: %s", exc)
                continue
            for event_id in stored:
                for delivery in self._pending.pop(event_id).deliveries:
                    self._ack(delivery, "event")
            try:
                await self._reemit_stale()
            except HANDOFF_ERRORS as exc:
                # Prefect went away between the read-back and the re-send:
                # the events stay pending, the next round tries again.
                log.warning("cannot re-send unstored events to Prefect yet: %s", exc)

    async def _reemit_stale(self) -> None:
        """Emit again what the server has not stored in time: it may have lost
        it (a restart before its persister flushed). A server merely behind
        has it queued, and each re-send adds to its work: the waits double."""
        now = self._loop.time()
        for pending in self._pending.values():
            if now - pending.since > pending.wait:
                log.info(
                    "event %s not stored after %.0fs; emitting it again",
                    pending.event.id,
                    pending.wait,
                )
                pending.since = now
                pending.wait = min(2 * pending.wait, REEMIT_AT_MOST_EVERY)
                await self.events.emit(pending.event)

    async def _count_runs_forever(self) -> None:
        """Count the namespace's runs in progress (flow runs not finished):
        what the health check, the metrics and the monitor report."""
        while True:
            try:
                active = await self.runs.active_runs(self.namespace)
                self._runs_active = len(active)
                self._prefect_reachable = True
            except HANDOFF_ERRORS as exc:
                self._prefect_reachable = False
                log.warning("cannot count runs in progress with Prefect: %s", exc)
            else:
                try:
                    await self._forget_finished(active)
                except BusUnavailable as exc:  # the next round tries again
                    log.warning("cannot drop finished runs' subscriptions yet: %s", exc)
            await asyncio.sleep(RUNS_EVERY)

    async def _with_retry(self, call: Callable[[], Awaitable[Any]]) -> Any:
        delay = 0.5
        while True:
            try:
                return await call()
            except HANDOFF_ERRORS as exc:
                log.warning("Prefect not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


class HealthSource:
    """The health of whichever listener is running now (``serve_listener``
    makes a new one each time Prefect comes back); callable from any thread."""

    def __init__(self) -> None:
        self.listener: BusListener | None = None

    def __call__(self) -> ListenerHealth:
        listener = self.listener
        if listener is None:
            return ListenerHealth(
                listening=False, bus_connected=False, prefect_reachable=False, runs_active=None
            )
        return listener.health()


async def serve_listener(
    settings: Settings,
    stopping: asyncio.Event,
    health: HealthSource | None = None,
    metrics: ListenerMetrics | None = None,
) -> None:
    """Run the listener until ``stopping`` is set, waiting for Prefect to be up.
    ``metrics`` outlive each listener made here: counters never go back."""
    from prefect.client.orchestration import get_client
    from prefect.events.clients import get_events_client

    metrics = metrics or ListenerMetrics()
    async with get_client() as client:
        while not stopping.is_set():
            try:
                await client.api_healthcheck()
                async with get_events_client() as events:
                    starter = RunStarter(client, settings.prefect.deployment)
                    listener = BusListener(settings, starter, events, client, metrics=metrics)
                    if health is not None:
                        health.listener = listener
                    await listener.run(stopping)
                return
            except HANDOFF_ERRORS as exc:
                log.warning("Prefect not reachable (%s); retrying in 2 s", exc)
                await asyncio.sleep(2)
