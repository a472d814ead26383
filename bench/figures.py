"""The benchmark's figures, computed from what was sent and what was seen on
the bus: pure functions and the result model (printed as a table, saved as
JSON)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from swf_panda_workers.peers.recorder import text_table
from swf_panda_workers.slice_window import percentile


class Latency(BaseModel):
    """Milliseconds from a cause to its effect on the bus."""

    samples: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        values = [s * 1000 for s in seconds]

        def at(pct: float) -> float | None:
            value = percentile(values, pct)
            return None if value is None else round(value, 1)

        return cls(samples=len(values), p50=at(50), p95=at(95), p99=at(99),
                   max=round(max(values), 1) if values else None)


class Tally(BaseModel):
    """How many effects of one kind were expected and how many came."""

    expected: int
    seen: int
    lost: int  # summed over runs: expected but not seen
    duplicated: int  # summed over runs: seen more often than expected

    @classmethod
    def of(cls, expected: Mapping[str, int], seen: Mapping[str, int]) -> Tally:
        runs = set(expected) | set(seen)
        return cls(
            expected=sum(expected.values()), seen=sum(seen.values()),
            lost=sum(max(0, expected.get(r, 0) - seen.get(r, 0)) for r in runs),
            duplicated=sum(max(0, seen.get(r, 0) - expected.get(r, 0)) for r in runs),
        )


def delays(causes: Mapping[str, Sequence[float]],
           effects: Mapping[str, Sequence[float]]) -> list[float]:
    """Per run, each cause paired with the first effect at or after it that
    no earlier cause took: seconds from one to the other. A cause without an
    effect gives no delay (the tally counts it as lost)."""
    return [delay for _, delay in timed_delays(causes, effects)]


def timed_delays(causes: Mapping[str, Sequence[float]],
                 effects: Mapping[str, Sequence[float]]) -> list[tuple[float, float]]:
    """As ``delays``, each with the time of its cause: (cause, seconds)."""
    found: list[tuple[float, float]] = []
    for run, times in causes.items():
        pending = sorted(effects.get(run, ()))
        for cause in sorted(times):
            while pending and pending[0] < cause:
                pending.pop(0)  # an effect before its cause answers something else
            if pending:
                found.append((cause, pending.pop(0) - cause))
    return found


class ProcessUse(BaseModel):
    """One part of the system (a process and its children)."""

    idle_rss_mb: float  # before the first run was announced
    peak_rss_mb: float
    cpu_seconds: float  # during the benchmark
    # RSS once the load has run a quarter, half, three quarters and all of
    # its time: a run that stays open must not grow with the events it saw.
    load_rss_mb: list[float | None] = []


class BenchResult(BaseModel):
    started_at: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    latency_ms: dict[str, Latency]
    sent_per_second: float  # the rate the load generator achieved
    handled_per_second: float  # slice results stored as run events, per second of load
    handoff_drain_seconds: float | None  # last result sent -> all results stored
    effects: dict[str, Tally]
    processes: dict[str, ProcessUse]
    per_added_run_mb: float  # (peak - idle) of listener + runner, per run
    notes: list[str]

    def table(self) -> str:
        rows = [("latency (ms)", "samples", "p50", "p95", "p99", "max")]
        rows += [(name, str(v.samples), *(number(x) for x in (v.p50, v.p95, v.p99, v.max)))
                 for name, v in self.latency_ms.items()]
        effects = [("effect", "expected", "seen", "lost", "duplicated")]
        effects += [(name, *(str(x) for x in (t.expected, t.seen, t.lost, t.duplicated)))
                    for name, t in self.effects.items()]
        use = [("process", "idle RSS MB", "peak RSS MB", "RSS at 1/4, 1/2, 3/4, end of load",
                "CPU s")]
        use += [(name, number(p.idle_rss_mb), number(p.peak_rss_mb),
                 " ".join(number(x) for x in p.load_rss_mb), number(p.cpu_seconds))
                for name, p in self.processes.items()]
        plan = self.plan
        return "\n\n".join([
            f"{plan['runs']} runs x {plan['slices']} slice results at {plan['rate']:g}/s "
            f"({plan['duration']:.0f} s of load), Prefect on {plan.get('database', 'sqlite')}",
            text_table(rows),
            f"slice results sent {self.sent_per_second:.1f}/s, stored as run events "
            f"{self.handled_per_second:.1f}/s; all stored "
            f"{number(self.handoff_drain_seconds)} s after the last was sent",
            text_table(effects),
            text_table(use),
            f"memory per added run (listener + runner): {self.per_added_run_mb:.1f} MB",
            *self.notes,
        ])


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
