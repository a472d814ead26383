"""Messages an operator sends by hand (``swf-panda-workers send``) to try the
service: a run's announcement and end as the control system sends them, a
slice result as a transformer sends it, each in the shape PROTOCOL.md gives.
Pure: the caller passes the time and does the sending."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from swf_panda_workers.config import Brokers
from swf_panda_workers.outbound import wire_run_id

Shape = Literal["testbed", "seed"]
SENDER = "swf-panda-workers-cli"


@dataclass(frozen=True)
class Sample:
    destination: str
    body: dict[str, Any]
    headers: dict[str, str]


def run_imminent(run_id: str, namespace: str, brokers: Brokers, now: datetime,
                 workers: int = 1, cores: int = 1, shape: Shape = "testbed") -> Sample:
    if shape == "seed":
        content: dict[str, Any] = {"num_workers": workers, "num_cores_per_worker": cores}
        return _control(brokers, "run_imminent", run_id, namespace, now, content, shape)
    content = {"run_id": run_id, "state": "run", "substate": "physics",
               "timestamp": _naive(now), "sender": SENDER,
               "core_count": cores, "target_worker_count": workers}
    return _control(brokers, "run_imminent_worker", run_id, namespace, now, content, shape)


def end_run(run_id: str, namespace: str, brokers: Brokers, now: datetime,
            shape: Shape = "testbed") -> Sample:
    if shape == "seed":
        return _control(brokers, "run_end", run_id, namespace, now, {"run_id": run_id}, shape)
    content = {"run_id": run_id, "state": "end", "substate": "physics",
               "timestamp": _naive(now), "sender": SENDER}
    return _control(brokers, "end_run", run_id, namespace, now, content, shape)


def slice_result(run_id: str, brokers: Brokers, now: datetime, seconds: float,
                 slice_id: int = 0, failed: bool = False, hostname: str = "cli-test") -> Sample:
    """As the transformer sends it: to the results queue, with no namespace
    header and no processing_time field (the time is processed_at -
    processing_start_at)."""
    started = now - timedelta(seconds=seconds)
    content: dict[str, Any] = {
        "requested_at": _naive(started, "microseconds"),
        "processing_start_at": _naive(started, "microseconds"),
        "processed_at": _naive(now, "microseconds"),
        "state": "failed" if failed else "done",
        "hostname": hostname,
        "result": {"state": "failed", "result": None, "error": "sent by hand as failed"}
        if failed else {"state": "done", "result": {"actual_processing_time": seconds},
                        "error": None},
    }
    if not failed:
        content["slice_id"] = slice_id
    body = {"msg_type": "slice_result", "run_id": wire_run_id(run_id),
            "created_at": _naive(now, "microseconds"), "content": content}
    return Sample(brokers.results_destination, body, _headers("slice_result", run_id, None))


def _control(brokers: Brokers, msg_type: str, run_id: str, namespace: str, now: datetime,
             content: dict[str, Any], shape: Shape) -> Sample:
    created = _naive(now) if shape == "testbed" else _naive(now, "milliseconds") + "Z"
    body = {"msg_type": msg_type, "run_id": run_id, "created_at": created,
            "namespace": namespace, "sender": SENDER, "content": content}
    return Sample(brokers.workers_topic, body, _headers(msg_type, run_id, namespace))


def _headers(msg_type: str, run_id: str, namespace: str | None) -> dict[str, str]:
    headers = {"persistent": "true", "vo": "eic", "msg_type": msg_type, "run_id": run_id}
    if namespace:
        headers["namespace"] = namespace
    return headers


def _naive(moment: datetime, timespec: str = "seconds") -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=timespec)
