"""The listener process heartbeats to swf-monitor (its stand-in, on a local
port) while it runs runs through the real broker and Prefect server: READY,
PROCESSING while a run is in progress, READY after, EXITED after SIGTERM.
A monitor that goes away mid-run, or hangs at shutdown, holds up nothing."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
from conftest import once
from prefect_reads import final_flow_run
from stacks import MONITOR_NAMESPACE, MONITOR_TOKEN

from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.monitor import HUNG, HeartbeatCall, MonitorStandIn

pytestmark = [
    pytest.mark.integration,
    once("heartbeats to swf-monitor; the Prefect database has no part in them"),
]

NAMESPACE, TOKEN = MONITOR_NAMESPACE, MONITOR_TOKEN  # monitor_stack's (stacks.py)
SHAPE = "testbed"
SLICES = 20
WAIT = 180.0  # generous: the machine is shared and busy; waits end when met
INSTANCE = f"panda-workers-{NAMESPACE}-{socket.gethostname()}"


@pytest.fixture
def since(monitor_stack: EmbeddedStack, monitor: MonitorStandIn) -> int:
    """A new listener process for the test; where its heartbeats start in
    the stand-in's records."""
    if monitor_stack.listener is not None:
        monitor_stack.listener.stop()
    start = len(monitor.records())
    monitor_stack.start_listener()
    return start


def ours(monitor: MonitorStandIn, since: int = 0) -> list[HeartbeatCall]:
    """This listener's requests from the ``since``-th on, answered or not."""
    return [c for c in monitor.records()[since:] if c.field("instance_name") == INSTANCE]


def state(call: HeartbeatCall) -> tuple[str, str]:
    return call.field("status"), call.field("operational_state")


def wait_state(monitor: MonitorStandIn, wanted: tuple[str, str], since: int = 0) -> int:
    """Wait for an accepted heartbeat in state ``wanted``; its index in the records."""

    def found() -> int | None:
        records = monitor.records()
        return next(
            (
                i
                for i in range(since, len(records))
                if records[i].accepted
                and records[i].field("instance_name") == INSTANCE
                and state(records[i]) == wanted
            ),
            None,
        )

    assert monitor.wait_for(lambda: found() is not None, WAIT), (
        f"no {wanted} heartbeat; seen: {[state(c) for c in ours(monitor, since)]}"
    )
    index = found()
    assert index is not None
    return index


def listener_log(stack: EmbeddedStack, start: int = 0) -> str:
    """The listener's log (all its lives), from byte ``start`` on."""
    return (stack.logs / "listener.log").read_bytes()[start:].decode(errors="replace")


def wait_log(stack: EmbeddedStack, start: int, done: Callable[[str], bool]) -> str:
    """Wait until the listener's log from byte ``start`` on satisfies ``done``."""
    deadline = time.monotonic() + WAIT
    while not done(text := listener_log(stack, start)):
        assert time.monotonic() < deadline, f"waited in vain; the log: {text[-3000:]}"
        time.sleep(0.2)
    return text


def monitor_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING swf.monitor" in line]


def log_size(stack: EmbeddedStack) -> int:
    return (stack.logs / "listener.log").stat().st_size


def stop_listener(stack: EmbeddedStack) -> int | None:
    """SIGTERM, as an operator or Kubernetes stops it; its exit status
    (negative: killed, for not exiting within the 30 s grace)."""
    assert stack.listener is not None and stack.listener.process is not None
    stack.listener.stop(grace=30)
    return stack.listener.process.returncode


class Run:
    """One run of the simulated peers, announced now, ended on ``finish``."""

    def __init__(self, stack: EmbeddedStack, peers: PeerHarness, run_id: str) -> None:
        self.stack, self.peers, self.run_id = stack, peers, run_id
        peers.control.announce(run_id, SHAPE, target_workers=2, slice_processing_time=0.5)

    def finish(self) -> None:
        farm = self.peers.farm
        assert farm.wait_for(
            lambda: (r := farm.runs.get(self.run_id)) is not None and r.slices_sent >= SLICES, WAIT
        ), "not every slice was sent"
        self.peers.control.end(self.run_id, SHAPE)
        flow_run = asyncio.run(
            final_flow_run(self.stack.api_url, NAMESPACE, self.run_id, wait=WAIT)
        )
        assert flow_run.state_name == "Completed", flow_run.state
        recorder = self.peers.recorder
        assert recorder.settle(30), "the recorder's marker never came back"
        for msg_type in ("create_workflow_task", "stop_transformer", "close_workflow_task"):
            assert recorder.count(msg_type, self.run_id) == 1, msg_type


def peers_for(stack: EmbeddedStack) -> PeerHarness:
    return PeerHarness(stack.brokers, NAMESPACE, slices_per_run=SLICES, idle_timeout=5)


def test_the_listener_heartbeats_ready_processing_ready_then_exited(
    monitor_stack: EmbeddedStack,
    monitor: MonitorStandIn,
    since: int,
    new_run_id: Callable[[], str],
) -> None:
    ready = wait_state(monitor, ("OK", "READY"), since)
    first = ours(monitor, since)[0]
    assert state(first) == ("WARNING", "STARTING")  # registered before it subscribed
    assert first.field("namespace") == NAMESPACE and first.field("mq_connected") is False

    with peers_for(monitor_stack) as peers:
        run = Run(monitor_stack, peers, new_run_id())
        processing = wait_state(monitor, ("OK", "PROCESSING"), ready)
        run.finish()
    wait_state(monitor, ("OK", "READY"), processing)

    assert stop_listener(monitor_stack) == 0
    calls = ours(monitor, since)
    assert state(calls[-1]) == ("EXITED", "EXITED") and calls[-1].accepted
    assert "exited: stopped" in calls[-1].field("description")
    assert all(c.auth == "ok" and c.accepted for c in calls), [(c.auth, c.status) for c in calls]
    pids = {c.field("pid") for c in calls}
    assert pids == {monitor_stack.listener.process.pid}  # type: ignore[union-attr]
    assert TOKEN not in listener_log(monitor_stack)


def test_a_monitor_gone_mid_run_or_hanging_at_shutdown_holds_up_nothing(
    monitor_stack: EmbeddedStack,
    monitor: MonitorStandIn,
    since: int,
    new_run_id: Callable[[], str],
) -> None:
    log_start = log_size(monitor_stack)
    ready = wait_state(monitor, ("OK", "READY"), since)

    with peers_for(monitor_stack) as peers:
        run = Run(monitor_stack, peers, new_run_id())
        wait_state(monitor, ("OK", "PROCESSING"), ready)
        failing = len(monitor.records())
        monitor.behave("fail")  # 503, as a gateway before a monitor that is down
        assert monitor.wait_for(lambda: len(ours(monitor, failing)) >= 2, WAIT)
        monitor.stop()  # then nothing listens on its port
        run.finish()  # the run goes through its whole life meanwhile
    # Kept on the log: that each failure is logged once, when it started, not
    # at each try, shows nowhere else.
    warnings = monitor_warnings(
        wait_log(monitor_stack, log_start, lambda text: "unreachable" in text)
    )
    assert [("HTTP 503" in w, "unreachable" in w) for w in warnings] == [
        (True, False),
        (False, True),
    ], warnings

    monitor.behave("ok")
    monitor.start()  # back on the same port: the heartbeats resume
    back = len(monitor.records())
    wait_state(monitor, ("OK", "READY"), back)  # delivered again

    monitor.behave("hang")  # every request held 60 s unanswered
    try:
        exit_status = stop_listener(monitor_stack)
    finally:
        monitor.behave("ok")
    # Exited by itself within the 30 s grace (else killed: a negative status),
    # the last heartbeat sent and cut off at monitor.timeout, not waited out.
    assert exit_status == 0
    last = ours(monitor, back)[-1]
    assert last.status == HUNG and state(last) == ("EXITED", "EXITED")
