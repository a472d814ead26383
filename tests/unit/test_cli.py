"""The command line: --help for every command, the test messages `send`
builds, the run report `show` prints, and the one-line errors."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import pytest

from swf_panda_workers.cli import build_parser, main
from swf_panda_workers.config.loading import CONFIG_ENV
from swf_panda_workers.config.schema import Brokers, Settings
from swf_panda_workers.core import sample_messages
from swf_panda_workers.core.effects import AdjustSent
from swf_panda_workers.core.messages import (
    RunEnd,
    RunImminent,
    SliceResult,
    WorkerSize,
    WorkflowIds,
    parse_message,
)
from swf_panda_workers.core.policies import WorkerPlan
from swf_panda_workers.core.run_report import FlowRunSummary, RunReport, artifact_key
from swf_panda_workers.core.run_state import RunState
from swf_panda_workers.operator_commands import send

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def packaged_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def command_paths(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], str]:
    """Every command and sub-command the parser knows, by the words that call
    it (aliases too), with the name its usage line gives."""
    found = {path: parser.prog}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= command_paths(sub, (*path, name))
    return found


COMMANDS = command_paths(build_parser())


def test_the_commands_the_issue_asks_for_exist() -> None:
    top = {path[0] for path in COMMANDS if path}
    assert {
        "listen",
        "runner",
        "serve-flows",
        "serve",
        "replay",
        "dry-run",
        "send",
        "show",
        "config",
    } <= top
    assert {("send", kind) for kind in ("run_imminent", "end_run", "slice_result", "file")} <= set(
        COMMANDS
    )


def test_the_demo_is_the_testbeds_command_not_the_products(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # swf-panda-workers-demo (tests/unit/test_demo_command.py): the product
    # ships no simulator, so its command line has no demo.
    assert "demo" not in {path[0] for path in COMMANDS if path}
    with pytest.raises(SystemExit) as exited:
        main(["demo"])
    assert exited.value.code == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "top")
def test_every_command_has_help(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {COMMANDS[words]}")
    # Something said beyond the usage line: a description or the options.
    assert len(out.splitlines()) > 3


def test_a_missing_named_configuration_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["show", "7", "--config", "/nowhere/swf.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: cannot read configuration /nowhere/swf.yaml")
    assert len(err.strip().splitlines()) == 1


def test_config_prints_the_file_and_masks_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ACTIVEMQ_PASSWORD", "s3cret-pw")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# /") and "swf_panda_workers.yaml" in out.splitlines()[0]
    assert "s3cret-pw" not in out and "password: '**********'" in out


@pytest.mark.parametrize("shape", ["testbed", "seed"])
def test_sent_announcements_and_ends_are_what_the_listener_takes(shape: str) -> None:
    brokers = Brokers()
    imminent = sample_messages.run_imminent(
        "100200",
        "ops",
        brokers,
        NOW,
        workers=4,
        cores=2,
        shape=shape,  # type: ignore[arg-type]
    )
    end = sample_messages.end_run("100200", "ops", brokers, NOW, shape)  # type: ignore[arg-type]

    announced = parse_message(json.dumps(imminent.body).encode())
    assert isinstance(announced, RunImminent) and announced.run_id == "100200"
    assert announced.content.target_worker_count == 4
    # cores per worker: only the seed's shape says; the testbed copies its
    # worker count into core_count.
    assert (announced.content.cores_per_worker, announced.content.core_count) == (
        (None, 4) if shape == "testbed" else (2, None)
    )
    assert isinstance(parse_message(json.dumps(end.body).encode()), RunEnd)
    for sample in (imminent, end):
        assert sample.destination == brokers.workers_topic
        assert sample.headers["namespace"] == "ops" and sample.headers["run_id"] == "100200"
        assert sample.headers["msg_type"] == sample.body["msg_type"]
    assert imminent.body["msg_type"] == (
        "run_imminent_worker" if shape == "testbed" else "run_imminent"
    )


def test_a_sent_slice_result_is_a_transformers() -> None:
    brokers = Brokers()
    sample = sample_messages.slice_result("100200", brokers, NOW, seconds=42.5, slice_id=7)
    result = parse_message(json.dumps(sample.body).encode())

    assert isinstance(result, SliceResult)
    assert result.processing_seconds == pytest.approx(42.5)
    assert sample.body["run_id"] == "100200"  # the slice's run id, as the testbed sends it
    assert sample.body["content"]["result"]["state"] is True  # a JSON boolean
    assert "namespace" not in sample.headers  # results from iDDS jobs carry none
    assert "processing_time" not in sample.body["content"]
    assert sample.destination == brokers.results_destination
    failed = sample_messages.slice_result("100200", brokers, NOW, seconds=1, failed=True)
    assert parse_message(json.dumps(failed.body).encode()).content.state == "failed"  # type: ignore[union-attr]


def test_a_raw_file_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert send(Settings(), None, b"{not json", None) == 1
    err = capsys.readouterr().err
    assert "the listener will set this aside" in err  # said before refusing
    assert "send: a raw message needs --destination" in err


def test_unreachable_broker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 9 (discard) here: the connect is refused at once.
    settings = Settings.model_validate({"brokers": {"host": "127.0.0.1", "port": 9}})
    sample = sample_messages.end_run("5", "ops", settings.brokers, NOW)
    assert send(settings, sample, None, None) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("send: 127.0.0.1:9:") and len(err.splitlines()) == 1


def test_the_run_report_says_where_the_run_is() -> None:
    size = WorkerSize(core_count=1, memory_per_core=2000, site="BNL", target_worker_count=3)
    bigger = size.model_copy(update={"target_worker_count": 5})
    state = RunState(
        run_id="100200",
        plan=WorkerPlan(initial=size, current=bigger),
        ids=WorkflowIds(request_id=11, transform_id=12, workload_id=13),
        create_sent=True,
        ended_at=NOW,
        stop_sent=True,
        slices_done=40,
        slices_failed=2,
        workers_seen=frozenset({"a", "b"}),
        slowest_slice=61.0,
        adjustments=(
            AdjustSent(decided_at=NOW, sent_at=NOW, size=bigger, reason="slices 2x too slow"),
        ),
    )
    flow_run = FlowRunSummary(id="f-1", name="run-100200", state="Running", started=NOW, ended=None)
    text = RunReport("100200", "ops", flow_run, (), state, {}, "http://ui:4200").text()

    assert "run 100200 (namespace ops)" in text
    assert "run-100200  Running" in text
    assert "http://ui:4200/runs/flow-run/f-1" in text
    assert "request 11, transform 12, workload 13" in text
    assert "create sent, ids, ended, stop sent, no close sent, no closed" in text
    assert "40 done, 2 failed, 2 workers seen, slowest 61.0 s" in text
    assert "started with 3, asked 5, confirmed by iDDS -" in text
    assert "-> 5 workers: slices 2x too slow" in text


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("run", "dev", "100200") == "run-dev-100200"
    assert artifact_key("scaling", "Dev_2", "r.7", dry_run=True) == "scaling-dev-2-r-7-dry-run"


def test_recorded_parameters_leave_the_dry_run_choice_to_the_replay() -> None:
    size = WorkerSize(core_count=1, memory_per_core=2000, site="BNL", target_worker_count=3)
    state = RunState(run_id="7", plan=WorkerPlan(initial=size, current=size))
    flow_run = FlowRunSummary(id="f", name="run-7", state="Completed", started=None, ended=None)
    recorded: dict[str, object] = {
        "run_id": "7",
        "namespace": "ops",
        "announcement": {},
        "received_at": None,
        "dry_run": False,
    }
    report = RunReport("7", "ops", flow_run, (), state, recorded)

    assert report.recorded_parameters == {
        "run_id": "7",
        "namespace": "ops",
        "announcement": {},
        "received_at": None,
    }
