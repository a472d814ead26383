"""A run's events as Prefect stores them: their names, resource ids and
event ids; the events made of bus messages, stream batches, iDDS's REST
answers, effects and stall reports; and what an event carries, read back
(``decode``).

Every bus message about a run becomes a Prefect event whose resource is the
run (``swf.run.<namespace>.<run_id>``); every effect the run flow performs
(create sent, adjust sent, ...) becomes one too. Operators see the same
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
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect.events import Event
from prefect.events.schemas.events import Resource

from swf_panda_workers.core.effects import Effect, effect_from
from swf_panda_workers.core.idds_gateway import Answer
from swf_panda_workers.core.messages import InvalidMessage, Message, parse_message
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
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
    ]


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
        _run_resource(namespace, run_id)
        if run_id
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


def stream_event(
    messages: Sequence[StreamMessage], namespace: str, listener: str | None = None
) -> Event:
    """Stream messages of one or more runs (at most STREAM_MAX_RUNS) in one
    event of the namespace, related to each of the runs and their flow runs
    (the Prefect UI shows it on theirs). It occurred when its first message
    was received: a run's history, read from its announcement on, never
    misses it."""
    flow_runs = {m.run_id: m.flow_run_id for m in messages}
    runs = sorted(flow_runs)
    if len(runs) > STREAM_MAX_RUNS:
        raise ValueError(f"a stream batch holds at most {STREAM_MAX_RUNS} runs, not {len(runs)}")
    resource = {"prefect.resource.id": namespace_resource_id(namespace), "swf.namespace": namespace}
    if listener is not None:
        resource[LISTENER_LABEL] = listener
    ids = [message_event_id(namespace, m.delivery_key) for m in messages]
    return Event(
        id=uuid.uuid5(_IDS, "|".join(map(str, ids))),
        occurred=min(m.received for m in messages),
        event=STREAM_EVENT,
        resource=resource,
        related=[
            related
            for run_id in runs
            for related in (
                {
                    "prefect.resource.id": run_resource_id(namespace, run_id),
                    "prefect.resource.role": RUN_ROLE,
                },
                *_flow_run_related(flow_runs[run_id]),
            )
        ],
        payload={
            "messages": [
                {
                    "id": str(event_id),
                    "msg_type": m.msg_type,
                    "run_id": m.run_id,
                    "received": m.received.isoformat(),
                    "message": m.body,
                }
                for event_id, m in zip(ids, messages, strict=True)
            ]
        },
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
        # unpacks hundreds a second; so ``occurred`` stays the stdlib datetime
        # it parses to (no conversion to Prefect's DateTime, a subclass).
        found.append(
            Event.model_construct(
                id=uuid.UUID(item["id"]),
                occurred=datetime.fromisoformat(item["received"]),  # type: ignore[arg-type]
                event=message_event_name(item["msg_type"]),
                resource=Resource.model_construct(root=resource),
                related=[],
                payload={"message": item["message"]},
            )
        )
    return found


STALL_EVENT = "swf.run.stalled"  # not among a run's inputs: a report for operators


def stall_event(
    namespace: str,
    run_id: str,
    waiting_for: str,
    idle_seconds: float,
    flow_run_id: uuid.UUID | None,
) -> Event:
    """A run that made no progress for ``idle_seconds``, waiting for ``waiting_for``."""
    return Event(
        occurred=utc_now(),
        event=STALL_EVENT,
        resource=_run_resource(namespace, run_id),
        related=_flow_run_related(flow_run_id),
        payload={"waiting_for": waiting_for, "idle_seconds": round(idle_seconds, 1)},
    )


def effect_event(
    effect: Effect, namespace: str, run_id: str, flow_run_id: uuid.UUID | None
) -> Event:
    name, payload = encode_effect(effect)
    return Event(
        occurred=utc_now(),
        event=name,
        resource=_run_resource(namespace, run_id),
        related=_flow_run_related(flow_run_id),
        payload=payload,
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
            return decode_effect(event)
        if event.event.startswith((MESSAGE_EVENT, ANSWER_EVENT)):
            return parse_message(event.payload["message"])
    except (KeyError, InvalidMessage, ValueError) as exc:
        log.warning("event %s (%s) is unreadable: %s", event.id, event.event, exc)
        return None
    return None


# An effect's journal event, both ways: the one place that knows how an
# effect is written into an event and read back out of one.
def encode_effect(effect: Effect) -> tuple[str, dict[str, Any]]:
    """The name and payload of the event that journals ``effect``."""
    return EFFECT_EVENT + effect.kind, {"effect": effect.model_dump(mode="json")}


def decode_effect(event: Event) -> Effect:
    """The effect a journal event (named EFFECT_EVENT + kind) carries; a
    KeyError or ValueError if it holds none."""
    return effect_from(event.payload["effect"], plain_utc(event.occurred))


# Every event a run's feed is made of: what the listener heard (alone, or in
# stream batches), what the flow did, and iDDS's REST answers (without them a
# retried REST flow run never learns the ids an earlier attempt got, and
# waits for a reply that REST mode never sends).
RUN_EVENT_PREFIXES = (MESSAGE_EVENT, STREAM_PREFIX, EFFECT_EVENT, ANSWER_EVENT)
# A run's stream, alone or batched: what a reader that wants none of it excludes.
STREAM_EVENTS = (*sorted(message_event_name(t) for t in STREAM_TYPES), STREAM_PREFIX)
