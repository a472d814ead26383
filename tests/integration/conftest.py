"""The real parts, started once per test session on private ports: an ActiveMQ
broker (Debian's activemq), a Prefect server (SQLite), the runner serving the
run deployment, and the listener, all as separate processes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swf_panda_workers.embedded.activemq import ActiveMQ
from swf_panda_workers.embedded.stack import EmbeddedStack

STOMP_PORT = 61633  # not the default: a demo or a testbed broker may hold 61613
PREFECT_PORT = 4310
NAMESPACE = "itest"

STACK_CONFIG = {
    "transceiver": {"namespace": NAMESPACE},
    "brokers": {"host": "127.0.0.1", "port": STOMP_PORT},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "timeouts": {"created_workflow_task": 30, "closed_workflow_task": 30, "run_end": 600},
    "prefect": {"runner_limit": 10},
}

_run_numbers = itertools.count(int(time.time()) % 100_000 * 100)


@pytest.fixture
def new_run_id() -> Callable[[], str]:
    """Makes numeric run ids, as the testbed sends, never used before."""
    return lambda: str(next(_run_numbers))


@pytest.fixture
def namespace() -> str:
    return NAMESPACE


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQ]:
    activemq = ActiveMQ(tmp_path_factory.mktemp("activemq"), stomp_port=STOMP_PORT,
                        openwire_port=STOMP_PORT + 3)
    activemq.start(fresh=True)
    yield activemq
    activemq.stop()


@pytest.fixture(scope="session")
def broker_port(broker: ActiveMQ) -> int:
    return broker.stomp_port


@pytest.fixture(scope="session")
def stack(broker_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    workdir = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedStack(workdir, STACK_CONFIG, prefect_port=PREFECT_PORT, own_broker=False,
                             fresh=True)
    with embedded:
        yield embedded
    _print_logs_on_failure(embedded.logs)


def _print_logs_on_failure(logs: Path) -> None:
    # pytest shows this output only for failing sessions (captured otherwise).
    for log in sorted(logs.glob("*.log")):
        print(f"--- {log.name} (last lines)")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
