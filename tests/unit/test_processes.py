"""The shared process launcher (swf_panda_workers/service/processes.py): a
child, and what the child started, end with the process that started it,
however that one ends; a port already answered by a server not started here
is refused with the port and its holder named. Real processes, no broker."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from swf_panda_workers.service.group_reaper import reap_on_eof
from swf_panda_workers.service.ports import listening_pids, port_answers
from swf_panda_workers.service.processes import ManagedProcess, PortTaken, PrefectServer

WAIT = 20.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# A child that starts a grandchild (in its own process group, as Prefect's
# runner starts flow-run processes), says both pids, and sleeps.
PARENT_OF_ONE = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(600)\n"
)
# A process that starts PARENT_OF_ONE as a ManagedProcess from a thread that
# then ends, prints the pids, and sleeps until killed.
SUPERVISOR = (
    "import sys, threading, time\n"
    "from pathlib import Path\n"
    "from swf_panda_workers.service.processes import ManagedProcess\n"
    "log = Path(sys.argv[1])\n"
    "def start():\n"
    "    child = ManagedProcess('child', [sys.executable, '-c', sys.argv[2]], {}, log).start()\n"
    "    print(child.pid, flush=True)\n"
    "starter = threading.Thread(target=start)\n"
    "starter.start()\n"
    "starter.join()\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to read its status is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def read_line(path: Path) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().strip() != ""), path
    return int(path.read_text().split()[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_child_and_what_it_started_end_when_their_starter_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "supervisor.out"
    with out.open("wb") as sink:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(tmp_path / "child.log"), PARENT_OF_ONE],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        child = read_line(out)
        grandchild = read_line(tmp_path / "child.log")
        # The thread that started the child has ended: the child lives on.
        assert alive(child) and alive(grandchild)
        supervisor.kill()  # SIGKILL: nothing of the starter's own code runs
        supervisor.wait()
        assert wait_until(lambda: not alive(child) and not alive(grandchild)), (
            child,
            grandchild,
            out.read_text(),
        )
    finally:
        supervisor.kill()


def test_stopping_a_child_ends_what_it_started_too(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = ManagedProcess("child", [sys.executable, "-c", PARENT_OF_ONE], {}, log).start()
    try:
        grandchild = read_line(log)
        child.stop(grace=5)
        assert not child.alive and child.exit_reason() == "killed by SIGTERM"
        assert wait_until(lambda: not alive(grandchild))
    finally:
        child.kill()


def test_what_a_dead_child_left_behind_is_killed_when_it_is_reaped(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = ManagedProcess("child", [sys.executable, "-c", PARENT_OF_ONE], {}, log).start()
    try:
        grandchild = read_line(log)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)  # the child alone, as the OOM killer would
        assert wait_until(lambda: not child.alive)
        assert alive(grandchild)  # orphaned, still in the child's group
        child.reap()
        assert wait_until(lambda: not alive(grandchild))
    finally:
        child.kill()


def test_the_reaper_kills_the_groups_still_registered_at_the_end_of_its_input() -> None:
    registered = subprocess.Popen(SLEEPER, start_new_session=True)
    forgotten = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        commands = io.StringIO(
            f"+{registered.pid}\n+{forgotten.pid}\n-{forgotten.pid}\n+not-a-number\n"
        )
        assert reap_on_eof(commands) == {registered.pid}
        assert registered.wait(timeout=WAIT) == -signal.SIGKILL
        assert forgotten.poll() is None
    finally:
        registered.kill()
        forgotten.kill()
        forgotten.wait()


class _PrefectLike(BaseHTTPRequestHandler):
    """Answers as a Prefect server does on /api/health and /api/admin/version."""

    def do_GET(self) -> None:
        answers = {"/api/health": True, "/api/admin/version": "3.8.8"}
        if self.path not in answers:
            self.send_error(404)
            return
        body = json.dumps(answers[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_server() -> Iterator[int]:
    """A 'Prefect server' this test did not start as a PrefectServer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PrefectLike)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_server_already_on_the_port_is_refused_with_port_and_holder_named(
    foreign_server: int, tmp_path: Path
) -> None:
    server = PrefectServer(tmp_path / "home", foreign_server)
    with pytest.raises(PortTaken) as refused:
        server.start(wait=30)
    message = str(refused.value)
    assert f"port {foreign_server} is already taken by pid {os.getpid()}: " in message
    assert "answers as a Prefect server 3.8.8" in message
    assert f"PREFECT_API_URL=http://127.0.0.1:{foreign_server}/api" in message
    assert server.process.process is None  # nothing was started
    assert not (tmp_path / "home").exists()


def test_the_holder_of_a_listening_port_is_found() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PrefectLike)
    try:
        port = server.server_address[1]
        assert port_answers(port)
        assert listening_pids(port) == {os.getpid()}
    finally:
        server.server_close()
    assert not port_answers(port)
    assert listening_pids(port) == set()
