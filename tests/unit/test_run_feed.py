"""The run feed yields each event once, and remembers a bounded window of
what it yielded, however long the run."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from prefect.events import Event

from swf_panda_workers.adapters.prefect_events import (
    SEEN_HORIZON,
    Route,
    RunEventsHub,
    RunFeed,
    SeenEvents,
    answer_event,
    decode,
    effect_event,
    message_event,
    run_filter,
    run_resource_id,
)
from swf_panda_workers.messages import CreatedWorkflowTask
from swf_panda_workers.run_state import Effect

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def event(seconds: float, event_id: uuid.UUID | None = None) -> Event:
    return Event(id=event_id or uuid.uuid4(), occurred=T0 + timedelta(seconds=seconds),
                 event="swf.bus.slice_result", resource={"prefect.resource.id": "swf.run.t.1"},
                 payload={})


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
    created = CreatedWorkflowTask.model_validate({
        "msg_type": "created_workflow_task", "run_id": "100123",
        "created_at": "2026-11-23T12:00:00",
        "content": {"run_id": "100123", "request_id": 1001, "transform_id": 2001,
                    "processing_id": 3001, "workload_id": 60001}})
    journaled = [
        answer_event(created, "t", None),
        effect_event(Effect(kind="create_sent"), "t", "100123", None),
        message_event({"msg_type": "slice_result", "run_id": "100123"}, "slice_result", "t",
                      "100123", "delivery-1"),
    ]
    wanted = run_filter(run_resource_id("t", "100123"), T0)
    assert wanted.event is not None and wanted.event.prefix is not None
    for item in journaled:
        assert item.event.startswith(tuple(wanted.event.prefix)), item.event
    assert decode(journaled[0]) == created


def run_event(resource_id: str, name: str = "swf.bus.slice_result") -> Event:
    return Event(occurred=T0, event=name, resource={"prefect.resource.id": resource_id},
                 payload={})


def test_the_hub_hands_each_event_to_the_feeds_of_its_run_only() -> None:
    hub = RunEventsHub()
    taken: dict[str, list[str]] = {"parent": [], "sub": [], "other": []}
    parent = Route("swf.run.t.1", ("swf.bus.slice_result",), lambda e: taken["parent"].append(
        e.event), lambda: None)
    sub = Route("swf.run.t.1", (), lambda e: taken["sub"].append(e.event), lambda: None)
    other = Route("swf.run.t.2", (), lambda e: taken["other"].append(e.event), lambda: None)
    for route in (parent, sub, other):
        hub._routes.setdefault(route.resource_id, []).append(route)

    hub._dispatch(run_event("swf.run.t.1"))
    hub._dispatch(run_event("swf.run.t.1", "swf.bus.end_run"))
    hub._dispatch(run_event("swf.run.t.3"))  # followed by no feed here: dropped

    assert taken == {"parent": ["swf.bus.end_run"],
                     "sub": ["swf.bus.slice_result", "swf.bus.end_run"], "other": []}
    hub.remove(sub)
    hub._dispatch(run_event("swf.run.t.1"))
    assert taken["sub"] == ["swf.bus.slice_result", "swf.bus.end_run"]
    assert hub.followed == 2


def test_every_feed_reads_its_history_again_when_the_hub_subscribes_again() -> None:
    hub = RunEventsHub()
    swept: list[str] = []
    for resource_id in ("swf.run.t.1", "swf.run.t.2"):
        route = Route(resource_id, (), lambda e: None,
                      lambda r=resource_id: swept.append(r))  # type: ignore[misc]
        hub._routes.setdefault(resource_id, []).append(route)
    hub._on_subscribed(True)
    assert swept == []  # the first subscription: each feed reads its history itself
    hub._on_subscribed(False)
    assert sorted(swept) == ["swf.run.t.1", "swf.run.t.2"]
