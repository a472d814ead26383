"""The supervisor `serve` runs its children under: a child that exits is
started again after a backoff, with a log line saying how it ended; a child
that ignores SIGTERM is killed at the stop's deadline; a start that must not
happen stops the service. Real (small) processes."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swf_panda_workers.service.processes import ManagedProcess, StartupError
from swf_panda_workers.service.supervisor import Backoff, Child, Fatal, Supervisor

WAIT = 20.0
# Exits with status 3 at its first start, runs at the next ones.
FAILS_ONCE = (
    "import pathlib, sys, time\n"
    "marker = pathlib.Path(sys.argv[1])\n"
    "if not marker.exists():\n"
    "    marker.touch()\n"
    "    print('cannot start: no marker yet', flush=True)\n"
    "    sys.exit(3)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)\n"
)
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)\n"
)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def child(tmp_path: Path, name: str, code: str, *args: str) -> Child:
    process = ManagedProcess(
        name, [sys.executable, "-c", code, *args], {}, tmp_path / f"{name}.log"
    )
    return Child(name, process, process.start, lambda: process.logged_since_start(b"up"))


@pytest.fixture
def running() -> Iterator[Callable[[Supervisor], threading.Event]]:
    """Runs a supervisor in a thread; stops it and its children afterwards."""
    started: list[tuple[Supervisor, threading.Event, threading.Thread]] = []

    def run(supervisor: Supervisor) -> threading.Event:
        stopping = threading.Event()
        thread = threading.Thread(target=supervisor.run, args=(stopping,), daemon=True)
        thread.start()
        started.append((supervisor, stopping, thread))
        return stopping

    yield run
    for supervisor, stopping, thread in started:
        stopping.set()
        thread.join(WAIT)
        supervisor.stop(within=1)


def test_backoff_doubles_up_to_its_limit() -> None:
    backoff = Backoff(first=1, limit=30)
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_child_that_exits_is_started_again_and_the_log_says_how_it_ended(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    running: Callable[[Supervisor], threading.Event],
) -> None:
    flaky = child(tmp_path, "flaky", FAILS_ONCE, str(tmp_path / "marker"))
    ready: list[str] = []
    supervisor = Supervisor(
        [flaky], Backoff(first=0.1), on_all_ready=lambda: ready.append("all ready")
    )
    with caplog.at_level(logging.INFO, logger="swf.serve"):
        running(supervisor)
        assert wait_until(lambda: flaky.ever_ready), flaky.process.tail()
    assert ready == ["all ready"]
    assert flaky.process.alive
    [ended] = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert ended.startswith("flaky (pid ")
    assert "exited with status 3 after" in ended
    assert "starting it again in 0.1s (exit 1 in a row)" in ended
    assert ended.endswith("ends: cannot start: no marker yet")


def test_a_child_not_ready_in_time_is_killed_and_started_again(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    running: Callable[[Supervisor], threading.Event],
) -> None:
    hung = child(tmp_path, "server", "import time\ntime.sleep(600)\n")  # never says "up"
    hung.ready_within = 0.3
    with caplog.at_level(logging.INFO, logger="swf.serve"):
        running(Supervisor([hung], Backoff(first=0.1)))
        assert wait_until(lambda: sum("server started" in r.message for r in caplog.records) >= 2)
    messages = [r.message for r in caplog.records]
    assert "server not ready 0.3s after its start: killing it" in messages
    assert any("killed by SIGKILL after" in m for m in messages)


def test_a_child_that_ignores_sigterm_is_killed_at_the_stop_deadline(
    tmp_path: Path, running: Callable[[Supervisor], threading.Event]
) -> None:
    stubborn = child(tmp_path, "stubborn", IGNORES_SIGTERM)
    supervisor = Supervisor([stubborn])
    stopping = running(supervisor)
    assert wait_until(lambda: stubborn.ever_ready)
    stopping.set()
    supervisor.stop(within=1.0)
    assert not stubborn.process.alive
    assert stubborn.process.exit_reason() == "killed by SIGKILL"


def test_a_start_that_must_not_happen_stops_the_service(tmp_path: Path) -> None:
    def refuse() -> None:
        raise StartupError("port 4200 is already taken by pid 1: someone else")

    process = ManagedProcess("server", [sys.executable, "-c", ""], {}, tmp_path / "s.log")
    supervisor = Supervisor([Child("prefect-server", process, refuse)])
    with pytest.raises(Fatal, match=r"^prefect-server: port 4200 is already taken by pid 1"):
        supervisor.run(threading.Event())
    assert process.process is None
