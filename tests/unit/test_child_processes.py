"""The real peers' processes never outlive their parent: a parent SIGKILLed
takes them with it (PR_SET_PDEATHSIG), and the launcher's long-lived thread
is what keeps them alive while the parent lives (the signal fires when the
forking *thread* ends). Process ends are awaited with pidfds, not sleeps."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from swf_testbed.peers._child_processes import (
    ChildLauncher,
    _popen,
    _Spawn,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[2]
SLEEP = ("sleep", "60")


def ended_within(pid: int, seconds: float) -> bool:
    """True once the process has ended (a zombie counts), within ``seconds``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(seconds * 1000))
    finally:
        os.close(fd)


def test_a_sigkilled_parent_takes_its_children_along(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib\n"
            "from swf_testbed.peers._child_processes import ChildLauncher\n"
            "child = ChildLauncher().spawn(['sleep', '60'], {}, pathlib.Path(sys.argv[1]))\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n",  # until killed
            str(tmp_path / "child.log"),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not ended_within(child, 0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert ended_within(child, 10), f"child {child} outlived its SIGKILLed parent"


def test_children_live_as_long_as_the_launcher_not_the_calling_thread(tmp_path: Path) -> None:
    launcher = ChildLauncher()
    spawned: list[subprocess.Popen[bytes]] = []
    caller = threading.Thread(
        target=lambda: spawned.append(launcher.spawn(SLEEP, {}, tmp_path / "a.log"))
    )
    caller.start()
    caller.join()
    child = spawned[0]
    assert not ended_within(child.pid, 0.5), "the child died with the thread that asked for it"
    launcher.close()  # the forking thread ends: the last resort of a stop
    assert ended_within(child.pid, 10)
    assert child.wait() == -signal.SIGKILL
    with pytest.raises(RuntimeError, match="closed"):
        launcher.spawn(SLEEP, {}, tmp_path / "b.log")


def test_why_the_launcher_a_child_forked_by_a_short_lived_thread_dies_with_it(
    tmp_path: Path,
) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    request = _Spawn(SLEEP, {}, tmp_path / "c.log", None)
    forker = threading.Thread(target=lambda: spawned.append(_popen(request)))
    forker.start()
    forker.join()
    assert ended_within(spawned[0].pid, 10)
    assert spawned[0].wait() == -signal.SIGKILL


def test_stop_is_sigterm_then_sigkill(tmp_path: Path) -> None:
    launcher = ChildLauncher()
    try:
        polite = launcher.spawn(SLEEP, {}, tmp_path / "d.log")
        assert stop_process(polite, grace=10) < 5
        assert polite.returncode == -signal.SIGTERM
        stubborn = launcher.spawn(
            [
                sys.executable,
                "-c",
                "import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                "time.sleep(60)",
            ],
            {},
            tmp_path / "e.log",
        )
        log = tmp_path / "e.log"
        # Wait for its handler to be in place (it says so) before signalling.
        while "ready" not in log.read_text():
            assert not ended_within(stubborn.pid, 0.05)
        assert stop_process(stubborn, grace=0.5) >= 0.5
        assert stubborn.returncode == -signal.SIGKILL
        assert stop_process(stubborn, grace=0.5) == 0.0  # already ended
    finally:
        launcher.close()
