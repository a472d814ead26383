"""One benchmark: start the system, announce the runs, send the load, end
the runs, and gather what happened from the bus, Prefect and /proc."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from bench.figures import (
    BenchResult,
    Latency,
    ProcessUse,
    Tally,
    delays,
    drift,
    timed_delays,
)
from bench.load import SliceLoad
from bench.plan import LoadPlan
from bench.processes import MetricSampler, Sampler
from bench.profiles import Profiles
from bench.timeline import Timeline
from listeners.metrics import PREFIX as METRICS_PREFIX
from swf_panda_workers.adapters.prefect_events.history import PAGE_LIMIT
from swf_panda_workers.adapters.prefect_events.schema import (
    STREAM_EVENT,
    message_event_name,
    namespace_resource_id,
    run_resource_id,
    unpacked,
)
from swf_testbed.launchers.postgres import PostgresCluster
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.control_system import ControlSystem
from swf_testbed.peers.idds import SimulatedIDDS, TaskInfo
from swf_testbed.peers.recorder import BusRecorder

NAMESPACE = "bench"
INITIAL_WORKERS = 10
IDLE_SECONDS = 5.0  # the system at rest before the first run, for its idle memory
EXPECTED = {  # effects each run must cause exactly this often
    "create_workflow_task": 1,
    "adjust_worker": 2,  # one per slow slice (plan.SLOW)
    # Sent twice, the run id as an integer and as a string: idds-prompt's
    # transformer compares it with == to the int it was started with,
    # swf-transform to the string of its first slice (outbound.stop_run_ids).
    "stop_transformer": 2,
    "close_workflow_task": 1,
}


@dataclass
class Options:
    plan: LoadPlan
    workdir: Path
    stomp_port: int = 61663
    prefect_port: int = 4340
    runner_limit: int | None = None  # default: runs + 5
    connections: int = 4  # load generator connections
    announce_every: float = 0.5  # s between two runs' announcements
    profile: Path | None = None  # where py-spy profiles of the load go, if anywhere
    postgres_port: int | None = None  # the Prefect server on a private PostgreSQL there
    metrics_port: int = 9651  # the listener's /metrics, sampled for the hand-off plot
    waves: int = 1  # the plan's runs, started, loaded and ended this many times in turn
    extra_config: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        plan = self.plan
        base: dict[str, Any] = {
            "transceiver": {"namespace": NAMESPACE},
            "brokers": {"host": "127.0.0.1", "port": self.stomp_port},
            # The seed's policy decides on each result, so a slow result's
            # adjust_worker measures the path through the system, not a tick.
            "slice": {"processing_time": plan.expected_seconds, "cooldown": 1},
            "scaling": {"policy": "reference", "end": "stop"},
            "timeouts": {
                "created_workflow_task": 120,
                "closed_workflow_task": 300,
                "run_end": 4 * 3600,
            },
            "prefect": {"runner_limit": self.runner_limit or plan.runs + 5},
            "metrics": {"port": self.metrics_port},
        }
        for section, values in self.extra_config.items():
            base[section] = {**base.get(section, {}), **values}
        return base


class Benchmark:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.plan = options.plan
        self.stack = EmbeddedStack(
            options.workdir, options.config(), prefect_port=options.prefect_port, fresh=True
        )
        self._first = int(time.time()) % 100_000 * 1000
        self.run_ids: list[str] = []  # this wave's
        self.all_runs: list[str] = []  # every wave's
        self.waves: list[tuple[float, float]] = []  # when each wave began and ended
        self.tasks: dict[str, TaskInfo] = {}
        self.announced: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.notes: list[str] = []
        self.acked_before_load = 0.0  # the listener's acked counter when the load began
        self.postgres_pid: int | None = None
        self.timeline: Timeline | None = None  # filled in by run()

    def run(self) -> BenchResult:
        if self.options.postgres_port is None:
            return self._run()
        with PostgresCluster(port=self.options.postgres_port) as cluster:
            self.stack.database_url = cluster.url
            self.postgres_pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
            return self._run()

    def _run(self) -> BenchResult:
        started_at = datetime.now(UTC)
        with self.stack:
            print(f"Prefect UI: {self.stack.ui_url}", flush=True)
            brokers = self.stack.brokers
            sampler = Sampler(self._roots()).start()
            acked = MetricSampler(
                f"http://127.0.0.1:{self.options.metrics_port}/metrics",
                f"{METRICS_PREFIX}_messages_acked_total",
            ).start()
            time.sleep(IDLE_SECONDS)
            idle = {name: tree.last_rss_mb for name, tree in sampler.trees.items()}
            recorder = BusRecorder(
                brokers, topics=(brokers.workers_topic, brokers.transformer_topic)
            ).start()
            idds = SimulatedIDDS(
                brokers,
                NAMESPACE,
                on_task_created=self._task_created,
                workers_topic=brokers.workers_topic,
            ).start()
            control = ControlSystem(brokers, NAMESPACE, workers_topic=brokers.workers_topic)
            control.start()
            load = SliceLoad(
                brokers,
                brokers.results_destination,
                self.plan,
                lambda r: self.tasks[r].workload_id,
                connections=self.options.connections,
            )
            states: dict[str, tuple[str, int | None]] = {}
            stored: dict[str, int] = {}
            drain: float | None = None
            try:
                for wave in range(self.options.waves):
                    self._next_wave(wave)
                    began = time.time()
                    self._drive(recorder, control, acked, load)
                    drain = self._wait_stored(time.time(), acked)
                    self._end_runs(recorder, control)
                    self.waves.append((began, time.time()))
                    states.update(self._final_states())
                    stored.update(self.stored_results())
            finally:
                sampler.stop()
                acked.stop()
                for part in (control, idds, recorder):
                    part.stop()
        self.timeline = self._timeline(recorder, load, sampler, acked)
        return self._result(started_at, recorder, load, drain, stored, states, idle, sampler)

    def _timeline(
        self, recorder: BusRecorder, load: SliceLoad, sampler: Sampler, acked: MetricSampler
    ) -> Timeline:
        seen = _times_by_run(recorder)
        plan = self.plan
        return Timeline(
            title=f"{plan.runs} runs, {plan.rate:g} slice results/s, "
            f"{plan.runs * plan.slices * len(self.waves)} results"
            + (f" in {len(self.waves)} waves" if len(self.waves) > 1 else ""),
            sent_at=load.sent_at,
            acked=acked.samples,
            latencies={
                "create": timed_delays(
                    {r: [t] for r, t in self.announced.items()}, seen["create_workflow_task"]
                ),
                "slow result -> adjust": timed_delays(load.slow_sent, seen["adjust_worker"]),
                "stop": timed_delays(
                    {r: [t] for r, t in self.ended.items()}, seen["stop_transformer"]
                ),
            },
            rss_mb={name: tree.history for name, tree in sampler.trees.items()},
            cpu_seconds={name: tree.cpu_history for name, tree in sampler.trees.items()},
        )

    def _roots(self) -> dict[str, int]:
        parts = {
            "listener": self.stack.listener,
            "runner": self.stack.runner,
            "prefect server": self.stack.server.process if self.stack.server else None,
        }
        roots = {
            name: part.process.pid
            for name, part in parts.items()
            if part is not None and part.process is not None
        }
        if self.postgres_pid is not None:
            roots["postgresql"] = self.postgres_pid
        return roots

    def _task_created(self, run_id: str, task: TaskInfo) -> None:
        self.tasks[run_id] = task

    def _next_wave(self, wave: int) -> None:
        first = self._first + wave * self.plan.runs
        self.run_ids = [str(first + i) for i in range(self.plan.runs)]
        self.all_runs += self.run_ids
        if self.options.waves > 1:
            print(f"wave {wave + 1} of {self.options.waves}", flush=True)

    def _drive(
        self, recorder: BusRecorder, control: ControlSystem, acked: MetricSampler, load: SliceLoad
    ) -> None:
        """Announce every run of the wave, wait for their tasks, then send the load."""
        for run_id in self.run_ids:
            self.announced[run_id] = time.time()
            control.announce(
                run_id,
                "testbed",
                target_workers=INITIAL_WORKERS,
                slice_processing_time=self.plan.expected_seconds,
            )
            time.sleep(self.options.announce_every)
        if not recorder.wait_for(
            lambda: all(recorder.of_type("created_workflow_task", r) for r in self.run_ids),
            timeout=180,
        ):
            raise RuntimeError("not every run's task was created within 180 s")
        print(
            f"{self.plan.runs} runs created; sending {self.plan.runs * self.plan.slices} "
            f"slice results at {self.plan.rate:g}/s for {self.plan.duration:.0f} s",
            flush=True,
        )
        self.acked_before_load = acked.latest() or 0.0
        profiles = (
            Profiles(self.options.profile, self._roots(), self.plan.duration)
            if self.options.profile
            else None
        )
        if profiles:
            profiles.start()
        load.run(self.run_ids)
        if profiles:
            profiles.wait()

    def _wait_stored(
        self, since: float, acked: MetricSampler, timeout: float = 600.0
    ) -> float | None:
        """Seconds until every result is stored (None: not within ``timeout``):
        how far the listener's hand-off lags the load. Watched on the
        listener's acked counter (each result is acked once stored), then
        counted in Prefect, which is too costly to do every second."""
        wanted = self.acked_before_load + self.plan.runs * self.plan.slices
        while time.time() - since < timeout:
            if (acked.latest() or 0) >= wanted:
                counts = self.stored_results()
                if all(counts.get(r, 0) >= self.plan.slices for r in self.run_ids):
                    return time.time() - since
            time.sleep(1.0)
        self.notes.append(f"not every slice result was stored within {timeout:g} s")
        return None

    def stored_results(self) -> dict[str, int]:
        """Per run, the distinct slice results the Prefect server stored."""
        return asyncio.run(self._count_stored())

    async def _count_stored(self) -> dict[str, int]:
        """Read from the namespace's stream batches, each once (read run by
        run, every run would read every batch it shares with the others)."""
        now = datetime.now(UTC)
        name = message_event_name("slice_result")
        wanted = {run_resource_id(NAMESPACE, r): r for r in self.run_ids}
        seen: dict[str, set[UUID]] = {r: set() for r in self.run_ids}
        batches = EventFilter(
            # From the wave's first announcement: earlier waves' are counted.
            occurred=EventOccurredFilter(
                since=datetime.fromtimestamp(
                    min(self.announced[r] for r in self.run_ids) - 60, UTC
                ),
                until=now,
            ),
            resource=EventResourceFilter(id=[namespace_resource_id(NAMESPACE)]),
            event=EventNameFilter(name=[STREAM_EVENT]),
        )
        with temporary_settings({PREFECT_API_URL: self.stack.api_url}):
            async with get_client() as client:
                page = await client.read_events(filter=batches, limit=PAGE_LIMIT)
                while True:
                    for event in (e for batch in page.events for e in unpacked(batch)):
                        run_id = wanted.get(event.resource.id)
                        if run_id is not None and event.event == name:
                            seen[run_id].add(event.id)
                    if page.next_page is None:
                        break
                    page = await client.read_events_page(str(page.next_page))
        return {run_id: len(ids) for run_id, ids in seen.items()}

    def _end_runs(self, recorder: BusRecorder, control: ControlSystem) -> None:
        for run_id in self.run_ids:
            self.ended[run_id] = time.time()
            control.end(run_id, "testbed")
        if not recorder.wait_for(
            lambda: all(recorder.of_type("closed_workflow_task", r) for r in self.run_ids),
            timeout=600,
        ):
            self.notes.append("not every run's task was closed within 600 s of its end")

    def _final_states(self) -> dict[str, tuple[str, int | None]]:
        """Per run: its flow run's final state and the slices its flow counted."""
        return asyncio.run(self._read_final_states())

    async def _read_final_states(self, wait: float = 300.0) -> dict[str, tuple[str, int | None]]:
        names = [f"run-{r}" for r in self.run_ids]
        deadline = time.monotonic() + wait
        with temporary_settings({PREFECT_API_URL: self.stack.api_url}):
            async with get_client() as client:
                while True:
                    runs = await client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))
                    )
                    final = all(r.state is not None and r.state.is_final() for r in runs)
                    if (final and len(runs) >= len(names)) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(1.0)
                artifacts = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        key=ArtifactFilterKey(any_=[f"run-{NAMESPACE}-{r}" for r in self.run_ids])
                    )
                )
        counted = {a.key: _slices_done(str(a.data)) for a in artifacts if a.key}
        states: dict[str, tuple[str, int | None]] = {}
        for flow_run in runs:
            run_id = flow_run.name.removeprefix("run-")
            states[run_id] = (
                (flow_run.state.name or "?") if flow_run.state else "?",
                counted.get(f"run-{NAMESPACE}-{run_id}"),
            )
        return states

    def _result(
        self,
        started_at: datetime,
        recorder: BusRecorder,
        load: SliceLoad,
        drain: float | None,
        stored: Mapping[str, int],
        states: Mapping[str, tuple[str, int | None]],
        idle: Mapping[str, float],
        sampler: Sampler,
    ) -> BenchResult:
        seen = _times_by_run(recorder)
        latency = {
            "run_imminent -> create_workflow_task": _first_delays(
                self.announced, seen["create_workflow_task"]
            ),
            "slow slice_result -> adjust_worker": delays(load.slow_sent, seen["adjust_worker"]),
            "end_run -> stop_transformer": _first_delays(self.ended, seen["stop_transformer"]),
            "end_run -> close_workflow_task": _first_delays(
                self.ended, seen["close_workflow_task"]
            ),
        }
        effects = {
            kind: Tally.of(
                {r: n for r in self.all_runs}, {r: len(t) for r, t in seen[kind].items()}
            )
            for kind, n in EXPECTED.items()
        }
        effects["slice result stored as event"] = Tally.of(
            {r: self.plan.slices for r in self.all_runs}, stored
        )
        effects["slice result counted by flow"] = Tally.of(
            {r: self.plan.slices for r in self.all_runs},
            {r: n for r, (_, n) in states.items() if n is not None},
        )
        state_names = sorted({s for s, _ in states.values()})
        self.notes.append(
            "flow runs: "
            + ", ".join(
                f"{sum(1 for s, _ in states.values() if s == name)} {name}" for name in state_names
            )
        )
        quarters = [
            (load.first_at or 0) + q * ((load.last_at or 0) - (load.first_at or 0))
            for q in (0.25, 0.5, 0.75, 1.0)
        ]
        processes = {
            name: ProcessUse(
                idle_rss_mb=round(idle[name], 1),
                peak_rss_mb=round(tree.peak_rss_mb, 1),
                cpu_seconds=round(tree.cpu_seconds, 1),
                load_rss_mb=[
                    None if (rss := tree.rss_at(q)) is None else round(rss, 1) for q in quarters
                ],
            )
            for name, tree in sampler.trees.items()
        }
        service = [processes[n] for n in ("listener", "runner") if n in processes]
        added = sum(p.peak_rss_mb - p.idle_rss_mb for p in service) / self.plan.runs
        load_seconds = (load.last_at or 0) - (load.first_at or 0)
        return BenchResult(
            started_at=started_at.isoformat(timespec="seconds"),
            machine={
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "prefect": prefect.__version__,
                "host": platform.node(),
            },
            plan={
                "database": "postgresql" if self.postgres_pid else "sqlite",
                "waves": self.options.waves,
                "runs": self.plan.runs,
                "slices": self.plan.slices,
                "rate": self.plan.rate,
                "expected_seconds": self.plan.expected_seconds,
                "duration": self.plan.duration,
                "announce_every": self.options.announce_every,
                "connections": self.options.connections,
                "config": self.options.config(),
            },
            latency_ms={name: Latency.of(values) for name, values in latency.items()},
            sent_per_second=round(load.achieved_rate, 1),
            handled_per_second=round(sum(stored.values()) / (load_seconds + (drain or 0.0)), 1)
            if load_seconds > 0
            else 0.0,
            handoff_drain_seconds=None if drain is None else round(drain, 1),
            effects=effects,
            processes=processes,
            per_added_run_mb=round(added, 1),
            notes=self.notes,
            drift=drift(
                self.waves,
                load.sent_at,
                {name: tree.history for name, tree in sampler.trees.items()},
                {name: tree.cpu_history for name, tree in sampler.trees.items()},
            ),
        )


def _times_by_run(recorder: BusRecorder) -> dict[str, dict[str, list[float]]]:
    """message type -> run id -> when each message of that type was seen."""
    found: dict[str, dict[str, list[float]]] = {kind: {} for kind in EXPECTED}
    for record in recorder.records:
        if record.msg_type in found:
            found[record.msg_type].setdefault(str(record.body.get("run_id")), []).append(record.at)
    return found


def _first_delays(causes: Mapping[str, float], effects: Mapping[str, list[float]]) -> list[float]:
    return delays({r: [t] for r, t in causes.items()}, effects)


def _slices_done(markdown: str) -> int | None:
    match = re.search(r"slices: (\d+) done", markdown)
    return int(match.group(1)) if match else None
