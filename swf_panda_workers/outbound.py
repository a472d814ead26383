"""The messages this service sends, built exactly as the peers read them.

Pure functions: the caller passes the time, so the shapes are unit-testable and
a replayed decision produces the same message. Safety rules from PROTOCOL.md
are enforced here, where every outbound message is made: never an adjust
or a close without the run's iDDS ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from swf_panda_workers.config import Settings
from swf_panda_workers.messages import RunImminent, WorkerSize, WorkflowIds
from swf_panda_workers.timestamps import parse_timestamp, to_iso


class UnsafeMessage(ValueError):
    """A message that must never go out (it would act on the wrong tasks)."""


@dataclass(frozen=True)
class Outgoing:
    """A message ready for the bus: where, what, and its STOMP headers."""

    destination: str
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def msg_type(self) -> str:
        return str(self.body["msg_type"])


class Sender(Protocol):
    """Where outgoing messages go: the bus (adapters.stomp_bus.BusClient), or
    nowhere in a dry run (dry_run.WithheldMessages)."""

    def send(self, message: Outgoing, timeout: float = 10.0) -> None:
        ...


def wire_run_id(run_id: str) -> int | str:
    """The transformer compares stop_transformer's run_id with ``==`` against
    the integer it was started with: numeric ids go out as integers."""
    return int(run_id) if run_id.isdigit() else run_id


def headers_for(msg_type: str, run_id: str, settings: Settings, now: datetime) -> dict[str, str]:
    ttl = settings.transceiver.timetolive
    headers = {
        "persistent": "true",
        "vo": "eic",
        "msg_type": msg_type,
        "run_id": run_id,
        # Artemis-era peers read ttl; ActiveMQ Classic only honours expires.
        "ttl": str(ttl),
        "expires": str(int(parse_timestamp(now).timestamp() * 1000) + ttl),  # naive = UTC
    }
    namespace = settings.transceiver.namespace
    if namespace:
        headers["namespace"] = namespace
    return headers


def _envelope(msg_type: str, run_id: int | str, now: datetime, content: dict[str, Any],
              settings: Settings) -> dict[str, Any]:
    return {
        "msg_type": msg_type,
        "run_id": run_id,
        "created_at": to_iso(now),
        "namespace": settings.transceiver.namespace,
        "content": content,
    }


def workflow_for(run: RunImminent, settings: Settings, now: datetime) -> dict[str, Any]:
    """The iDDS workflow description of a run (PROTOCOL.md, create_workflow_task)."""
    panda = settings.panda
    spec = run.content
    year, month, day = now.strftime("%Y"), now.strftime("%m"), now.strftime("%d")
    scope = panda.scope or f"EIC_{year}"
    site = spec.site or panda.site
    content = {
        **spec.model_dump(mode="json", exclude_none=True),
        "run_id": run.run_id,
        "created_at": to_iso(now),
        "core_count": spec.core_count or panda.core_count,
        "memory_per_core": spec.memory_per_core or panda.ram_count,
        "site": site,
        # iDDS reads target_worker_count as the number of PanDA jobs.
        "target_worker_count": spec.target_worker_count or panda.num_workers,
        "panda_attributes": panda.task_attributes(),
    }
    return {
        "scope": scope,
        "name": f"{scope}_{panda.transform_tag}_{site}_{year}{month}{day}",
        "requester": panda.requester,
        "username": panda.username,
        "transform_tag": panda.transform_tag,
        "cloud": panda.cloud,
        "campaign": panda.campaign,
        "campaign_scope": f"{panda.campaign}_{year}",
        "campaign_group": f"{panda.campaign}_{year}_{month}",
        "campaign_tag": panda.campaign_tag,
        "content": content,
    }


def create_workflow_task(run: RunImminent, settings: Settings, now: datetime) -> Outgoing:
    content = {
        "run_id": run.run_id,
        "created_at": to_iso(now),
        "workflow": workflow_for(run, settings, now),
    }
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("create_workflow_task", run.run_id, now, content, settings),
        headers_for("create_workflow_task", run.run_id, settings, now),
    )


def adjust_content(run_id: str, ids: WorkflowIds | None, size: WorkerSize,
                   now: datetime) -> dict[str, Any]:
    """What iDDS reads from an adjust_worker, on the bus or over REST."""
    if ids is None:
        raise UnsafeMessage(f"adjust_worker for run {run_id} without its iDDS ids")
    return {
        "run_id": run_id,
        "created_at": to_iso(now),
        **ids.model_dump(include={"request_id", "transform_id", "workload_id"}),
        **size.model_dump(exclude_none=True),
    }


def adjust_worker(run_id: str, ids: WorkflowIds | None, size: WorkerSize,
                  settings: Settings, now: datetime) -> Outgoing:
    content = adjust_content(run_id, ids, size, now)
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("adjust_worker", run_id, now, content, settings),
        headers_for("adjust_worker", run_id, settings, now),
    )


def close_content(run_id: str, ids: WorkflowIds | None, now: datetime) -> dict[str, Any]:
    """What iDDS reads from a close_workflow_task, on the bus or over REST."""
    # iDDS's close filters on the ids it is given (some versions ignore
    # run_id): without them it would cancel every processing it has.
    if ids is None:
        raise UnsafeMessage(f"close_workflow_task for run {run_id or '?'} without its iDDS ids")
    return {"run_id": run_id, "created_at": to_iso(now),
            **ids.model_dump(include={"request_id", "transform_id", "workload_id"})}


def close_workflow_task(run_id: str, ids: WorkflowIds | None, settings: Settings,
                        now: datetime) -> Outgoing:
    content = close_content(run_id, ids, now)
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("close_workflow_task", run_id, now, content, settings),
        headers_for("close_workflow_task", run_id, settings, now),
    )


def stop_transformer(run_id: str, settings: Settings, now: datetime) -> Outgoing:
    body = {
        "msg_type": "stop_transformer",
        "run_id": wire_run_id(run_id),
        "created_at": to_iso(now),
        "content": {"requested_at": to_iso(now)},
    }
    return Outgoing(
        settings.brokers.transformer_topic,
        body,
        headers_for("stop_transformer", run_id, settings, now),
    )
