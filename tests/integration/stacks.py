"""The integration tests' stacks beyond the session's (conftest.py), each a
fixture named for what it gives: a runner and a listener (or two) of a
namespace of their own, sharing the session's broker and Prefect server, or
a server of their own; `swf-panda-workers serve` with its own server; the
real iDDS REST app and its peers. test_security.py's, with a broker and a
server of their own, are in secure_stacks.py. conftest.py imports them, so
that pytest finds them for every test file. Their scopes are as they were in
the files: a module-scoped one starts with the first test of a file that
asks for it and stops after the last; `serve` is a fresh process per test."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PREFECT_PORT,
    REAL_REST_IDDS_PORT,
    REAL_REST_NAMESPACE,
    STACK_CONFIG,
    STOMP_PORT,
    new_idds_database_url,
)
from process_reads import command_line, descendants, start_time

from swf_panda_workers.service.processes import (
    ManagedProcess,
    PrefectServer,
    listener_process,
    service_env,
)
from swf_testbed.launchers.stack import PROJECT_ROOT, EmbeddedStack, start_subscribed
from swf_testbed.peers._bus import poll_until
from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.monitor import MonitorStandIn
from swf_testbed.peers.real_peers import RealPeers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _beside(
    stack: EmbeddedStack, namespace: str, deployment: str, **sections: dict[str, Any]
) -> dict[str, Any]:
    """The session stack's configuration for another namespace and
    deployment, with sections merged over the session's."""
    base = stack.config
    config = {
        **base,
        "transceiver": {**base["transceiver"], "namespace": namespace},
        "prefect": {**base["prefect"], "deployment": deployment},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


# --- test_faults.py: a short wait for iDDS's ids ----------------------------------------

# The session's 30 s, waited by each of the flow's two attempts, would make a
# silent iDDS cost a minute.
FAULT_NAMESPACE = "itestfault"
FAULT_CREATE_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def fault_stack(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    config = _beside(
        stack,
        FAULT_NAMESPACE,
        "swf-run/panda-workers-fault",
        timeouts={"created_workflow_task": FAULT_CREATE_TIMEOUT},
    )
    with EmbeddedStack(
        tmp_path_factory.mktemp("fault-stack"), config, own_broker=False, shared_server=stack.server
    ) as embedded:
        yield embedded


# --- test_listener_replicas.py: two listener replicas of one namespace -------------------

REPLICA_NAMESPACE = "itestreplica"
REPLICAS = ("a", "b")


@pytest.fixture(scope="module")
def replica_stack(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """A runner and two listener replicas of one namespace."""
    config = _beside(stack, REPLICA_NAMESPACE, "swf-run/panda-workers-replica")
    with EmbeddedStack(
        tmp_path_factory.mktemp("replica-stack"),
        config,
        own_broker=False,
        shared_server=stack.server,
        listener_replicas=REPLICAS,
    ) as embedded:
        yield embedded


# --- test_monitor.py: a listener heartbeating to swf-monitor's stand-in -------------------

MONITOR_NAMESPACE = "itestmonitor"
MONITOR_TOKEN = secrets.token_urlsafe(24)  # the listener's API token; must never leak


@pytest.fixture(scope="module")
def monitor() -> Iterator[MonitorStandIn]:
    with MonitorStandIn(token=MONITOR_TOKEN) as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def monitor_stack(
    stack: EmbeddedStack, monitor: MonitorStandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """A runner and a listener, the listener heartbeating to the stand-in
    (its token from a file)."""
    workdir = tmp_path_factory.mktemp("monitor-stack")
    token_file = workdir / "api-token"
    token_file.write_text(MONITOR_TOKEN + "\n")
    config = _beside(
        stack, MONITOR_NAMESPACE, "swf-run/panda-workers-monitor", monitor={"timeout": 2}
    )
    listener_env = {
        "SWF_MONITOR_URL": monitor.url,
        "SWF_API_TOKEN_FILE": str(token_file),
        "SWF_MONITOR_INTERVAL": "30",
    }
    with EmbeddedStack(
        workdir, config, own_broker=False, shared_server=stack.server, listener_env=listener_env
    ) as embedded:
        yield embedded


# --- test_namespaces.py: two namespaces whose results go to a topic ---------------------

RESULTS_TOPIC = "/topic/panda.results"
IDDS_ELSEWHERE = "iddselse"


def namespace_config(
    namespace: str, results: str, idds_namespace: str | None = None
) -> dict[str, object]:
    return {
        **STACK_CONFIG,
        "transceiver": {
            "namespace": namespace,
            **({"idds_namespace": idds_namespace} if idds_namespace else {}),
        },
        "brokers": {**STACK_CONFIG["brokers"], "results_destination": results},
        "prefect": {"deployment": f"swf-run/panda-workers-{namespace}", "runner_limit": 5},
    }


@pytest.fixture(scope="module")
def topic_stacks(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EmbeddedStack, EmbeddedStack]]:
    """Two namespaces whose transformers send results to a topic; the second
    talks to an iDDS in another namespace."""
    with ExitStack() as stacks:
        pair = tuple(
            stacks.enter_context(
                EmbeddedStack(
                    tmp_path_factory.mktemp(namespace),
                    namespace_config(namespace, RESULTS_TOPIC, idds),
                    own_broker=False,
                    shared_server=stack.server,
                )
            )
            for namespace, idds in (("itopica", None), ("itopicb", IDDS_ELSEWHERE))
        )
        yield pair  # type: ignore[misc]


# --- test_observability.py: a listener with its metrics endpoint on -----------------------

OBSERVED_NAMESPACE = "itestobs"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def observed_stack(
    stack: EmbeddedStack, metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """A runner and a listener with its endpoint on."""
    config = _beside(stack, OBSERVED_NAMESPACE, "swf-run/panda-workers-obs")
    config["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    with EmbeddedStack(
        tmp_path_factory.mktemp("observed-stack"),
        config,
        own_broker=False,
        shared_server=stack.server,
    ) as embedded:
        yield embedded


# --- test_runner_modes.py: flow runs in a subprocess each --------------------------------

SUBPROCESS_NAMESPACE = "itestsubproc"


@pytest.fixture(scope="module")
def subprocess_stack(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    config = _beside(
        stack,
        SUBPROCESS_NAMESPACE,
        "swf-run/panda-workers-subprocess",
        prefect={"flow_runs": "subprocess"},
    )
    with EmbeddedStack(
        tmp_path_factory.mktemp("subprocess-stack"),
        config,
        own_broker=False,
        shared_server=stack.server,
    ) as embedded:
        yield embedded


# --- test_prefect_deploy.py: prefect.yaml deployed to a Prefect server of its own ----------

DEPLOY_NAMESPACE = "itestdeploy"
DEPLOY_PORT = PREFECT_PORT + 50  # apart from the ports of other test sessions (+10 each)
BIN = Path(sys.executable).parent
DEPLOY_CONFIG = {
    **STACK_CONFIG,
    "transceiver": {"namespace": DEPLOY_NAMESPACE},
}


@dataclass
class Deployed:
    api_url: str
    env: dict[str, str]
    deploy_output: str


def prefect(env: dict[str, str], *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prefect"), *words],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=PROJECT_ROOT,
    )


@pytest.fixture(scope="module")
def deployed(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A Prefect server, `prefect deploy --all` as the README says, a process
    worker on the pool and a listener; the broker is the session's."""
    workdir = tmp_path_factory.mktemp("deploy")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(DEPLOY_CONFIG))
    server = PrefectServer(workdir / "prefect", DEPLOY_PORT).start()
    env = service_env(
        server.api_url,
        config,
        {
            "SWF_PANDA_WORKERS_HOME": str(PROJECT_ROOT),
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # a run starts within a second, not ten
        },
    )
    started: list[ManagedProcess] = []
    try:
        for words in (
            ("work-pool", "create", "swf-panda-workers", "--type", "process"),
            ("work-pool", "set-concurrency-limit", "swf-panda-workers", "20"),
        ):
            done = prefect(env, *words)
            assert done.returncode == 0, done.stdout + done.stderr
        deploy = prefect(env, "--no-prompt", "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        (workdir / "logs").mkdir(exist_ok=True)
        worker = ManagedProcess(
            "worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", "swf-panda-workers"],
            env,
            workdir / "logs" / "worker.log",
            PROJECT_ROOT,
        )
        started.append(worker.start())
        started.append(start_subscribed(listener_process(env, workdir / "logs", PROJECT_ROOT)))
        yield Deployed(server.api_url, env, deploy.stdout)
    finally:
        for process in reversed(started):
            process.stop()
        server.stop()


# --- test_serve.py: `swf-panda-workers serve`, started and stopped by each test ---------

SERVE_NAMESPACE = "itestserve"
SERVE_RESULTS_QUEUE = "/queue/panda.results.worker.serve"
# Apart from the session servers (+10 each) and test_prefect_deploy's (+50).
SERVE_PORT = int(os.environ.get("SWF_TEST_SERVE_PREFECT_PORT", str(PREFECT_PORT + 7)))
SERVE_WAIT = 120.0  # generous: the machine is shared; every wait ends when its condition holds
SERVE_COMMAND = str(Path(sys.executable).with_name("swf-panda-workers"))

SERVE_CONFIG = {
    "transceiver": {"namespace": SERVE_NAMESPACE},
    "brokers": {"host": "127.0.0.1", "port": STOMP_PORT, "results_queue": SERVE_RESULTS_QUEUE},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "scaling": {"policy": "reference", "end": "stop"},
    "timeouts": {"created_workflow_task": 30, "closed_workflow_task": 30, "run_end": 600},
    "prefect": {"runner_limit": 10, "server_port": SERVE_PORT},
    "metrics": {"port": 0},
}


@dataclass
class Serve:
    """One `swf-panda-workers serve` process and its state directory."""

    state: Path
    config: Path
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")
        }  # serve starts its own server
        self.process = ManagedProcess(
            "serve",
            [SERVE_COMMAND, "serve", "--config", str(self.config)],
            {**env, "PYTHONUNBUFFERED": "1"},
            self.state / "serve.out",
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{SERVE_PORT}/api"

    def start(self) -> None:
        """Start serve; return once it says it serves."""
        self.process.start()
        ready = poll_until(
            lambda: self.process.logged_since_start(b"serving namespace") or not self.process.alive,
            SERVE_WAIT,
        )
        assert ready and self.process.alive, f"serve not serving:\n{self.process.tail(60)}"

    def tree(self) -> set[tuple[int, int]]:
        """serve and every process below it, as (pid, start time) pairs: a pid
        reused later is another process."""
        assert self.process.pid is not None
        return {
            (pid, started)
            for pid in descendants(self.process.pid)
            if (started := start_time(pid)) is not None
        }

    def child_pid(self, module: str) -> int:
        assert self.process.pid is not None
        [pid] = [
            pid for pid in descendants(self.process.pid) if f"-m {module}" in command_line(pid)
        ]
        return pid

    def sigterm(self) -> float:
        """SIGTERM serve alone; return the seconds it took to exit."""
        assert self.process.process is not None
        began = time.monotonic()
        self.process.process.send_signal(signal.SIGTERM)
        code = self.process.process.wait(SERVE_WAIT)
        took = time.monotonic() - began
        assert code == 0, f"serve exited {code} on SIGTERM:\n{self.process.tail(40)}"
        self.process.reap()
        return took

    def sigkill(self) -> None:
        """SIGKILL serve alone, as the OOM killer or a supervisor giving up does."""
        assert self.process.process is not None
        self.process.process.kill()
        self.process.process.wait(SERVE_WAIT)
        self.process.reap()


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state directory for the module: its database is the one every
    start of serve must find again."""
    home = tmp_path_factory.mktemp("serve")
    config = home / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **SERVE_CONFIG,
                "prefect": {**SERVE_CONFIG["prefect"], "state_dir": str(home / "state")},
            }
        )
    )
    return config


@pytest.fixture
def serve(serve_config: Path) -> Iterator[Serve]:
    state = Path(yaml.safe_load(serve_config.read_text())["prefect"]["state_dir"])
    state.mkdir(exist_ok=True)
    made = Serve(state, serve_config)
    yield made
    made.process.stop(grace=30)


# --- test_real_rest.py: the real iDDS REST app, PanDA and the transformers ---------------


@pytest.fixture(scope="module")
def real_rest_peers(
    real_rest_stack: EmbeddedStack,
    idds_pki: GridPki,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RealPeers]:
    """The real iDDS (transceiver and REST app, one database) where the REST
    stack's runner expects it, PanDA and the transformers."""
    brokers = real_rest_stack.brokers
    with RealPeers(
        brokers,
        tmp_path_factory.mktemp("real-rest-peers"),
        namespace=REAL_REST_NAMESPACE,
        database_url=new_idds_database_url(request),
        results_destination=brokers.results_destination,
        pki=idds_pki,
        rest_port=REAL_REST_IDDS_PORT,
    ) as started:
        yield started
