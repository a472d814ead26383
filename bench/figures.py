"""The benchmark's figures, computed from what was sent and what was seen on
the bus: pure functions and the result model (printed as a table, saved as
JSON)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from swf_panda_workers.core.slice_window import percentile
from swf_testbed.peers.recorder import text_table


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

        return cls(
            samples=len(values),
            p50=at(50),
            p95=at(95),
            p99=at(99),
            max=round(max(values), 1) if values else None,
        )


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
            expected=sum(expected.values()),
            seen=sum(seen.values()),
            lost=sum(max(0, expected.get(r, 0) - seen.get(r, 0)) for r in runs),
            duplicated=sum(max(0, seen.get(r, 0) - expected.get(r, 0)) for r in runs),
        )


def delays(
    causes: Mapping[str, Sequence[float]], effects: Mapping[str, Sequence[float]]
) -> list[float]:
    """Per run, each cause paired with the first effect at or after it that
    no earlier cause took: seconds from one to the other. A cause without an
    effect gives no delay (the tally counts it as lost)."""
    return [delay for _, delay in timed_delays(causes, effects)]


def timed_delays(
    causes: Mapping[str, Sequence[float]], effects: Mapping[str, Sequence[float]]
) -> list[tuple[float, float]]:
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


Series = Sequence[tuple[float, float]]  # (unix time, value)
Span = tuple[float, float]  # (unix time, unix time)


class Drift(BaseModel):
    """The system early in a long benchmark and at its end: the waves of runs
    that began 10 to 20 minutes after the first, and those of the last ten
    minutes. Whole waves, so that each side holds the same mix of run starts,
    load and run ends."""

    early: Span
    late: Span
    rss_mb: dict[str, tuple[float, float]]  # process -> mean RSS early, late
    cpu_per_1000: tuple[float, float]  # CPU s of all processes per 1000 results, early, late

    def rss_growth_pct(self) -> float:
        """The largest change of a process's RSS, late against early, in %."""
        return max(
            (abs(late / early - 1) * 100 for early, late in self.rss_mb.values() if early > 0),
            default=0.0,
        )

    def cpu_growth_pct(self) -> float:
        early, late = self.cpu_per_1000
        return abs(late / early - 1) * 100 if early > 0 else 0.0


EARLY = (600.0, 1200.0)  # s after the first wave began: its second ten minutes
LATE = 600.0  # s: the last ten minutes


def drift(
    waves: Sequence[Span],
    sent_at: Sequence[float],
    rss: Mapping[str, Series],
    cpu: Mapping[str, Series],
) -> Drift | None:
    """``waves``: when each wave began and ended; ``rss`` and ``cpu``: each
    process's samples (CPU used so far). None if the benchmark was too short
    to hold a wave on each side."""
    if not waves:
        return None
    origin, end = waves[0][0], waves[-1][1]
    early = _whole(waves, origin + EARLY[0], origin + EARLY[1])
    late = _whole(waves, max(end - LATE, origin + EARLY[1]), end)
    if early is None or late is None:
        return None

    def mean_rss(series: Series, span: Span) -> float:
        inside = [v for t, v in series if span[0] <= t <= span[1]]
        return round(sum(inside) / len(inside), 1) if inside else 0.0

    def cpu_per_1000(span: Span) -> float:
        used = sum(_at(series, span[1]) - _at(series, span[0]) for series in cpu.values())
        results = sum(1 for t in sent_at if span[0] <= t <= span[1])
        return round(used / results * 1000, 2) if results else 0.0

    return Drift(
        early=early,
        late=late,
        rss_mb={name: (mean_rss(s, early), mean_rss(s, late)) for name, s in rss.items()},
        cpu_per_1000=(cpu_per_1000(early), cpu_per_1000(late)),
    )


def _whole(waves: Sequence[Span], lo: float, hi: float) -> Span | None:
    """From the start of the first wave within [lo, hi] to the end of the last."""
    inside = [w for w in waves if lo <= w[0] and w[1] <= hi]
    return (inside[0][0], inside[-1][1]) if inside else None


def _at(series: Series, moment: float) -> float:
    """The value sampled last at or before ``moment`` (the first, if none)."""
    before = [v for t, v in series if t <= moment]
    return before[-1] if before else (series[0][1] if series else 0.0)


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
    drift: Drift | None = None  # a benchmark of several waves, long enough

    def table(self) -> str:
        rows: list[tuple[str, ...]] = [("latency (ms)", "samples", "p50", "p95", "p99", "max")]
        rows += [
            (name, str(v.samples), *(number(x) for x in (v.p50, v.p95, v.p99, v.max)))
            for name, v in self.latency_ms.items()
        ]
        effects: list[tuple[str, ...]] = [("effect", "expected", "seen", "lost", "duplicated")]
        effects += [
            (name, *(str(x) for x in (t.expected, t.seen, t.lost, t.duplicated)))
            for name, t in self.effects.items()
        ]
        use = [
            ("process", "idle RSS MB", "peak RSS MB", "RSS at 1/4, 1/2, 3/4, end of load", "CPU s")
        ]
        use += [
            (
                name,
                number(p.idle_rss_mb),
                number(p.peak_rss_mb),
                " ".join(number(x) for x in p.load_rss_mb),
                number(p.cpu_seconds),
            )
            for name, p in self.processes.items()
        ]
        plan = self.plan
        return "\n\n".join(
            [
                f"{plan['runs']} runs x {plan['slices']} slice results at {plan['rate']:g}/s "
                f"({plan['duration']:.0f} s of load), Prefect on {plan.get('database', 'sqlite')}",
                text_table(rows),
                f"slice results sent {self.sent_per_second:.1f}/s, stored as run events "
                f"{self.handled_per_second:.1f}/s; all stored "
                f"{number(self.handoff_drain_seconds)} s after the last was sent",
                text_table(effects),
                text_table(use),
                f"memory per added run (listener + runner): {self.per_added_run_mb:.1f} MB",
                *self._drift_lines(),
                *self.notes,
            ]
        )

    def _drift_lines(self) -> list[str]:
        drift = self.drift
        if drift is None:
            return []
        rows = [("early and late", "RSS MB early", "RSS MB late")]
        rows += [
            (name, number(early), number(late)) for name, (early, late) in drift.rss_mb.items()
        ]
        minutes = [round((b - a) / 60, 1) for a, b in (drift.early, drift.late)]
        return [
            text_table(rows),
            f"CPU per 1000 results: {drift.cpu_per_1000[0]} s early, "
            f"{drift.cpu_per_1000[1]} s late (whole waves: {minutes[0]} min early, "
            f"{minutes[1]} min late); largest RSS change {drift.rss_growth_pct():.1f} %, "
            f"CPU change {drift.cpu_growth_pct():.1f} %",
        ]


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
