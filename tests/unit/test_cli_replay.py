"""`swf-panda-workers replay`: a recording in, the comparison and the plot out;
bad input is one line and exit status 2."""

from __future__ import annotations

import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from swf_panda_workers.cli import main
from swf_panda_workers.config.loading import CONFIG_ENV
from swf_panda_workers.core.recording import RecordedSlice, RunRecording

T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)


def a_recording() -> RunRecording:
    """1 slice/s for 10 minutes, 1 s each, 3 s in the middle four minutes."""
    slices = []
    for second in range(600):
        took = 3.0 if 180 <= second < 420 else 1.0
        queued = T0 + timedelta(seconds=second)
        slices.append(
            RecordedSlice(
                at=queued + timedelta(seconds=took),
                requested_at=queued,
                processing_seconds=took,
                worker="t-1",
            )
        )
    return RunRecording(
        run_id="100123",
        namespace="test",
        announcement={
            "msg_type": "run_imminent",
            "run_id": "100123",
            "content": {"target_worker_count": 2, "slice_processing_time": 1.0},
        },
        announced_at=T0,
        ended_at=T0 + timedelta(seconds=600),
        slices=slices,
    )


@pytest.fixture(autouse=True)
def packaged_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "recording.json"
    path.write_text(a_recording().model_dump_json())
    return path


def test_replay_compares_the_default_policies(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "p.png"

    assert main(["replay", "--file", str(recorded), "--plot", str(plot)]) == 0

    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "reference" in line)
    assert "proportional" in header
    assert "worker-hours" in out and "backlog over deadline (s)" in out
    assert f"plot: {plot}" in out
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_replay_takes_policies_and_writes_the_plot_here(
    recorded: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)

    status = main(
        [
            "replay",
            "--file",
            str(recorded),
            "--worker-startup",
            "0",
            "--policy",
            "proportional:max_workers=4",
            "--policy",
            "reference:end=stop",
        ]
    )

    assert status == 0
    out = capsys.readouterr().out
    assert "proportional:max_workers=4" in out and "reference:end=stop" in out
    assert (tmp_path / "replay-100123.png").exists()


def test_replay_fetches_from_prefect_and_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[str, str]] = []

    async def fetch_recording(run_id: str, namespace: str) -> RunRecording:
        asked.append((run_id, namespace))
        return a_recording()

    adapter = types.ModuleType("swf_panda_workers.adapters.prefect_recordings")
    adapter.fetch_recording = fetch_recording  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, adapter.__name__, adapter)
    saved = tmp_path / "saved.json"

    status = main(
        [
            "replay",
            "--run",
            "100123",
            "--namespace",
            "prod",
            "--save",
            str(saved),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )

    assert status == 0
    assert asked == [("100123", "prod")]
    assert RunRecording.model_validate_json(saved.read_text()) == a_recording()
    assert "reference" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--policy", "proportional:max_wrokers=3"], "max_wrokers", id="bad key"),
        pytest.param(["--policy", "adaptive"], "policy", id="bad policy"),
        pytest.param(
            ["--policy", "reference:slice.cooldown=soon"], "slice.cooldown", id="bad value"
        ),
        pytest.param(["--worker-startup", "-1"], "worker-startup", id="negative start-up"),
    ],
)
def test_replay_rejects_bad_arguments(
    recorded: Path, tmp_path: Path, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "p.png"

    assert main(["replay", "--file", str(recorded), "--plot", str(plot), *args]) == 2

    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not plot.exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param("{not json", "is not a run recording", id="not JSON"),
        pytest.param('{"run_id": "1"}', "is not a run recording", id="not a recording"),
    ],
)
def test_replay_rejects_a_bad_file(
    tmp_path: Path, content: str | None, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recording.json"
    if content is not None:
        path.write_text(content)

    assert main(["replay", "--file", str(path), "--plot", str(tmp_path / "p.png")]) == 2

    err = capsys.readouterr().err
    assert says in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_replay_reports_a_failed_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fetch_recording(run_id: str, namespace: str) -> RunRecording:
        raise LookupError(f"no run {run_id} in {namespace}")

    adapter = types.ModuleType("swf_panda_workers.adapters.prefect_recordings")
    adapter.fetch_recording = fetch_recording  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, adapter.__name__, adapter)

    assert main(["replay", "--run", "9", "--namespace", "dev"]) == 2

    assert "cannot fetch run 9 (dev) from Prefect: no run 9 in dev" in capsys.readouterr().err
