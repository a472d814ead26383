"""Where `serve` keeps its state (swf_panda_workers/state_dir.py): the
configuration, else PREFECT_HOME, else the user's XDG state directory;
never the temporary directory unless configured there, and then flagged."""

from __future__ import annotations

from pathlib import Path

import pytest

from swf_panda_workers.cli import main
from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.state_dir import earlier_databases, state_dir

HOME = Path("/home/operator")


@pytest.mark.parametrize(
    ("configured", "environ", "path", "chosen_by"),
    [
        pytest.param(
            None,
            {},
            HOME / ".local/state/swf-panda-workers",
            "the XDG default, ~/.local/state",
            id="nothing set: XDG default",
        ),
        pytest.param(
            None,
            {"XDG_STATE_HOME": "/var/lib/op"},
            Path("/var/lib/op/swf-panda-workers"),
            "XDG_STATE_HOME",
            id="XDG_STATE_HOME",
        ),
        pytest.param(
            None,
            {"XDG_STATE_HOME": "relative/dir"},
            HOME / ".local/state/swf-panda-workers",
            "the XDG default, ~/.local/state",
            id="a relative XDG_STATE_HOME is ignored, as the spec says",
        ),
        pytest.param(
            None,
            {"PREFECT_HOME": "/srv/prefect", "XDG_STATE_HOME": "/var/lib/op"},
            Path("/srv/prefect"),
            "PREFECT_HOME",
            id="PREFECT_HOME before XDG",
        ),
        pytest.param(
            "/data/swf",
            {"PREFECT_HOME": "/srv/prefect"},
            Path("/data/swf"),
            "prefect.state_dir",
            id="the configuration before PREFECT_HOME",
        ),
        pytest.param(
            "/data/swf",
            {"SWF_STATE_DIR": "/data/other"},
            Path("/data/other"),
            "SWF_STATE_DIR",
            id="SWF_STATE_DIR overrides the configuration",
        ),
    ],
)
def test_where_the_state_is(
    configured: str | None, environ: dict[str, str], path: Path, chosen_by: str
) -> None:
    raw = {"prefect": {"state_dir": configured}} if configured else {}
    state = state_dir(settings_from(raw, environ), environ, home=HOME)
    assert (state.path, state.chosen_by) == (path, chosen_by)
    assert state.prefect_home == path and state.logs == path / "logs"


def test_a_state_directory_under_the_temporary_directory_is_told_apart(tmp_path: Path) -> None:
    settings = settings_from({"prefect": {"state_dir": str(tmp_path / "state")}}, {})
    assert state_dir(settings, {}).temporary(temp_root=tmp_path)
    assert not state_dir(settings_from({}, {}), {}, home=HOME).temporary(temp_root=tmp_path)


def test_config_prints_the_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWF_STATE_DIR", str(tmp_path / "state"))
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        f"# serve's state directory (Prefect database, logs): "
        f"{tmp_path / 'state'} (from SWF_STATE_DIR)"
    )


def test_the_databases_earlier_versions_kept_are_found(tmp_path: Path) -> None:
    temp, configured = tmp_path / "tmp", tmp_path / "var"
    assert earlier_databases({"SWF_STATE_DIR": str(configured)}, temp_root=temp) == []
    in_temp = temp / "swf-panda-workers" / "prefect" / "prefect.db"
    in_configured = configured / "swf-panda-workers" / "prefect" / "prefect.db"
    for database in (in_temp, in_configured):
        database.parent.mkdir(parents=True)
        database.write_bytes(b"SQLite format 3\0")
    assert earlier_databases({"SWF_STATE_DIR": str(configured)}, temp_root=temp) == [
        in_configured,
        in_temp,
    ]
    assert earlier_databases({}, temp_root=temp) == [in_temp]
