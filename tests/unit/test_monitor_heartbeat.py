"""What the swf-monitor heartbeat says: the listener's health mapped to the
monitor's status and operational state, the body, and what each answer of
the monitor means. Tables, no I/O."""

from __future__ import annotations

import pytest

from listeners.bus_listener import ListenerHealth
from swf_panda_workers.adapters.swf_monitor import answer_outcome
from swf_panda_workers.core.monitor_heartbeat import (
    AgentIdentity,
    AgentState,
    agent_state,
    default_instance_name,
    describe,
    exit_state,
    heartbeat_payload,
)


def health(
    listening: bool = True, bus: bool = True, prefect: bool = True, runs: int | None = 0
) -> ListenerHealth:
    return ListenerHealth(
        listening=listening, bus_connected=bus, prefect_reachable=prefect, runs_active=runs
    )


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        # starting: nothing yet (what HealthSource gives before the listener exists)
        (
            health(listening=False, bus=False, prefect=False, runs=None),
            AgentState("WARNING", "STARTING", False),
        ),
        # connected, not yet subscribed
        (health(listening=False, bus=True, runs=None), AgentState("OK", "STARTING", True)),
        # listening, runs not counted yet, or none
        (health(runs=None), AgentState("OK", "READY", True)),
        (health(runs=0), AgentState("OK", "READY", True)),
        # runs in progress
        (health(runs=1), AgentState("OK", "PROCESSING", True)),
        (health(runs=7), AgentState("OK", "PROCESSING", True)),
        # the bus lost: WARNING, whatever it was doing
        (health(bus=False, runs=0), AgentState("WARNING", "READY", False)),
        (health(bus=False, runs=3), AgentState("WARNING", "PROCESSING", False)),
        # Prefect unreachable is said in the description only
        (health(prefect=False, runs=0), AgentState("OK", "READY", True)),
    ],
)
def test_state_from_health(snapshot: ListenerHealth, expected: AgentState) -> None:
    assert agent_state(snapshot) == expected


@pytest.mark.parametrize(
    ("snapshot", "failed", "expected"),
    [
        (health(bus=False), False, AgentState("EXITED", "EXITED", False)),
        (health(bus=True, runs=4), False, AgentState("EXITED", "EXITED", True)),
        (health(bus=False), True, AgentState("ERROR", "EXITED", False)),
    ],
)
def test_exit_state(snapshot: ListenerHealth, failed: bool, expected: AgentState) -> None:
    assert exit_state(snapshot, failed) == expected


@pytest.mark.parametrize(
    ("namespace", "replica", "hostname", "expected"),
    [
        ("dev", None, "node1", "panda-workers-dev-node1"),
        ("epic", "a", "node1.bnl.gov", "panda-workers-epic-a-node1.bnl.gov"),
    ],
)
def test_default_instance_name(
    namespace: str, replica: str | None, hostname: str, expected: str
) -> None:
    assert default_instance_name(namespace, replica, hostname) == expected


def test_a_long_default_instance_name_fits_the_monitors_column() -> None:
    # Over 100 characters swf-monitor fails with a server error; two long
    # names that differ only at their end must stay two names.
    long_a = default_instance_name("n" * 64, "r" * 64, "host-a.example.org")
    long_b = default_instance_name("n" * 64, "r" * 64, "host-b.example.org")
    assert len(long_a) == len(long_b) == 100 and long_a != long_b
    assert long_a.startswith("panda-workers-nnnn")


@pytest.mark.parametrize(
    ("snapshot", "exit_reason", "parts"),
    [
        (
            health(runs=2),
            None,
            [
                "listener swf-panda-workers-dev",
                "MQ: connected",
                "Prefect: reachable",
                "runs in progress: 2",
            ],
        ),
        (
            health(bus=False, prefect=False, runs=None),
            None,
            ["MQ: disconnected", "Prefect: not reachable", "runs in progress: not counted yet"],
        ),
        (health(runs=2), "stopped", ["exited: stopped"]),
    ],
)
def test_description(snapshot: ListenerHealth, exit_reason: str | None, parts: list[str]) -> None:
    text = describe(snapshot, "swf-panda-workers-dev", exit_reason)
    assert "\n" not in text
    for part in parts:
        assert part in text
    if exit_reason:
        assert "runs in progress" not in text


def test_payload_has_what_the_testbed_agents_send() -> None:
    identity = AgentIdentity("panda-workers-dev-h", "panda_workers", "dev", 4242, "h")
    payload = heartbeat_payload(identity, AgentState("OK", "PROCESSING", True), "text")

    assert payload == {
        "instance_name": "panda-workers-dev-h",
        "agent_type": "panda_workers",
        "status": "OK",
        "operational_state": "PROCESSING",
        "namespace": "dev",
        "pid": 4242,
        "hostname": "h",
        "description": "text",
        "mq_connected": True,
    }


@pytest.mark.parametrize(
    ("status", "location", "body", "delivered", "kind", "says"),
    [
        (201, None, b'{"id": 1, "instance_name": "x"}', True, "delivered", "HTTP 201"),
        (200, None, b'{"id": 1}', True, "delivered", "HTTP 200"),
        # a 200 that is not the agent: a proxy's or a login page
        (200, None, b"<html>Sign in</html>", False, "not the agent's JSON", "<html>Sign in"),
        (200, None, b"[1, 2]", False, "not the agent's JSON", "not the agent's JSON"),
        (200, None, b"", False, "not the agent's JSON", "no body"),
        # redirects: said, never followed; the login's query is left out
        (
            302,
            "https://sso.example/auth?state=s3cr3t&next=/api/",
            b"",
            False,
            "redirect",
            "a redirect to https://sso.example/auth, not followed",
        ),
        (301, None, b"", False, "redirect", "nowhere"),
        (401, None, b'{"detail": "Invalid token."}', False, "HTTP 401", "SWF_API_TOKEN"),
        (403, None, b'{"detail": "no"}', False, "HTTP 403", "token was refused"),
        (
            400,
            None,
            b'{"agent_type": ["\\"panda_workers\\" is not a valid choice."]}',
            False,
            "HTTP 400",
            "monitor.agent_type",
        ),
        (
            503,
            None,
            b"<html>\n<body>503\x00 Service Unavailable</body>\n</html>",
            False,
            "HTTP 503",
            "<html> <body>503? Service Unavailable</body> </html>",
        ),
        (500, None, b"x" * 1000, False, "HTTP 500", "x" * 200 + "..."),
    ],
)
def test_answers(
    status: int, location: str | None, body: bytes, delivered: bool, kind: str, says: str
) -> None:
    outcome = answer_outcome(status, location, body)

    assert (outcome.delivered, outcome.kind) == (delivered, kind)
    assert says in outcome.detail
    assert "s3cr3t" not in outcome.detail
