"""python -m bench [--runs N] [--slices M] [--rate R] ...: see bench/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.plan import LoadPlan
from bench.scenarios import SCENARIOS
from bench.system import Benchmark, Options
from bench.timeline import timeline_png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Drive the whole system (ActiveMQ, Prefect server, runner, listener, "
        "simulated peers) with concurrent runs and print latencies, throughput, lost or "
        "duplicated effects, memory and CPU. Defaults: the issue's target, 20 runs, "
        "500 slice results/s, 5 minutes.",
    )
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="a named scenario: its load replaces --runs, --slices, --rate and "
        "--announce-every, and its targets are judged pass or fail",
    )
    parser.add_argument("--runs", type=int, default=20, help="concurrent runs")
    parser.add_argument("--slices", type=int, default=7500, help="slice results per run")
    parser.add_argument("--rate", type=float, default=500, help="slice results/s in total")
    parser.add_argument(
        "--expected",
        type=float,
        default=5.0,
        help="the service's expected slice processing time (s)",
    )
    parser.add_argument(
        "--announce-every",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="time between two runs' announcements (0: all at once)",
    )
    parser.add_argument(
        "--waves",
        type=int,
        help="start, load and end the runs this many times in turn (default: "
        "the scenario's, else 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=4, help="connections the simulated transformers send on"
    )
    parser.add_argument("--stomp-port", type=int, default=61663)
    parser.add_argument("--prefect-port", type=int, default=4340)
    parser.add_argument(
        "--postgres-port",
        type=int,
        metavar="PORT",
        help="run the Prefect server on a private PostgreSQL cluster on PORT (default: SQLite)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the system keeps its files (default: a new temporary directory)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of each process during the load into DIR",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory the JSON result is written to",
    )
    args = parser.parse_args(argv)

    scenario = SCENARIOS[args.scenario] if args.scenario else None
    if scenario is not None:
        args.runs, args.slices, args.rate = scenario.runs, scenario.slices, scenario.rate
        args.announce_every = scenario.announce_every
        args.waves = args.waves or scenario.waves
    plan = LoadPlan(
        runs=args.runs, slices=args.slices, rate=args.rate, expected_seconds=args.expected
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="swf-bench-"))
    load_before = os.getloadavg()
    bench = Benchmark(
        Options(
            plan=plan,
            workdir=workdir,
            stomp_port=args.stomp_port,
            prefect_port=args.prefect_port,
            connections=args.connections,
            profile=args.profile,
            announce_every=args.announce_every,
            postgres_port=args.postgres_port,
            waves=args.waves or 1,
        )
    )
    result = bench.run()
    result.notes.append(
        "machine load average before the run (1, 5, 15 min): "
        + ", ".join(f"{x:.2f}" for x in load_before)
    )
    print(result.table())
    if scenario is not None:
        print("\n" + scenario.verdict(result))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.scenario or 'custom'}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    print(f"\nresult written to {path}; the system's logs are in {workdir / 'logs'}")
    if bench.timeline is not None:
        plot = args.out / f"{stem}.png"
        plot.write_bytes(timeline_png(bench.timeline))
        print(f"timeline drawn in {plot}")


if __name__ == "__main__":
    main()
