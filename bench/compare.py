"""Compare benchmark results side by side:

python -m bench.compare bench-results/bench-A.json bench-results/bench-B.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from bench.figures import BenchResult, number
from swf_testbed.peers.recorder import text_table


def comparison(results: Sequence[tuple[str, BenchResult]]) -> str:
    """One row per figure, one column per result."""
    names = [name for name, _ in results]
    rows: list[tuple[str, ...]] = [("figure", *names)]

    def row(label: str, values: Sequence[float | int | None]) -> None:
        rows.append((label, *(number(v) if not isinstance(v, int) else str(v) for v in values)))

    row("runs", [r.plan["runs"] for _, r in results])
    row("slice results/s planned", [r.plan["rate"] for _, r in results])
    row("slice results/s stored", [r.handled_per_second for _, r in results])
    for latency in dict.fromkeys(k for _, r in results for k in r.latency_ms):
        for pct in ("p50", "p99"):
            row(
                f"{latency} {pct} (ms)",
                [
                    getattr(r.latency_ms[latency], pct) if latency in r.latency_ms else None
                    for _, r in results
                ],
            )
    for effect in dict.fromkeys(k for _, r in results for k in r.effects):
        row(
            f"{effect}: lost + duplicated",
            [
                r.effects[effect].lost + r.effects[effect].duplicated
                if effect in r.effects
                else None
                for _, r in results
            ],
        )
    for part in dict.fromkeys(k for _, r in results for k in r.processes):
        row(
            f"{part} peak RSS (MB)",
            [r.processes[part].peak_rss_mb if part in r.processes else None for _, r in results],
        )
        row(
            f"{part} CPU (s)",
            [r.processes[part].cpu_seconds if part in r.processes else None for _, r in results],
        )
    row("memory per added run (MB)", [r.per_added_run_mb for _, r in results])
    return text_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by the bench")
    args = parser.parse_args(argv)
    print(
        comparison(
            [
                (path.stem, BenchResult.model_validate(json.loads(path.read_text())))
                for path in args.results
            ]
        )
    )


if __name__ == "__main__":
    main()
