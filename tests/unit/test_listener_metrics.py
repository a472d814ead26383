"""The listener's metrics, without a broker: deliveries go through the real
``BusListener.handle`` (with the fakes of test_listener_handle) and the
counts are read from the listener's own registry, as a scrape would; the
workers requested per run and their expiry are a table of calls with the
time passed in."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from test_listener_handle import NS, RESULTS, TOPIC, FakeBus, FakeEvents, FakeRuns, listener

from listeners.bus_listener import BusListener, HealthSource, ListenerHealth
from listeners.metrics import ListenerMetrics, destination_kind
from listeners.requested_workers import RequestedWorkers
from swf_panda_workers.adapters.stomp_bus import Delivery

M = "swf_panda_workers"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePrefect:
    """Reads back what FakeEvents holds, as the events API would once stored."""

    def __init__(self, events: FakeEvents) -> None:
        self.events = events

    async def read_events(self, filter: Any, limit: int) -> Any:
        wanted = set(filter.id.id)
        return SimpleNamespace(events=[e for e in self.events.emitted if e.id in wanted])


def sample(metrics: ListenerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"{M}_{name}", labels)


_ids = iter(range(10**9))


def message(
    body: dict[str, Any] | bytes,
    destination: str = TOPIC,
    received_at: float = 1000.0,
    **headers: str,
) -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    base = {"destination": destination, "message-id": f"ID:metrics-{next(_ids)}"}
    if destination == TOPIC:
        base["namespace"] = NS
    return Delivery({**base, **headers}, raw, "sub", 1, received_at)


def shell(
    clock: Clock,
    runs: FakeRuns | None = None,
    events: FakeEvents | None = None,
    bus: FakeBus | None = None,
) -> tuple[BusListener, ListenerMetrics, FakeBus]:
    bus = bus or FakeBus()
    made = listener(bus, runs, events)
    made.metrics = ListenerMetrics(clock=clock)
    return made, made.metrics, bus


RUN = {"msg_type": "run_imminent", "run_id": "7", "content": {"target_worker_count": 3}}
ADJUST: dict[str, Any] = {
    "msg_type": "adjust_worker",
    "run_id": "7",
    "content": {"run_id": "7", "request_id": 1, "transform_id": 2, "target_worker_count": 5},
}
END = {"msg_type": "end_run", "run_id": "7"}


def test_a_run_start_counts_received_acked_and_its_hand_off_time() -> None:
    clock = Clock(1000.3)

    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(clock)
        await made.handle(message(RUN, received_at=1000.0))
        return metrics

    metrics = asyncio.run(go())
    assert (
        sample(metrics, "messages_received_total", msg_type="run_imminent", destination="topic")
        == 1
    )
    assert sample(metrics, "messages_acked_total") == 1
    assert sample(metrics, "handoff_seconds_count", stored="flow_run") == 1
    assert sample(metrics, "handoff_seconds_sum", stored="flow_run") == pytest.approx(0.3)
    assert sample(metrics, "handoff_seconds_bucket", stored="flow_run", le="0.25") == 0
    assert sample(metrics, "handoff_seconds_bucket", stored="flow_run", le="0.5") == 1


def test_a_recorded_message_is_timed_to_the_ack_after_its_event_is_read_back() -> None:
    clock, events = Clock(1002.0), FakeEvents()

    async def go() -> tuple[ListenerMetrics, FakeBus]:
        made, metrics, bus = shell(clock, FakeRuns(), events)
        made.prefect = FakePrefect(events)
        await made.handle(message(END, received_at=1000.0))
        assert sample(metrics, "messages_acked_total") == 0  # not stored yet
        confirming = asyncio.create_task(made._confirm_forever())
        while not bus.acked:
            await asyncio.sleep(0.05)
        confirming.cancel()
        return metrics, bus

    metrics, _ = asyncio.run(go())
    assert sample(metrics, "messages_received_total", msg_type="end_run", destination="topic") == 1
    assert sample(metrics, "messages_acked_total") == 1
    assert sample(metrics, "handoff_seconds_count", stored="event") == 1
    assert sample(metrics, "handoff_seconds_sum", stored="event") == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("body", "destination", "headers", "msg_type", "reason"),
    [
        pytest.param(b"{not json", TOPIC, {}, "unparsed", "bad_json", id="not JSON"),
        pytest.param(b"x" * 1_000_001, TOPIC, {}, "unparsed", "too_large", id="too large"),
        pytest.param(
            json.dumps({"msg_type": "nope", "run_id": "1"}).encode(),
            TOPIC,
            {},
            "unparsed",
            "invalid_message",
            id="unknown type",
        ),
        pytest.param(
            json.dumps(END).encode(), RESULTS, {}, "end_run", "wrong_queue", id="wrong queue"
        ),
        pytest.param(
            json.dumps({"msg_type": "slice_result", "run_id": "5", "content": {}}).encode(),
            RESULTS,
            {"namespace": "prod"},
            "unread",
            None,
            id="another namespace",
        ),
    ],
)
def test_what_is_not_handed_off_is_counted_by_type_and_reason_and_acked_untimed(
    body: bytes,
    destination: str,
    headers: dict[str, str],
    msg_type: str,
    reason: str | None,
) -> None:
    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(Clock())
        await made.handle(message(body, destination, 1000.0, **headers))
        return metrics

    metrics = asyncio.run(go())
    assert (
        sample(
            metrics,
            "messages_received_total",
            msg_type=msg_type,
            destination=destination_kind(destination),
        )
        == 1
    )
    assert sample(metrics, "messages_acked_total") == 1
    assert sample(metrics, "handoff_seconds_count", stored="flow_run") is None
    assert sample(metrics, "handoff_seconds_count", stored="event") is None
    if reason is not None:
        assert sample(metrics, "messages_rejected_total", reason=reason) == 1


def test_a_message_prefect_refuses_is_counted_as_rejected_for_that_reason() -> None:
    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(Clock(), FakeRuns(refuse=422))
        await made.handle(message(RUN))
        return metrics

    metrics = asyncio.run(go())
    assert sample(metrics, "messages_rejected_total", reason="prefect_refused") == 1
    assert (
        sample(metrics, "messages_received_total", msg_type="run_imminent", destination="topic")
        == 1
    )


def test_a_copy_the_dead_letter_queue_refused_is_neither_rejected_nor_acked() -> None:
    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(Clock(), bus=FakeBus(fail_sends=True))
        await made.handle(message(b"[]"))
        return metrics

    metrics = asyncio.run(go())
    assert sample(metrics, "messages_rejected_total", reason="bad_json") is None
    assert sample(metrics, "messages_acked_total") == 0


def test_a_message_retried_while_prefect_is_away_is_received_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = FakeRuns(refuse=503)

    async def no_wait(_: float) -> None:
        return None

    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(Clock(), runs)
        monkeypatch.setattr("listeners.bus_listener.asyncio.sleep", no_wait)
        await made.handle(message(RUN))  # 503: back into the inbox
        runs.refuse = None
        await made.handle(made._inbox.get_nowait())
        return metrics

    metrics = asyncio.run(go())
    assert runs.started == ["7"]
    assert (
        sample(metrics, "messages_received_total", msg_type="run_imminent", destination="topic")
        == 1
    )
    assert sample(metrics, "messages_acked_total") == 1


def test_workers_requested_follow_the_runs_create_and_adjust_echoed_by_the_topic() -> None:
    clock = Clock()
    create = {
        "msg_type": "create_workflow_task",
        "run_id": "7",
        "content": {
            "run_id": "7",
            "workflow": {"content": {"run_id": "7", "target_worker_count": 3}},
        },
    }

    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(clock)
        await made.handle(message(create))
        assert sample(metrics, "workers_requested", run_id="7") == 3
        await made.handle(message(ADJUST))
        # Another namespace's adjust never reaches us (the topic's selector);
        # one with no size leaves the last one.
        await made.handle(
            message({**ADJUST, "content": {**ADJUST["content"], "target_worker_count": None}})
        )
        return metrics

    metrics = asyncio.run(go())
    assert sample(metrics, "workers_requested", run_id="7") == 5
    assert (
        sample(metrics, "messages_received_total", msg_type="adjust_worker", destination="topic")
        == 2
    )


def test_an_ended_runs_workers_are_dropped_after_the_grace_period() -> None:
    clock = Clock()

    async def go() -> ListenerMetrics:
        made, metrics, _ = shell(clock)
        await made.handle(message(ADJUST))
        await made.handle(message(END))
        return metrics

    metrics = asyncio.run(go())
    grace = metrics.requested_workers.grace
    clock.now += grace
    assert sample(metrics, "workers_requested", run_id="7") == 5
    clock.now += 1
    assert sample(metrics, "workers_requested", run_id="7") is None


@pytest.mark.parametrize(
    ("calls", "at", "expected"),
    [
        pytest.param([("requested", "a", 3, 0)], 10_000, {"a": 3}, id="a run without end stays"),
        pytest.param(
            [("requested", "a", 3, 0), ("ended", "a", 0, 100)], 400, {"a": 3}, id="within the grace"
        ),
        pytest.param(
            [("requested", "a", 3, 0), ("ended", "a", 0, 100)], 401, {}, id="past the grace"
        ),
        pytest.param(
            [("requested", "a", 3, 0), ("ended", "a", 0, 100), ("requested", "a", 2, 350)],
            600,
            {"a": 2},
            id="an adjust during the drain restarts the grace",
        ),
        pytest.param(
            [("requested", "a", 3, 0), ("ended", "a", 0, 100), ("requested", "a", 2, 350)],
            651,
            {},
            id="which still ends",
        ),
        pytest.param([("ended", "b", 0, 0)], 1, {}, id="an end alone records nothing"),
        pytest.param(
            [("requested", "a", 1, 0), ("requested", "b", 2, 1), ("requested", "c", 3, 2)],
            3,
            {"b": 2, "c": 3},
            id="over the cap, the oldest news goes",
        ),
        pytest.param(
            [
                ("requested", "a", 1, 0),
                ("requested", "b", 2, 1),
                ("requested", "a", 4, 2),
                ("requested", "c", 3, 3),
            ],
            4,
            {"a": 4, "c": 3},
            id="a run with news is kept",
        ),
    ],
)
def test_requested_workers_are_kept_bounded(
    calls: list[tuple[str, str, int, float]],
    at: float,
    expected: dict[str, int],
) -> None:
    sizes = RequestedWorkers(grace=300, kept=2)
    for call, run_id, workers, now in calls:
        if call == "requested":
            sizes.requested(run_id, workers, now)
        else:
            sizes.ended(run_id, now)
    assert sizes.current(at) == expected


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (
            ListenerHealth(True, True, True, 4),
            {"listening": 1, "bus_connected": 1, "prefect_reachable": 1, "runs_active": 4},
        ),
        (
            ListenerHealth(True, False, False, 2),
            {"listening": 1, "bus_connected": 0, "prefect_reachable": 0, "runs_active": 2},
        ),
        (
            ListenerHealth(False, False, False, None),
            {"listening": 0, "bus_connected": 0, "prefect_reachable": 0, "runs_active": None},
        ),
    ],
)
def test_the_listeners_health_is_read_at_each_scrape(
    health: ListenerHealth,
    expected: dict[str, float | None],
) -> None:
    metrics = ListenerMetrics(lambda: health)
    assert {name: sample(metrics, name) for name in expected} == expected


def test_a_listener_not_started_yet_reports_all_down() -> None:
    metrics = ListenerMetrics(HealthSource(), {"namespace": NS, "listener_id": "x"})
    assert sample(metrics, "listening") == 0 and sample(metrics, "bus_connected") == 0
    assert sample(metrics, "listener_info", namespace=NS, listener_id="x") == 1


def test_two_listeners_in_one_process_count_apart() -> None:
    async def go() -> tuple[ListenerMetrics, ListenerMetrics]:
        first, first_metrics, _ = shell(Clock())
        _, second_metrics, _ = shell(Clock())
        await first.handle(message(b"[]"))
        return first_metrics, second_metrics

    first, second = asyncio.run(go())
    assert sample(first, "messages_acked_total") == 1
    assert sample(second, "messages_acked_total") == 0
