"""The service's processes on one machine: a Prefect server (SQLite, or a
PostgreSQL database), the runner and the listener, each a child process with
its own log file.

Every child ends with the process that started it, however that one ends
(SIGKILL included): on Linux the child gets SIGKILL as its parent-death
signal, and the process group it leads (what it started in turn) is killed by
the group reaper (group_reaper.py) once the parent is gone.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swf_panda_workers.service.group_reaper import GroupReaper, kill_group
from swf_panda_workers.service.ports import describe_holders, listening_pids, port_answers

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StartupError(RuntimeError):
    pass


class PortTaken(StartupError):
    """Something this process did not start already answers on the port a
    server of its own was to take."""


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


class _Launcher:
    """Forks every child from one thread that lives as long as this process.

    The kernel sends a child its parent-death signal when the *thread* that
    forked it exits, not the process: a child forked from a short-lived
    thread (an executor's worker, ``asyncio.to_thread``) would be killed with
    that thread. So whoever starts a child hands the fork to this thread."""

    def __init__(self) -> None:
        self._prctl = _prctl()
        self._lock = threading.Lock()
        self._start_afresh()
        # A forked child (multiprocessing) has neither the thread nor the reaper.
        os.register_at_fork(after_in_child=self._start_afresh)

    def _start_afresh(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self.reaper = GroupReaper()

    def popen(self, argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **options)`` in a session of its own, forked
        from the launcher thread, with SIGKILL as its parent-death signal; its
        process group registered with the reaper."""
        done: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put(
            (
                lambda: subprocess.Popen(
                    argv, start_new_session=True, preexec_fn=self._preexec(os.getpid()), **options
                ),
                done,
            )
        )
        self._ensure_thread()
        process = done.result()
        self.reaper.register(process.pid)
        return process

    def _preexec(self, parent: int) -> Callable[[], None] | None:
        prctl = self._prctl
        if prctl is None:
            return None

        def die_with_parent() -> None:  # runs in the child, between fork and exec
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os.kill(os.getpid(), signal.SIGKILL)

        return die_with_parent

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="swf-launcher", daemon=True
                )
                self._thread.start()

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


_launcher = _Launcher()


def launch(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """Start a child that ends with this process (see ``_Launcher.popen``)."""
    return _launcher.popen(argv, **options)


def adopt_group(group: int) -> None:
    """Have process group ``group`` killed when this process ends, however it
    ends: for a server that detaches itself (pg_ctl's postmaster), which the
    parent-death signal cannot reach. ``release_group`` when stopped."""
    _launcher.reaper.register(group)


def release_group(group: int) -> None:
    _launcher.reaper.forget(group)


def end_group(leader: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
    """Signal what is left of a child's process group (its own children, once
    it exited) and forget the group: the child itself must have been waited
    for, else its pid, the group's id, could be signalled after reuse."""
    kill_group(leader.pid, signum)
    _launcher.reaper.forget(leader.pid)


@dataclass
class ManagedProcess:
    """A child leading its own process group, stopped with SIGTERM then
    SIGKILL; it and its group end with this process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _group_left: bool = field(default=False, init=False)  # its group may still hold processes
    _log_offset: int = field(default=0, init=False)  # the log's size at the last start

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._group_left = True
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self.process = launch(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exit_reason(self) -> str:
        """How the child ended, in words (``exited with status 1``, ``killed by SIGKILL``)."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return "running" if self.process is not None else "not started"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, for fault tests."""
        if self.alive:
            assert self.process is not None
            kill_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.reap()

    def stop(self, grace: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        self.finish(time.monotonic() + grace)

    def signal(self, signum: int) -> None:
        """Signal the child's whole group, if the child still runs."""
        if self.alive:
            assert self.process is not None
            kill_group(self.process.pid, signum)

    def finish(self, deadline: float) -> None:
        """Wait for the child until ``deadline`` (time.monotonic()), then
        SIGKILL its group; either way SIGKILL what it left behind."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) still running at its deadline: SIGKILL", self.name, self.process.pid
            )
            kill_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.reap()

    def reap(self) -> None:
        """Once the child has exited: SIGKILL what it left in its group."""
        if self._group_left and self.process is not None and self.process.poll() is not None:
            self._group_left = False
            end_group(self.process)

    def logged_since_start(self, text: bytes) -> bool:
        """Whether ``text`` is in what the child logged since its last start."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                return text in log_file.read()
        except OSError:
            return False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME. Its
    database is SQLite in that home unless ``database_url`` names another
    (``postgresql+asyncpg://user:password@host:port/database``), or the
    environment's PREFECT_API_DATABASE_CONNECTION_URL does. Its log goes to
    ``logs`` (default: the home).

    A server already answering on the port is refused, never used: it would
    be another process with another database (an orphan of an earlier start,
    say), and the one started here would fail to bind. To use a running
    server on purpose, name it with PREFECT_API_URL and start none."""

    home: Path
    port: int = 4200
    database_url: str | None = field(default=None, repr=False)  # it holds a password
    logs: Path | None = None
    # How the caller's operator gives it another port, for the refusal.
    another_port: str = "give this server another port"

    def __post_init__(self) -> None:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            # Store events within a second, so read-back acks come promptly.
            # Not in bigger batches than the default 20: Prefect 3.8.8's
            # persister drops a whole batch after five failed flushes, and a
            # batch of 2000 held after a server restart was lost so (one row
            # failing NOT NULL on events.occurred), a second's events at once.
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
            # No automations are used: their service reads every event (a run's
            # every slice result) for nothing. A server of one's own keeps them.
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        if self.database_url is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        self.process = ManagedProcess(
            "prefect-server",
            python_module(
                "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)
            ),
            env,
            (self.logs or self.home) / "prefect-server.log",
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 180.0) -> PrefectServer:
        """Start the server and return once it answers (else stop it and raise)."""
        self.launch()
        deadline = time.monotonic() + wait
        while not self.ready():
            if not self.process.alive:
                self.process.reap()
                if port_answers(self.port):  # it could not bind: another one took the port
                    raise PortTaken(self._taken())
                raise StartupError(
                    f"Prefect server {self.process.exit_reason()}:\n{self.process.tail()}"
                )
            if time.monotonic() > deadline:
                self.process.stop()
                raise StartupError(f"Prefect server not healthy after {wait}s")
            time.sleep(0.25)
        return self

    def launch(self) -> None:
        """Start the process (PortTaken if something else answers on the port)."""
        if port_answers(self.port):
            raise PortTaken(self._taken())
        self.home.mkdir(parents=True, exist_ok=True)
        self.process.start()

    def ready(self) -> bool:
        """Whether the server started here answers; PortTaken (the process
        stopped) if what answers is another one, which took the port between
        the check and the start."""
        if not healthy(self.api_url):
            return False
        holders = listening_pids(self.port)
        if self.process.alive and (holders is None or self.process.pid in holders):
            return True
        message = self._taken()
        self.process.stop()
        raise PortTaken(message)

    def _taken(self) -> str:
        version = prefect_version(self.api_url)
        what = (
            f"a Prefect server {version}" if version else "something that is not a Prefect server"
        )
        return (
            f"port {self.port} is already taken by {describe_holders(self.port)}, "
            f"which answers as {what}, and was not started here. Stop it; or, to use "
            f"it on purpose, set PREFECT_API_URL={self.api_url} (then no server is "
            f"started); or {self.another_port}"
        )

    def stop(self) -> None:
        self.process.stop()


def prefect_version(api_url: str) -> str | None:
    """The version a Prefect server at ``api_url`` reports; None if what
    answers there is no Prefect server."""
    if not healthy(api_url):
        return None
    try:
        with urllib.request.urlopen(f"{api_url}/admin/version", timeout=2) as response:
            return str(response.read().decode(errors="replace").strip().strip('"'))
    except (urllib.error.URLError, OSError):
        return "(version not told)"


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def service_env(
    api_url: str, config: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of the runner and the listener."""
    return {
        **os.environ,
        **(extra or {}),
        "PREFECT_API_URL": api_url,
        "SWF_PANDA_WORKERS_CONFIG": str(config),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }


def runner_process(env: dict[str, str], logs: Path, cwd: Path) -> ManagedProcess:
    return ManagedProcess(
        "runner", python_module("deployments.serve"), env, logs / "runner.log", cwd
    )


def listener_process(env: dict[str, str], logs: Path, cwd: Path) -> ManagedProcess:
    return ManagedProcess("listener", python_module("listeners"), env, logs / "listener.log", cwd)


def wait_for_deployment(
    api_url: str, name: str, wait: float = 120.0, auth_string: str | None = None
) -> None:
    """The runner registers its deployment when it starts serving."""
    deadline = time.monotonic() + wait
    while not deployment_registered(api_url, name, auth_string):
        if time.monotonic() >= deadline:
            raise StartupError(f"deployment {name} not registered after {wait}s")
        time.sleep(0.5)


def deployment_registered(api_url: str, name: str, auth_string: str | None = None) -> bool:
    """Whether the server holds the deployment ``name`` (flow/deployment).
    ``auth_string``: the server's PREFECT_SERVER_API_AUTH_STRING, by default
    this process's PREFECT_API_AUTH_STRING (the header Prefect's client sends)."""
    flow_name, _, deployment = name.partition("/")
    url = f"{api_url}/deployments/name/{flow_name}/{deployment}"
    auth_string = auth_string or os.environ.get("PREFECT_API_AUTH_STRING")
    headers = (
        {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
        if auth_string
        else {}
    )
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
