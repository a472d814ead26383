"""Starting a run's flow run, once; finding the runs a namespace owns; and
recording which process executes a run's flow run, so that a runner can tell
a run whose process died from one still running (deployments/recovery.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from swf_panda_workers.core.messages import RunImminent
from swf_panda_workers.core.timestamps import to_iso

T = TypeVar("T")
_ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]


# Prefect's client waits 2, 4, 8, 16 then 32 s between retries of a 503, the
# answer of a server on SQLite whose database was locked by another write for
# a few milliseconds: twenty runs announced together waited up to a minute
# behind such waits. For the writes a run start needs, the client's own
# retries are off, and they are retried here at the pace of such a lock.
QUICK_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # s before each next attempt


async def quickly_retried(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` (a request to Prefect), retried soon after a 503; what
    the last attempt raises is raised."""
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
        for delay in QUICK_RETRIES:
            try:
                return await call()
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 503:
                    raise
            await asyncio.sleep(delay)
        return await call()


def idempotency_key(namespace: str, run_id: str) -> str:
    """One flow run per run and namespace, however often run_imminent comes."""
    return f"swf-run:{namespace}:{run_id}"


def run_tags(namespace: str, run_id: str) -> list[str]:
    return ["swf-panda-workers", f"namespace:{namespace}", f"run:{run_id}"]


class DeploymentMissing(RuntimeError):
    """The run deployment is not on the Prefect server (yet): the runner that
    registers it is not up, or it was deleted. Worth waiting out."""


class RunStarter:
    """Creates run flow runs from the configured deployment, one at a time
    (concurrent creates against SQLite hit 'database is locked')."""

    def __init__(self, client: PrefectClient, deployment_name: str) -> None:
        self._client = client
        self._deployment_name = deployment_name
        self._deployment_id: UUID | None = None

    async def start(
        self, run: RunImminent, namespace: str, announcement: dict[str, Any], received_at: datetime
    ) -> UUID:
        """Create (or find) the run's flow run; once this returns, it is stored."""
        try:
            if self._deployment_id is None:
                deployment = await self._client.read_deployment_by_name(self._deployment_name)
                self._deployment_id = deployment.id
            deployment_id = self._deployment_id
            flow_run = await quickly_retried(
                lambda: self._client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={
                        "run_id": run.run_id,
                        "namespace": namespace,
                        "announcement": announcement,
                        "received_at": to_iso(received_at),
                    },
                    name=f"run-{run.run_id}",
                    tags=run_tags(namespace, run.run_id),
                    idempotency_key=idempotency_key(namespace, run.run_id),
                )
            )
        except (ObjectNotFound, httpx.HTTPStatusError) as exc:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code != 404:
                raise
            self._deployment_id = None  # it may come back under a new id
            raise DeploymentMissing(
                f"deployment {self._deployment_name} is not on the Prefect server: is the "
                "runner serving it?"
            ) from exc
        return flow_run.id

    async def find(self, namespace: str, run_id: str) -> UUID | None:
        """The run's flow run, whoever started it and whatever its state."""
        flow_runs = await self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=run_tags(namespace, run_id)),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
            ),
            limit=1,
        )
        return flow_runs[0].id if flow_runs else None

    async def active_runs(self, namespace: str) -> dict[str, UUID]:
        """run_id -> flow run id of the namespace's runs still in progress."""
        flow_runs = await self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"namespace:{namespace}", "swf-panda-workers"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE)),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),  # not sub-flows
            ),
        )
        return {
            str(fr.parameters["run_id"]): fr.id for fr in flow_runs if "run_id" in fr.parameters
        }


# --- which process runs a flow run ---------------------------------------------

PROCESS_LABEL = "swf.process"  # flow-run label: the process of its current attempt
_PROC = Path("/proc")


@dataclass(frozen=True)
class RunProcess:
    """The process executing one attempt of a flow run. On Linux, the boot id
    and the process's start time (clock ticks since boot) tell a live process
    from a later one that got the same pid; elsewhere they are empty and only
    the pid is checked."""

    host: str
    boot: str
    pid: int
    started: str
    attempt: int  # the flow run's run_count when the process claimed it

    @classmethod
    def current(cls, attempt: int) -> RunProcess:
        return cls.of(os.getpid(), attempt)

    @classmethod
    def of(cls, pid: int, attempt: int) -> RunProcess:
        """Process ``pid`` of this host."""
        return cls(socket.gethostname(), _boot_id(), pid, _start_time(pid), attempt)

    @property
    def label(self) -> str:
        return f"{self.host}|{self.boot}|{self.pid}|{self.started}|{self.attempt}"

    @classmethod
    def from_label(cls, text: object) -> RunProcess | None:
        """None for a label this module did not write."""
        parts = str(text).split("|") if text is not None else []
        if len(parts) != 5 or not parts[2].isdigit() or not parts[4].isdigit():
            return None
        host, boot, pid, started, attempt = parts
        return cls(host, boot, int(pid), started, int(attempt))

    def alive(self) -> bool | None:
        """Whether the process still runs; None when this host cannot tell
        (the process ran on another host)."""
        if self.host != socket.gethostname():
            return None
        if self.boot != _boot_id():
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, another user's
        state, started = _proc_stat(self.pid)
        # A zombie has exited: nobody reaped it yet (a container's init may never).
        return state not in ("Z", "X") and started == self.started


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    return _proc_stat(pid)[1]


def _proc_stat(pid: int) -> tuple[str, str]:
    """(state, start time) from /proc/<pid>/stat (fields 3 and 22); ("", "")
    without /proc. The command name before them may hold spaces and
    parentheses, so fields are counted from its closing one."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return "", ""
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


async def claim_run(client: PrefectClient, flow_run_id: UUID, attempt: int) -> RunProcess:
    """Record that this process executes the flow run's attempt ``attempt``."""
    process = RunProcess.current(attempt)
    await quickly_retried(
        lambda: client.update_flow_run_labels(flow_run_id, {PROCESS_LABEL: process.label})
    )
    return process
