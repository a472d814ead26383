"""The listener's Prometheus metrics, in a registry of its own (not the
process-wide default), so that one process, a test say, can hold several.

``BusListener`` calls ``received`` once per delivery with the routing
decision, ``acked`` at each ack and ``set_aside`` when a message went to the
dead-letter queue; what the listener knows of itself (listening, bus,
Prefect, runs in progress) and the workers each run asked for are read when
the metrics are scraped. Every label takes a bounded set of values: message
types and reasons come from fixed lists, run ids from ``RequestedWorkers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from listeners.requested_workers import RequestedWorkers
from listeners.routing import Decision, Ignore, Record, RejectKind, SetAside
from swf_panda_workers.adapters.stomp_bus import Delivery
from swf_panda_workers.core.messages import (
    AdjustWorker,
    CreateWorkflowTask,
    RunEnd,
    UnroutedSliceResult,
)

if TYPE_CHECKING:
    from listeners.bus_listener import ListenerHealth

PREFIX = "swf_panda_workers"
# From a flow run created at once (a few ms) to an event confirmed after the
# server's persister flush and our read-back (seconds), and Prefect outages.
HANDOFF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
Handoff = Literal["flow_run", "event"]  # what was stored before the ack


class ListenerMetrics:
    def __init__(
        self,
        health: Callable[[], ListenerHealth] | None = None,
        identity: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requested_workers = RequestedWorkers()
        self._clock = clock
        self._received = Counter(
            f"{PREFIX}_messages_received",
            "Bus messages received, by type ('unparsed': bad "
            "input; 'unread': dropped unread, another namespace's; 'slice_result_no_run': a "
            "transformer's result naming no run) and destination kind",
            ["msg_type", "destination"],
            registry=self.registry,
        )
        self._rejected = Counter(
            f"{PREFIX}_messages_rejected",
            "Messages set aside to the dead-letter queue, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._acked = Counter(
            f"{PREFIX}_messages_acked", "Bus messages acked", registry=self.registry
        )
        self._handoff = Histogram(
            f"{PREFIX}_handoff_seconds",
            "From a message's receipt to its ack once Prefect "
            "stored what it caused (a flow run, or an event read back)",
            ["stored"],
            buckets=HANDOFF_BUCKETS,
            registry=self.registry,
        )
        if identity:
            Info(f"{PREFIX}_listener", "Which listener this is", registry=self.registry).info(
                identity
            )
        self.registry.register(_StateCollector(health, self.requested_workers, clock))

    def received(self, delivery: Delivery, decision: Decision) -> None:
        self._received.labels(message_type(decision), destination_kind(delivery.destination)).inc()
        now = self._clock()
        match decision:
            case Ignore(message=AdjustWorker(run_id=run_id, content=content)) if (
                content.target_worker_count is not None
            ):
                self.requested_workers.requested(run_id, content.target_worker_count, now)
            case Ignore(message=CreateWorkflowTask(run_id=run_id) as create):
                initial = initial_size(create)
                if initial is not None:
                    self.requested_workers.requested(run_id, initial, now)
            case Record(message=RunEnd(run_id=run_id)):
                self.requested_workers.ended(run_id, now)

    def acked(self, delivery: Delivery, stored: Handoff | None = None) -> None:
        """``stored``: what the ack waited for; None for messages acked at once
        (ignored, set aside), which are not hand-offs."""
        self._acked.inc()
        if stored is not None:
            self._handoff.labels(stored).observe(max(0.0, self._clock() - delivery.received_at))

    def set_aside(self, kind: RejectKind) -> None:
        self._rejected.labels(kind).inc()


def message_type(decision: Decision) -> str:
    message = getattr(decision, "message", None)
    if isinstance(message, UnroutedSliceResult):
        return "slice_result_no_run"  # a transformer's answer to a heartbeat, dropped
    if message is not None:
        return str(message.msg_type)
    return "unparsed" if isinstance(decision, SetAside) else "unread"


def destination_kind(destination: str) -> str:
    for kind in ("topic", "queue"):
        if destination.startswith(f"/{kind}/"):
            return kind
    return "other"


def initial_size(create: CreateWorkflowTask) -> int | None:
    """The workers a run's create_workflow_task asks for (outbound.py puts
    them in the workflow's content; the model leaves the workflow untyped)."""
    content: Any = create.content.workflow.get("content")
    workers = content.get("target_worker_count") if isinstance(content, dict) else None
    return (
        workers
        if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0
        else None
    )


class _StateCollector(Collector):
    """Gauges read at each scrape: the listener's health and the workers each
    run requested."""

    def __init__(
        self,
        health: Callable[[], ListenerHealth] | None,
        requested: RequestedWorkers,
        clock: Callable[[], float],
    ) -> None:
        self._health = health
        self._requested = requested
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            f"{PREFIX}_workers_requested",
            "Workers last requested from iDDS for a run "
            "(create_workflow_task, then each adjust_worker); message mode only",
            labels=["run_id"],
        )
        for run_id, count in sorted(self._requested.current(self._clock()).items()):
            workers.add_metric([run_id], count)
        yield workers
        if self._health is None:
            return
        health = self._health()
        for name, value, text in (
            ("listening", health.listening, "1 while subscribed and taking messages"),
            ("bus_connected", health.bus_connected, "1 while connected to the broker"),
            (
                "prefect_reachable",
                health.prefect_reachable,
                "1 if the last count of runs in progress reached Prefect",
            ),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=float(value))
        if health.runs_active is not None:  # not counted yet: no sample rather than a guess
            yield GaugeMetricFamily(
                f"{PREFIX}_runs_active",
                "Flow runs of the namespace not finished (counted every 15 s)",
                value=float(health.runs_active),
            )
