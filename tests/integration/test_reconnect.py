"""The service survives the broker going away: stomp.py neither reconnects
nor resubscribes by itself, so this proves our BusClient does."""

import re
import time
from collections.abc import Callable

import pytest
from conftest import once

from swf_panda_workers.embedded.activemq import ActiveMQ
from swf_panda_workers.embedded.stack import EmbeddedStack
from swf_panda_workers.peers.harness import PeerHarness
from swf_panda_workers.peers.scenario import play_session

pytestmark = [pytest.mark.integration, once(
    "the broker restarting under the listener")]


def test_listener_reconnects_and_resubscribes_after_a_broker_restart(
    broker: ActiveMQ, stack: EmbeddedStack, namespace: str, new_run_id: Callable[[], str]
) -> None:
    assert stack.listener is not None
    log = stack.logs / "listener.log"
    before = log.stat().st_size

    broker.stop()
    broker.start()
    # The testbed's announcements are not persistent: a durable subscriber
    # that is not back yet would never get one (the broker keeps only
    # persistent messages for it). So the run starts once it is back.
    deadline = time.monotonic() + 60
    while "connected to" not in log.read_text(errors="replace")[before:].split(
            "lost the broker", 1)[-1]:
        assert time.monotonic() < deadline, "the listener did not reconnect"
        time.sleep(0.2)

    with PeerHarness(stack.brokers, namespace, slices_per_run=10, idle_timeout=3) as peers:
        run_id = new_run_id()
        session = play_session(peers, [run_id], "testbed", 10)
        assert session.ok
        for msg_type in ("create_workflow_task", "stop_transformer", "close_workflow_task"):
            assert peers.recorder.count(msg_type, run_id) == 1

    assert stack.listener.alive
    since_restart = log.read_text(errors="replace")[before:]
    assert "lost the broker" in since_restart  # it really was cut off ...
    # ... and subscribed again: the workers topic, results naming no run, and
    # one per run it still follows.
    counts = [int(n) for n in re.findall(r"\((\d+) subscriptions\)", since_restart)]
    assert counts and min(counts) >= 2
