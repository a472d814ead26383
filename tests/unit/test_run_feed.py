"""The run feed yields each event once, and remembers a bounded window of
what it yielded, however long the run."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.events import Event

from swf_panda_workers.adapters.prefect_events.feed import (
    SEEN_HORIZON,
    Route,
    RunEventsHub,
    RunFeed,
    SeenEvents,
)
from swf_panda_workers.adapters.prefect_events.history import _OnceEach, run_filter
from swf_panda_workers.adapters.prefect_events.schema import (
    STREAM_EVENTS,
    STREAM_MAX_RUNS,
    StreamMessage,
    answer_event,
    decode,
    effect_event,
    message_event,
    message_event_id,
    run_resource_id,
    stream_event,
    unpacked,
)
from swf_panda_workers.core.effects import CreateSent
from swf_panda_workers.core.messages import CreatedWorkflowTask

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def event(seconds: float, event_id: uuid.UUID | None = None) -> Event:
    return Event(
        id=event_id or uuid.uuid4(),
        occurred=T0 + timedelta(seconds=seconds),
        event="swf.bus.slice_result",
        resource={"prefect.resource.id": "swf.run.t.1"},
        payload={},
    )


def drain(feed: RunFeed) -> list[Event]:
    async def take() -> list[Event]:
        found = []
        while (item := await feed.next(timeout=0)) is not None:
            found.append(item)
        return found

    return asyncio.run(take())


def test_an_event_stored_and_then_streamed_is_yielded_once() -> None:
    stored = event(0)
    live: asyncio.Queue[Event] = asyncio.Queue()
    feed = RunFeed([stored], live)
    repeat = event(0, stored.id)
    fresh = event(1)
    for item in (repeat, fresh, fresh):
        live.put_nowait(item)
    assert [e.id for e in drain(feed)] == [stored.id, fresh.id]


def test_memory_of_seen_events_stays_within_the_horizon() -> None:
    seen = SeenEvents()
    step = 10.0
    count = int(3 * SEEN_HORIZON.total_seconds() / step)
    for i in range(count):
        seen.add(uuid.uuid4(), T0 + timedelta(seconds=i * step))
    assert len(seen) <= SEEN_HORIZON.total_seconds() / step + 1
    assert len(seen) < count / 2


def test_an_event_older_than_what_is_remembered_counts_as_seen() -> None:
    live: asyncio.Queue[Event] = asyncio.Queue()
    feed = RunFeed([], live)
    first = event(0)
    live.put_nowait(first)
    later = event(SEEN_HORIZON.total_seconds() + 60)
    live.put_nowait(later)
    assert [e.id for e in drain(feed)] == [first.id, later.id]
    # A re-read of the history brings both again: the first is forgotten
    # but too old to be new, the later one is remembered.
    live.put_nowait(event(0, first.id))
    live.put_nowait(event(SEEN_HORIZON.total_seconds() + 60, later.id))
    live.put_nowait(unseen := event(SEEN_HORIZON.total_seconds() + 61))
    assert [e.id for e in drain(feed)] == [unseen.id]
    assert feed.remembered == 2


def test_a_runs_feed_reads_back_every_kind_of_event_the_run_journals() -> None:
    # A retried REST flow run learns its task's ids only from the answer an
    # earlier attempt journaled: the run's filter must take answer events too.
    created = CreatedWorkflowTask.model_validate(
        {
            "msg_type": "created_workflow_task",
            "run_id": "100123",
            "created_at": "2026-11-23T12:00:00",
            "content": {
                "run_id": "100123",
                "request_id": 1001,
                "transform_id": 2001,
                "processing_id": 3001,
                "workload_id": 60001,
            },
        }
    )
    journaled = [
        answer_event(created, "t", None),
        effect_event(CreateSent(), "t", "100123", None),
        message_event(
            {"msg_type": "slice_result", "run_id": "100123"},
            "slice_result",
            "t",
            "100123",
            "delivery-1",
        ),
        stream_event([stream_message("100123", "delivery-2")], "t"),
    ]
    wanted = run_filter(run_resource_id("t", "100123"), T0)
    assert wanted.event is not None and wanted.event.prefix is not None
    for item in journaled:
        assert item.event.startswith(tuple(wanted.event.prefix)), item.event
    assert decode(journaled[0]) == created


def run_event(resource_id: str, name: str = "swf.bus.slice_result") -> Event:
    return Event(occurred=T0, event=name, resource={"prefect.resource.id": resource_id}, payload={})


def test_the_hub_hands_each_event_to_the_feeds_of_its_run_only() -> None:
    hub = RunEventsHub()
    taken: dict[str, list[str]] = {"parent": [], "sub": [], "other": []}
    parent = Route(
        "swf.run.t.1",
        ("swf.bus.slice_result",),
        lambda e: taken["parent"].append(e.event),
        lambda: None,
    )
    sub = Route("swf.run.t.1", (), lambda e: taken["sub"].append(e.event), lambda: None)
    other = Route("swf.run.t.2", (), lambda e: taken["other"].append(e.event), lambda: None)
    for route in (parent, sub, other):
        hub._routes.setdefault(route.resource_id, []).append(route)

    hub._dispatch(run_event("swf.run.t.1"))
    hub._dispatch(run_event("swf.run.t.1", "swf.bus.end_run"))
    hub._dispatch(run_event("swf.run.t.3"))  # followed by no feed here: dropped

    assert taken == {
        "parent": ["swf.bus.end_run"],
        "sub": ["swf.bus.slice_result", "swf.bus.end_run"],
        "other": [],
    }
    hub.remove(sub)
    hub._dispatch(run_event("swf.run.t.1"))
    assert taken["sub"] == ["swf.bus.slice_result", "swf.bus.end_run"]
    assert hub.followed == 2


def test_every_feed_reads_its_history_again_when_the_hub_subscribes_again() -> None:
    hub = RunEventsHub()
    swept: list[str] = []
    for resource_id in ("swf.run.t.1", "swf.run.t.2"):
        route = Route(resource_id, (), lambda e: None, lambda r=resource_id: swept.append(r))  # type: ignore[misc]
        hub._routes.setdefault(resource_id, []).append(route)
    hub._on_subscribed(True)
    assert swept == []  # the first subscription: each feed reads its history itself
    hub._on_subscribed(False)
    assert sorted(swept) == ["swf.run.t.1", "swf.run.t.2"]


def stream_message(run_id: str, key: str, seconds: float = 0.0) -> StreamMessage:
    return StreamMessage(
        "slice_result",
        run_id,
        key,
        {"msg_type": "slice_result", "run_id": run_id, "content": {}},
        T0 + timedelta(seconds=seconds),
        uuid.uuid5(uuid.NAMESPACE_URL, run_id),
    )


def test_a_stream_batch_unpacks_into_the_events_its_messages_would_have_made() -> None:
    messages = [
        stream_message("1", "m-1"),
        stream_message("2", "m-2", 0.5),
        stream_message("1", "m-3", 1.0),
    ]
    batch = stream_event(messages, "t", listener="swf-panda-workers-t")
    assert batch.occurred == T0  # its first message's: a history read from then has it
    assert [r.id for r in batch.related] == [
        "swf.run.t.1",
        f"prefect.flow-run.{messages[0].flow_run_id}",
        "swf.run.t.2",
        f"prefect.flow-run.{messages[1].flow_run_id}",
    ]
    alone = [
        message_event(
            m.body, "slice_result", "t", m.run_id, m.delivery_key, listener="swf-panda-workers-t"
        )
        for m in messages
    ]
    assert [(e.id, e.event, e.resource.root, e.payload) for e in unpacked(batch)] == [
        (e.id, e.event, e.resource.root, e.payload) for e in alone
    ]
    assert [e.occurred for e in unpacked(batch, "swf.run.t.1")] == [T0, T0 + timedelta(seconds=1)]
    assert decode(unpacked(batch)[0]) is not None


def test_a_stream_batch_relates_to_no_more_runs_than_the_server_takes() -> None:
    too_many = [stream_message(str(n), f"m-{n}") for n in range(STREAM_MAX_RUNS + 1)]
    with pytest.raises(ValueError, match="at most"):
        stream_event(too_many, "t")


def test_the_hub_hands_each_message_of_a_batch_to_its_runs_feeds() -> None:
    hub = RunEventsHub()
    taken: dict[str, list[uuid.UUID]] = {"1": [], "2": [], "parent-1": []}
    routes = [
        Route("swf.run.t.1", (), lambda e: taken["1"].append(e.id), lambda: None),
        Route("swf.run.t.2", (), lambda e: taken["2"].append(e.id), lambda: None),
        Route("swf.run.t.1", STREAM_EVENTS, lambda e: taken["parent-1"].append(e.id), lambda: None),
    ]
    for route in routes:
        hub._routes.setdefault(route.resource_id, []).append(route)
    hub._dispatch(
        stream_event(
            [
                stream_message("1", "a"),
                stream_message("2", "b"),
                stream_message("1", "c"),
                stream_message("3", "d"),
            ],
            "t",
        )
    )
    assert taken == {
        "1": [message_event_id("t", "a"), message_event_id("t", "c")],
        "2": [message_event_id("t", "b")],
        "parent-1": [],
    }


def test_a_message_stored_in_two_batches_is_read_once() -> None:
    """Redelivered after the listener's crash, or received by two replicas
    from a topic: the same message in two batches."""
    first = stream_event([stream_message("1", "a"), stream_message("1", "b")], "t")
    second = stream_event([stream_message("1", "b", 2), stream_message("2", "c", 2)], "t")
    end = message_event({"msg_type": "end_run", "run_id": "1"}, "end_run", "t", "1", "e")
    read = _OnceEach("swf.run.t.1", ())
    assert [e.id for e in read.new([first])] == [message_event_id("t", k) for k in "ab"]
    assert [e.id for e in read.new([second, end])] == [end.id]
    parent = _OnceEach("swf.run.t.1", STREAM_EVENTS)
    assert [e.id for e in parent.new([first, second, end])] == [end.id]


def test_a_settled_feed_holds_what_its_late_history_sweeps_brought() -> None:
    """An event streamed before the subscription and stored after the first
    history read comes only with a late sweep: a run that ends at once must
    wait for it before its count is final."""
    late = event(1)

    async def go() -> list[Event]:
        live: asyncio.Queue[Event] = asyncio.Queue()
        feed = RunFeed([], live)

        async def sweep() -> None:
            await asyncio.sleep(0.05)
            live.put_nowait(late)

        feed._late = asyncio.create_task(sweep())
        before = await feed.next(timeout=0)
        assert before is None
        await feed.settled()
        return [e for e in [await feed.next(timeout=0)] if e is not None]

    assert [e.id for e in asyncio.run(go())] == [late.id]


def test_a_feed_is_settled_once_its_first_late_sweep_is_read() -> None:
    """The later sweeps are for safety; a run's count waits for the first."""
    late = event(2)

    async def go() -> tuple[list[Event], bool]:
        live: asyncio.Queue[Event] = asyncio.Queue()
        feed = RunFeed([], live)

        async def sweeps() -> None:
            live.put_nowait(late)
            feed._late_read.set()
            await asyncio.sleep(3600)  # the second sweep, far off

        feed._late = asyncio.create_task(sweeps())
        await feed.settled()
        still_sweeping = not feed._late.done()
        feed._late.cancel()
        return [e for e in [await feed.next(timeout=0)] if e is not None], still_sweeping

    found, still_sweeping = asyncio.run(go())
    assert [e.id for e in found] == [late.id] and still_sweeping
