"""`swf-panda-workers serve` as an operator runs it, started and stopped again
and again (SIGTERM, SIGKILL, sometimes mid-run), its listener killed under it,
and a foreign Prefect server on its port. Real ActiveMQ (the session's), the
real `serve` process with its own Prefect server, runner and listener, and
the simulated peers.

Each test checks what must hold after any stop: no process of the previous
`serve` is left, every run completes with one create, one stop and one close,
and the flow runs of every start are in the one database of the state
directory. The figures (start, run, stop times) are printed, not asserted.

Run once: `serve` starts its own Prefect server on SQLite in its state
directory whatever the session's database is, so the PostgreSQL pass would
repeat the same test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import PREFECT_PORT, once
from prefect.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import final_flow_run
from process_reads import command_line, still_alive
from stacks import (
    SERVE_CONFIG,
    SERVE_NAMESPACE,
    SERVE_RESULTS_QUEUE,
    SERVE_WAIT,
    Serve,
)

from swf_panda_workers.adapters.prefect_events.history import run_history
from swf_panda_workers.adapters.prefect_events.schema import run_resource_id
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.timestamps import utc_now
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers._bus import poll_until
from swf_testbed.peers.harness import PeerHarness

pytestmark = [
    pytest.mark.integration,
    once("serve's own Prefect server is SQLite in its state directory, whatever the session's"),
]

# serve's (stacks.py); WAIT is generous, and every wait ends when its condition holds
NAMESPACE, RESULTS_QUEUE, WAIT = SERVE_NAMESPACE, SERVE_RESULTS_QUEUE, SERVE_WAIT

CYCLES = 20
SLICES = 8
# The last slice takes 0.8 s where 0.5 s is expected: one adjust_worker per
# run (reference policy). Slices arrive 0.2 s apart, so that one comes once
# the run's scaling sub-flow follows the run's events: a result emitted while
# it subscribes reaches it only when it reads the history again, 6 s later.
SLOW_SLICE = 7
ARRIVAL_GAP = 0.2
MID_RUN = frozenset({2, 7, 12, 17})  # stopped once the run's adjust is journaled, before its end


def processing_time(index: int) -> float:
    return 0.8 if index == SLOW_SLICE else 0.1


@pytest.fixture(scope="module")
def peers(broker_port: int) -> Iterator[PeerHarness]:
    brokers = Brokers(host="127.0.0.1", port=broker_port, results_queue=RESULTS_QUEUE)
    with PeerHarness(
        brokers,
        NAMESPACE,
        slices_per_run=SLICES,
        processing_time=processing_time,
        arrival=lambda index: index * ARRIVAL_GAP,
        idle_timeout=3,
    ) as harness:
        yield harness


_run_numbers = iter(range(int(time.time()) % 100_000 * 100 + 50, 10**12))


def announce(peers: PeerHarness) -> str:
    run_id = str(next(_run_numbers))
    peers.control.announce(run_id, "testbed", target_workers=3, slice_processing_time=0.5)
    return run_id


def sent(peers: PeerHarness, run_id: str) -> int:
    run = peers.farm.runs.get(run_id)
    return run.slices_sent if run is not None else 0


def journaled_adjusts(api_url: str, run_id: str) -> int:
    """The adjustments the run's flow journaled, as the server stored them."""

    async def read() -> list[Event]:
        with temporary_settings({PREFECT_API_URL: api_url}):
            return await run_history(
                run_resource_id(NAMESPACE, run_id), since=utc_now() - timedelta(hours=1)
            )

    return sum(event.event == "swf.effect.adjust_sent" for event in asyncio.run(read()))


def end_when_processed(peers: PeerHarness, run_ids: list[str]) -> None:
    """Once every slice of the runs went out and each run asked for its
    workers, end them and wait for the closes."""
    assert peers.farm.wait_for(lambda: all(sent(peers, r) >= SLICES for r in run_ids), WAIT), {
        r: sent(peers, r) for r in run_ids
    }
    assert peers.recorder.wait_for(
        lambda: all(peers.recorder.of_type("adjust_worker", r) for r in run_ids), WAIT
    )
    for run_id in run_ids:
        peers.control.end(run_id, "testbed")
    assert peers.wait_until(lambda: all(map(peers.task_closed, run_ids)), WAIT), [
        r for r in run_ids if not peers.task_closed(r)
    ]


def once_each(peers: PeerHarness, run_id: str) -> dict[str, int]:
    """How often the run's requests went out on the bus."""
    return {
        msg_type: peers.recorder.count(msg_type, run_id)
        for msg_type in (
            "create_workflow_task",
            "adjust_worker",
            "stop_transformer",
            "close_workflow_task",
        )
    }


def completed_in(api_url: str, run_ids: list[str]) -> dict[str, str]:
    """Each run's one top-level flow run's final state, as the server reads
    it from its database (final_flow_run fails on a second flow run)."""
    return {
        run_id: asyncio.run(final_flow_run(api_url, NAMESPACE, run_id)).state_name or ""
        for run_id in run_ids
    }


@dataclass
class Figures:
    """One cycle's times (seconds), printed, never asserted."""

    cycle: int
    stop: str
    marks: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.monotonic)

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.marks[phase] = now - self._last
        self._last = now

    def line(self) -> str:
        phases = " ".join(f"{phase} {seconds:5.2f}" for phase, seconds in self.marks.items())
        return f"cycle {self.cycle:>2} {self.stop:<16} {phases}"


def test_twenty_starts_and_stops_leave_nothing_behind_and_lose_no_run(
    serve: Serve, peers: PeerHarness
) -> None:
    """Start serve, play a run with slices (one of them slow: one adjust),
    stop it with SIGTERM or SIGKILL in turn, some cycles once the run's
    adjust is journaled and before its end; the next start finishes that run."""
    runs: list[str] = []
    unfinished: list[str] = []
    began = time.monotonic()
    figures: list[Figures] = []
    for cycle in range(CYCLES):
        how = ("SIGTERM" if cycle % 2 == 0 else "SIGKILL") + (
            " mid-run" if cycle in MID_RUN else ""
        )
        figures.append(figure := Figures(cycle, how))
        serve.start()
        figure.mark("serving")
        run_id = announce(peers)
        runs.append(run_id)
        assert peers.wait_until(lambda r=run_id: peers.task_created(r), WAIT), (
            f"cycle {cycle}: run {run_id} never created:\n{serve.process.tail(40)}"
        )
        figure.mark("created")
        if cycle in MID_RUN:
            # Once its adjust is journaled (one sent but not yet journaled
            # would be sent again: at least once), before its end.
            assert poll_until(lambda r=run_id: journaled_adjusts(serve.api_url, r) > 0, WAIT)
            todo, unfinished = unfinished, [run_id]
        else:
            todo, unfinished = [*unfinished, run_id], []
        if todo:
            end_when_processed(peers, todo)
            figure.mark("closed")
            # The last start's database holds every start's runs, each once.
            done = runs if cycle == CYCLES - 1 else todo
            assert completed_in(serve.api_url, done) == dict.fromkeys(done, "Completed")
        figure.mark("completed")
        before = serve.tree()
        assert len(before) >= 5, f"serve, server, runner, listener, reaper: {before}"
        if how.startswith("SIGTERM"):
            figure.marks["SIGTERM->exit"] = serve.sigterm()
        else:
            serve.sigkill()
        assert poll_until(lambda b=before: not still_alive(b), 30), (
            f"cycle {cycle} ({how}): still alive: "
            + "; ".join(f"{pid} {command_line(pid)}" for pid, _ in still_alive(before))
        )
        figure.mark("all gone")
        print(figure.line(), flush=True)
    assert not unfinished, "the last cycle must not stop mid-run"
    print(f"{CYCLES} cycles in {time.monotonic() - began:.0f}s", flush=True)
    assert peers.recorder.settle(30), "the recorder's marker never came back"
    counts = {run_id: once_each(peers, run_id) for run_id in runs}
    assert {r: c for r, c in counts.items() if set(c.values()) != {1}} == {}
    assert peers.idds.violations == []
    assert sorted(p.name for p in serve.state.glob("**/*.db")) == ["prefect.db"]
    report(figures)


def report(figures: list[Figures]) -> None:
    for phase in ("serving", "created", "closed", "SIGTERM->exit"):
        seen = [f.marks[phase] for f in figures if phase in f.marks]
        print(f"{phase}: median {statistics.median(seen):.2f}s, max {max(seen):.2f}s")


def test_a_listener_killed_under_serve_is_started_again_and_its_run_completes(
    serve: Serve, peers: PeerHarness
) -> None:
    serve.start()
    run_id = announce(peers)
    assert peers.wait_until(lambda: peers.task_created(run_id), WAIT)
    assert peers.farm.wait_for(lambda: sent(peers, run_id) >= 3, WAIT)
    killed = serve.child_pid("listeners")
    os.kill(killed, signal.SIGKILL)
    began = time.monotonic()
    # readiness: serve says when the new listener has subscribed
    assert poll_until(lambda: serve.process.logged_since_start(b"listener ready again"), WAIT), (
        serve.process.tail(20)
    )
    print(
        f"\nlistener SIGKILLed -> started again and subscribed: {time.monotonic() - began:.2f}s",
        flush=True,
    )
    # serve reaped the killed listener (no zombie left in /proc) and started another.
    assert not Path(f"/proc/{killed}").exists()
    assert serve.child_pid("listeners") != killed
    end_when_processed(peers, [run_id])
    assert completed_in(serve.api_url, [run_id]) == {run_id: "Completed"}
    assert peers.recorder.settle(30)
    assert once_each(peers, run_id) == dict.fromkeys(
        ("create_workflow_task", "adjust_worker", "stop_transformer", "close_workflow_task"), 1
    )


def test_a_prefect_server_serve_did_not_start_is_refused_naming_port_and_holder(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    """The session's Prefect server stands for an orphan of an earlier serve."""
    assert stack.server is not None and stack.server.process.alive
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **SERVE_CONFIG,
                "prefect": {
                    **SERVE_CONFIG["prefect"],
                    "server_port": PREFECT_PORT,
                    "state_dir": str(tmp_path / "state"),
                },
            }
        )
    )
    served = Serve(tmp_path, config)
    served.process.start()
    assert served.process.process is not None
    assert served.process.process.wait(WAIT) == 1
    said = served.process.tail(10)
    assert f"port {PREFECT_PORT} is already taken by pid {stack.server.process.pid}: " in said, said
    assert "answers as a Prefect server 3." in said
    assert f"PREFECT_API_URL=http://127.0.0.1:{PREFECT_PORT}/api" in said
    assert "set prefect.server_port to another port" in said
    assert not (tmp_path / "state" / "prefect.db").exists()  # nothing was started
