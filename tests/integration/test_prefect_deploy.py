"""prefect.yaml as an operator uses it, against a Prefect server of its own:
`prefect deploy --all` declares both deployments (parameters, work pool and
queues, concurrency limits, tags); a process worker on the pool runs a whole
run that the listener starts; and `prefect deployment run` of the dry-run
deployment with the recorded run's parameters replays it, sending nothing."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from uuid import UUID

import pytest
from conftest import once
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import artifact_markdown, final_flow_run, final_state_name
from stacks import BIN, DEPLOY_NAMESPACE, Deployed, prefect

from swf_testbed.launchers.stack import PROJECT_ROOT, EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session, slowdown_in_the_middle

pytestmark = [pytest.mark.integration, once("its Prefect server is its own, on SQLite")]

NAMESPACE = DEPLOY_NAMESPACE  # deployed's (stacks.py)
SLICES = 30
OUTBOUND = ("create_workflow_task", "adjust_worker", "stop_transformer", "close_workflow_task")


def read_deployment(api_url: str, name: str) -> dict[str, object]:
    async def read() -> dict[str, object]:
        with temporary_settings({PREFECT_API_URL: api_url}):
            async with get_client() as client:
                return (await client.read_deployment_by_name(name)).model_dump(mode="json")

    return asyncio.run(read())


def test_deploy_all_declares_both_deployments(deployed: Deployed) -> None:
    live = read_deployment(deployed.api_url, "swf-run/panda-workers")
    dry = read_deployment(deployed.api_url, "swf-run/panda-workers-dry-run")

    for deployment, dry_run, queue, limit in (
        (live, False, "runs", 40),
        (dry, True, "dry-runs", 4),
    ):
        assert deployment["entrypoint"] == "flows/run_lifecycle.py:run_lifecycle"
        assert deployment["parameters"] == {"dry_run": dry_run}
        assert deployment["work_pool_name"] == "swf-panda-workers"
        assert deployment["work_queue_name"] == queue
        assert deployment["global_concurrency_limit"]["limit"] == limit  # type: ignore[index]
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"  # type: ignore[index]
        assert "swf-panda-workers" in deployment["tags"]  # type: ignore[operator]
        # The pull step puts the worker in this checkout, resolved at deploy time.
        step = deployment["pull_steps"][0]  # type: ignore[index]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(
            PROJECT_ROOT
        )
    assert "dry-run" in dry["tags"]  # type: ignore[operator]


def test_a_worker_runs_the_run_and_a_deployment_run_replays_it(
    deployed: Deployed, stack: EmbeddedStack, new_run_id
) -> None:
    run_id = new_run_id()
    with PeerHarness(
        stack.brokers,
        NAMESPACE,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        idle_timeout=3,
        heartbeat_every=2,
    ) as peers:
        # A worker starts a flow-run process per run: give it the time.
        session = play_session(peers, [run_id], "testbed", SLICES, wait=180)
        assert session.ok, f"the run did not go through its life: {session}"
        flow_run = asyncio.run(final_flow_run(deployed.api_url, NAMESPACE, run_id, wait=120))
        assert flow_run.state_name == "Completed"
        recorder = peers.recorder
        live_adjusts = [
            a["content"]["target_worker_count"] for a in recorder.of_type("adjust_worker", run_id)
        ]
        assert live_adjusts, "the slow stretch asked for no workers: nothing to compare"
        sent_before = {t: len(recorder.of_type(t, run_id)) for t in OUTBOUND}

        shown = subprocess.run(
            [str(BIN / "swf-panda-workers"), "show", run_id, "--parameters"],
            capture_output=True,
            text=True,
            timeout=60,
            env=deployed.env,
        )
        assert shown.returncode == 0, shown.stderr
        replay = prefect(
            deployed.env,
            "deployment",
            "run",
            "swf-run/panda-workers-dry-run",
            "--params",
            shown.stdout,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        match = re.search(r"UUID: ([0-9a-f-]{36})", replay.stdout)
        assert match, replay.stdout
        assert asyncio.run(final_state_name(deployed.api_url, UUID(match.group(1)))) == "Completed"

        summary = asyncio.run(
            artifact_markdown(deployed.api_url, f"run-{NAMESPACE}-{run_id}-dry-run")
        )
        assert f"Dry run of run {run_id}" in summary and "close status: **ToCancel**" in summary
        dry_adjusts = [int(n) for n in re.findall(r"^\| [\d:]+ \| (\d+) \|", summary, re.M)]
        assert dry_adjusts == live_adjusts
        assert {t: len(recorder.of_type(t, run_id)) for t in OUTBOUND} == sent_before
        assert json.loads(shown.stdout)["run_id"] == run_id
