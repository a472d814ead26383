"""What the listener does with one delivery, decided without any I/O.

``decide`` reads a delivery's body and headers, the namespace, the results
queue's name and the runs the namespace owns, and returns exactly one
``Decision``:

- ``StartRun``: a run announcement; start (or find) the run's flow run;
- ``Record``: a message about a run (or a namespace-wide heartbeat); hand it
  to the run's flow as a Prefect event;
- ``LookUpRun``: a slice result or an iDDS reply of a run this listener has
  not seen start; record it if Prefect holds the run's flow run (another
  listener replica of the namespace started it), else ignore it;
- ``Ignore``: nothing to do, the message is not ours to act on (another
  namespace's, our own requests echoed by the topic, a transformer's result
  naming no run); ack it;
- ``SetAside``: bad input; copy it to the dead-letter queue with ``reason``
  and ack it. ``kind`` classes the reason in a word (for the metrics).

Ignore and SetAside carry the message too when it was parsed: the metrics
count messages by type, and read the size of each run's workers from our own
adjust_worker echoed by the topic.

Namespaces: from the workers topic everything in our namespace is taken,
and from outside it (iDDS's own namespace, or none) only iDDS's replies,
which carry iDDS's namespace and not the requester's. From the results
destination (a queue or a topic) only what transformers send, with no
namespace (as iDDS starts them) or ours.

It never raises: whatever the bytes, the answer is one of the five, and what
is set aside carries a one-line, printable, bounded reason. Which rule
applies to a parsed message is a mapping from its type, not a chain of
comparisons of type names.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from swf_panda_workers.core.messages import (
    AdjustedWorker,
    AdjustWorker,
    ClosedWorkflowTask,
    CloseWorkflowTask,
    CreatedWorkflowTask,
    CreateWorkflowTask,
    Heartbeat,
    InvalidMessage,
    Message,
    RunImminent,
    SliceResult,
    StopTransformer,
    TransformerHeartbeat,
    UnroutedSliceResult,
    decode_body,
    parse_message,
)

# Bodies over this are set aside unread. The biggest real message (a
# run_imminent with the whole upstream run document) is a few kB; a Prefect
# event carries at most about 1.5 MB (PREFECT_EVENTS_MAXIMUM_SIZE_BYTES).
MAX_BODY_BYTES = 1_000_000
# A reason goes into a STOMP header and a log line: one bounded line.
# ActiveMQ drops a connection that sends a header over 10240 bytes; 1000
# printable characters are at most 4000 bytes of UTF-8.
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class StartRun:
    message: RunImminent
    data: dict[str, Any]  # the announcement as received: the flow run's parameter


@dataclass(frozen=True)
class Record:
    message: Message
    data: dict[str, Any]  # the body as received: the event's payload
    run_id: str | None  # None: a heartbeat naming no run, kept with the namespace


# Replies of iDDS: taken from its namespace (or none) too, for our runs only.
IddsReply = CreatedWorkflowTask | AdjustedWorker | ClosedWorkflowTask
IDDS_REPLIES: frozenset[type] = frozenset({CreatedWorkflowTask, AdjustedWorker, ClosedWorkflowTask})


@dataclass(frozen=True)
class LookUpRun:
    message: SliceResult | IddsReply
    data: dict[str, Any]  # the body as received: the event's payload if the run is found


@dataclass(frozen=True)
class Ignore:
    why: str
    message: Message | None = None  # None: dropped unread (another namespace's)


# Why a message was set aside, in a word: a metric label, so a fixed few.
RejectKind = Literal["too_large", "bad_json", "invalid_message", "wrong_queue", "prefect_refused"]


@dataclass(frozen=True)
class SetAside:
    reason: str
    kind: RejectKind
    message: Message | None = None  # None: it did not parse


Decision = StartRun | Record | LookUpRun | Ignore | SetAside


@dataclass(frozen=True)
class Inbox:
    """Where the listener takes messages from, and for whom."""

    namespace: str
    results_destination: str  # a queue or a topic
    idds_namespace: str | None = None  # iDDS's, when not ours


@dataclass(frozen=True)
class Where:
    """What the rules need to know besides the message."""

    namespace: str
    owned: Container[str]
    destination: str


Rule = Callable[[Any, dict[str, Any], Where], Decision]


def _start_run(message: RunImminent, data: dict[str, Any], where: Where) -> Decision:
    return StartRun(message, data)


def _record(message: Message, data: dict[str, Any], where: Where) -> Decision:
    return Record(message, data, getattr(message, "run_id", None))


def _record_if_owned(
    message: SliceResult | IddsReply, data: dict[str, Any], where: Where
) -> Decision:
    # Results and iDDS's replies carry no namespace of ours: one for a run this
    # listener did not see start belongs to another namespace (or to none),
    # unless another replica of this namespace started the run; only Prefect knows.
    if message.run_id not in where.owned:
        return LookUpRun(message, data)
    return Record(message, data, message.run_id)


def _unrouted(message: UnroutedSliceResult, data: dict[str, Any], where: Where) -> Decision:
    # Not bad input: the real transformers send these whenever one takes
    # another's heartbeat off the shared slice queue. Counted, not set aside.
    return Ignore(
        "slice_result without run_id: a transformer's answer to a message "
        "that was no slice (a heartbeat on its slice queue)",
        message,
    )


def _own_echo(message: Message, data: dict[str, Any], where: Where) -> Decision:
    return Ignore(f"{message.msg_type} is a request to a peer, echoed by the topic", message)


OUR_REQUESTS: frozenset[type] = frozenset(
    {CreateWorkflowTask, AdjustWorker, CloseWorkflowTask, StopTransformer}
)

RULES: Mapping[type, Rule] = {
    RunImminent: _start_run,
    SliceResult: _record_if_owned,
    CreatedWorkflowTask: _record_if_owned,
    AdjustedWorker: _record_if_owned,
    ClosedWorkflowTask: _record_if_owned,
    UnroutedSliceResult: _unrouted,
    CreateWorkflowTask: _own_echo,
    AdjustWorker: _own_echo,
    CloseWorkflowTask: _own_echo,
    StopTransformer: _own_echo,
}
# The results destination carries no namespace (iDDS's transformers send
# none), so only what transformers send is taken from it: a run announcement
# or an iDDS reply there could be any namespace's.
FROM_RESULTS: frozenset[type] = frozenset(
    (SliceResult, UnroutedSliceResult, Heartbeat, TransformerHeartbeat)
)


def decide(
    body: bytes, headers: Mapping[str, str], inbox: Inbox, owned: Container[str]
) -> Decision:
    """The one thing to do with a delivery of ``body`` with ``headers``."""
    namespace = inbox.namespace
    where = Where(namespace, owned, headers.get("destination", ""))
    from_results = where.destination == inbox.results_destination
    # An empty header is no namespace (swf-transform's heartbeats send one).
    sender = headers.get("namespace") or None
    outside = (None, namespace) if from_results else (None, namespace, inbox.idds_namespace)
    if sender not in outside:
        return Ignore(f"namespace {one_line(sender or '', 100)} is not {namespace}")
    if len(body) > MAX_BODY_BYTES:
        return SetAside(
            f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} byte limit", "too_large"
        )
    try:
        data = decode_body(body)
    except InvalidMessage as exc:
        return SetAside(one_line(str(exc)) or "invalid JSON", "bad_json")
    try:
        message = parse_message(data)
    except InvalidMessage as exc:
        return SetAside(one_line(str(exc)) or "invalid message", "invalid_message")
    if from_results and type(message) not in FROM_RESULTS:
        return SetAside(
            f"{message.msg_type} does not belong on {where.destination}, which "
            f"carries no namespace",
            "wrong_queue",
            message,
        )
    if (
        not from_results
        and sender != namespace
        and not _taken_from_outside(message, data, namespace)
    ):
        # Another namespace's business: no message, so no metric reads it as ours.
        return Ignore(
            f"{message.msg_type} from namespace {sender or '(none)'}: only iDDS's "
            f"replies are taken from outside {namespace}"
        )
    return RULES.get(type(message), _record)(message, data, where)


def _taken_from_outside(message: Message, data: dict[str, Any], namespace: str) -> bool:
    """iDDS's replies, and our own requests to an iDDS in another namespace
    (they carry its namespace header, and ours in the body)."""
    return type(message) in IDDS_REPLIES or (
        type(message) in OUR_REQUESTS and data.get("namespace") == namespace
    )


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most about ``limit`` characters:
    control characters (newline, NUL, ...) escaped as in Python literals, so
    that input quoted in a reason can neither forge a log line nor break the
    STOMP header it travels in."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(line) > limit:
        return f"{line[:limit]}... ({len(line)} characters in all)"
    return line
