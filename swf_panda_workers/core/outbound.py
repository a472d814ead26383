"""The messages this service sends, built exactly as the peers read them.

Pure functions: the caller passes the time, so the shapes are unit-testable and
a replayed decision produces the same message. Safety rules from PROTOCOL.md
are enforced here, where every outbound message is made: never an adjust
without the run's iDDS ids, never a close without its ids or its run id
(iDDS would close every task it has).

Requests to iDDS carry iDDS's namespace header (``transceiver.idds_namespace``,
by default ours): its prompt transceiver selects on its own namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.messages import RunImminent, WorkerSize, WorkflowIds
from swf_panda_workers.core.timestamps import parse_timestamp, to_iso


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

    def send(self, message: Outgoing, timeout: float = 10.0) -> None: ...


def wire_run_id(run_id: str) -> int | str:
    """A run id as idds-prompt's transformer holds it (``run_prompt --run_id``
    is an integer): numeric ids as JSON integers."""
    return int(run_id) if run_id.isdigit() else run_id


def stop_run_ids(run_id: str) -> tuple[int | str, ...]:
    """Every form of the run id a real transformer compares the stop's with
    ``==``: idds-prompt's integer and, for a numeric id, swf-transform's
    string (taken from its first slice when started without --run_id)."""
    as_int = wire_run_id(run_id)
    return (as_int, run_id) if as_int != run_id else (run_id,)


def headers_for(
    msg_type: str, run_id: str, settings: Settings, now: datetime, namespace: str | None = None
) -> dict[str, str]:
    """``namespace``: the namespace header, by default ours."""
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
    namespace = namespace or settings.transceiver.namespace
    if namespace:
        headers["namespace"] = namespace
    return headers


def _to_idds(msg_type: str, run_id: str, settings: Settings, now: datetime) -> dict[str, str]:
    return headers_for(
        msg_type, run_id, settings, now, namespace=settings.transceiver.requests_namespace
    )


def _envelope(
    msg_type: str, run_id: int | str, now: datetime, content: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    return {
        "msg_type": msg_type,
        "run_id": run_id,
        "created_at": to_iso(now),
        "namespace": settings.transceiver.namespace,
        "content": content,
    }


def cores_per_worker(run: RunImminent, settings: Settings) -> int:
    """Cores per worker: the seed's ``num_cores_per_worker`` when the
    announcement gives one, else ``panda.core_count``. Never the testbed's
    ``core_count``: its fast-processing agent copies target_worker_count into
    it (30 workers would each ask for 30 cores)."""
    return run.content.cores_per_worker or settings.panda.core_count


def workflow_name(run: RunImminent, settings: Settings, announced_at: datetime) -> str:
    """``<scope>_<transform_tag>_<site>_<YYYYMMDD>_<run_id>``: unique per run.
    iDDS looks its request up by this exact name and keeps one task per name
    (it is the PanDA task's name too): without the run id, the second run of
    a day and site fails inside iDDS and gets no reply at all. The date is the
    announcement's, so a retry on another day names the same task."""
    return (
        f"{_scope(settings, announced_at)}_{settings.panda.transform_tag}_"
        f"{run.content.site or settings.panda.site}_{announced_at:%Y%m%d}_{run.run_id}"
    )


def _scope(settings: Settings, announced_at: datetime) -> str:
    return settings.panda.scope or f"EIC_{announced_at:%Y}"


def workflow_for(
    run: RunImminent, settings: Settings, now: datetime, announced_at: datetime | None = None
) -> dict[str, Any]:
    """The iDDS workflow description of a run (PROTOCOL.md, create_workflow_task).
    ``announced_at`` (default ``now``) dates its name and campaign."""
    panda = settings.panda
    spec = run.content
    day = announced_at or now
    year, month = day.strftime("%Y"), day.strftime("%m")
    content = {
        **spec.model_dump(mode="json", exclude_none=True, exclude={"cores_per_worker"}),
        "run_id": run.run_id,
        "created_at": to_iso(now),
        "core_count": cores_per_worker(run, settings),
        "memory_per_core": spec.memory_per_core or panda.ram_count,
        "site": spec.site or panda.site,
        # iDDS reads target_worker_count as the number of PanDA jobs.
        "target_worker_count": spec.target_worker_count or panda.num_workers,
        "panda_attributes": panda.task_attributes(),
    }
    return {
        "scope": _scope(settings, day),
        "name": workflow_name(run, settings, day),
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


def create_workflow_task(
    run: RunImminent, settings: Settings, now: datetime, workflow: dict[str, Any] | None = None
) -> Outgoing:
    """``workflow``: the run's (``workflow_for``), by default made now."""
    content = {
        "run_id": run.run_id,
        "created_at": to_iso(now),
        "workflow": workflow if workflow is not None else workflow_for(run, settings, now),
    }
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("create_workflow_task", run.run_id, now, content, settings),
        _to_idds("create_workflow_task", run.run_id, settings, now),
    )


def adjust_content(
    run_id: str, ids: WorkflowIds | None, size: WorkerSize, now: datetime
) -> dict[str, Any]:
    """What iDDS reads from an adjust_worker, on the bus or over REST."""
    if ids is None:
        raise UnsafeMessage(f"adjust_worker for run {run_id} without its iDDS ids")
    return {
        "run_id": run_id,
        "created_at": to_iso(now),
        **_ids_or_nulls(ids),
        **size.model_dump(exclude_none=True),
    }


def adjust_worker(
    run_id: str, ids: WorkflowIds | None, size: WorkerSize, settings: Settings, now: datetime
) -> Outgoing:
    content = adjust_content(run_id, ids, size, now)
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("adjust_worker", run_id, now, content, settings),
        _to_idds("adjust_worker", run_id, settings, now),
    )


def close_content(run_id: str, ids: WorkflowIds | None, now: datetime) -> dict[str, Any]:
    """What iDDS reads from a close_workflow_task, on the bus or over REST:
    the task's ids, or (``ids`` None, on the bus only) the run id alone, by
    which iDDS's transceiver looks the run's task up (answering NotFound when
    there is none)."""
    # Given no ids and no run id iDDS filters on nothing: it would cancel
    # every processing it has.
    if ids is None and not run_id:
        raise UnsafeMessage("close_workflow_task without ids and without run id")
    return {"run_id": run_id, "created_at": to_iso(now), **_ids_or_nulls(ids)}


def _ids_or_nulls(ids: WorkflowIds | None) -> dict[str, int | None]:
    if ids is None:
        return dict.fromkeys(("request_id", "transform_id", "workload_id"))
    return ids.model_dump(include={"request_id", "transform_id", "workload_id"})


def close_workflow_task(
    run_id: str, ids: WorkflowIds | None, settings: Settings, now: datetime
) -> Outgoing:
    """``ids`` None: close the run's task by its run id (see ``close_content``)."""
    content = close_content(run_id, ids, now)
    return Outgoing(
        settings.brokers.workers_topic,
        _envelope("close_workflow_task", run_id, now, content, settings),
        _to_idds("close_workflow_task", run_id, settings, now),
    )


def stop_transformers(run_id: str, settings: Settings, now: datetime) -> tuple[Outgoing, ...]:
    """The stop broadcast, in each form a real transformer obeys (``stop_run_ids``)."""
    return tuple(
        Outgoing(
            settings.brokers.transformer_topic,
            {
                "msg_type": "stop_transformer",
                "run_id": form,
                "created_at": to_iso(now),
                "content": {"requested_at": to_iso(now)},
            },
            headers_for("stop_transformer", run_id, settings, now),
        )
        for form in stop_run_ids(run_id)
    )
