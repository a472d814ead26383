"""The demo's command line, ``swf-panda-workers-demo`` (the testbed's, not
the product's): its options, their defaults, and what it hands the demo."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from swf_panda_workers.config.loading import ConfigError
from swf_testbed import demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """What ``run_demo`` is called with, instead of running a session."""
    calls: list[tuple[Any, ...]] = []

    def fake_run_demo(*args: Any) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    return calls


def test_the_console_script_is_the_demos_main() -> None:
    testbed = tomllib.loads((REPO / "testbed" / "pyproject.toml").read_text())
    assert testbed["project"]["scripts"] == {"swf-panda-workers-demo": "swf_testbed.demo:main"}
    product = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "swf-panda-workers-demo" not in product["project"]["scripts"]


def test_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: swf-panda-workers-demo")
    for option in (
        "--runs",
        "--shape",
        "--slices",
        "--prefect-port",
        "--workdir",
        "--keep",
        "--mode",
    ):
        assert option in out


def test_the_defaults_are_the_demos(handed: list[tuple[Any, ...]]) -> None:
    assert demo.main([]) == 0
    assert handed == [
        (Path(".swf-local/demo").resolve(), 2, "testbed", 120, 4200, False, "message")
    ]


def test_every_option_reaches_the_demo(handed: list[tuple[Any, ...]], tmp_path: Path) -> None:
    assert (
        demo.main(
            [
                "--runs",
                "1",
                "--shape",
                "seed",
                "--slices",
                "20",
                "--prefect-port",
                "4300",
                "--workdir",
                str(tmp_path / "w"),
                "--keep",
                "--mode",
                "rest",
            ]
        )
        == 0
    )
    assert handed == [(tmp_path / "w", 1, "seed", 20, 4300, True, "rest")]


@pytest.mark.parametrize(
    "words", [["--shape", "round"], ["--mode", "carrier-pigeon"], ["--runs", "two"]]
)
def test_a_bad_option_is_a_usage_error(words: list[str], handed: list[tuple[Any, ...]]) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(words)
    assert exited.value.code == 2
    assert handed == []


def test_a_configuration_error_is_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*_: Any) -> int:
        raise ConfigError("brokers.port: not a port")

    monkeypatch.setattr(demo, "run_demo", refuse)
    assert demo.main(["--runs", "1"]) == 2
    assert capsys.readouterr().err == "configuration error: brokers.port: not a port\n"


def test_the_product_command_line_does_not_import_the_testbed() -> None:
    # Loading the product's entry points leaves the testbed unloaded.
    code = (
        "import sys, swf_panda_workers.cli, swf_panda_workers.service.serve, "
        "listeners.bus_listener, flows.run_lifecycle, deployments.serve\n"
        "print(sorted(m for m in sys.modules if m.startswith('swf_testbed')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"
