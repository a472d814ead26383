"""What the listener tells swf-monitor about itself: the heartbeat's body and
the mapping from the listener's health to the monitor's status and
operational state. Pure: no I/O (the HTTP side is
``swf_panda_workers.adapters.swf_monitor``).

The testbed's agents (swf-common-lib's BaseAgent) POST the same fields to
``/api/systemagents/heartbeat/``: ``status`` is OK while the bus is connected,
WARNING when not, EXITED in the last heartbeat; ``operational_state`` is
STARTING until the agent takes work, READY while it waits for work,
PROCESSING while it has some, EXITED at the end. For this service "work" is
a run in progress (a flow run of the namespace not finished)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

HEARTBEAT_PATH = "/api/systemagents/heartbeat/"

Status = Literal["OK", "WARNING", "ERROR", "EXITED"]
OperationalState = Literal["STARTING", "READY", "PROCESSING", "EXITED"]


class HealthSnapshot(Protocol):
    """What the listener says of itself (``listeners.bus_listener.ListenerHealth``)."""

    @property
    def listening(self) -> bool: ...
    @property
    def bus_connected(self) -> bool: ...
    @property
    def prefect_reachable(self) -> bool: ...
    @property
    def runs_active(self) -> int | None: ...


@dataclass(frozen=True)
class AgentIdentity:
    """Who sends the heartbeats: the same for the whole life of the process."""

    instance_name: str
    agent_type: str
    namespace: str
    pid: int
    hostname: str


@dataclass(frozen=True)
class AgentState:
    """What the monitor shows of the listener; a change is reported at once."""

    status: Status
    operational_state: OperationalState
    mq_connected: bool


# The monitor's column: a longer instance_name is a server error there (500).
INSTANCE_NAME_MAX = 100


def default_instance_name(namespace: str, replica: str | None, hostname: str) -> str:
    """Stable across restarts on one host and distinct per listener:
    ``panda-workers-<namespace>[-<replica>]-<hostname>``; over 100 characters,
    its first 91 and a digest of the whole, so that it stays distinct."""
    parts = ["panda-workers", namespace, *([replica] if replica else []), hostname]
    name = "-".join(parts)
    if len(name) <= INSTANCE_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: INSTANCE_NAME_MAX - 9]}-{digest}"


def agent_state(health: HealthSnapshot) -> AgentState:
    """The monitor's view of a running listener."""
    if not health.listening:
        operational: OperationalState = "STARTING"
    elif health.runs_active:  # None (not counted yet) reads as none
        operational = "PROCESSING"
    else:
        operational = "READY"
    return AgentState(
        status="OK" if health.bus_connected else "WARNING",
        operational_state=operational,
        mq_connected=health.bus_connected,
    )


def exit_state(health: HealthSnapshot, failed: bool) -> AgentState:
    """The last heartbeat's: EXITED, or ERROR when the listener ended on an
    error (it still has exited: operational_state says so)."""
    return AgentState(
        status="ERROR" if failed else "EXITED",
        operational_state="EXITED",
        mq_connected=health.bus_connected,
    )


def describe(health: HealthSnapshot, listener_id: str, exit_reason: str | None = None) -> str:
    """One line an operator reads in the monitor's agent list."""
    parts = [
        f"PanDA workers listener {listener_id}",
        f"MQ: {'connected' if health.bus_connected else 'disconnected'}",
        f"Prefect: {'reachable' if health.prefect_reachable else 'not reachable'}",
    ]
    if exit_reason is not None:
        parts.append(f"exited: {exit_reason}")
    elif health.runs_active is None:
        parts.append("runs in progress: not counted yet")
    else:
        parts.append(f"runs in progress: {health.runs_active}")
    return ". ".join(parts)


def heartbeat_payload(
    identity: AgentIdentity, state: AgentState, description: str
) -> dict[str, Any]:
    """The JSON body of POST {monitor}/api/systemagents/heartbeat/."""
    return {
        "instance_name": identity.instance_name,
        "agent_type": identity.agent_type,
        "status": state.status,
        "operational_state": state.operational_state,
        "namespace": identity.namespace,
        "pid": identity.pid,
        "hostname": identity.hostname,
        "description": description,
        "mq_connected": state.mq_connected,
    }
