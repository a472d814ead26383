"""The demo: a whole data-taking session on this machine.

Broker, Prefect server, runner and listener start as real processes; the
control system, iDDS and the transformers are simulated over the real broker.
Runs are announced, their slices stream in, they scale up during a slow
stretch and back down after it, end, drain and are closed; the bus traffic
and the Prefect flow runs are summarised at the end, and the first run is
replayed offline through both scaling policies for comparison.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from swf_panda_workers.adapters.prefect_runs import run_tags
from swf_panda_workers.embedded.activemq import stomp_answers
from swf_panda_workers.embedded.stack import EmbeddedStack
from swf_panda_workers.peers.control_system import Shape
from swf_panda_workers.peers.harness import PeerHarness
from swf_panda_workers.peers.idds_rest import client_env
from swf_panda_workers.peers.scenario import play_session, slowdown_in_the_middle

NAMESPACE = "demo"

# The proportional policy on the testbed's time scale shrunk about thirty
# times (seconds for its minutes), as the demo and the integration tests run it.
SHRUNK_SCALING: dict[str, Any] = {
    "policy": "proportional", "window": 8, "percentile": 90, "target_utilisation": 0.8,
    "drain_deadline": 10, "min_workers": 2, "max_workers": 12, "tolerance": 0.1,
    "up_window": 2, "down_window": 6, "max_step_up": 1.0, "max_step_down": 0.5, "rampup": 4,
    "min_results": 5, "tick": 1, "end": "drain", "drain_timeout": 60, "drain_quiet": 3,
}
SLICE_RATE = 4.0  # slices/s arriving per run
DEMO_CONFIG: dict[str, Any] = {
    "transceiver": {"namespace": NAMESPACE},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "scaling": SHRUNK_SCALING,
    "timeouts": {"created_workflow_task": 60, "closed_workflow_task": 60, "run_end": 3600},
    "prefect": {"runner_limit": 10},
}


Mode = Literal["message", "rest"]


def run_demo(workdir: Path, runs: int = 2, shape: Shape = "testbed", slices: int = 240,
             prefect_port: int = 4200, keep: bool = False, mode: Mode = "message") -> int:
    config = {**DEMO_CONFIG, "transceiver": {"namespace": NAMESPACE, "mode": mode}}
    # REST mode: a simulated iDDS REST server on a free port, reached with a
    # one-off OIDC token that only the runner (and the server) know.
    idds_port, token = _free_port(), secrets.token_urlsafe(24)
    runner_env = (client_env(idds_port, token, workdir / "idds-client") if mode == "rest"
                  else {})
    stack = EmbeddedStack(workdir, config, prefect_port=prefect_port, runner_env=runner_env)
    borrowed = borrowed_broker(stack)
    if borrowed is not None:
        print(f"using the broker already answering STOMP on {borrowed}: the demo did not start "
              "it (it may hold another session's messages); stop it to have the demo start "
              "its own")
    print(f"starting {'' if borrowed else 'broker, '}Prefect server, runner and listener "
          f"(logs in {stack.logs}) ...")
    with stack:
        print(f"Prefect UI: {stack.ui_url}")
        # Numeric run ids, as the testbed sends; distinct for every demo.
        base = int(time.time()) % 1_000_000 * 10
        run_ids = [str(base + i) for i in range(runs)]
        # Slices stream in at SLICE_RATE; the middle third takes 2 s, not 0.5 s.
        with PeerHarness(stack.brokers, NAMESPACE, slices_per_run=slices,
                         processing_time=slowdown_in_the_middle(0.5, 2.0, slices // 3,
                                                                2 * slices // 3),
                         arrival=lambda index: index / SLICE_RATE, worker_rampup=1.0,
                         idle_timeout=5, heartbeat_every=5, idds_mode=mode,
                         rest_port=idds_port, rest_token=token, rest_vo="eic") as peers:
            where = (f"iDDS REST API at {peers.idds_rest.url}" if peers.idds_rest
                     else "iDDS on the bus")
            print(f"runs {', '.join(run_ids)}: {shape}-shaped messages, {slices} slices each; "
                  f"{where}")
            result = play_session(peers, run_ids, shape, slices, wait=slices / SLICE_RATE + 90)
            print("\nOn the bus (messages per run):")
            print(peers.recorder.summary_table(run_ids))
            for run_id in run_ids:
                sizes = [str(a["content"]["target_worker_count"])
                         for a in peers.recorder.of_type("adjust_worker", run_id)]
                print(f"  run {run_id} workers: 3 -> {' -> '.join(sizes) or 'unchanged'}")
            if peers.idds_rest is not None:
                print("\nAt the iDDS REST API (HTTP status of each request, per run):")
                print(peers.idds_rest.summary_table(run_ids))
        states = asyncio.run(flow_run_states(stack.api_url, run_ids))
        print("\nIn Prefect:")
        for run_id in run_ids:
            print(f"  run {run_id}: {states.get(run_id, 'no flow run')}")
        print(f"\ncreated after {result.timings['created']:.1f}s, "
              f"closed after {result.timings['closed']:.1f}s")
        print(f"Prefect UI: {stack.ui_url}  (flow runs 'run-<id>', events 'swf.run.{NAMESPACE}.*',"
              " artifacts 'scaling-<ns>-<id>' and '...-plot')")
        replayed = replay_first_run(stack, run_ids[0], workdir)
        if keep:
            print("the stack stays up for the UI; Ctrl-C (or SIGTERM) stops it")
            wait_for_stop_signal()
    ok = result.ok and replayed and all(states.get(r) == "Completed" for r in run_ids)
    print("demo finished: " + ("every run completed" if ok else "SOME RUNS DID NOT COMPLETE"))
    return 0 if ok else 1


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
        code = cli(["replay", "--run", run_id, "--namespace", NAMESPACE,
                    "--config", str(stack.config_path),
                    "--policy", "reference", "--policy", "proportional",
                    "--worker-startup", "1",  # as the simulated pilots start
                    "--save", str(workdir / f"run-{run_id}.json"),
                    "--plot", str(workdir / f"replay-{run_id}.png")])
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


async def flow_run_states(api_url: str, run_ids: list[str], namespace: str = NAMESPACE,
                          wait: float = 30.0) -> dict[str, str]:
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
                    flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=run_tags(namespace, run_id))))
                    for flow_run in flow_runs:
                        if flow_run.state is not None:
                            states[run_id] = flow_run.state.name
                            final = final and flow_run.state.is_final()
                if (final and len(states) == len(run_ids)) or time.monotonic() > deadline:
                    return states
                await asyncio.sleep(0.5)
