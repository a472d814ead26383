"""The benchmark's named scenarios and the targets each is judged against.

A scenario fixes the load (runs, results per run, total rate, how the runs
are announced); a target reads one figure off the result and passes when it
is at or under its limit. The figures come from bench/figures.py; nothing
here measures anything."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.figures import BenchResult, number
from swf_testbed.peers.recorder import text_table

CREATE = "run_imminent -> create_workflow_task"
ADJUST = "slow slice_result -> adjust_worker"
STOP = "end_run -> stop_transformer"


@dataclass(frozen=True)
class Target:
    what: str
    limit: float
    unit: str
    read: Callable[[BenchResult], float | None]

    def judge(self, result: BenchResult) -> tuple[float | None, bool]:
        value = self.read(result)
        return value, value is not None and value <= self.limit


def p99(latency: str) -> Callable[[BenchResult], float | None]:
    return lambda result: result.latency_ms[latency].p99 if latency in result.latency_ms else None


def lost_or_doubled(result: BenchResult) -> float:
    return float(sum(t.lost + t.duplicated for t in result.effects.values()))


def cpu_per_1000_results(result: BenchResult) -> float | None:
    results = result.plan.get("waves", 1) * result.plan["runs"] * result.plan["slices"]
    used = sum(p.cpu_seconds for p in result.processes.values())
    return round(used / results * 1000, 2) if results else None


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    runs: int
    slices: int  # per run
    rate: float  # slice results per second, all runs together
    announce_every: float  # s between two announcements
    targets: tuple[Target, ...]
    waves: int = 1  # the runs started, loaded and ended this many times in turn

    def verdict(self, result: BenchResult) -> str:
        rows = [("target", "limit", "measured", "")]
        for target in self.targets:
            value, passed = target.judge(result)
            rows.append(
                (
                    target.what,
                    f"{target.limit:g} {target.unit}",
                    f"{number(value)} {target.unit}",
                    "pass" if passed else "FAIL",
                )
            )
        return f"scenario {self.name}: {self.what}\n\n" + text_table(rows)


def rss_growth(result: BenchResult) -> float | None:
    return None if result.drift is None else round(result.drift.rss_growth_pct(), 1)


def cpu_growth(result: BenchResult) -> float | None:
    return None if result.drift is None else round(result.drift.cpu_growth_pct(), 1)


NOTHING_LOST = Target(
    "effects lost or doubled, results not stored or not counted", 0, "", lost_or_doubled
)

SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "burst-20",
            "20 runs announced within one second, ending in the same second",
            runs=20,
            slices=30,
            rate=100,
            announce_every=0.05,
            targets=(
                Target("run_imminent -> create_workflow_task p99", 2000, "ms", p99(CREATE)),
                Target("end_run -> stop_transformer p99", 500, "ms", p99(STOP)),
                NOTHING_LOST,
            ),
        ),
        Scenario(
            "sustained-200",
            "20 runs, 200 slice results/s in all for 5 minutes",
            runs=20,
            slices=3000,
            rate=200,
            announce_every=0.05,
            targets=(
                Target("slow slice_result -> adjust_worker p99", 150, "ms", p99(ADJUST)),
                Target("CPU of all processes per 1000 results", 2.5, "s", cpu_per_1000_results),
                NOTHING_LOST,
            ),
        ),
        Scenario(
            "sustained-500",
            "20 runs, 500 slice results/s in all for 5 minutes",
            runs=20,
            slices=7500,
            rate=500,
            announce_every=0.05,
            targets=(
                Target("slow slice_result -> adjust_worker p99", 250, "ms", p99(ADJUST)),
                Target("end_run -> stop_transformer p99", 500, "ms", p99(STOP)),
                NOTHING_LOST,
            ),
        ),
        # Waves of 20 runs x 900 results at 100/s (3 minutes of load, and the
        # starts and ends around it), one after the other for about an hour.
        Scenario(
            "soak-1h",
            "an hour at 100 slice results/s, runs starting and ending all the time",
            runs=20,
            slices=900,
            rate=100,
            announce_every=0.05,
            waves=16,
            targets=(
                Target(
                    "largest change of a process's RSS, last 10 min against minutes 10-20",
                    10,
                    "%",
                    rss_growth,
                ),
                Target(
                    "change of CPU per 1000 results, last 10 min against minutes 10-20",
                    10,
                    "%",
                    cpu_growth,
                ),
                NOTHING_LOST,
            ),
        ),
    )
}
