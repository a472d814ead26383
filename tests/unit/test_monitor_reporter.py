"""The swf-monitor heartbeats (``monitor_heartbeats``, as the listener process
runs them) against the monitor's stand-in on a local port: what is sent and
when, and that a monitor that is down, hangs, refuses or redirects never
stops the reporter nor holds up its stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from listeners.bus_listener import ListenerHealth
from swf_panda_workers.adapters.swf_monitor import (
    HeartbeatReporter,
    MonitorClient,
    monitor_heartbeats,
)
from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.config.schema import Settings
from swf_testbed.peers.monitor import HUNG, LOGIN_PATH, HeartbeatCall, MonitorStandIn

TOKEN = "unit-t0ken-9f8e7d"
WAIT = 10.0
POLL = 0.02  # s between the reporter's looks at the health: changes show at once


@dataclass
class Listener:
    """A listener's health as the test sets it, called as HealthSource is."""

    listening: bool = False
    bus_connected: bool = False
    prefect_reachable: bool = False
    runs_active: int | None = None

    def __call__(self) -> ListenerHealth:
        return ListenerHealth(
            self.listening, self.bus_connected, self.prefect_reachable, self.runs_active
        )

    def ready(self) -> None:
        self.listening = self.bus_connected = self.prefect_reachable = True
        self.runs_active = 0


@pytest.fixture
def stand_in() -> Iterator[MonitorStandIn]:
    with MonitorStandIn(token=TOKEN) as server:
        yield server


def settings(url: str, token: str | None = TOKEN, **monitor: Any) -> Settings:
    environ = {"SWF_API_TOKEN": token} if token else {}
    return settings_from(
        {
            "transceiver": {"namespace": "unit"},
            "monitor": {"url": url, "interval": 60, "timeout": 2, **monitor},
        },
        environ,
    )


def states(calls: list[HeartbeatCall]) -> list[tuple[str, str]]:
    return [(c.field("status"), c.field("operational_state")) for c in calls]


async def until(predicate: Callable[[], bool]) -> None:
    """Let the reporter run until ``predicate`` holds (asserted)."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("waited in vain")


def beat(
    config: Settings,
    listener: Listener,
    body: Callable[[HeartbeatReporter | None, asyncio.Event], Awaitable[None]],
) -> None:
    """Run the heartbeats around ``body`` as the listener process does; it
    ends with ``stopping`` set, then the last heartbeat."""

    async def main() -> None:
        stopping = asyncio.Event()
        async with monitor_heartbeats(config, listener, stopping, poll=POLL) as reporter:
            await body(reporter, stopping)
            stopping.set()

    asyncio.run(main())


def test_heartbeats_follow_the_listener_through_its_states(stand_in: MonitorStandIn) -> None:
    listener = Listener()

    async def life(reporter: HeartbeatReporter | None, _: asyncio.Event) -> None:
        await until(lambda: len(stand_in.heartbeats()) == 1)  # registered at once
        listener.ready()
        await until(lambda: states(stand_in.heartbeats())[-1] == ("OK", "READY"))
        listener.runs_active = 2
        await until(lambda: states(stand_in.heartbeats())[-1] == ("OK", "PROCESSING"))
        listener.runs_active = 0
        await until(lambda: states(stand_in.heartbeats())[-1] == ("OK", "READY"))
        listener.bus_connected = False
        await until(lambda: states(stand_in.heartbeats())[-1] == ("WARNING", "READY"))

    beat(settings(stand_in.url), listener, life)

    calls = stand_in.records()
    # Each change once, at once (the interval, 60 s, never came), then EXITED.
    assert states(calls) == [
        ("WARNING", "STARTING"),
        ("OK", "READY"),
        ("OK", "PROCESSING"),
        ("OK", "READY"),
        ("WARNING", "READY"),
        ("EXITED", "EXITED"),
    ]
    assert [c.status for c in calls] == [201, 200, 200, 200, 200, 200]
    assert all(c.auth == "ok" for c in calls)  # Authorization: Token <token>, every time
    first = calls[0]
    hostname = socket.gethostname()
    assert first.method == "POST" and first.path == "/api/systemagents/heartbeat/"
    assert first.body == {
        "instance_name": f"panda-workers-unit-{hostname}",
        "agent_type": "panda_workers",
        "status": "WARNING",
        "operational_state": "STARTING",
        "namespace": "unit",
        "pid": os.getpid(),
        "hostname": hostname,
        "mq_connected": False,
        "description": first.field("description"),
    }
    assert "MQ: disconnected" in first.field("description")
    assert [c.field("mq_connected") for c in calls] == [False, True, True, True, False, False]
    assert "exited: stopped" in calls[-1].field("description")
    assert stand_in.agents[f"panda-workers-unit-{hostname}"]["status"] == "EXITED"


def test_heartbeats_repeat_every_interval(stand_in: MonitorStandIn) -> None:
    listener = Listener()
    listener.ready()

    async def steady(reporter: HeartbeatReporter | None, _: asyncio.Event) -> None:
        await until(lambda: len(stand_in.heartbeats()) >= 4)

    beat(settings(stand_in.url, interval=0.05, instance_name="panda-a"), listener, steady)

    beats = stand_in.heartbeats("panda-a")
    assert states(beats[:4]) == [("OK", "READY")] * 4


def test_off_without_a_url(stand_in: MonitorStandIn) -> None:
    async def nothing(reporter: HeartbeatReporter | None, _: asyncio.Event) -> None:
        assert reporter is None

    beat(settings_from({}, {}), Listener(), nothing)

    assert stand_in.records() == []


def test_a_listener_that_fails_exits_as_error(stand_in: MonitorStandIn) -> None:
    async def fails(reporter: HeartbeatReporter | None, _: asyncio.Event) -> None:
        await until(lambda: len(stand_in.heartbeats()) == 1)
        raise RuntimeError("the broker refused us")

    with pytest.raises(RuntimeError, match="the broker refused us"):
        beat(settings(stand_in.url), Listener(), fails)

    last = stand_in.heartbeats()[-1]
    assert states([last]) == [("ERROR", "EXITED")]
    assert "RuntimeError" in last.field("description")
    assert "refused us" not in last.field("description")  # its type only: text may quote anything


# --- a monitor that does not answer as it should ---------------------------------------


def failing(
    reporter: HeartbeatReporter | None,
    at_least: int,
    then: Callable[[], None] | None = None,
    delivered: int = 0,
) -> Callable[[HeartbeatReporter | None, asyncio.Event], Awaitable[None]]:
    """A listener life: ready, while heartbeats keep failing (``at_least``
    attempts); ``then`` cures the monitor and the heartbeats get through."""

    async def life(reporter: HeartbeatReporter | None, _: asyncio.Event) -> None:
        assert reporter is not None
        await until(lambda: reporter.attempts >= at_least)
        assert reporter.delivered == 0
        if then is not None:
            then()
            await until(lambda: reporter.delivered > delivered)

    return life


def monitor_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "swf.monitor" and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="swf.monitor")
    return caplog


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_nothing_listening(logs: pytest.LogCaptureFixture) -> None:
    listener = Listener()
    listener.ready()
    seen: list[HeartbeatReporter] = []

    async def life(reporter: HeartbeatReporter | None, stopping: asyncio.Event) -> None:
        assert reporter is not None
        seen.append(reporter)
        await failing(reporter, at_least=3)(reporter, stopping)

    beat(settings(f"http://127.0.0.1:{free_port()}", interval=0.05), listener, life)

    reporter = seen[0]
    assert reporter.attempts >= 4 and reporter.delivered == 0  # the EXITED one tried too
    warnings = monitor_warnings(logs)
    # Once for the failures, however many; once for the last heartbeat.
    assert len(warnings) == 2, warnings
    assert "unreachable: ConnectError" in warnings[0]
    assert "last heartbeat (EXITED/EXITED) was not delivered" in warnings[1]


def test_a_hanging_monitor_neither_blocks_nor_holds_up_the_stop(
    stand_in: MonitorStandIn, logs: pytest.LogCaptureFixture
) -> None:
    stand_in.behave("hang")  # holds each request 60 s unanswered
    listener = Listener()
    listener.ready()
    ticks: list[int] = []

    async def life(reporter: HeartbeatReporter | None, stopping: asyncio.Event) -> None:
        async def tick() -> None:  # the listener's own work on the same event loop
            while True:
                ticks.append(1)
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(tick())
        await until(lambda: len(stand_in.records()) >= 3)
        ticking.cancel()

    beat(settings(stand_in.url, interval=0.05, timeout=0.3), listener, life)

    calls = stand_in.records()
    assert all(c.status == HUNG for c in calls)
    # Cut off, tried again, and the loop went on meanwhile.
    assert len(calls) >= 4 and len(ticks) > len(calls)
    assert states(calls)[-1] == ("EXITED", "EXITED")  # tried, bounded by the timeout
    warnings = monitor_warnings(logs)
    assert len(warnings) == 2 and "no answer within 0.3s" in warnings[0], warnings


def test_503_then_back(stand_in: MonitorStandIn, logs: pytest.LogCaptureFixture) -> None:
    stand_in.behave("fail")
    listener = Listener()
    listener.ready()

    async def life(reporter: HeartbeatReporter | None, stopping: asyncio.Event) -> None:
        assert reporter is not None
        # Cured once the monitor has answered three: the reporter counts an
        # attempt before its request arrives, so its count could run ahead.
        await until(lambda: sum(c.status == 503 for c in stand_in.records()) >= 3)
        stand_in.behave("ok")
        await until(lambda: reporter.delivered > 0)

    beat(settings(stand_in.url, interval=0.05), listener, life)

    calls = stand_in.records()
    assert [c.status for c in calls[:3]] == [503] * 3
    assert calls[-1].accepted and states(calls)[-1] == ("EXITED", "EXITED")
    warnings = monitor_warnings(logs)
    assert len(warnings) == 1 and "HTTP 503" in warnings[0], warnings
    assert any("heartbeats delivered again" in r.getMessage() for r in logs.records)


def test_redirects_are_reported_not_followed(
    stand_in: MonitorStandIn, logs: pytest.LogCaptureFixture
) -> None:
    stand_in.behave("redirect")
    listener = Listener()
    listener.ready()

    beat(
        settings(stand_in.url, interval=0.05),
        listener,
        lambda reporter, stopping: failing(reporter, at_least=3)(reporter, stopping),
    )

    calls = stand_in.records()
    assert calls and all(c.status == 302 for c in calls)
    assert not any(c.path.startswith(LOGIN_PATH) for c in calls)  # never followed
    warnings = monitor_warnings(logs)
    assert len(warnings) == 2, warnings
    assert f"a redirect to {stand_in.url}{LOGIN_PATH}, not followed" in warnings[0]
    assert "Authorization" in warnings[0]


@pytest.mark.parametrize(("token", "auth"), [(None, "missing"), ("not-the-t0ken", "wrong")])
def test_a_refused_token(
    stand_in: MonitorStandIn, logs: pytest.LogCaptureFixture, token: str | None, auth: str
) -> None:
    listener = Listener()
    listener.ready()

    beat(
        settings(stand_in.url, token=token, interval=0.05),
        listener,
        lambda reporter, stopping: failing(reporter, at_least=3)(reporter, stopping),
    )

    calls = stand_in.records()
    assert calls and all(c.status == 403 and c.auth == auth for c in calls)
    warnings = monitor_warnings(logs)
    assert len(warnings) == 2 and "SWF_API_TOKEN" in warnings[0], warnings
    assert TOKEN not in logs.text and "not-the-t0ken" not in logs.text


def test_an_agent_type_the_monitor_does_not_list(logs: pytest.LogCaptureFixture) -> None:
    listener = Listener()
    listener.ready()
    with MonitorStandIn(token=TOKEN, agent_types=("data", "processing", "other")) as stand_in:
        beat(
            settings(stand_in.url, interval=0.05),
            listener,
            lambda reporter, stopping: failing(reporter, at_least=2)(reporter, stopping),
        )
        refused = stand_in.records()
        beat(
            settings(stand_in.url, agent_type="other"),
            listener,
            lambda reporter, stopping: until(lambda: len(stand_in.heartbeats()) == 1),
        )

    assert refused and all(c.status == 400 for c in refused)
    assert "is not a valid choice" in monitor_warnings(logs)[0]
    assert "monitor.agent_type" in monitor_warnings(logs)[0]
    assert [c.field("agent_type") for c in stand_in.heartbeats()] == ["other", "other"]


def test_a_body_that_is_not_the_agent(
    stand_in: MonitorStandIn, logs: pytest.LogCaptureFixture
) -> None:
    stand_in.behave("garbage")
    listener = Listener()
    listener.ready()

    beat(
        settings(stand_in.url, interval=0.05),
        listener,
        lambda reporter, stopping: failing(reporter, at_least=2)(reporter, stopping),
    )

    assert "not the agent's JSON" in monitor_warnings(logs)[0]


def test_an_error_quoting_the_token_is_told_without_it() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers['authorization']}")

    client = MonitorClient(
        "http://monitor.invalid", SecretStr(TOKEN), 1.0, transport=httpx.MockTransport(refuse)
    )
    outcome = asyncio.run(client.post({}))

    assert not outcome.delivered
    assert outcome.detail == "unreachable: LocalProtocolError: Illegal header value Token <token>"
