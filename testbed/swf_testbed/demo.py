"""The demo: a whole data-taking session on this machine.

Broker, Prefect server, runner and listener start as real processes, and so
do the real peers: iDDS's prompt transceiver (idds-server 2.6.21, on its own
database) and, for each PanDA job iDDS submits, a real transformer
(idds-prompt 2.6.21's run_prompt). Only the control system (announcements,
slices, ends), PanDA (one HTTP stand-in that starts the jobs) and the
payload (a reconstruction that takes the time the scenario says) are
simulated. In REST mode the service reaches iDDS over its real REST API
(idds-server 2.6.21's own app, on the transceiver's database, served over
TLS with x509 proxies made for the demo, as its Apache serves it): it
answers a create with HTTP 500 after making the task, and the service finds
the task by name.

Runs are announced, their slices stream in, a slow stretch makes them ask
for more workers (iDDS 2.6.21 does not act on the count: the summary shows
what was asked), they end, drain, stop and are closed; the bus traffic, the
transformers and the Prefect flow runs are summarised at the end, and the
first run is replayed offline through both scaling policies.

    swf-panda-workers-demo [--runs N] [--shape testbed|seed] [--slices N]
                           [--prefect-port P] [--workdir DIR] [--keep] [--mode message|rest]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_panda_workers.config.loading import ConfigError
from swf_testbed.launchers.activemq import stomp_answers
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers._bus import poll_until
from swf_testbed.peers.control_system import Shape
from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.idds_rest_app import AppRequest, client_env
from swf_testbed.peers.peers_venv_scripts.payload_schedule import (
    PayloadSchedule,
    SliceRule,
)
from swf_testbed.peers.real_peers import RealPeers
from swf_testbed.peers.recorder import BusRecorder

NAMESPACE = "demo"

# The proportional policy on the testbed's time scale shrunk about thirty
# times (seconds for its minutes), as the demo and the integration tests run it.
SHRUNK_SCALING: dict[str, Any] = {
    "policy": "proportional",
    "window": 8,
    "percentile": 90,
    "target_utilisation": 0.8,
    "drain_deadline": 10,
    "min_workers": 2,
    "max_workers": 12,
    "tolerance": 0.1,
    "up_window": 2,
    "down_window": 6,
    "max_step_up": 1.0,
    "max_step_down": 0.5,
    "rampup": 4,
    "min_results": 5,
    "tick": 1,
    "end": "drain",
    "drain_timeout": 60,
    "drain_quiet": 3,
}
SLICE_RATE = 4.0  # slices/s sent per run
WORKERS = 3  # announced per run: iDDS submits a PanDA task of that many jobs
IDLE_TIMEOUT = 60  # s the transformers wait for a slice (panda.idle_timeout)
DEMO_CONFIG: dict[str, Any] = {
    "transceiver": {"namespace": NAMESPACE},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "scaling": SHRUNK_SCALING,
    "timeouts": {"created_workflow_task": 60, "closed_workflow_task": 60, "run_end": 3600},
    "prefect": {"runner_limit": 10},
    "panda": {"idle_timeout": IDLE_TIMEOUT},
}


Mode = Literal["message", "rest"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swf-panda-workers-demo", description="run a whole session on this machine"
    )
    parser.add_argument("--runs", type=int, default=2, help="concurrent runs (default 2)")
    parser.add_argument(
        "--shape",
        choices=["testbed", "seed"],
        default="testbed",
        help="message shapes the control system uses",
    )
    parser.add_argument(
        "--slices", type=int, default=120, help="slices per run (they arrive at 4/s)"
    )
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".swf-local/demo"),
        help="broker data, Prefect database and logs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack up afterwards")
    parser.add_argument(
        "--mode",
        choices=["message", "rest"],
        default="message",
        help="how the service reaches iDDS: on the bus (default), or its REST "
        "API (iDDS's own REST app, via idds-client)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``swf-panda-workers-demo``: the testbed's command, apart from the product's."""
    args = build_parser().parse_args(argv)
    try:
        return run_demo(
            args.workdir.resolve(),
            args.runs,
            args.shape,
            args.slices,
            args.prefect_port,
            args.keep,
            args.mode,
        )
    except ConfigError as exc:  # as the product's command line reports it
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def run_demo(
    workdir: Path,
    runs: int = 2,
    shape: Shape = "testbed",
    slices: int = 120,
    prefect_port: int = 4200,
    keep: bool = False,
    mode: Mode = "message",
) -> int:
    config = {**DEMO_CONFIG, "transceiver": {"namespace": NAMESPACE, "mode": mode}}
    # REST mode: iDDS's REST app on a free port, over TLS; the runner holds
    # the operator's proxy, made with a CA of the demo's own.
    pki = GridPki.make(workdir / "pki") if mode == "rest" else None
    idds_port = _free_port()
    runner_env = (
        client_env(f"https://127.0.0.1:{idds_port}/idds", pki.user, pki.ca, workdir / "idds-client")
        if pki is not None
        else {}
    )
    stack = EmbeddedStack(workdir, config, prefect_port=prefect_port, runner_env=runner_env)
    borrowed = borrowed_broker(stack)
    if borrowed is not None:
        print(
            f"using the broker already answering STOMP on {borrowed}: the demo did not start "
            "it (it may hold another session's messages); stop it to have the demo start "
            "its own"
        )
    print(
        f"starting {'' if borrowed else 'the broker, '}Prefect server, runner and listener "
        f"(logs in {stack.logs}) ..."
    )
    with stack:
        print(f"Prefect UI: {stack.ui_url}")
        # Numeric run ids, as the testbed sends; distinct for every demo.
        base = int(time.time()) % 1_000_000 * 10
        run_ids = [str(base + i) for i in range(runs)]
        brokers = stack.brokers
        print(
            "starting the real peers: iDDS's prompt transceiver"
            f"{' and its REST app' if pki else ''}, the PanDA stand-in ..."
        )
        with (
            BusRecorder(
                brokers, topics=(brokers.workers_topic, brokers.transformer_topic)
            ) as recorder,
            RealPeers(
                brokers,
                workdir / "peers",
                namespace=NAMESPACE,
                results_destination=brokers.results_destination,
                schedule=slow_middle_third(run_ids, slices),
                pki=pki,
                rest_port=idds_port,
            ) as peers,
        ):
            rest = peers.rest if pki is not None else None
            where = f"iDDS's REST API at {rest.url}" if rest else "iDDS on the bus"
            print(
                f"runs {', '.join(run_ids)}: {shape}-shaped messages, {slices} slices each, "
                f"{WORKERS} workers announced; {where}"
            )
            timings = play(peers, recorder, rest is not None, run_ids, shape, slices)
            print("\nOn the bus (messages per run; a stop goes as an integer and a string):")
            print(recorder.summary_table(run_ids))
            for run_id in run_ids:
                sizes = [
                    str(a["content"]["target_worker_count"])
                    for a in recorder.of_type("adjust_worker", run_id)
                ]
                print(
                    f"  run {run_id} workers asked: {WORKERS} -> "
                    f"{' -> '.join(sizes) or 'unchanged'} (iDDS 2.6.21 applies no count)"
                )
            print("\nThe transformers (real run_prompt processes, one per PanDA job):")
            for run_id in run_ids:
                pilots = peers.pilots.of_run(run_id)
                stopped_at = timings.get(f"stop {run_id}")
                exits = [
                    f"{(p.exited_at or 0) - stopped_at:.1f}"
                    for p in pilots
                    if stopped_at and p.exited_at
                ]
                print(
                    f"  run {run_id}: {len(pilots)} started, exit codes "
                    f"{sorted({p.exit_code for p in pilots}, key=str)}, exited "
                    f"{', '.join(exits) or '-'} s after the stop"
                )
            if rest is not None:
                print("\nAt iDDS's REST API (each request, as its server logged it):")
                for request in rest.requests():
                    print(f"  {request_line(request)}")
        states = asyncio.run(flow_run_states(stack.api_url, run_ids))
        print("\nIn Prefect:")
        for run_id in run_ids:
            print(f"  run {run_id}: {states.get(run_id, 'no flow run')}")
        print(f"\ncreated after {timings['created']:.1f}s, closed after {timings['closed']:.1f}s")
        print(
            f"Prefect UI: {stack.ui_url}  (flow runs 'run-<id>', events 'swf.run.{NAMESPACE}.*',"
            " artifacts 'run-<ns>-<id>', 'scaling-<ns>-<id>' and '...-plot')"
        )
        replayed = replay_first_run(stack, run_ids[0], workdir)
        if keep:
            print("the stack stays up for the UI; Ctrl-C (or SIGTERM) stops it")
            wait_for_stop_signal()
    ok = (
        bool(timings.get("all closed"))
        and replayed
        and all(states.get(r) == "Completed" for r in run_ids)
    )
    print("demo finished: " + ("every run completed" if ok else "SOME RUNS DID NOT COMPLETE"))
    return 0 if ok else 1


def slow_middle_third(run_ids: list[str], slices: int) -> PayloadSchedule:
    """0.5 s a slice; the middle third 2 s: the runs ask for more workers."""
    return PayloadSchedule(
        0.5,
        tuple(
            SliceRule(run_id=run_id, first=slices // 3, last=2 * slices // 3 - 1, seconds=2.0)
            for run_id in run_ids
        ),
    )


def request_line(request: AppRequest) -> str:
    """One request to iDDS's REST app, for the demo's summary."""
    error = f"  ({request.error[:90]})" if request.error else ""
    return f"{request.method:4} {request.path[:90]} -> {request.status}{error}"


def play(
    peers: RealPeers,
    recorder: BusRecorder,
    rest: bool,
    run_ids: list[str],
    shape: Shape,
    slices: int,
) -> dict[str, float]:
    """Announce every run, stream their slices, end each once they are sent;
    returns the session's timings (seconds from its start; epoch for stops)."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    control = peers.control
    for run_id in run_ids:
        control.announce(run_id, shape, target_workers=WORKERS, slice_processing_time=0.5)

    def created(run_id: str) -> bool:
        # iDDS submitted the run's PanDA task (either mode).
        return bool(peers.panda.submissions_for(run_id))

    if not poll_until(lambda: all(map(created, run_ids)), 60):
        return timings
    timings["created"] = time.monotonic() - started
    senders = [
        control.send_slices_in_background(run_id, slices, rate=SLICE_RATE) for run_id in run_ids
    ]
    for sender in senders:
        sender.join()
    for run_id in run_ids:
        control.end(run_id, shape)

    def closed(run_id: str) -> bool:
        if rest:  # iDDS marked the run's processing ToCancel
            return set(peers.idds.database.records(run_id).processing_statuses()) == {"ToCancel"}
        return bool(recorder.of_type("closed_workflow_task", run_id))

    # The service drains the runs' queues (scaling.end: drain) before it
    # stops their transformers and closes their tasks.
    timings["all closed"] = float(
        poll_until(lambda: all(recorder.stops(r) and closed(r) for r in run_ids), 180)
    )
    timings["closed"] = time.monotonic() - started
    for run_id in run_ids:
        stops = [
            r.at
            for r in recorder.records
            if r.msg_type == "stop_transformer" and str(r.body.get("run_id")) == run_id
        ]
        if stops:
            timings[f"stop {run_id}"] = min(stops)
    # The transformers leave once their slice queue was idle for 5 s.
    peers.pilots.wait_for(lambda: all(peers.pilots.live(r) == 0 for r in run_ids), 30)
    return timings


def borrowed_broker(stack: EmbeddedStack) -> str | None:
    """``host:port`` of a broker already answering where the stack would
    start its own (it then uses that one, whoever started it); else None."""
    brokers = stack.brokers
    if stomp_answers(brokers.host, brokers.port):
        return f"{brokers.host}:{brokers.port}"
    return None


def replay_first_run(stack: EmbeddedStack, run_id: str, workdir: Path) -> bool:
    """What an operator does before changing the policy: replay a recorded
    run through the candidates, offline."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from swf_panda_workers.cli import main as cli

    print(f"\nReplay of run {run_id} through both policies (swf-panda-workers replay):")
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        code = cli(
            [
                "replay",
                "--run",
                run_id,
                "--namespace",
                NAMESPACE,
                "--config",
                str(stack.config_path),
                "--policy",
                "reference",
                "--policy",
                "proportional",
                "--worker-startup",
                "1",  # as the simulated pilots start
                "--save",
                str(workdir / f"run-{run_id}.json"),
                "--plot",
                str(workdir / f"replay-{run_id}.png"),
            ]
        )
    return code == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


async def flow_run_states(
    api_url: str, run_ids: list[str], namespace: str = NAMESPACE, wait: float = 30.0
) -> dict[str, str]:
    """The state of each run's flow run, found by its tags, once all are final
    (the flow run finishes a moment after iDDS's close reply) or ``wait`` passed."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + wait
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            while True:
                states: dict[str, str] = {}
                final = True
                for run_id in run_ids:
                    flow_runs = await client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(
                            tags=FlowRunFilterTags(all_=run_tags(namespace, run_id))
                        )
                    )
                    for flow_run in flow_runs:
                        if flow_run.state is not None:
                            states[run_id] = flow_run.state.name or "?"
                            final = final and flow_run.state.is_final()
                if (final and len(states) == len(run_ids)) or time.monotonic() > deadline:
                    return states
                await asyncio.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
