"""A data-taking session as the control system plays it: announce runs, let
the transformers work through their slices, end the runs, and wait for iDDS
to close them. The demo and the integration tests both play it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swf_testbed.peers.control_system import Shape
from swf_testbed.peers.harness import PeerHarness


def slowdown_in_the_middle(
    normal: float, slow: float, first: int, last: int
) -> Callable[[int], float]:
    """Slice times with a slow stretch (slices first..last-1), to make the
    run ask for more workers."""

    def seconds(index: int) -> float:
        return slow if first <= index < last else normal

    return seconds


@dataclass
class SessionResult:
    run_ids: list[str]
    created: bool = False
    drained: bool = False
    closed: bool = False
    stopped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.created and self.closed and self.stopped


def play_session(
    peers: PeerHarness,
    run_ids: list[str],
    shape: Shape,
    slices: int,
    target_workers: int = 3,
    slice_processing_time: float = 0.5,
    duplicate_messages: bool = False,
    wait: float = 90.0,
) -> SessionResult:
    """Announce every run at once, then end each when its slices are done.
    ``duplicate_messages`` sends run_imminent and end_run twice."""
    result = SessionResult(run_ids)
    recorder, farm = peers.recorder, peers.farm
    started = time.monotonic()
    for run_id in run_ids:
        for _ in range(2 if duplicate_messages else 1):
            peers.control.announce(
                run_id,
                shape,
                target_workers=target_workers,
                slice_processing_time=slice_processing_time,
            )

    result.created = peers.wait_until(lambda: all(map(peers.task_created, run_ids)), wait)
    result.timings["created"] = time.monotonic() - started

    def all_slices_done() -> bool:
        return all(
            r in farm.runs and farm.runs[r].slices_sent + farm.runs[r].failed_sent >= slices
            for r in run_ids
        )

    result.drained = farm.wait_for(all_slices_done, wait) if result.created else False
    result.timings["drained"] = time.monotonic() - started
    for run_id in run_ids:
        peers.control.end(run_id, shape, duplicate=duplicate_messages)

    result.closed = peers.wait_until(lambda: all(map(peers.task_closed, run_ids)), wait)
    result.timings["closed"] = time.monotonic() - started
    # Topics are delivered independently: the stop may trail the close reply.
    result.stopped = recorder.wait_for(
        lambda: all(recorder.of_type("stop_transformer", r) for r in run_ids), 10
    )
    return result
