"""Bad input on the real bus, through the real listener: each kind is copied
whole to the dead-letter queue with the reason in the header
``swf_reject_reason`` (and logged, on one line), and acked; the listener
stays up, and a run in progress meanwhile completes. Messages of another
namespace are not ours: not acted on, not set aside.

Every bad body carries a fresh nonce, so its dead-letter copy is found by
comparing bodies byte for byte (which also shows the copy is whole).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from conftest import once
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings

from swf_panda_workers.adapters.prefect_events.history import run_history
from swf_panda_workers.adapters.prefect_events.schema import run_resource_id
from swf_panda_workers.adapters.stomp_bus import BusClient, Delivery, Subscription
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.timestamps import utc_now
from swf_testbed.demo import flow_run_states
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session

pytestmark = [
    pytest.mark.integration,
    once("what the listener does with bad input; no Prefect database in it"),
]

WAIT = 90.0  # s; every wait returns as soon as its condition holds
TOPIC, QUEUE = "topic", "queue"
RUN_ID_RULE = (
    "run_id: Value error, run_id must be 1-64 characters of letters, digits, '_', '.', '-'"
)


class DeadLetters:
    """A consumer of the dead-letter queue: every copy it receives, by body."""

    def __init__(self, brokers: Brokers) -> None:
        self._copies: list[Delivery] = []
        self._changed = threading.Condition()
        self._bus = BusClient(
            brokers,
            (Subscription(brokers.dead_letter_queue, ack="auto"),),
            self._arrived,
            name="test-dead-letters",
        )

    def _arrived(self, delivery: Delivery) -> None:  # stomp.py's receiver thread
        with self._changed:
            self._copies.append(delivery)
            self._changed.notify_all()

    def copies_of(self, body: bytes) -> list[Delivery]:
        with self._changed:
            return [copy for copy in self._copies if copy.body == body]

    def wait_for(self, body: bytes, timeout: float = WAIT) -> Delivery:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(c.body == body for c in self._copies), timeout
            )
        assert found, f"no dead-letter copy of {body[:120]!r} within {timeout}s"
        return self.copies_of(body)[0]

    def __enter__(self) -> DeadLetters:
        self._bus.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._bus.stop()


@dataclass(frozen=True)
class Bad:
    """One bad message: where it is sent, its body (with ``{nonce}`` to fill
    in), the reason the listener must give, and headers of the sender's."""

    name: str
    where: str
    body: bytes
    reason: str
    headers: dict[str, str] = field(default_factory=dict)

    def made(self) -> bytes:
        return self.body.replace(b"{nonce}", uuid.uuid4().hex.encode())


def obj(**fields: object) -> bytes:
    return json.dumps({**fields, "nonce": "{nonce}"}).encode()


TEN_MB = (
    b'{"msg_type": "end_run", "run_id": "1", "nonce": "{nonce}", "pad": "'
    + b"x" * 10_000_000
    + b'"}'
)

CASES = [
    Bad(
        "malformed JSON",
        TOPIC,
        b'{"msg_type": "end_run", "run_id": "{nonce}"',
        "body is not JSON: Expecting ',' delimiter at line 1",
    ),
    Bad("a JSON array", TOPIC, b'["{nonce}", 1]', "body is a JSON list, not an object"),
    Bad("a JSON string", TOPIC, b'"{nonce}"', "body is a JSON str, not an object"),
    Bad("missing run_id", TOPIC, obj(msg_type="end_run"), "run_id: Field required"),
    Bad("empty run_id", TOPIC, obj(msg_type="end_run", run_id=""), RUN_ID_RULE),
    Bad(
        "unknown msg_type",
        TOPIC,
        obj(msg_type="no_such_type", run_id="1"),
        "msg_type: unknown message type 'no_such_type'",
    ),
    Bad(
        "text where an integer belongs",
        TOPIC,
        obj(
            msg_type="created_workflow_task",
            run_id="1",
            content={"request_id": "abc", "transform_id": 1},
        ),
        "content.request_id: Input should be a valid integer, unable to parse string as an integer",
    ),
    Bad(
        "text where a number belongs",
        TOPIC,
        obj(msg_type="run_imminent_worker", run_id="1", content={"num_workers": "many"}),
        "content.num_workers: Input should be a valid integer, unable to parse string as an "
        "integer",
    ),
    Bad(
        "a list as run_id",
        TOPIC,
        obj(msg_type="end_run", run_id=["1"]),
        "run_id: Value error, run_id must be a string or an integer",
    ),
    Bad(
        "a 10 MB body",
        TOPIC,
        TEN_MB,
        f"body of {len(TEN_MB) + 32 - 7} bytes is over the 1000000 byte limit",
    ),
    Bad(
        "invalid UTF-8",
        TOPIC,
        b'{"msg_type": "end_run", "run_id": "\xff\xfe{nonce}"}',
        "body is not UTF-8: invalid start byte at byte 35",
    ),
    Bad(
        "selector injection in run_id",
        TOPIC,
        obj(msg_type="end_run", run_id="1' OR '1'='1"),
        RUN_ID_RULE,
    ),
    Bad(
        "selector injection in an announcement's run_id",
        TOPIC,
        obj(msg_type="run_imminent_worker", run_id="1' OR namespace<>'x"),
        RUN_ID_RULE,
    ),
    Bad(
        "path injection in run_id", TOPIC, obj(msg_type="end_run", run_id="../../etc"), RUN_ID_RULE
    ),
    Bad(
        "path traversal inside run_id", TOPIC, obj(msg_type="end_run", run_id="x/../y"), RUN_ID_RULE
    ),
    Bad("newline in run_id", TOPIC, obj(msg_type="end_run", run_id="1\n2"), RUN_ID_RULE),
    # The sender's headers are not the body: they neither make it good nor
    # reach the copy (a forged reason, a forged origin).
    Bad(
        "injection in the headers",
        TOPIC,
        obj(msg_type="end_run", run_id="../../etc"),
        RUN_ID_RULE,
        headers={
            "run_id": "1' OR '1'='1",
            "msg_type": "run_imminent",
            "swf_reject_reason": "forged",
            "swf_original_destination": "/queue/forged",
        },
    ),
    # Input quoted in a reason is escaped: one header line, one log line.
    Bad(
        "newline, colon and NUL in msg_type",
        TOPIC,
        obj(msg_type="x\nswf_reject_reason:forged\u0000", run_id="1"),
        r"msg_type: unknown message type 'x\nswf_reject_reason:forged\x00'",
    ),
    # These four were accepted, then failed the hand-off to Prefect and took
    # the listener down (and again on every redelivery).
    Bad(
        "a lone surrogate",
        TOPIC,
        obj(msg_type="end_run", run_id="1", text="\ud800"),
        r"body holds the lone surrogate \ud800, which is not Unicode text",
    ),
    Bad(
        "an integer of 5000 digits",
        TOPIC,
        b'{"msg_type": "end_run", "run_id": "1", "nonce": "{nonce}", "n": ' + b"7" * 5000 + b"}",
        "body is not JSON: Exceeds the limit (4300 digits) for integer string conversion",
    ),
    Bad(
        "300 levels of nesting",
        TOPIC,
        obj(msg_type="end_run", run_id="1", content={"deep": "{deep}"}).replace(
            b'"{deep}"', b"[" * 300 + b"]" * 300
        ),
        "body is nested deeper than 32 levels",
    ),
    Bad(
        "NaN",
        TOPIC,
        b'{"msg_type": "run_imminent", "run_id": "1", "nonce": "{nonce}", "content": '
        b'{"slice_processing_time": NaN}}',
        "body is not JSON: NaN is not a JSON number",
    ),
    Bad(
        "malformed JSON on the results queue",
        QUEUE,
        b'{"msg_type": "slice_result" {nonce}',
        "body is not JSON: Expecting ',' delimiter at line 1",
    ),
    Bad(
        "a 10 MB body on the results queue",
        QUEUE,
        TEN_MB,
        f"body of {len(TEN_MB) + 32 - 7} bytes is over the 1000000 byte limit",
    ),
    Bad(
        "a run announcement on the results queue",
        QUEUE,
        obj(msg_type="run_imminent_worker", run_id="1"),
        "run_imminent_worker does not belong on /queue/panda.results.worker, which carries "
        "no namespace",
    ),
]


CASE = {case.name: case for case in CASES}


@pytest.fixture(scope="module")
def dead_letters(stack: EmbeddedStack) -> Iterator[DeadLetters]:
    with DeadLetters(stack.brokers) as consumer:
        yield consumer


@pytest.fixture(scope="module")
def sender(stack: EmbeddedStack) -> Iterator[BusClient]:
    with BusClient(stack.brokers, name="test-bad-input-sender") as bus:
        yield bus


@pytest.fixture(autouse=True)
def listener_up(stack: EmbeddedStack) -> None:
    """A test that took the listener down fails on its own; the next starts
    with a listener again."""
    assert stack.listener is not None
    if not stack.listener.alive:
        stack.start_listener()


def send(
    stack: EmbeddedStack,
    bus: BusClient,
    where: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    namespace: str | None = None,
) -> str:
    """Send as a peer does; returns the destination."""
    brokers = stack.brokers
    destination = brokers.workers_topic if where == TOPIC else brokers.results_destination
    sent = {"persistent": "true", **(headers or {})}
    if where == TOPIC:  # the topic's selector: only our namespace reaches the listener
        sent["namespace"] = namespace or stack.settings.transceiver.namespace
    elif namespace is not None:
        sent["namespace"] = namespace
    bus.send_raw(destination, body, sent, timeout=60)
    return destination


def listener_log(stack: EmbeddedStack) -> str:
    return (stack.logs / "listener.log").read_text(errors="replace")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_set_aside_with_its_reason(
    stack: EmbeddedStack,
    dead_letters: DeadLetters,
    sender: BusClient,
    case: Bad,
) -> None:
    body = case.made()
    destination = send(stack, sender, case.where, body, case.headers)

    copy = dead_letters.wait_for(body)
    assert len(copy.body) == len(body)  # whole, byte for byte (matched by equality)
    assert copy.headers["swf_reject_reason"] == case.reason
    assert copy.headers["swf_original_destination"] == destination
    assert copy.headers["persistent"] == "true"
    original_id = copy.headers["swf_original_message_id"]
    assert original_id.startswith("ID:")
    if case.name == "newline, colon and NUL in msg_type":
        # Kept on the log: that input quoted in a reason cannot forge a log
        # line shows nowhere else (the header above is the reason's outcome).
        # Logged before the copy is sent, so already in the log.
        assert (
            f"rejected message {original_id} from {destination}: {case.reason}\n"
            in listener_log(stack)
        )
    assert stack.listener is not None and stack.listener.alive


def test_a_run_completes_while_every_kind_of_bad_input_arrives(
    stack: EmbeddedStack,
    dead_letters: DeadLetters,
    sender: BusClient,
    namespace: str,
    new_run_id: Callable[[], str],
) -> None:
    bodies = [(case, case.made()) for case in CASES]
    failures: list[BaseException] = []

    def pour() -> None:
        try:
            for case, body in bodies:
                send(stack, sender, case.where, body, case.headers)
        except BaseException as exc:  # re-raised as a failure by the test, below
            failures.append(exc)

    with PeerHarness(stack.brokers, namespace, slices_per_run=20, idle_timeout=3) as peers:
        run_id = new_run_id()
        pouring = threading.Thread(target=pour, name="bad-input")
        pouring.start()
        session = play_session(peers, [run_id], "testbed", 20)
        pouring.join(WAIT)
        assert not failures and not pouring.is_alive()
        assert session.ok, f"the run did not complete: {session}"
        for msg_type in ("create_workflow_task", "stop_transformer", "close_workflow_task"):
            assert peers.recorder.count(msg_type, run_id) == 1, msg_type
    for case, body in bodies:
        assert dead_letters.wait_for(body).headers["swf_reject_reason"] == case.reason
    states = asyncio.run(flow_run_states(stack.api_url, [run_id], namespace))
    assert states == {run_id: "Completed"}
    assert stack.listener is not None and stack.listener.alive


def test_what_was_set_aside_is_not_delivered_again_after_a_restart(
    stack: EmbeddedStack,
    dead_letters: DeadLetters,
    sender: BusClient,
) -> None:
    # Acked means gone from the broker: a restarted listener gets it again
    # only if it was not. Redeliveries come before anything sent later, so
    # once a later message's copy is back, any repeat would have shown.
    bodies = [CASE[name].made() for name in ("malformed JSON", "a JSON array", "empty run_id")]
    for body in bodies:
        send(stack, sender, TOPIC, body)
        dead_letters.wait_for(body)
    queued = CASE["malformed JSON on the results queue"].made()
    send(stack, sender, QUEUE, queued)
    dead_letters.wait_for(queued)

    assert stack.listener is not None
    stack.listener.stop()
    stack.start_listener()
    for where in (TOPIC, QUEUE):
        later = CASE["malformed JSON"].made()
        send(stack, sender, where, later)
        dead_letters.wait_for(later)
    for body in [*bodies, queued]:
        assert len(dead_letters.copies_of(body)) == 1


def test_messages_of_another_namespace_are_not_ours(
    stack: EmbeddedStack,
    dead_letters: DeadLetters,
    sender: BusClient,
    namespace: str,
    new_run_id: Callable[[], str],
) -> None:
    # On the topic, the selector keeps them from the listener altogether.
    foreign_run = new_run_id()
    send(
        stack,
        sender,
        TOPIC,
        json.dumps(
            {
                "msg_type": "run_imminent_worker",
                "run_id": foreign_run,
                "namespace": "other",
                "content": {"target_worker_count": 1},
            }
        ).encode(),
        namespace="other",
    )
    foreign_garbage = CASE["malformed JSON"].made()
    send(stack, sender, TOPIC, foreign_garbage, namespace="other")
    # The listener handles the topic in order: once a later message of ours
    # is set aside, the two before it would have been handled.
    ours = CASE["malformed JSON"].made()
    send(stack, sender, TOPIC, ours)
    dead_letters.wait_for(ours)
    assert asyncio.run(flow_runs_of(stack.api_url, foreign_run)) == 0
    assert dead_letters.copies_of(foreign_garbage) == []

    # On the results queue (no selector: results name no namespace), a result
    # naming another namespace is dropped even for a run number we own, as is
    # a result of a run we do not own; only our own run's results are kept.
    with PeerHarness(stack.brokers, namespace, slices_per_run=5, idle_timeout=3) as peers:
        run_id = new_run_id()
        since = utc_now() - timedelta(minutes=1)
        peers.control.announce(run_id, "testbed")
        assert peers.wait_until(lambda: peers.task_created(run_id), WAIT)

        def result(run: str, hostname: str) -> bytes:
            return json.dumps(
                {
                    "msg_type": "slice_result",
                    "run_id": run,
                    "content": {"state": "done", "hostname": hostname, "processing_time": 0.1},
                }
            ).encode()

        nonce = uuid.uuid4().hex
        send(stack, sender, QUEUE, result(run_id, f"foreign-{nonce}"), namespace="other")
        unowned = new_run_id()
        send(stack, sender, QUEUE, result(unowned, f"unowned-{nonce}"))
        send(stack, sender, QUEUE, result(run_id, f"sentinel-{nonce}"))

        def hostnames(run: str) -> set[str]:
            events = asyncio.run(history(stack.api_url, run_resource_id(namespace, run), since))
            return {
                str(e.payload["message"].get("content", {}).get("hostname"))
                for e in events
                if e.event == "swf.bus.slice_result"
            }

        assert peers.wait_until(lambda: f"sentinel-{nonce}" in hostnames(run_id), WAIT)
        assert f"foreign-{nonce}" not in hostnames(run_id)
        assert hostnames(unowned) == set()
        peers.control.end(run_id, "testbed")
        assert peers.wait_until(lambda: peers.task_closed(run_id), WAIT)
    for body in (result(run_id, f"foreign-{nonce}"), result(unowned, f"unowned-{nonce}")):
        assert dead_letters.copies_of(body) == []


async def flow_runs_of(api_url: str, run_id: str) -> int:
    """Flow runs of this run number, whatever their namespace."""
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            return len(
                await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}"]))
                )
            )


async def history(api_url: str, resource_id: str, since: datetime) -> list[Event]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        return await run_history(resource_id, since)
