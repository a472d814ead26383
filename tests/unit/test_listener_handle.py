"""The listener's thin shell around ``decide``, with fakes for the bus and
Prefect: each outcome is carried out (set aside = copy to the dead-letter
queue with the reason, then ack), and no delivery, however bad, makes
``handle`` raise. The fakes serialize what they are given as the real
clients do, so a body that Prefect's client could not encode fails here."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import datetime
from typing import Any, get_args

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefect.events import Event
from pydantic import TypeAdapter

from listeners import bus_listener
from listeners.bus_listener import BusListener
from listeners.routing import Decision
from swf_panda_workers.adapters.prefect_events.schema import (
    STREAM_EVENT,
    message_event_id,
    unpacked,
)
from swf_panda_workers.adapters.prefect_runs import DeploymentMissing
from swf_panda_workers.adapters.stomp_bus import BusUnavailable, Delivery, Subscription
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.messages import RunImminent

NS = "itest"
TOPIC = "/topic/panda.workers"
RESULTS = "/queue/panda.results.worker"
DLQ = "/queue/panda.workers.DLQ.test"


class FakeBus:
    def __init__(self, fail_sends: bool = False) -> None:
        self.fail_sends = fail_sends
        self.connected = threading.Event()
        self.log: list[tuple[str, Any]] = []  # ("send", (dest, body, headers)) / ("ack", id)

    def send_raw(self, destination: str, body: bytes, headers: dict[str, str]) -> None:
        if self.fail_sends:
            raise BusUnavailable("broker did not confirm")
        self.log.append(("send", (destination, body, headers)))

    def ack(self, delivery: Delivery) -> None:
        self.log.append(("ack", delivery.message_id))

    def subscribe(self, sub: Subscription) -> None:
        self.log.append(("subscribe", sub))

    def unsubscribe(self, sub_id: str) -> None:
        self.log.append(("unsubscribe", sub_id))

    @property
    def subscribed(self) -> list[Subscription]:
        return [what for kind, what in self.log if kind == "subscribe"]

    @property
    def acked(self) -> list[str]:
        return [what for kind, what in self.log if kind == "ack"]

    @property
    def sent(self) -> list[tuple[str, bytes, dict[str, str]]]:
        return [what for kind, what in self.log if kind == "send"]


class FakeRuns:
    """``elsewhere``: runs whose flow run another listener replica started."""

    def __init__(self, refuse: int | None = None, elsewhere: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.elsewhere = elsewhere
        self.started: list[str] = []
        self.looked_up: list[str] = []

    async def find(self, namespace: str, run_id: str) -> uuid.UUID | None:
        self.looked_up.append(run_id)
        if run_id in self.elsewhere or run_id in self.started:
            return uuid.uuid5(uuid.NAMESPACE_URL, run_id)
        return None

    async def start(
        self, run: RunImminent, namespace: str, announcement: dict[str, Any], received_at: datetime
    ) -> uuid.UUID:
        # What Prefect's client does with the parameters: a pydantic JSON-mode
        # dump, then httpx's strict JSON in UTF-8.
        dumped = TypeAdapter(dict[str, Any]).dump_python(
            {"announcement": announcement}, mode="json"
        )
        json.dumps(dumped, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if self.refuse is not None:
            request = httpx.Request("POST", "http://prefect/api/deployments/x/create_flow_run")
            raise httpx.HTTPStatusError(
                "refused",
                request=request,
                response=httpx.Response(
                    self.refuse, text='{"detail": "no\\nway"}', request=request
                ),
            )
        self.started.append(run.run_id)
        return uuid.uuid5(uuid.NAMESPACE_URL, run.run_id)

    async def active_runs(self, namespace: str) -> dict[str, uuid.UUID]:
        return {run_id: uuid.uuid5(uuid.NAMESPACE_URL, run_id) for run_id in self.started}


class FakeEvents:
    def __init__(self) -> None:
        self.emitted: list[Event] = []

    async def emit(self, event: Event) -> None:
        event.model_dump_json()  # what the websocket client sends
        self.emitted.append(event)


def listener(
    bus: FakeBus, runs: FakeRuns | None = None, events: FakeEvents | None = None
) -> BusListener:
    settings = Settings.model_validate(
        {"transceiver": {"namespace": NS}, "brokers": {"dead_letter_queue": DLQ}}
    )
    made = BusListener(settings, runs or FakeRuns(), events or FakeEvents(), bus=bus)
    made._loop = asyncio.get_running_loop()
    return made


_ids = iter(range(10**9))


def delivery(body: bytes, destination: str = TOPIC, **headers: str) -> Delivery:
    base = {"destination": destination, "message-id": f"ID:m-{next(_ids)}", "ack": "a"}
    if destination == TOPIC:
        base["namespace"] = NS
    return Delivery({**base, **headers}, body, "sub", 1)


async def handled(
    body: bytes,
    bus: FakeBus | None = None,
    runs: FakeRuns | None = None,
    events: FakeEvents | None = None,
    **kwargs: str,
) -> tuple[Delivery, FakeBus]:
    bus = bus or FakeBus()
    shell = listener(bus, runs, events)
    item = delivery(body, **kwargs)
    await shell.handle(item)
    return item, bus


def test_every_outcome_has_an_action() -> None:
    async def actions() -> set[type]:
        return set(listener(FakeBus())._actions())

    assert asyncio.run(actions()) == set(get_args(Decision))


def test_bad_input_is_copied_whole_with_its_reason_then_acked() -> None:
    body = b"{not json" + b" " * 2_000_000  # over the limit too: the size is the reason
    item, bus = asyncio.run(handled(body, swf_reject_reason="forged", expires="1"))
    assert bus.log == [
        (
            "send",
            (
                DLQ,
                body,
                {
                    "persistent": "true",
                    "swf_reject_reason": "body of 2000009 bytes is over the 1000000 byte limit",
                    "swf_original_destination": TOPIC,
                    "swf_original_message_id": item.message_id,
                },
            ),
        ),
        ("ack", item.message_id),
    ]


def test_a_copy_the_broker_did_not_confirm_leaves_the_message_unacked() -> None:
    _, bus = asyncio.run(handled(b"[]", bus=FakeBus(fail_sends=True)))
    assert bus.log == []


def test_a_message_prefect_refuses_is_set_aside_with_prefects_words() -> None:
    body = json.dumps({"msg_type": "run_imminent", "run_id": "5"}).encode()
    item, bus = asyncio.run(handled(body, runs=FakeRuns(refuse=422)))
    [(destination, copied, headers)] = bus.sent
    assert (destination, copied) == (DLQ, body)
    assert headers["swf_reject_reason"] == r'Prefect refused it: {"detail": "no\nway"}'
    assert bus.acked == [item.message_id]


def waiting_for_prefect(shell: BusListener) -> list[Delivery]:
    """The deliveries whose events are sent and not yet confirmed stored."""
    return [d for pending in shell._pending.values() for d in pending.deliveries]


def test_a_result_of_another_namespace_is_acked_and_not_recorded() -> None:
    events = FakeEvents()
    body = json.dumps({"msg_type": "slice_result", "run_id": "5", "content": {}}).encode()
    item, bus = asyncio.run(handled(body, events=events, destination=RESULTS, namespace="prod"))
    assert bus.log == [("ack", item.message_id)]
    assert events.emitted == []


def test_a_result_of_a_run_another_replica_started_is_recorded_with_its_flow_run() -> None:
    runs, events = FakeRuns(elsewhere=frozenset({"5"})), FakeEvents()
    body = json.dumps({"msg_type": "slice_result", "run_id": "5", "content": {}}).encode()

    async def go() -> tuple[Delivery, FakeBus, BusListener]:
        bus = FakeBus()
        shell = listener(bus, runs, events)
        item = delivery(body, RESULTS)
        await shell.handle(item)
        await shell.handle(delivery(body, RESULTS))  # the run is known from now on
        return item, bus, shell

    item, bus, shell = asyncio.run(go())
    flow_run_id = uuid.uuid5(uuid.NAMESPACE_URL, "5")
    assert runs.looked_up == ["5"]
    assert shell.owned == {"5": flow_run_id}
    # Each in a stream batch (handle sends at once), related to the run and
    # to its flow run.
    assert [e.event for e in events.emitted] == [STREAM_EVENT] * 2
    assert [r.id for r in events.emitted[0].related] == [
        "swf.run.itest.5",
        f"prefect.flow-run.{flow_run_id}",
    ]
    (result,) = unpacked(events.emitted[0])
    assert (result.event, result.resource.id) == ("swf.bus.slice_result", "swf.run.itest.5")
    assert result.resource["swf.listener"] == f"swf-panda-workers-{NS}"
    # Acked once Prefect confirms the event, as any recorded message.
    assert bus.acked == [] and item in waiting_for_prefect(shell)


def test_a_result_of_a_run_no_replica_started_is_acked_and_not_recorded() -> None:
    runs, events = FakeRuns(), FakeEvents()
    body = json.dumps({"msg_type": "slice_result", "run_id": "5", "content": {}}).encode()
    item, bus = asyncio.run(handled(body, runs=runs, events=events, destination=RESULTS))
    assert runs.looked_up == ["5"]
    assert bus.log == [("ack", item.message_id)]
    assert events.emitted == []


def test_prefect_is_asked_once_about_a_stream_of_another_runs_results() -> None:
    runs, events, bus = FakeRuns(), FakeEvents(), FakeBus()

    async def stream() -> BusListener:
        shell = listener(bus, runs, events)
        for _ in range(20):
            body = json.dumps({"msg_type": "slice_result", "run_id": "5", "content": {}})
            await shell.handle(delivery(body.encode(), RESULTS))
        return shell

    asyncio.run(stream())
    assert runs.looked_up == ["5"]
    assert len(bus.acked) == 20 and events.emitted == []


def test_an_announcement_starts_the_run_and_is_acked() -> None:
    runs = FakeRuns()
    body = json.dumps({"msg_type": "run_imminent", "run_id": "5"}).encode()
    item, bus = asyncio.run(handled(body, runs=runs))
    assert runs.started == ["5"]
    # The run's results are taken from the shared queue before the ack: they
    # may come as soon as iDDS has the task.
    (results,) = bus.subscribed
    assert (results.destination, results.selector) == (
        "/queue/panda.results.worker",
        "run_id = '5'",
    )
    assert bus.log[-1] == ("ack", item.message_id)


JSON_ISH = st.lists(
    st.sampled_from(
        [
            b'{"msg_type": "end_run", "run_id": "1", "x": ',
            b'{"msg_type": "run_imminent", ',
            b'"run_id": "7", ',
            b'"content": {"a": ',
            b'"s": ',
            b"NaN",
            b"1e999",
            b'"\\ud800"',
            b'"\\ud83d\\ude00"',
            b"9" * 4400,
            b"[" * 40,
            b"]" * 40,
            b"}",
            b"}}",
            b"\xff",
            b"\x00",
            b",",
        ]
    ),
    max_size=8,
).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | JSON_ISH, st.sampled_from([TOPIC, RESULTS]))
def test_handle_never_raises_and_settles_each_delivery_once(body: bytes, where: str) -> None:
    events = FakeEvents()

    async def go() -> tuple[Delivery, FakeBus, BusListener]:
        bus = FakeBus()
        shell = listener(bus, FakeRuns(), events)
        item = delivery(body, where)
        await shell.handle(item)
        return item, bus, shell

    item, bus, shell = asyncio.run(go())
    pending = waiting_for_prefect(shell)
    # acked now, or waiting for Prefect to confirm its event: one or the other
    assert bus.acked.count(item.message_id) + pending.count(item) == 1
    assert len(bus.sent) <= 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "x": "\\ud800"}',
            id="lone surrogate: UTF-8 cannot encode it for Prefect",
        ),
        pytest.param(
            b'{"msg_type": "run_imminent", "run_id": "1", "content": {"x": "\\udfff"}}',
            id="lone surrogate in an announcement",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "n": ' + b"9" * 4400 + b"}",
            id="integer over the 4300-digit limit: ValueError from json",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "c": ' + b"[" * 300 + b"]" * 300 + b"}",
            id="300 levels: over pydantic's serialization depth",
        ),
    ],
)
def test_bodies_that_once_crashed_the_listener_are_set_aside(body: bytes) -> None:
    item, bus = asyncio.run(handled(body))
    assert [destination for destination, _, _ in bus.sent] == [DLQ]
    assert bus.acked == [item.message_id]


def test_nan_is_set_aside_rather_than_reaching_prefect_as_null() -> None:
    body = b'{"msg_type": "run_imminent", "run_id": "1", "content": {"x": NaN}}'
    runs = FakeRuns()
    item, bus = asyncio.run(handled(body, runs=runs))
    assert runs.started == []
    assert bus.sent[0][2]["swf_reject_reason"] == "body is not JSON: NaN is not a JSON number"
    assert bus.acked == [item.message_id]


class NoDeploymentYet(FakeRuns):
    """Prefect answers, but the runner does not serve the run deployment yet."""

    async def start(
        self, run: RunImminent, namespace: str, announcement: dict[str, Any], received_at: datetime
    ) -> uuid.UUID:
        raise DeploymentMissing("deployment swf-run/panda-workers is not on the server")


def announcement(run_id: str) -> Delivery:
    return delivery(
        json.dumps(
            {"msg_type": "run_imminent", "run_id": run_id, "namespace": NS, "content": {}}
        ).encode()
    )


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(bus_listener, "RETRY_AFTER", 0.05)
    return 0.05


def test_a_run_announced_before_the_runner_serves_its_deployment_waits_unacked(
    quick_retry: float,
) -> None:
    """The deployment missing (the runner not up yet, or redeploying) is
    waited out: the announcement stays unacked and is tried again, never set
    aside, and the listener goes on."""

    async def go() -> tuple[Delivery, Delivery, FakeBus]:
        bus = FakeBus()
        shell = listener(bus, NoDeploymentYet())
        item = announcement("77")
        await shell.handle(item)
        again = await asyncio.wait_for(shell._inbox.get(), timeout=10)
        return item, again, bus

    item, again, bus = asyncio.run(go())
    assert bus.acked == [] and bus.sent == []  # neither acked nor dead-lettered
    assert again is item  # back in the inbox, to be tried again


def test_an_announcement_that_waits_does_not_hold_up_other_runs_messages(
    quick_retry: float,
) -> None:
    """While one run's announcement waits for the deployment, the messages
    behind it (another run's end, its results) are handed over at once: the
    wait is the waiting message's alone."""
    events = FakeEvents()
    end_of_another_run = json.dumps(
        {"msg_type": "end_run", "run_id": "5", "namespace": NS}
    ).encode()

    async def go() -> tuple[list[str], Delivery, FakeBus]:
        bus = FakeBus()
        shell = listener(bus, NoDeploymentYet(), events)
        order: list[str] = []
        waiting = announcement("77")
        await shell.handle(waiting)
        # Not back yet: the retry is scheduled, not slept through in handle().
        order.append("waiting" if not shell._inbox.empty() else "handed over first")
        await shell.handle(delivery(end_of_another_run))
        order.append(f"event of run {events.emitted[-1].resource['swf.run_id']}")
        again = await asyncio.wait_for(shell._inbox.get(), timeout=10)
        order.append("announcement tried again")
        return order, again, bus

    order, again, bus = asyncio.run(go())
    assert order == ["handed over first", "event of run 5", "announcement tried again"]
    assert again.body == announcement("77").body
    assert bus.acked == []  # the end's ack waits for Prefect's read-back; the announcement's wait


class SlowToStore(FakeRuns):
    """Prefect takes its time to store a flow run (SQLite, runs announced
    together): each start waits until ``stored`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.stored = asyncio.Event()

    async def start(
        self, run: RunImminent, namespace: str, announcement: dict[str, Any], received_at: datetime
    ) -> uuid.UUID:
        await self.stored.wait()
        return await super().start(run, namespace, announcement, received_at)


def test_a_slow_run_start_does_not_hold_up_the_messages_behind_it() -> None:
    """The consumer loop queues run starts for the starter, which makes them
    one at a time, in order; meanwhile another run's end is handed over."""
    events = FakeEvents()
    end_of_another_run = json.dumps(
        {"msg_type": "end_run", "run_id": "5", "namespace": NS}
    ).encode()

    async def go() -> tuple[list[str], FakeBus, list[Delivery]]:
        bus, runs = FakeBus(), SlowToStore()
        shell = listener(bus, runs, events)
        starter = asyncio.create_task(shell._start_forever())
        seen: list[str] = []
        announced = [announcement("77"), announcement("78")]
        for item in announced:
            await shell.dispatch(item)
        await shell.dispatch(delivery(end_of_another_run))
        seen.append(f"event of run {events.emitted[-1].resource['swf.run_id']}")
        seen.append(f"started {runs.started}")
        runs.stored.set()
        while len(runs.started) < 2:
            await asyncio.sleep(0.01)
        seen.append(f"started {runs.started}")
        starter.cancel()
        return seen, bus, announced

    seen, bus, announced = asyncio.run(go())
    assert seen == ["event of run 5", "started []", "started ['77', '78']"]
    assert [item.message_id for item in announced] == bus.acked  # acked once started


# --- the stream in batches ---------------------------------------------------


def result(run_id: str) -> Delivery:
    return delivery(
        json.dumps({"msg_type": "slice_result", "run_id": run_id, "content": {}}).encode(), RESULTS
    )


class FakePrefect:
    """Reads events back: those in ``stored``."""

    def __init__(self) -> None:
        self.stored: set[uuid.UUID] = set()

    async def read_events(self, filter: Any, limit: int) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(
            events=[SimpleNamespace(id=i) for i in filter.id.id if i in self.stored]
        )


def test_results_of_several_runs_go_in_one_event_acked_once_it_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_listener, "CONFIRM_EVERY", 0.01)
    events, bus, prefect = FakeEvents(), FakeBus(), FakePrefect()
    items = [result(run_id) for run_id in ("5", "6", "5")]

    async def go() -> list[str]:
        shell = listener(bus, events=events)
        shell.prefect = prefect
        shell.owned.update({"5": uuid.uuid4(), "6": uuid.uuid4()})
        for item in items:
            await shell.dispatch(item)
        seen = [f"{len(events.emitted)} sent before the window ends"]
        await shell.send_stream()
        confirming = asyncio.create_task(shell._confirm_forever())
        await asyncio.sleep(0.1)
        seen.append(f"{len(bus.acked)} acked before Prefect stores it")
        prefect.stored.add(events.emitted[0].id)
        while len(bus.acked) < len(items):
            await asyncio.sleep(0.01)
        confirming.cancel()
        return seen

    assert asyncio.run(go()) == [
        "0 sent before the window ends",
        "0 acked before Prefect stores it",
    ]
    (batch,) = events.emitted
    assert batch.event == STREAM_EVENT
    assert [(e.resource.id, e.id) for e in unpacked(batch)] == [
        (f"swf.run.{NS}.{r}", message_event_id(NS, i.message_id))
        for r, i in zip(("5", "6", "5"), items, strict=True)
    ]
    assert bus.acked == [i.message_id for i in items]


def test_a_runs_end_is_sent_after_the_results_received_before_it() -> None:
    events = FakeEvents()

    async def go() -> None:
        shell = listener(FakeBus(), events=events)
        shell.owned["5"] = uuid.uuid4()
        await shell.dispatch(result("5"))
        await shell.dispatch(
            delivery(json.dumps({"msg_type": "end_run", "run_id": "5", "namespace": NS}).encode())
        )

    asyncio.run(go())
    assert [e.event for e in events.emitted] == [STREAM_EVENT, "swf.bus.end_run"]


class DownEvents(FakeEvents):
    async def emit(self, event: Event) -> None:
        raise OSError("connection refused")


def test_a_batch_prefect_cannot_take_goes_back_to_the_inbox_unacked(quick_retry: float) -> None:
    bus = FakeBus()
    items = [result("5"), result("5")]

    async def go() -> list[Delivery]:
        shell = listener(bus, events=DownEvents())
        shell.owned["5"] = uuid.uuid4()
        for item in items:
            await shell.dispatch(item)
        await shell.send_stream()
        return [shell._inbox.get_nowait() for _ in items]

    assert asyncio.run(go()) == items
    assert bus.acked == []


def test_a_batch_holds_at_most_its_number_of_runs() -> None:
    events = FakeEvents()

    async def go() -> None:
        shell = listener(FakeBus(), events=events)
        shell._stream.max_runs = 2
        for run_id in ("1", "2", "1", "3"):
            shell.owned[run_id] = uuid.uuid4()
            await shell.dispatch(result(run_id))
        await shell.send_stream()

    asyncio.run(go())
    assert [[e.resource["swf.run_id"] for e in unpacked(batch)] for batch in events.emitted] == [
        ["1", "2", "1"],
        ["3"],
    ]


def test_an_event_left_unstored_is_sent_again_less_and_less_often() -> None:
    """Lost by a restarting server, it must be sent again; queued by a server
    merely behind, each re-send is more work for it."""
    events = FakeEvents()

    async def go() -> list[float]:
        shell = listener(FakeBus(), events=events)
        await shell.handle(
            delivery(json.dumps({"msg_type": "end_run", "run_id": "5", "namespace": NS}).encode())
        )
        (pending,) = shell._pending.values()
        waits = []
        for _ in range(4):
            pending.since -= pending.wait - 1  # not yet
            await shell._reemit_stale()
            pending.since -= 2  # now past its wait
            await shell._reemit_stale()
            waits.append(pending.wait)
        return waits

    assert asyncio.run(go()) == [60.0, 120.0, 240.0, 240.0]
    assert len(events.emitted) == 1 + 4 and len({e.id for e in events.emitted}) == 1
