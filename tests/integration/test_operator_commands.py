"""The operator's commands against the real stack: `send` a run's
announcement and end and see the service act on them, `show` a finished run,
and replay it in Prefect with `prefect deployment run` and the recorded
parameters plus dry_run=true, or with `swf-panda-workers dry-run`: the flows
decide again and nothing reaches the bus or the run's journal."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from conftest import once
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import artifact_markdown, final_flow_run, final_state_name

from swf_panda_workers.adapters.prefect_events.history import history_start, run_history
from swf_panda_workers.adapters.prefect_events.schema import decode, run_resource_id
from swf_panda_workers.core.effects import EFFECT_TYPES, Effect
from swf_panda_workers.service.processes import service_env
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session, slowdown_in_the_middle

pytestmark = [
    pytest.mark.integration,
    once(
        "show and dry-run read through Prefect's API, as the lifecycle tests do on both databases"
    ),
]

SLICES = 30
BIN = Path(sys.executable).parent
OUTBOUND = ("create_workflow_task", "adjust_worker", "stop_transformer", "close_workflow_task")


@pytest.fixture
def peers(stack: EmbeddedStack, namespace: str) -> Iterator[PeerHarness]:
    with PeerHarness(
        stack.brokers,
        namespace,
        slices_per_run=SLICES,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        idle_timeout=3,
        heartbeat_every=2,
    ) as harness:
        yield harness


def cli(
    stack: EmbeddedStack, *words: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The installed command, as an operator runs it, against the test stack."""
    return subprocess.run(
        [str(BIN / "swf-panda-workers"), *words],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=service_env(stack.api_url, stack.config_path),
    )


def effects_of(stack: EmbeddedStack, namespace: str, run_id: str) -> list[Effect]:
    async def read() -> list[Effect]:
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            flow_run = await final_flow_run(stack.api_url, namespace, run_id)
            since = history_start(flow_run.created)  # type: ignore[arg-type]
            events = await run_history(run_resource_id(namespace, run_id), since)
        return [item for event in events if isinstance(item := decode(event), EFFECT_TYPES)]

    return asyncio.run(read())


def test_a_run_started_and_ended_by_hand_with_send(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, new_run_id
) -> None:
    run_id = new_run_id()
    sent = cli(stack, "send", "run_imminent", run_id, "--workers", "2", "--namespace", namespace)
    assert sent.returncode == 0, sent.stderr
    assert "sent run_imminent_worker to /topic/panda.workers" in sent.stdout
    assert peers.wait_until(lambda: peers.task_created(run_id), 60), "no task for the run sent"
    created = peers.recorder.of_type("create_workflow_task", run_id)
    assert created[0]["content"]["workflow"]["content"]["target_worker_count"] == 2

    result = cli(stack, "send", "slice_result", run_id, "--seconds", "3.5")
    assert result.returncode == 0, result.stderr
    ended = cli(stack, "send", "end_run", run_id, "--namespace", namespace)
    assert ended.returncode == 0, ended.stderr
    assert peers.wait_until(lambda: peers.task_closed(run_id), 60), "the run sent was not closed"
    flow_run = asyncio.run(final_flow_run(stack.api_url, namespace, run_id))
    assert flow_run.state_name == "Completed"

    shown = cli(stack, "show", run_id, "--namespace", namespace)
    assert shown.returncode == 0, shown.stderr
    # The simulated transformers take at most 1 s a slice: 3.5 s is the one sent by hand.
    assert "slowest 3.5 s" in shown.stdout
    assert "closed (ToCancel)" in shown.stdout


def test_show_then_replay_a_finished_run_sends_nothing(
    stack: EmbeddedStack, peers: PeerHarness, namespace: str, new_run_id
) -> None:
    run_id = new_run_id()
    assert play_session(peers, [run_id], "testbed", SLICES).ok
    recorder = peers.recorder
    live_adjusts = [
        a["content"]["target_worker_count"] for a in recorder.of_type("adjust_worker", run_id)
    ]
    assert live_adjusts, "the slow stretch asked for no workers: nothing to compare"
    ids = recorder.of_type("created_workflow_task", run_id)[0]["content"]
    asyncio.run(final_flow_run(stack.api_url, namespace, run_id))

    shown = cli(stack, "show", run_id, "--namespace", namespace)
    assert shown.returncode == 0, shown.stderr
    assert f"request {ids['request_id']}, transform {ids['transform_id']}" in shown.stdout
    assert "create sent, ids, ended, stop sent, close sent, closed (ToCancel)" in shown.stdout
    assert f"{SLICES} done" in shown.stdout
    assert shown.stdout.count("  adjust  ") == len(live_adjusts)

    parameters = cli(stack, "show", run_id, "--namespace", namespace, "--parameters")
    assert parameters.returncode == 0, parameters.stderr
    recorded = json.loads(parameters.stdout)
    assert recorded["run_id"] == run_id and recorded["namespace"] == namespace
    assert "dry_run" not in recorded  # the replay's to choose
    sent_before = {t: len(recorder.of_type(t, run_id)) for t in OUTBOUND}
    journal_before = effects_of(stack, namespace, run_id)

    # Prefect's own command, with the recorded parameters and dry_run=true.
    replay = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            stack.settings.prefect.deployment,
            "--params",
            json.dumps({**recorded, "dry_run": True}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env(stack.api_url, stack.config_path),
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", replay.stdout).group(1))  # type: ignore[union-attr]
    assert asyncio.run(final_state_name(stack.api_url, flow_run_id)) == "Completed"

    summary = asyncio.run(artifact_markdown(stack.api_url, f"run-{namespace}-{run_id}-dry-run"))
    assert f"Dry run of run {run_id}" in summary and "nothing was sent" in summary
    assert "close status: **ToCancel**" in summary  # iDDS's recorded answer
    assert f"- slices: {SLICES} done" in summary
    dry_adjusts = [int(n) for n in re.findall(r"^\| [\d:]+ \| (\d+) \|", summary, re.M)]
    assert dry_adjusts == live_adjusts  # the same policy, the same results: the same sizes

    # Nothing reached the bus, nothing was added to the run's journal.
    assert {t: len(recorder.of_type(t, run_id)) for t in OUTBOUND} == sent_before
    assert effects_of(stack, namespace, run_id) == journal_before
    # The live run's own summary is untouched.
    live = asyncio.run(artifact_markdown(stack.api_url, f"run-{namespace}-{run_id}"))
    assert "Dry run" not in live

    # The same through the project's command, which waits and prints the summary.
    again = cli(stack, "dry-run", run_id, "--namespace", namespace, "--wait", "120")
    assert again.returncode == 0, again.stderr
    assert f"Dry run of run {run_id}" in again.stdout
    assert {t: len(recorder.of_type(t, run_id)) for t in OUTBOUND} == sent_before


def test_show_and_dry_run_of_an_unknown_run_say_so(stack: EmbeddedStack, namespace: str) -> None:
    for command in ("show", "dry-run"):
        result = cli(stack, command, "999999999", "--namespace", namespace)
        assert result.returncode == 1
        assert f"{command}: no flow run of run 999999999 in namespace {namespace}" in result.stderr
