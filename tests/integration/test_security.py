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

Its own broker and Prefect server, on ports apart from the session's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import once
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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

from swf_panda_workers.adapters.stomp_bus import (
    BusClient,
    BusRefused,
    Delivery,
    Subscription,
)
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.service.processes import (
    ManagedProcess,
    PrefectServer,
    StartupError,
    listener_process,
    runner_process,
    service_env,
    wait_for_deployment,
)
from swf_testbed.launchers.activemq import ActiveMQ, BrokerTls, stomp_answers
from swf_testbed.launchers.stack import PROJECT_ROOT
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import play_session

pytestmark = [
    pytest.mark.integration,
    once("TLS, logins and secrets; its Prefect server is its own, on SQLite"),
]

# Plain STOMP (login required) on PORT, STOMP over TLS on PORT + 1, OpenWire on
# PORT + 2; the Prefect server that requires an auth string on its own port.
SECURE_STOMP_PORT = int(os.environ.get("SWF_TEST_SECURE_STOMP_PORT", "61684"))
TLS_PORT = SECURE_STOMP_PORT + 1
AUTH_PREFECT_PORT = int(os.environ.get("SWF_TEST_AUTH_PREFECT_PORT", "4355"))

USER = "swf-agent"
PASSWORD = "pw-" + secrets.token_urlsafe(18)  # must never leak
AUTH_STRING = "admin:" + secrets.token_urlsafe(18)  # must never leak
NAMESPACE = "itestsec"
DEPLOYMENT = "swf-run/panda-workers-secure"
SERVICE_CONFIG = {
    "transceiver": {"namespace": NAMESPACE},
    # The plain port without TLS or login: the environment must override it,
    # or the services are refused.
    "brokers": {"host": "127.0.0.1", "port": SECURE_STOMP_PORT},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "timeouts": {"created_workflow_task": 30, "closed_workflow_task": 30, "run_end": 600},
    "prefect": {"deployment": DEPLOYMENT, "runner_limit": 4},
}


# --- certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    wrong_ca: Path  # a CA that signed nothing the broker has
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """Valid for a day; self-signed when ``issuer`` is None."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    return _certificate(
        common_name,
        key,
        None,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (usage, True),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        ],
    ), key


def _leaf(
    common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([purpose]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), False),
    ]
    if server:  # the names the client checks the broker's certificate against
        extensions.append(
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            )
        )
    return _certificate(common_name, key, (ca[0].subject, ca[1]), extensions), key


def _write_pem(path: Path, item: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca("swf test CA")
    server = _leaf("broker", ca, server=True)
    client = _leaf("swf-panda-workers", ca, server=False)
    wrong_ca = _ca("some other CA")
    return Pki(
        ca=_write_pem(d / "ca.pem", ca[0]),
        wrong_ca=_write_pem(d / "wrong-ca.pem", wrong_ca[0]),
        server_cert=_write_pem(d / "broker.pem", server[0]),
        server_key=_write_pem(d / "broker.key", server[1]),
        client_cert=_write_pem(d / "client.pem", client[0]),
        client_key=_write_pem(d / "client.key", client[1]),
    )


# --- the secured broker and Prefect server ----------------------------------------


@pytest.fixture(scope="module")
def secure_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQ]:
    broker = ActiveMQ(
        tmp_path_factory.mktemp("secure-activemq"),
        stomp_port=SECURE_STOMP_PORT,
        openwire_port=SECURE_STOMP_PORT + 2,
        tls=BrokerTls(TLS_PORT, pki.server_cert, pki.server_key, client_ca_file=pki.ca),
        users={USER: PASSWORD},
    )
    broker.start(fresh=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def tls_brokers(pki: Pki, secure_broker: ActiveMQ) -> Brokers:
    """What the service uses: TLS, the client certificate, the login."""
    return Brokers(
        host="127.0.0.1",
        port=TLS_PORT,
        use_ssl=True,
        ssl_ca_certs=pki.ca,
        ssl_cert_file=pki.client_cert,
        ssl_key_file=pki.client_key,
        username=USER,
        password=SecretStr(PASSWORD),
    )


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("auth-prefect"), AUTH_PREFECT_PORT)
    server.process.env["PREFECT_SERVER_API_AUTH_STRING"] = AUTH_STRING
    server.start()  # its health check is open: it needs no auth string
    yield server
    server.stop()


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
    pki: Pki, tls_brokers: Brokers, change: Any, says: str
) -> None:
    brokers = tls_brokers.model_copy(update=change(pki))
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


@dataclass
class SecureService:
    runner: ManagedProcess
    listener: ManagedProcess
    logs: Path
    env: dict[str, str]


def secret_env(pki: Pki, secrets_dir: Path, password: str = PASSWORD) -> dict[str, str]:
    """The broker settings as a deployment would pass them: TLS and paths in
    variables, the user and password in files (as mounted secrets)."""
    user_file, password_file = secrets_dir / "activemq-user", secrets_dir / "activemq-password"
    user_file.write_text(USER + "\n")
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return {
        "ACTIVEMQ_PORT": str(TLS_PORT),
        "ACTIVEMQ_USE_SSL": "true",
        "ACTIVEMQ_SSL_CA_CERTS": str(pki.ca),
        "ACTIVEMQ_SSL_CERT_FILE": str(pki.client_cert),
        "ACTIVEMQ_SSL_KEY_FILE": str(pki.client_key),
        "ACTIVEMQ_USER_FILE": str(user_file),
        "ACTIVEMQ_PASSWORD_FILE": str(password_file),
        "PREFECT_API_AUTH_STRING": AUTH_STRING,
    }


def start_listener(env: dict[str, str], logs: Path, wait: float = 120.0) -> ManagedProcess:
    listener = listener_process(env, logs, PROJECT_ROOT).start()
    log = logs / "listener.log"
    deadline = time.monotonic() + wait
    while b"listening for namespace" not in log.read_bytes():
        if not listener.alive:
            raise StartupError(f"listener exited:\n{listener.tail()}")
        if time.monotonic() > deadline:
            listener.stop()
            raise StartupError(f"listener not subscribed after {wait}s:\n{listener.tail()}")
        time.sleep(0.2)
    return listener


@pytest.fixture(scope="module")
def secure_service(
    pki: Pki,
    secure_broker: ActiveMQ,
    auth_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SecureService]:
    workdir = tmp_path_factory.mktemp("secure-service")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(SERVICE_CONFIG, sort_keys=False))
    (workdir / "secrets").mkdir(mode=0o700)
    env = service_env(auth_server.api_url, config, secret_env(pki, workdir / "secrets"))
    logs = workdir / "logs"
    runner = runner_process(env, logs, PROJECT_ROOT).start()
    try:
        wait_for_deployment(auth_server.api_url, DEPLOYMENT, wait=180, auth_string=AUTH_STRING)
        listener = start_listener(env, logs)
    except BaseException:
        runner.stop()
        raise
    yield SecureService(runner, listener, logs, env)
    listener.stop()
    runner.stop()


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
    pki: Pki,
    secure_broker: ActiveMQ,
    auth_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("refused-listener")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(SERVICE_CONFIG, sort_keys=False))
    wrong = "not-" + PASSWORD
    env = service_env(auth_server.api_url, config, secret_env(pki, workdir, password=wrong))
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
