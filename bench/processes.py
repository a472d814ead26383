"""Memory and CPU of the system's processes, read from /proc: each part is a
process and all its descendants (the runner's flow-run subprocesses, the
Prefect server's workers)."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone
    # The command name (field 2) may hold spaces: split after its parenthesis.
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, as they are now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def rss_mb(pid: int) -> float:
    try:
        resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
    except (OSError, IndexError):
        return 0.0
    return int(resident) * PAGE_MB


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    # utime and stime are fields 14 and 15 of /proc/<pid>/stat (11, 12 here).
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class TreeUse:
    """RSS and CPU of one process tree, sampled over time."""

    root: int
    peak_rss_mb: float = 0.0
    last_rss_mb: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (time, RSS MB)
    cpu_history: list[tuple[float, float]] = field(default_factory=list)  # (time, CPU s so far)
    _cpu_start: dict[int, float] = field(default_factory=dict)
    _cpu_last: dict[int, float] = field(default_factory=dict)

    def sample(self) -> None:
        pids = descendants(self.root)
        self.last_rss_mb = sum(rss_mb(pid) for pid in pids)
        self.history.append((time.time(), self.last_rss_mb))
        self.peak_rss_mb = max(self.peak_rss_mb, self.last_rss_mb)
        first = not self._cpu_last
        for pid in pids:
            used = cpu_seconds(pid)
            # A process seen for the first time after the start began at zero
            # (a flow run's subprocess); one there at the start, from then.
            self._cpu_start.setdefault(pid, used if first else 0.0)
            self._cpu_last[pid] = used
        self.cpu_history.append((time.time(), self.cpu_seconds))

    def rss_at(self, moment: float) -> float | None:
        """The RSS sampled last before ``moment``."""
        before = [rss for at, rss in self.history if at <= moment]
        return before[-1] if before else None

    @property
    def cpu_seconds(self) -> float:
        """CPU used since the first sample; a child's last sampled figure
        stands for it once it has exited."""
        return sum(self._cpu_last[pid] - self._cpu_start[pid] for pid in self._cpu_last)


class Periodic:
    """Calls ``sample`` every ``every`` seconds on a thread of its own, once
    at the start too, until stopped."""

    def __init__(self, every: float, name: str) -> None:
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()


class Sampler(Periodic):
    """Samples named process trees every ``every`` seconds on a thread."""

    def __init__(self, roots: dict[str, int], every: float = 0.5) -> None:
        super().__init__(every, "bench-sampler")
        self.trees = {name: TreeUse(pid) for name, pid in roots.items()}

    def sample(self) -> None:
        for tree in self.trees.values():
            tree.sample()


class MetricSampler(Periodic):
    """Samples one Prometheus counter (e.g. the listener's acked messages)
    from ``url`` every ``every`` seconds on a thread; a sample that fails is
    skipped."""

    def __init__(self, url: str, metric: str, every: float = 1.0) -> None:
        super().__init__(every, "bench-metric")
        self.url = url
        self.metric = metric
        self.samples: list[tuple[float, float]] = []

    def latest(self) -> float | None:
        """The counter's last value sampled (None: none yet)."""
        return self.samples[-1][1] if self.samples else None

    def sample(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == self.metric:
                self.samples.append((time.time(), float(value)))
