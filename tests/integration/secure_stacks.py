"""The stacks of test_security.py, beside stacks.py's: a CA and the
certificates it signs (made here, nothing is committed), an ActiveMQ broker
that requires TLS with a client certificate and a login, a Prefect server
that requires an API auth string, and the whole service (runner and
listener) against those two, given its secrets through the environment and
files. Their own broker and Prefect server, on ports apart from the
session's. conftest.py imports the fixtures, so that pytest finds them;
module scope as before: each starts with the first test of test_security.py
that asks for it and stops after its last."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

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
from swf_testbed.launchers.activemq import ActiveMQ, BrokerTls
from swf_testbed.launchers.stack import PROJECT_ROOT

# Plain STOMP (login required) on PORT, STOMP over TLS on PORT + 1, OpenWire on
# PORT + 2; the Prefect server that requires an auth string on its own port.
SECURE_STOMP_PORT = int(os.environ.get("SWF_TEST_SECURE_STOMP_PORT", "61684"))
TLS_PORT = SECURE_STOMP_PORT + 1
AUTH_PREFECT_PORT = int(os.environ.get("SWF_TEST_AUTH_PREFECT_PORT", "4355"))

USER = "swf-agent"
PASSWORD = "pw-" + secrets.token_urlsafe(18)  # must never leak
AUTH_STRING = "admin:" + secrets.token_urlsafe(18)  # must never leak
SECURE_NAMESPACE = "itestsec"
SECURE_DEPLOYMENT = "swf-run/panda-workers-secure"
SECURE_CONFIG = {
    "transceiver": {"namespace": SECURE_NAMESPACE},
    # The plain port without TLS or login: the environment must override it,
    # or the services are refused.
    "brokers": {"host": "127.0.0.1", "port": SECURE_STOMP_PORT},
    "slice": {"processing_time": 0.5, "cooldown": 2},
    "timeouts": {"created_workflow_task": 30, "closed_workflow_task": 30, "run_end": 600},
    "prefect": {"deployment": SECURE_DEPLOYMENT, "runner_limit": 4},
}


# --- certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class SecurePki:
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
def secure_pki(tmp_path_factory: pytest.TempPathFactory) -> SecurePki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca("swf test CA")
    server = _leaf("broker", ca, server=True)
    client = _leaf("swf-panda-workers", ca, server=False)
    wrong_ca = _ca("some other CA")
    return SecurePki(
        ca=_write_pem(d / "ca.pem", ca[0]),
        wrong_ca=_write_pem(d / "wrong-ca.pem", wrong_ca[0]),
        server_cert=_write_pem(d / "broker.pem", server[0]),
        server_key=_write_pem(d / "broker.key", server[1]),
        client_cert=_write_pem(d / "client.pem", client[0]),
        client_key=_write_pem(d / "client.key", client[1]),
    )


# --- the secured broker and Prefect server ----------------------------------------


@pytest.fixture(scope="module")
def secure_broker(
    secure_pki: SecurePki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ActiveMQ]:
    broker = ActiveMQ(
        tmp_path_factory.mktemp("secure-activemq"),
        stomp_port=SECURE_STOMP_PORT,
        openwire_port=SECURE_STOMP_PORT + 2,
        tls=BrokerTls(
            TLS_PORT, secure_pki.server_cert, secure_pki.server_key, client_ca_file=secure_pki.ca
        ),
        users={USER: PASSWORD},
    )
    broker.start(fresh=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def tls_brokers(secure_pki: SecurePki, secure_broker: ActiveMQ) -> Brokers:
    """What the service uses: TLS, the client certificate, the login."""
    return Brokers(
        host="127.0.0.1",
        port=TLS_PORT,
        use_ssl=True,
        ssl_ca_certs=secure_pki.ca,
        ssl_cert_file=secure_pki.client_cert,
        ssl_key_file=secure_pki.client_key,
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


# --- the whole service, secrets from the environment and files ----------------------------


@dataclass
class SecureService:
    runner: ManagedProcess
    listener: ManagedProcess
    logs: Path
    env: dict[str, str]


def secret_env(pki: SecurePki, secrets_dir: Path, password: str = PASSWORD) -> dict[str, str]:
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
    secure_pki: SecurePki,
    secure_broker: ActiveMQ,
    auth_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SecureService]:
    workdir = tmp_path_factory.mktemp("secure-service")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(SECURE_CONFIG, sort_keys=False))
    (workdir / "secrets").mkdir(mode=0o700)
    env = service_env(auth_server.api_url, config, secret_env(secure_pki, workdir / "secrets"))
    logs = workdir / "logs"
    runner = runner_process(env, logs, PROJECT_ROOT).start()
    try:
        wait_for_deployment(
            auth_server.api_url, SECURE_DEPLOYMENT, wait=180, auth_string=AUTH_STRING
        )
        listener = start_listener(env, logs)
    except BaseException:
        runner.stop()
        raise
    yield SecureService(runner, listener, logs, env)
    listener.stop()
    runner.stop()
