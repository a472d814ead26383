"""Replay: a recorded run played again offline through any policy and settings,
to see what a policy change would have done before it is used.

The replay is a discrete-event simulation, pure and deterministic (a heap of
timed events; no wall clock, no threads). The recorded slices arrive when
they were queued and each keeps the time it took; transformers take them
first come, first served. The policy is driven through the same ScalingLoop
as the live scaling sub-flow (a look after each result when due, and on its
tick), and its decisions act on the simulated workers: more workers come up
``worker_startup`` seconds after they are asked for, fewer means the surplus
leaves once its current slice is done. At the recorded end of the run the
queue is abandoned with the slices in progress (``scaling.end: stop``), or
worked off (``drain``, within ``scaling.drain_timeout``, the policy still
deciding); a drain is over when the last slice is done, where the live
service, which cannot see the queue, waits ``drain_quiet`` longer.

``comparison_table`` puts several replays side by side; each replay's
settings come from a policy spec (config/policy_specs.py).
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.effects import Adjustment, AdjustSent
from swf_panda_workers.core.policies import WorkerPlan
from swf_panda_workers.core.recording import RunRecording
from swf_panda_workers.core.run_state import initial_state
from swf_panda_workers.core.scaling_loop import ScalingLoop
from swf_panda_workers.core.slice_window import SliceObservation, percentile
from swf_panda_workers.core.timeline import Timeline, Trace

DEFAULT_WORKER_STARTUP = 30.0
# The shortest wait between two looks on the tick: a float tick that does not
# land on a microsecond must still move the clock forward.
MIN_TICK_STEP = timedelta(microseconds=1)


@dataclass(frozen=True)
class ReplayResult:
    """What one policy did with the recorded run, and what it cost."""

    label: str
    started_at: datetime  # the first slice's arrival
    ended_at: datetime  # the run's end (end_run) as recorded
    over_at: datetime  # the end (stop), or when the drain finished or timed out
    worker_hours: float  # live workers, idle ones included, from start to over
    backlog_over_deadline: float  # seconds some queued slice had waited past the deadline
    adjustments: tuple[AdjustSent, ...]
    peak_workers: int
    slices_processed: int
    slices_abandoned: int  # queued or in progress when the run was over, or never arrived
    p90_wait: float | None  # seconds in the queue, of the slices processed
    last_result_at: datetime | None
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def run_minutes(self) -> float:
        return (self.over_at - self.started_at).total_seconds() / 60.0

    def trace(self) -> Trace:
        return Trace(
            label=self.label,
            points=list(self.timeline.points),
            adjustments=[a.sent_at for a in self.adjustments],
        )


def replay(
    recording: RunRecording,
    settings: Settings,
    label: str,
    worker_startup: float = DEFAULT_WORKER_STARTUP,
) -> ReplayResult:
    """The recorded run replayed through the policy ``settings`` configure."""
    if worker_startup < 0:
        raise ValueError("worker_startup must not be negative")
    return _Replay(recording, settings, label, timedelta(seconds=worker_startup)).run()


def comparison_table(results: Sequence[ReplayResult]) -> str:
    """The replays side by side, one column each, as plain text."""
    rows: list[tuple[str, list[str]]] = [
        ("worker-hours", [f"{r.worker_hours:.2f}" for r in results]),
        ("backlog over deadline (s)", [f"{r.backlog_over_deadline:.0f}" for r in results]),
        ("adjustments", [str(len(r.adjustments)) for r in results]),
        ("peak workers", [str(r.peak_workers) for r in results]),
        (
            "slices processed / abandoned",
            [f"{r.slices_processed} / {r.slices_abandoned}" for r in results],
        ),
        (
            "p90 queue wait (s)",
            ["-" if r.p90_wait is None else f"{r.p90_wait:.1f}" for r in results],
        ),
        ("run over after (min)", [f"{r.run_minutes:.1f}" for r in results]),
    ]
    header = ("", [r.label for r in results])
    first = max(len(name) for name, _ in (header, *rows))
    widths = [max(len(values[i]) for _, values in (header, *rows)) for i in range(len(results))]

    def line(name: str, values: list[str]) -> str:
        cells = "  ".join(value.rjust(width) for value, width in zip(values, widths, strict=True))
        return f"{name.ljust(first)}  {cells}".rstrip()

    lines = [line(*header), "-" * (first + sum(w + 2 for w in widths))]
    lines += [line(name, values) for name, values in rows]
    return "\n".join(lines)


# --- the simulation ---------------------------------------------------------


class _Kind(IntEnum):
    # At one instant: a finished slice frees its worker before anything else
    # happens, new workers come up before arrivals look for one, and the end
    # comes after everything that happened at that same moment.
    DONE = 0
    WORKERS_UP = 1
    ARRIVAL = 2
    TICK = 3
    END = 4
    DRAIN_TIMEOUT = 5


@dataclass(frozen=True)
class _Slice:
    arrives: datetime
    seconds: float  # how long it occupies a worker
    reported: float | None  # what its result said (what the policy sees)
    failed: bool


@dataclass
class _Job:
    slice: _Slice
    started: datetime


@dataclass(eq=False)
class _Worker:
    name: str
    job: _Job | None = None
    leaving: bool = False  # exits when its current slice is done


def _slices(recording: RunRecording, settings: Settings) -> list[_Slice]:
    known = [s.processing_seconds for s in recording.slices if s.processing_seconds is not None]
    # A slice whose result carries no time (a failure, mostly) still held a
    # worker: assume a typical one.
    typical = statistics.median(known) if known else settings.slice.processing_time
    slices = []
    for s in recording.slices:
        seconds = typical if s.processing_seconds is None else s.processing_seconds
        arrives = s.requested_at or s.started_at or s.at - timedelta(seconds=seconds)
        slices.append(_Slice(arrives, seconds, s.processing_seconds, s.failed))
    slices.sort(key=lambda s: s.arrives)  # stable: equal times keep the recorded order
    return slices


class _Replay:
    def __init__(
        self, recording: RunRecording, settings: Settings, label: str, startup: timedelta
    ) -> None:
        run = recording.run
        self.label = label
        self.settings = settings
        self.startup = startup
        self.slices = _slices(recording, settings)
        self.started = self.slices[0].arrives if self.slices else recording.announced_at
        last_seen = max((s.at for s in recording.slices), default=self.started)
        # No end_run recorded: the run lasted as long as its results came.
        self.ended = max(self.started, recording.ended_at or last_seen)
        self.loop = ScalingLoop.for_run(settings, run)
        self.plan: WorkerPlan = replace(
            initial_state(run, settings).plan, requested_at=self.started
        )

        self.clock = self.started
        self.events: list[tuple[datetime, _Kind, int, Any]] = []
        self.sequence = 0
        self.queue: deque[_Slice] = deque()
        self.workers: list[_Worker] = []
        self.idle: deque[_Worker] = deque()
        self.named = 0
        self.generation = 0  # of the latest decision: older pending start-ups are void
        self.arrived = 0
        self.over: datetime | None = None

        self.worker_seconds = 0.0
        self.peak = 0
        self.waits: list[float] = []
        self.late: list[tuple[datetime, datetime]] = []  # (deadline passed, left the queue)
        self.processed = 0
        self.abandoned = 0
        self.last_result: datetime | None = None
        self.adjustments: list[AdjustSent] = []

    # -- running

    def run(self) -> ReplayResult:
        self._add_workers(self._size())
        for index, piece in enumerate(self.slices):
            self._schedule(piece.arrives, _Kind.ARRIVAL, index)
        self._schedule(self.ended, _Kind.END, None)
        if self.loop.policy.tick_seconds > 0:
            self._schedule(self.started, _Kind.TICK, None)
        while self.events and self.over is None:
            at, kind, _, payload = heapq.heappop(self.events)
            self._advance(at)
            self._handle(kind, payload)
        assert self.over is not None, "the end is always scheduled"
        return self._result()

    def _schedule(self, at: datetime, kind: _Kind, payload: Any) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, kind, self.sequence, payload))

    def _advance(self, to: datetime) -> None:
        self.worker_seconds += len(self.workers) * (to - self.clock).total_seconds()
        self.clock = to

    def _handle(self, kind: _Kind, payload: Any) -> None:
        match kind:
            case _Kind.ARRIVAL:
                self.queue.append(self.slices[payload])
                self.arrived += 1
                self._dispatch()
            case _Kind.DONE:
                self._done(payload)
            case _Kind.WORKERS_UP:
                if payload == self.generation:
                    self._add_workers(self._size() - self._staying())
                    self._dispatch()
            case _Kind.TICK:
                self._act(self.loop.on_idle(self.plan, self.clock))
                wait = timedelta(seconds=self.loop.seconds_to_next_look(self.clock))
                self._schedule(self.clock + max(wait, MIN_TICK_STEP), _Kind.TICK, None)
            case _Kind.END:
                if self.settings.scaling.end == "stop" or self._drained():
                    self._finish()
                else:
                    self._schedule(
                        self.clock + timedelta(seconds=self.settings.scaling.drain_timeout),
                        _Kind.DRAIN_TIMEOUT,
                        None,
                    )
            case _Kind.DRAIN_TIMEOUT:
                self._finish()

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            worker, piece = self.idle.popleft(), self.queue.popleft()
            self._left_queue(piece, self.clock)
            self.waits.append((self.clock - piece.arrives).total_seconds())
            worker.job = _Job(piece, self.clock)
            self._schedule(self.clock + timedelta(seconds=piece.seconds), _Kind.DONE, worker)

    def _done(self, worker: _Worker) -> None:
        job = worker.job
        assert job is not None, "a worker finishes only the slice it took"
        worker.job = None
        self.processed += 1
        self.last_result = self.clock
        if worker.leaving:
            self._remove(worker)
        else:
            self.idle.append(worker)
        piece = job.slice
        self._act(
            self.loop.after_result(
                self.plan,
                SliceObservation(
                    at=self.clock,
                    processing_seconds=piece.reported,
                    waited_seconds=(job.started - piece.arrives).total_seconds(),
                    worker=worker.name,
                    failed=piece.failed,
                ),
            )
        )
        self._dispatch()
        if self.clock >= self.ended and self._drained():
            self._finish()

    def _drained(self) -> bool:
        return (
            not self.queue
            and self.arrived == len(self.slices)
            and all(worker.job is None for worker in self.workers)
        )

    def _finish(self) -> None:
        self.over = self.clock
        in_progress = sum(1 for worker in self.workers if worker.job is not None)
        for piece in self.queue:
            self._left_queue(piece, self.clock)
        self.abandoned = len(self.queue) + in_progress + len(self.slices) - self.arrived

    # -- the policy and the workers

    def _act(self, adjustment: Adjustment | None) -> None:
        """An adjustment is sent the moment it is decided."""
        if adjustment is None:
            return
        self.plan = self.plan.adjusted(adjustment, self.clock)
        new = self._size()
        self.adjustments.append(AdjustSent.of(adjustment, sent_at=self.clock))
        self.generation += 1  # any start-up still pending is superseded
        staying = self._staying()
        if new > staying:
            # Workers told to leave are still here: keeping them is quicker
            # than starting new ones.
            for worker in self.workers:
                if worker.leaving and staying < new:
                    worker.leaving = False
                    staying += 1
            if staying < new:
                self._schedule(self.clock + self.startup, _Kind.WORKERS_UP, self.generation)
        elif new < staying:
            surplus = staying - new
            while surplus and self.idle:
                self._remove(self.idle.pop())
                surplus -= 1
            for worker in self.workers:
                if surplus and not worker.leaving:
                    worker.leaving = True  # busy: it finishes its slice first
                    surplus -= 1

    def _size(self) -> int:
        # The size asked for. Not plan.workers: that reads a request for 0
        # workers as the initial size.
        asked = self.plan.current.target_worker_count
        return self.plan.workers if asked is None else asked

    def _staying(self) -> int:
        return sum(1 for worker in self.workers if not worker.leaving)

    def _add_workers(self, count: int) -> None:
        for _ in range(max(0, count)):
            self.named += 1
            worker = _Worker(f"replay-worker-{self.named}")
            self.workers.append(worker)
            self.idle.append(worker)
        self.peak = max(self.peak, len(self.workers))

    def _remove(self, worker: _Worker) -> None:
        self.workers.remove(worker)

    # -- the outcome

    def _left_queue(self, piece: _Slice, at: datetime) -> None:
        overdue = piece.arrives + timedelta(seconds=self.settings.scaling.drain_deadline)
        if at > overdue:
            self.late.append((overdue, at))

    def _result(self) -> ReplayResult:
        assert self.over is not None
        return ReplayResult(
            label=self.label,
            started_at=self.started,
            ended_at=self.ended,
            over_at=self.over,
            worker_hours=self.worker_seconds / 3600.0,
            backlog_over_deadline=_covered(self.late),
            adjustments=tuple(self.adjustments),
            peak_workers=self.peak,
            slices_processed=self.processed,
            slices_abandoned=self.abandoned,
            p90_wait=percentile(self.waits, 90.0),
            last_result_at=self.last_result,
            timeline=self.loop.timeline,
        )


def _covered(spans: list[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of the spans."""
    total = 0.0
    reach: datetime | None = None
    for begin, end in sorted(spans):
        if reach is None or begin > reach:
            total += (end - begin).total_seconds()
            reach = end
        elif end > reach:
            total += (end - reach).total_seconds()
            reach = end
    return total
