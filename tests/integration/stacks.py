"""The integration tests' module-scoped stacks, each a fixture named for the
stack it gives, beside the session's (conftest.py): a runner and a listener
(or two) of a namespace of their own, sharing the session's broker and Prefect
server, or a server of their own. conftest.py imports them, so that pytest
finds them for every test file; module scope as before: each starts with the
first test of a file that asks for it and stops after the last."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PREFECT_PORT, STACK_CONFIG

from swf_panda_workers.service.processes import (
    ManagedProcess,
    PrefectServer,
    listener_process,
    service_env,
)
from swf_testbed.launchers.stack import PROJECT_ROOT, EmbeddedStack, start_subscribed
from swf_testbed.peers.monitor import MonitorStandIn


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
