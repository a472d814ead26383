"""The proportional policy end to end: a run whose slices slow down in the
middle scales up, then back down once they are fast again, within its bounds;
it drains its queue before the stop; its decisions are in the Prefect UI as a
table and a plot; and the replay command reads it back from Prefect and
compares the policies on it. Real broker, real Prefect server, simulated peers.

The time scale is the testbed's shrunk about thirty times (SCALING_CONFIG in
conftest): slices arrive at 4/s for 100 s, take 0.5 s, then 2 s for 30 s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SCALING_CONFIG, SCALING_NAMESPACE, once
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import final_flow_run

from swf_panda_workers.cli import main as cli
from swf_panda_workers.core.recording import RunRecording
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import slowdown_in_the_middle

pytestmark = [pytest.mark.integration, once("the scaling policy's decisions")]

RATE = 4.0  # slices/s
SLICES = 400  # 100 s of arrivals
SLOW = (100, 220)  # slices 100..219 take 2 s instead of 0.5 s: seconds 25..55
INITIAL = 3  # 4/s x 0.5 s / 0.8 = 2.5: enough before the slowdown
BOUNDS = (SCALING_CONFIG["scaling"]["min_workers"], SCALING_CONFIG["scaling"]["max_workers"])


@pytest.fixture
def peers(scaling_stack: EmbeddedStack) -> Iterator[PeerHarness]:
    # An iDDS that applies adjust_worker's count (2.6.21 does not): the
    # policy's loop closed, as it will be once iDDS acts on the count.
    with PeerHarness(
        scaling_stack.brokers,
        SCALING_NAMESPACE,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.5, 2.0, *SLOW),
        arrival=lambda index: index / RATE,
        worker_rampup=1.0,
        idle_timeout=5,
        heartbeat_every=2,
        applies_worker_count=True,
    ) as started:
        yield started


def test_a_slowdown_scales_up_then_back_down_within_bounds(
    scaling_stack: EmbeddedStack,
    peers: PeerHarness,
    new_run_id: Callable[[], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_id = new_run_id()
    peers.control.announce(run_id, "seed", target_workers=INITIAL)
    assert peers.wait_until(lambda: peers.task_created(run_id), 60), "no task created"
    farm = peers.farm
    # All slices queued; end the run while the last ones are still processed,
    # as the control system does: the drain must finish them.
    farm_run = farm.run(run_id, 150)
    assert farm.wait_for(lambda: farm_run.queued >= SLICES, 150)
    peers.control.end(run_id, "seed")
    assert peers.wait_until(lambda: peers.task_closed(run_id), 120), "the task was not closed"

    flow_run = asyncio.run(final_flow_run(scaling_stack.api_url, SCALING_NAMESPACE, run_id))
    assert flow_run.state_name == "Completed"

    sizes = [
        a["content"]["target_worker_count"] for a in peers.recorder.of_type("adjust_worker", run_id)
    ]
    assert sizes, "the slowdown asked for no workers"
    assert all(BOUNDS[0] <= size <= BOUNDS[1] for size in sizes), sizes
    peak = sizes.index(max(sizes))
    assert max(sizes) > INITIAL, f"never scaled up: {sizes}"
    assert sizes[-1] < max(sizes) and peak < len(sizes) - 1, f"never scaled down: {sizes}"
    # up to the peak, then down: no oscillation
    assert sizes[: peak + 1] == sorted(sizes[: peak + 1]), sizes
    assert sizes[peak:] == sorted(sizes[peak:], reverse=True), sizes

    # The drain: every slice processed before the stop, none left behind.
    run = farm.runs[run_id]
    assert run.slices_sent + run.failed_sent == SLICES and run.unprocessed == []
    assert peers.recorder.of_type("stop_transformer", run_id)

    # The decisions in the UI: one row per adjust_worker, and the plot.
    table, plot = asyncio.run(
        artifacts(scaling_stack.api_url, f"scaling-{SCALING_NAMESPACE}-{run_id}")
    )
    assert [row["workers"] for row in json.loads(table)] == sizes
    assert all(row["slices/s"] and row["processing (s)"] for row in json.loads(table))
    assert plot.startswith("![") and "(data:image/png;base64," in plot

    # The replay command reads the run back from Prefect and compares policies.
    saved, png = tmp_path / "run.json", tmp_path / "replay.png"
    with temporary_settings({PREFECT_API_URL: scaling_stack.api_url}):
        code = cli(
            [
                "replay",
                "--run",
                run_id,
                "--namespace",
                SCALING_NAMESPACE,
                "--policy",
                "reference",
                "--policy",
                "proportional:max_workers=6",
                "--save",
                str(saved),
                "--plot",
                str(png),
            ]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reference" in out and "proportional:max_workers=6" in out and "worker-hours" in out
    recording = RunRecording.model_validate_json(saved.read_text())
    assert len(recording.slices) == SLICES
    assert [a.size.target_worker_count for a in recording.adjustments] == sizes
    assert png.read_bytes().startswith(b"\x89PNG")


async def artifacts(api_url: str, key: str) -> tuple[str, str]:
    """The latest table artifact ``key`` and markdown artifact ``key``-plot."""
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            found = {}
            for name in (key, f"{key}-plot"):
                (artifact,) = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[name])), limit=1
                )
                found[name] = artifact.data
    table, plot = found[key], found[f"{key}-plot"]
    assert isinstance(table, str) and isinstance(plot, str)
    return table, plot
