"""Security against the real parts.

- STOMP over TLS to ActiveMQ's ``stomp+ssl`` connector, with a CA, a broker
  certificate and a client certificate made here (nothing is committed); the
  broker requires both the client certificate and a login.
- Refusals (an untrusted broker, no client certificate, a wrong password, an
  unreadable CA file) end ``BusClient.start`` with ``BusRefused`` and the
  reason, not with a timeout.
- A Prefect server that requires an API auth string refuses clients without it.
- The whole service (runner, listener, flow runs) against those two, given
  every secret through the environment or files the environment names, plays
  a run end to end; no secret shows in a log, a flow run's parameters or
  Prefect's database.

Its own broker and Prefect server, on ports apart from the session's
(secure_stacks.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import once
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect_reads import final_flow_run
from process_reads import connected_ports
from pydantic import SecretStr
from secure_stacks import (
    AUTH_STRING,
    PASSWORD,
    SECURE_CONFIG,
    SECURE_NAMESPACE,
    SECURE_STOMP_PORT,
    TLS_PORT,
    USER,
    SecurePki,
    SecureService,
    secret_env,
)

from swf_panda_workers.adapters.stomp_bus import (
    BusClient,
    BusRefused,
    Delivery,
    Subscription,
)
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.service.processes import PrefectServer, listener_process, service_env
from swf_testbed.launchers.activemq import ActiveMQ, stomp_answers
from swf_testbed.launchers.stack import PROJECT_ROOT
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session

pytestmark = [
    pytest.mark.integration,
    once("TLS, logins and secrets; its Prefect server is its own, on SQLite"),
]

NAMESPACE = SECURE_NAMESPACE  # secure_service's (secure_stacks.py)


# --- TLS and login, with BusClient -------------------------------------------------


def test_a_message_round_trips_over_tls_with_a_client_certificate_and_login(
    tls_brokers: Brokers,
) -> None:
    queue = f"/queue/swf.security.{uuid.uuid4().hex}"
    received: list[Delivery] = []
    arrived = threading.Event()

    def keep(delivery: Delivery) -> None:
        received.append(delivery)
        arrived.set()

    with BusClient(
        tls_brokers, (Subscription(queue, ack="auto"),), keep, name="security-test"
    ) as bus:
        bus.send_raw(queue, b'{"over": "tls"}', {"persistent": "true"})
        assert arrived.wait(30), "the message did not come back"

    assert [d.body for d in received] == [b'{"over": "tls"}']
    # That port speaks only TLS (so the round trip was encrypted), and the
    # broker's plain port wants the login (so the login was checked).
    assert not stomp_answers("127.0.0.1", TLS_PORT, login=USER, passcode=PASSWORD)
    assert not stomp_answers("127.0.0.1", SECURE_STOMP_PORT)
    assert stomp_answers("127.0.0.1", SECURE_STOMP_PORT, login=USER, passcode=PASSWORD)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda p: {"ssl_ca_certs": p.wrong_ca},
            r"failed TLS: its certificate failed verification against the CAs in .*wrong-ca\.pem",
        ),
        (
            lambda p: {"ssl_ca_certs": None},  # the system's CAs do not know our test CA
            r"failed TLS: its certificate failed verification against the system's CAs",
        ),
        (
            lambda p: {"ssl_cert_file": None, "ssl_key_file": None},
            r"failed TLS: it refused our client certificate",
        ),
        (
            lambda p: {"password": SecretStr("not-" + PASSWORD)},
            r"refused the login: User name \[swf-agent\] or password is invalid",
        ),
        (
            lambda p: {"username": None, "password": None},
            r"refused the login: User name \[null\] or password is invalid",
        ),
        (
            lambda p: {"ssl_ca_certs": p.ca.with_name("absent.pem")},
            r"brokers\.ssl_ca_certs: cannot read .*absent\.pem: No such file",
        ),
    ],
    ids=[
        "wrong-ca",
        "system-cas",
        "no-client-cert",
        "wrong-password",
        "no-login",
        "missing-ca-file",
    ],
)
def test_a_refusal_ends_start_at_once_with_its_reason(
    secure_pki: SecurePki, tls_brokers: Brokers, change: Any, says: str
) -> None:
    brokers = tls_brokers.model_copy(update=change(secure_pki))
    client = BusClient(brokers, name="security-test")

    # Retrying would end in BusUnavailable when the timeout is up: BusRefused
    # comes only from recognising the refusal, on the first attempt.
    with pytest.raises(BusRefused, match=says) as caught:
        client.start(timeout=120)
    client.stop()

    assert PASSWORD not in str(caught.value)


def test_a_client_id_still_connected_is_retried_then_named(
    tls_brokers: Brokers, caplog: pytest.LogCaptureFixture
) -> None:
    """ActiveMQ refuses a client-id still in use (a listener restarted before
    the broker dropped its old connection, or a second listener of the same
    name): it is retried until the start's deadline, not taken for a refusal
    at once, then refused with the id and what to do."""
    client_id = f"swf-security-{uuid.uuid4().hex}"
    with BusClient(tls_brokers, name="first", client_id=client_id):
        second = BusClient(tls_brokers, name="second", client_id=client_id)
        with (
            caplog.at_level(logging.WARNING, logger="swf_panda_workers.adapters.stomp_bus"),
            pytest.raises(
                BusRefused,
                match=f"refuses client-id {client_id}: another "
                "connection holds it .*already connected.*SWF_LISTENER_REPLICA",
            ),
        ):
            second.start(timeout=3)
        second.stop()

    # Retried, not refused at once: a start begun while the id is held
    # connects once the holder lets go. The log says only when its first
    # attempt was refused, so that the holder lets go after it.
    def refused_once() -> bool:
        return any(f"refuses client-id {client_id}" in r.message for r in caplog.records)

    caplog.clear()
    first = BusClient(tls_brokers, name="first", client_id=client_id)
    first.start(timeout=30)
    third = BusClient(tls_brokers, name="third", client_id=client_id)
    failures: list[BaseException] = []

    def start_third() -> None:
        try:
            third.start(timeout=120)
        except BaseException as exc:  # re-raised as a failure by the test, below
            failures.append(exc)

    with caplog.at_level(logging.WARNING, logger="swf_panda_workers.adapters.stomp_bus"):
        starting = threading.Thread(target=start_third, name="third-start")
        starting.start()
        try:
            deadline = time.monotonic() + 60
            while not refused_once() and starting.is_alive():
                assert time.monotonic() < deadline, "the held client-id was never refused"
                time.sleep(0.1)
        finally:
            first.stop()
        starting.join(150)
    try:
        assert not failures, failures
        assert third.connected.is_set()
    finally:
        third.stop()


# --- the Prefect API auth string ------------------------------------------------------


def test_the_prefect_server_refuses_clients_without_its_auth_string(
    auth_server: PrefectServer,
) -> None:
    async def read_flows(auth_string: str | None) -> int:
        with temporary_settings(
            {PREFECT_API_URL: auth_server.api_url, PREFECT_API_AUTH_STRING: auth_string}
        ):
            async with get_client() as client:
                return len(await client.read_flows())

    for wrong in (None, "admin:guess"):
        with pytest.raises(httpx.HTTPStatusError) as caught:
            asyncio.run(read_flows(wrong))
        assert caught.value.response.status_code == 401
    assert asyncio.run(read_flows(AUTH_STRING)) >= 0


# --- the whole service, secrets from the environment and files ----------------------------


def test_a_run_end_to_end_over_tls_with_secrets_from_the_environment_and_files(
    secure_service: SecureService,
    tls_brokers: Brokers,
    auth_server: PrefectServer,
) -> None:
    run_id = str(int(time.time() * 1000) % 10**12)
    with PeerHarness(tls_brokers, NAMESPACE, slices_per_run=10, idle_timeout=3) as peers:
        session = play_session(peers, [run_id], "testbed", 10, wait=120)
        counts = {
            t: peers.recorder.count(t, run_id)
            for t in ("create_workflow_task", "stop_transformer", "close_workflow_task")
        }

    assert session.ok, f"session did not complete: {session}"
    assert counts == {"create_workflow_task": 1, "stop_transformer": 1, "close_workflow_task": 1}
    flow_run = asyncio.run(
        final_flow_run(auth_server.api_url, NAMESPACE, run_id, wait=120, auth_string=AUTH_STRING)
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    # The listener reached the broker where the environment said: on the TLS
    # port, not on the configuration's plain one (which takes the same login).
    assert secure_service.listener.pid is not None
    ports = connected_ports(secure_service.listener.pid)
    assert TLS_PORT in ports and SECURE_STOMP_PORT not in ports, ports

    parameters, logs = asyncio.run(parameters_and_logs(auth_server.api_url, flow_run))
    # The run's flow run gets the announcement and where it came from; its
    # scaling sub-flow those, the iDDS ids and dry_run: no settings, no credentials.
    run_keys = {"run_id", "namespace", "announcement", "received_at"}
    assert set(parameters[flow_run.id]) == run_keys
    assert len(parameters) == 2, "no scaling sub-flow found"
    assert all(set(p) <= run_keys | {"ids", "dry_run"} for p in parameters.values()), parameters
    assert logs, "no flow-run logs read back: the checks below would prove nothing"
    for secret in (PASSWORD, AUTH_STRING):
        assert secret not in repr(parameters)
        assert not [line for line in logs if secret in line]
        for path in (*secure_service.logs.glob("*.log"), *prefect_files(auth_server, run_id)):
            assert secret.encode() not in path.read_bytes(), path


def test_the_listener_stops_with_the_reason_when_the_broker_refuses_its_login(
    secure_pki: SecurePki,
    secure_broker: ActiveMQ,
    auth_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("refused-listener")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(SECURE_CONFIG, sort_keys=False))
    wrong = "not-" + PASSWORD
    env = service_env(auth_server.api_url, config, secret_env(secure_pki, workdir, password=wrong))
    listener = listener_process(env, workdir / "logs", PROJECT_ROOT).start()
    try:
        assert listener.process is not None
        listener.process.wait(timeout=180)  # exits by itself: no retrying forever
    finally:
        listener.stop()

    log = (workdir / "logs" / "listener.log").read_text(errors="replace")
    assert listener.process.returncode != 0
    # Kept on the log: the reason for the operator is written there and
    # nowhere else (the exit status says only that it failed).
    assert (
        f"BusRefused: the broker 127.0.0.1:{TLS_PORT} refused the login: "
        f"User name [{USER}] or password is invalid"
    ) in log, log[-3000:]
    assert wrong not in log and PASSWORD not in log and AUTH_STRING not in log


# --- reading back from Prefect -------------------------------------------------------


def prefect_files(server: PrefectServer, run_id: str) -> list[Path]:
    """Everything the server keeps: its database (with WAL) and its log;
    checked to hold the run, so a search of them means something."""
    files = [p for p in server.home.rglob("*") if p.is_file()]
    database = [p for p in files if p.name.startswith("prefect.db")]
    assert any(f"run-{run_id}".encode() in p.read_bytes() for p in database), files
    return files


async def parameters_and_logs(
    api_url: str, flow_run: FlowRun
) -> tuple[dict[uuid.UUID, dict[str, Any]], list[str]]:
    """The parameters of the run's flow run and its sub-flows, and their logs."""
    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: AUTH_STRING}):
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])
                )
            )
            ids = [flow_run.id, *(c.id for c in children)]
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200
            )
    return {r.id: r.parameters for r in runs}, [log.message for log in logs]
