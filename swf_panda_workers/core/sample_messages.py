"""Messages an operator sends by hand (``swf-panda-workers send``) to try the
service: a run's announcement and end as the control system sends them, a
slice result as a transformer sends it, each as the real peer's code builds
it (tests/real_messages/: the testbed's fast-processing agent, swf-transform).
Pure: the caller passes the time and does the sending."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from swf_panda_workers.config.schema import Brokers

Shape = Literal["testbed", "seed"]
SENDER = "swf-panda-workers-cli"


@dataclass(frozen=True)
class Sample:
    destination: str
    body: dict[str, Any]
    headers: dict[str, str]


def run_imminent(
    run_id: str,
    namespace: str,
    brokers: Brokers,
    now: datetime,
    workers: int = 1,
    cores: int = 1,
    shape: Shape = "testbed",
) -> Sample:
    """``cores``: cores per worker, which only the seed's shape can say (the
    testbed's agent puts its worker count in core_count)."""
    if shape == "seed":
        content: dict[str, Any] = {"num_workers": workers, "num_cores_per_worker": cores}
        return _control(brokers, "run_imminent", run_id, namespace, now, content, shape)
    content = {
        "msg_type": "run_imminent",
        "namespace": namespace,
        "run_id": run_id,
        "state": "beam",
        "substate": "not_ready",
        "timestamp": _naive(now, "microseconds"),
        "sender": SENDER,
        "core_count": workers,
        "target_worker_count": workers,
    }
    return _control(brokers, "run_imminent_worker", run_id, namespace, now, content, shape)


def end_run(
    run_id: str, namespace: str, brokers: Brokers, now: datetime, shape: Shape = "testbed"
) -> Sample:
    if shape == "seed":
        return _control(brokers, "run_end", run_id, namespace, now, {"run_id": run_id}, shape)
    content = {
        "msg_type": "end_run",
        "namespace": namespace,
        "run_id": run_id,
        "timestamp": _naive(now, "microseconds"),
        "sender": SENDER,
    }
    return _control(brokers, "end_run", run_id, namespace, now, content, shape)


def slice_result(
    run_id: str,
    brokers: Brokers,
    now: datetime,
    seconds: float,
    slice_id: int = 0,
    failed: bool = False,
    hostname: str = "cli-test",
) -> Sample:
    """As swf-transform sends it: to the results destination, with no
    namespace header (transformers started by iDDS have none), the slice's
    run id (a string), a boolean ``result.state`` and no processing_time
    field (the time is processed_at - processing_start_at)."""
    started = now - timedelta(seconds=seconds)
    content: dict[str, Any] = {
        "requested_at": _naive(started, "microseconds"),
        "processing_start_at": _naive(started, "microseconds"),
        "processed_at": _naive(now, "microseconds"),
        "state": "failed" if failed else "done",
        "hostname": hostname,
        "panda_task_id": None,
        "panda_id": None,
        "harvester_id": None,
        "result": {"state": False, "result": None, "error": "sent by hand as failed"}
        if failed
        else {
            "state": True,
            "error": None,
            "result": {
                "run_id": run_id,
                "slice_id": slice_id,
                "processed": True,
                "actual_processing_time": seconds,
            },
        },
    }
    body = {
        "msg_type": "slice_result",
        "run_id": run_id,
        "created_at": _naive(now, "microseconds"),
        "content": content,
    }
    headers = {
        "persistent": "true",
        "ttl": "43200000",
        "vo": "eic",
        "msg_type": "slice_result",
        "run_id": run_id,
    }
    return Sample(brokers.results_destination, body, headers)


def _control(
    brokers: Brokers,
    msg_type: str,
    run_id: str,
    namespace: str,
    now: datetime,
    content: dict[str, Any],
    shape: Shape,
) -> Sample:
    testbed = shape == "testbed"
    created = _naive(now, "microseconds") if testbed else _naive(now, "milliseconds") + "Z"
    body = {
        "msg_type": msg_type,
        "run_id": run_id,
        "created_at": created,
        "content": content,
        "sender": SENDER,
        "namespace": namespace,
    }
    # The testbed's agent sends these non-persistent, without a time to live.
    headers = {
        "persistent": "false" if testbed else "true",
        "vo": "eic",
        "msg_type": msg_type,
        "namespace": namespace,
        "run_id": run_id,
    }
    return Sample(brokers.workers_topic, body, headers)


def _naive(moment: datetime, timespec: str = "seconds") -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=timespec)
