"""The service's processes on one machine: a Prefect server (SQLite, or a
PostgreSQL database), the runner and the listener, each a child process with
its own log file."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class StartupError(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    """A child in its own process group, stopped with SIGTERM then SIGKILL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, for fault tests."""
        if self.alive:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive:
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

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
    environment's PREFECT_API_DATABASE_CONNECTION_URL does."""

    home: Path
    port: int = 4200
    database_url: str | None = field(default=None, repr=False)  # it holds a password

    def __post_init__(self) -> None:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            # Store events within a second, so read-back acks come promptly.
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        if self.database_url is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        self.process = ManagedProcess(
            "prefect-server",
            python_module("prefect", "server", "start", "--host", "127.0.0.1",
                          "--port", str(self.port)),
            env, self.home / "prefect-server.log",
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 180.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.process.start()
        deadline = time.monotonic() + wait
        while not healthy(self.api_url):
            if not self.process.alive:
                raise StartupError(f"Prefect server exited:\n{self.process.tail()}")
            if time.monotonic() > deadline:
                self.process.stop()
                raise StartupError(f"Prefect server not healthy after {wait}s")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        self.process.stop()


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def service_env(api_url: str, config: Path,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
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
    return ManagedProcess("runner", python_module("deployments.serve"), env,
                          logs / "runner.log", cwd)


def listener_process(env: dict[str, str], logs: Path, cwd: Path) -> ManagedProcess:
    return ManagedProcess("listener", python_module("listeners"), env, logs / "listener.log", cwd)


def wait_for_deployment(api_url: str, name: str, wait: float = 120.0,
                        auth_string: str | None = None) -> None:
    """The runner registers its deployment when it starts serving.
    ``auth_string``: the server's PREFECT_SERVER_API_AUTH_STRING, by default
    this process's PREFECT_API_AUTH_STRING (the header Prefect's client sends)."""
    flow_name, _, deployment = name.partition("/")
    url = f"{api_url}/deployments/name/{flow_name}/{deployment}"
    auth_string = auth_string or os.environ.get("PREFECT_API_AUTH_STRING")
    headers = ({"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
               if auth_string else {})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StartupError(f"deployment {name} not registered after {wait}s")
