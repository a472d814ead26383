"""The real parts, started once per test session on private ports: an ActiveMQ
broker (Debian's activemq), a Prefect server (SQLite), the runner serving the
run deployment, and the listener, all as separate processes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator, Iterator

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the last lines of the service's logs."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, EmbeddedStack):
        for log in sorted(stack.logs.glob("*.log")):
            tail = "\n".join(_interesting(log.read_text(errors="replace").splitlines())[-60:])
            report.sections.append((f"service log {log.name}", tail))
    return report


def _interesting(lines: list[str]) -> list[str]:
    return [line for line in lines if "HTTP Request:" not in line]
