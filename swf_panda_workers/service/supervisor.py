"""Children kept running: all are started, a child that exits is started
again after a backoff with a log line saying how it ended, and all stop
together within a deadline.

The loop never blocks on a child: starting (a Prefect server takes seconds
to answer) is launched, then polled, so a stop request is seen within one
poll, whatever the children are doing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from swf_panda_workers.service.processes import ManagedProcess, StartupError

log = logging.getLogger("swf.serve")

POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Backoff:
    """Seconds before a child is started again: ``first``, doubling with each
    exit in a row up to ``limit``; a child that ran ``stable`` seconds starts
    again after ``first``."""

    first: float = 1.0
    limit: float = 30.0
    stable: float = 60.0

    def delay(self, exits_in_a_row: int) -> float:
        return min(self.limit, self.first * 2 ** max(0, exits_in_a_row - 1))


@dataclass
class Child:
    """``launch`` starts the process (raising StartupError when it must not:
    then the whole service stops); ``ready`` is polled after each launch
    until it says True, and may raise StartupError too. Children of a lower
    ``stop_phase`` are stopped first."""

    name: str
    process: ManagedProcess
    launch: Callable[[], object]  # what it returns is not used
    ready: Callable[[], bool] = lambda: True
    stop_phase: int = 0
    # s after a launch to be ready, else it is killed and started again; None:
    # it may take its time (the listener waits out a broker that is down)
    ready_within: float | None = None
    # what the supervisor knows of it
    launched_at: float | None = field(default=None, init=False)
    is_ready: bool = field(default=False, init=False)
    ever_ready: bool = field(default=False, init=False)
    exits_in_a_row: int = field(default=0, init=False)
    due: float | None = field(default=0.0, init=False)  # next launch; None: launched


class Fatal(RuntimeError):
    """The service cannot go on (e.g. a foreign server on its port)."""


@dataclass
class Supervisor:
    children: Sequence[Child]
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    on_all_ready: Callable[[], None] | None = None  # once, when every child first is ready
    _announced: bool = field(default=False, init=False)

    def run(self, stopping: threading.Event) -> None:
        """Keep the children running until ``stopping`` is set (then return;
        ``stop`` ends them), or raise Fatal."""
        while not stopping.is_set():
            for child in self.children:
                self._tend(child)
            if not self._announced and all(c.ever_ready for c in self.children):
                self._announced = True
                if self.on_all_ready is not None:
                    self.on_all_ready()
            stopping.wait(POLL_SECONDS)

    def _tend(self, child: Child) -> None:
        now = self.clock()
        if child.due is not None:
            if now >= child.due:
                self._launch(child, now)
            return
        if not child.process.alive:
            self._schedule_restart(child, now)
            return
        if not child.is_ready:
            self._poll_ready(child, now)

    def _launch(self, child: Child, now: float) -> None:
        try:
            child.launch()
        except StartupError as exc:
            raise Fatal(f"{child.name}: {exc}") from exc
        child.launched_at, child.due, child.is_ready = now, None, False
        log.info("%s started (pid %s)", child.name, child.process.pid)

    def _poll_ready(self, child: Child, now: float) -> None:
        try:
            ready = child.ready()
        except StartupError as exc:
            raise Fatal(f"{child.name}: {exc}") from exc
        if ready:
            child.is_ready = True
            if child.ever_ready:
                log.info("%s ready again", child.name)
            child.ever_ready = True
            return
        assert child.launched_at is not None
        if child.ready_within is not None and now - child.launched_at > child.ready_within:
            log.error(
                "%s not ready %gs after its start: killing it", child.name, child.ready_within
            )
            child.process.kill()

    def _schedule_restart(self, child: Child, now: float) -> None:
        child.process.reap()  # what it started dies with it
        assert child.launched_at is not None
        ran = now - child.launched_at
        child.exits_in_a_row = 1 if ran >= self.backoff.stable else child.exits_in_a_row + 1
        delay = self.backoff.delay(child.exits_in_a_row)
        child.due, child.is_ready = now + delay, False
        last = child.process.tail(1).strip() or "(its log is empty)"
        log.error(
            "%s (pid %s) %s after %.1fs; starting it again in %.1fs (exit %d in a row)."
            " Its log %s ends: %s",
            child.name,
            child.process.pid,
            child.process.exit_reason(),
            ran,
            delay,
            child.exits_in_a_row,
            child.process.log_path,
            last[-300:],
        )

    def stop(self, within: float = 9.0) -> None:
        """SIGTERM every child, phase by phase (the listener and the runner
        before the server they talk to), each phase given its share of
        ``within`` seconds, then SIGKILL; whatever a child started goes too."""
        phases = sorted({c.stop_phase for c in self.children})
        start = time.monotonic()  # the real clock: ManagedProcess.finish waits on it
        for index, phase in enumerate(phases):
            group = [c for c in self.children if c.stop_phase == phase]
            for child in group:
                child.process.signal(signal.SIGTERM)
            deadline = start + within * (index + 1) / len(phases)
            for child in group:
                child.process.finish(deadline)
