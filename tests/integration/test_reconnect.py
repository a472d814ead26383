"""The service survives the broker going away: stomp.py neither reconnects
nor resubscribes by itself, so this proves our BusClient does."""

import re
import time
from collections.abc import Callable

import pytest
from conftest import once

from swf_testbed.launchers.activemq import ActiveMQ
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session

pytestmark = [pytest.mark.integration, once("the broker restarting under the listener")]


def test_listener_reconnects_and_resubscribes_after_a_broker_restart(
    broker: ActiveMQ, stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    assert stack.listener is not None
    listener_pid = stack.listener.pid
    log = stack.logs / "listener.log"
    before = log.stat().st_size

    broker.stop()
    broker.start()
    # The testbed's announcements are not persistent: a durable subscriber
    # that is not back yet would never get one (the broker keeps only
    # persistent messages for it). So the run starts once it is back
    # (readiness, read from its log).
    deadline = time.monotonic() + 60
    while (
        "connected to"
        not in log.read_text(errors="replace")[before:].split("lost the broker", 1)[-1]
    ):
        assert time.monotonic() < deadline, "the listener did not reconnect"
        time.sleep(0.2)

    with PeerHarness(stack.brokers, namespace, slices_per_run=10, idle_timeout=3) as peers:
        run_id = new_run_id()
        session = play_session(peers, [run_id], "testbed", 10)
        assert session.ok
        for msg_type in ("create_workflow_task", "stop_transformer", "close_workflow_task"):
            assert peers.recorder.count(msg_type, run_id) == 1

    # The same process, cut off by the broker's stop, reconnected and
    # subscribed again by itself: the run above reached it on the workers
    # topic and its results on the queue.
    assert stack.listener.alive and stack.listener.pid == listener_pid
    # Kept on the log: the subscription to results naming no run comes back
    # too, and nothing else shows it (that queue is shared with the session's
    # other listeners, so a broker-side read cannot tell whose took a message).
    since_restart = log.read_text(errors="replace")[before:]
    counts = [int(n) for n in re.findall(r"\((\d+) subscriptions\)", since_restart)]
    assert counts and min(counts) >= 2
