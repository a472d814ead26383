"""The real parts, started once per test session on private ports: an ActiveMQ
broker (Debian's activemq), a Prefect server, the runner serving the run
deployment, and the listener, all as separate processes.

The Prefect server's database is SQLite, or with
SWF_TEST_PREFECT_DATABASE=postgresql a private PostgreSQL cluster (Debian's
postgresql) started for the session on SWF_TEST_POSTGRES_PORT. The real
iDDS's database (tests with the real peers) follows it, unless
SWF_TEST_IDDS_DATABASE says otherwise; on PostgreSQL it is a database of its
own in the same cluster."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Generator, Iterator

import pytest

from swf_testbed.demo import SHRUNK_SCALING
from swf_testbed.launchers.activemq import ActiveMQ
from swf_testbed.launchers.postgres import PostgresCluster
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.idds_rest.server import client_env
from swf_testbed.peers.idds_rest_app import client_env as real_client_env

# Not the defaults (a demo or a testbed broker may hold 61613); overridable
# so that two test sessions can run side by side on one machine.
STOMP_PORT = int(os.environ.get("SWF_TEST_STOMP_PORT", "61633"))
PREFECT_PORT = int(os.environ.get("SWF_TEST_PREFECT_PORT", "4310"))
PREFECT_DATABASE = os.environ.get("SWF_TEST_PREFECT_DATABASE", "sqlite")
POSTGRES_PORT = int(os.environ.get("SWF_TEST_POSTGRES_PORT", "55432"))
IDDS_DATABASE = os.environ.get("SWF_TEST_IDDS_DATABASE", PREFECT_DATABASE)
NAMESPACE = "itest"

STACK_CONFIG = {
    "transceiver": {"namespace": NAMESPACE},
    "brokers": {"host": "127.0.0.1", "port": STOMP_PORT},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    # The seed's policy and its immediate stop, which these tests were written
    # for; the proportional policy and the drain have their own stack below.
    "scaling": {"policy": "reference", "end": "stop"},
    "timeouts": {"created_workflow_task": 30, "closed_workflow_task": 30, "run_end": 600},
    "prefect": {"runner_limit": 10},
    # No metrics endpoint: the stacks' listeners would all want port 9640;
    # test_observability.py opens one on a free port.
    "metrics": {"port": 0},
}

# The same service in REST mode: its own runner and listener beside the
# message-mode ones, sharing the broker and the Prefect server. Only the mode
# key, the namespace and the deployment name differ, plus short iDDS waits.
REST_NAMESPACE = "itestrest"
# the simulated iDDS REST server, started by each test
REST_IDDS_PORT = int(os.environ.get("SWF_TEST_IDDS_PORT", "18443"))
REST_TOKEN = secrets.token_urlsafe(24)  # the runner's OIDC token; must never leak
REST_CONFIG = {
    **STACK_CONFIG,
    "transceiver": {"namespace": REST_NAMESPACE, "mode": "rest"},
    "idds": {"timeout": 3, "retry_delays": [0.5, 1]},
    "prefect": {"deployment": "swf-run/panda-workers-rest", "runner_limit": 10},
}

# REST mode against the real iDDS REST app (idds-server's, served by the real
# peers over TLS with x509 proxies): a third runner and listener, whose
# idds-client holds the test PKI's operator proxy and trusts its CA. The app
# is started by each test (RealPeers with a pki), on this port.
REAL_REST_NAMESPACE = "itestrealrest"
REAL_REST_IDDS_PORT = int(os.environ.get("SWF_TEST_REAL_IDDS_PORT", str(REST_IDDS_PORT + 1)))
REAL_REST_IDLE_TIMEOUT = 30  # the real transformers' --idle_timeout: bounded if a stop is missed
REAL_REST_CONFIG = {
    **STACK_CONFIG,
    "transceiver": {"namespace": REAL_REST_NAMESPACE, "mode": "rest"},
    # The real create makes the PanDA task before it answers: more than the
    # simulator's 3 s may be needed on a busy machine.
    "idds": {"timeout": 15, "retry_delays": [0.5, 1]},
    "panda": {"idle_timeout": REAL_REST_IDLE_TIMEOUT},
    "prefect": {"deployment": "swf-run/panda-workers-real-rest", "runner_limit": 10},
}

# The proportional policy on the demo's time scale (seconds where the testbed
# has minutes), with its own namespace, results queue and deployment.
SCALING_NAMESPACE = "itestscale"
SCALING_CONFIG = {
    **STACK_CONFIG,
    "transceiver": {"namespace": SCALING_NAMESPACE},
    "slice": {"cooldown": 2},
    "scaling": SHRUNK_SCALING,
    "prefect": {"deployment": "swf-run/panda-workers-scaling", "runner_limit": 10},
}


def once(reason: str) -> pytest.MarkDecorator:
    """Skipped in CI's second pass (the Prefect server on PostgreSQL): for a
    test whose outcome the Prefect server's database has no part in, run
    once, in the first pass; ``reason`` says why."""
    return pytest.mark.skipif(
        PREFECT_DATABASE != "sqlite", reason=f"run once, in the SQLite pass: {reason}"
    )


_run_numbers = itertools.count(int(time.time()) % 100_000 * 100)
_idds_databases = itertools.count(1)


@pytest.fixture
def new_run_id() -> Callable[[], str]:
    """Makes numeric run ids, as the testbed sends, never used before."""
    return lambda: str(next(_run_numbers))


@pytest.fixture
def namespace() -> str:
    return NAMESPACE


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQ]:
    activemq = ActiveMQ(
        tmp_path_factory.mktemp("activemq"), stomp_port=STOMP_PORT, openwire_port=STOMP_PORT + 3
    )
    activemq.start(fresh=True)
    yield activemq
    activemq.stop()


@pytest.fixture(scope="session")
def broker_port(broker: ActiveMQ) -> int:
    return broker.stomp_port


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's private PostgreSQL cluster, made on first use."""
    with PostgresCluster(port=POSTGRES_PORT) as cluster:
        yield cluster


def _database_kind(variable: str, value: str) -> str:
    if value not in ("sqlite", "postgresql"):
        raise pytest.UsageError(f"{variable}={value!r}: use sqlite or postgresql")
    return value


@pytest.fixture(scope="session")
def prefect_database_url(request: pytest.FixtureRequest) -> str | None:
    """The session's Prefect database: None for SQLite (in the server's home),
    else the URL of the session's PostgreSQL cluster."""
    if _database_kind("SWF_TEST_PREFECT_DATABASE", PREFECT_DATABASE) == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.url


@pytest.fixture
def idds_database_url(request: pytest.FixtureRequest) -> str | None:
    """A fresh database for one real iDDS: None for SQLite (iDDS's file in
    its work directory), else a new database in the session's cluster."""
    return new_idds_database_url(request)


def new_idds_database_url(request: pytest.FixtureRequest) -> str | None:
    """idds_database_url, for fixtures of any scope."""
    if _database_kind("SWF_TEST_IDDS_DATABASE", IDDS_DATABASE) == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    name = cluster.create_database(f"idds_{next(_idds_databases)}")
    return cluster.database_url(name, scheme="postgresql")  # iDDS picks psycopg2 itself


@pytest.fixture(scope="session")
def stack(
    broker_port: int, prefect_database_url: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    workdir = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedStack(
        workdir,
        STACK_CONFIG,
        prefect_port=PREFECT_PORT,
        own_broker=False,
        fresh=True,
        database_url=prefect_database_url,
    )
    with embedded:
        yield embedded


@pytest.fixture
def rest_token() -> str:
    """The OIDC token the REST-mode runner holds."""
    return REST_TOKEN


@pytest.fixture
def rest_idds_port() -> int:
    """Where the REST-mode runner expects the (simulated) iDDS REST server."""
    return REST_IDDS_PORT


@pytest.fixture(scope="session")
def rest_stack(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    workdir = tmp_path_factory.mktemp("rest-stack")
    idds_client_env = client_env(REST_IDDS_PORT, REST_TOKEN, workdir / "idds-client")
    embedded = EmbeddedStack(
        workdir,
        REST_CONFIG,
        own_broker=False,
        shared_server=stack.server,
        runner_env=idds_client_env,
    )
    with embedded:
        yield embedded


@pytest.fixture(scope="session")
def idds_pki(tmp_path_factory: pytest.TempPathFactory) -> GridPki:
    """The session's grid PKI: the real iDDS REST app's host certificate, the
    operator's proxy (the REST runner's) and the PanDA server's."""
    return GridPki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def real_rest_stack(
    stack: EmbeddedStack, idds_pki: GridPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """The service in REST mode for the real iDDS REST app on REAL_REST_IDDS_PORT."""
    workdir = tmp_path_factory.mktemp("real-rest-stack")
    idds_client_env = real_client_env(
        f"https://127.0.0.1:{REAL_REST_IDDS_PORT}/idds",
        idds_pki.user,
        idds_pki.ca,
        workdir / "idds-client",
    )
    embedded = EmbeddedStack(
        workdir,
        REAL_REST_CONFIG,
        own_broker=False,
        shared_server=stack.server,
        runner_env=idds_client_env,
    )
    with embedded:
        yield embedded


@pytest.fixture(scope="session")
def scaling_stack(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """A runner and listener with the proportional policy, beside the others."""
    embedded = EmbeddedStack(
        tmp_path_factory.mktemp("scaling-stack"),
        SCALING_CONFIG,
        own_broker=False,
        shared_server=stack.server,
    )
    with embedded:
        yield embedded


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the last lines of the service's logs."""
    report = yield
    if not report.failed:
        return report
    for fixture in (
        "stack",
        "rest_stack",
        "real_rest_stack",
        "scaling_stack",
        "replica_stack",
        "monitor_stack",
    ):
        stack = getattr(item, "funcargs", {}).get(fixture)
        if isinstance(stack, EmbeddedStack):
            for log in sorted(stack.logs.glob("*.log")):
                tail = "\n".join(_interesting(log.read_text(errors="replace").splitlines())[-60:])
                report.sections.append((f"{fixture} log {log.name}", tail))
    return report


def _interesting(lines: list[str]) -> list[str]:
    return [line for line in lines if "HTTP Request:" not in line]


# The other stacks, here so that pytest finds them for every file; imported
# last, as stacks.py reads this module's configuration.
from secure_stacks import (  # noqa: E402
    auth_server,
    secure_broker,
    secure_pki,
    secure_service,
    tls_brokers,
)
from stacks import (  # noqa: E402
    deployed,
    fault_stack,
    metrics_port,
    monitor,
    monitor_stack,
    observed_stack,
    real_rest_peers,
    replica_stack,
    serve,
    serve_config,
    subprocess_stack,
    topic_stacks,
)

__all__ = [
    "auth_server",
    "deployed",
    "fault_stack",
    "metrics_port",
    "monitor",
    "monitor_stack",
    "observed_stack",
    "real_rest_peers",
    "replica_stack",
    "secure_broker",
    "secure_pki",
    "secure_service",
    "serve",
    "serve_config",
    "subprocess_stack",
    "tls_brokers",
    "topic_stacks",
]
