"""A private ActiveMQ Classic broker (Debian package ``activemq``) for the demo
and the tests: STOMP on 127.0.0.1, its own instance directory, no systemd.

Optionally (``tls``) a ``stomp+ssl`` connector too, whose keystore is made
from a PEM certificate and key (and, to require client certificates, a
truststore from a PEM CA); and (``users``) the simpleAuthenticationPlugin, so
every connection must log in. Both are what the security tests need to
exercise the service's TLS and credential settings against the real broker.

Java is started directly rather than through /usr/bin/activemq, whose wrapper
forces its own options and base directory and hides the JVM's pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from swf_panda_workers.service.processes import end_group, launch

JAR = Path("/usr/share/activemq/bin/activemq.jar")


class BrokerError(RuntimeError):
    pass


def stomp_answers(
    host: str,
    port: int,
    timeout: float = 2.0,
    login: str | None = None,
    passcode: str | None = None,
) -> bool:
    """A real STOMP CONNECT -> CONNECTED round trip (logged in, when the
    broker requires it: it answers an anonymous CONNECT with ERROR)."""
    frame = "CONNECT\naccept-version:1.2\nhost:localhost\n"
    if login is not None:  # CONNECT headers are not escaped (STOMP 1.2, for 1.0 brokers)
        frame += f"login:{login}\npasscode:{passcode or ''}\n"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(frame.encode() + b"\n\0")
            reply = sock.recv(64)
            sock.sendall(b"DISCONNECT\n\n\0")
            return reply.startswith(b"CONNECTED")
    except OSError:
        return False


def ensure_installed() -> None:
    if JAR.exists() and shutil.which("java"):
        return
    raise BrokerError(
        "ActiveMQ is not installed: run `apt-get install -y --no-install-recommends activemq` "
        "(scripts/bootstrap.sh does it for you)"
    )


@dataclass(frozen=True)
class BrokerTls:
    """A ``stomp+ssl`` connector on ``port``: the broker presents ``cert_file``
    (PEM, the leaf first, then any intermediates) with ``key_file`` (PEM,
    unencrypted). With ``client_ca_file`` (PEM) it requires client
    certificates signed by that CA."""

    port: int
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass
class ActiveMQ:
    """One broker instance. ``start`` is idempotent for the same directory.

    ``users`` (name -> password), when given, are the only logins accepted on
    every connector; anonymous connections are refused."""

    home: Path
    stomp_port: int = 61613
    openwire_port: int = 61616
    heap: str = "256m"
    process: subprocess.Popen[bytes] | None = None
    tls: BrokerTls | None = None
    users: Mapping[str, str] = field(default_factory=dict)

    def answers(self) -> bool:
        """Plain STOMP logs in (as the first user, if any) and, with TLS, the
        TLS connector accepts connections."""
        login, passcode = next(iter(self.users.items()), (None, None))
        if not stomp_answers("127.0.0.1", self.stomp_port, login=login, passcode=passcode):
            return False
        if self.tls is None:
            return True
        try:
            with socket.create_connection(("127.0.0.1", self.tls.port), timeout=2.0):
                return True
        except OSError:
            return False

    @property
    def pid_file(self) -> Path:
        return self.home / "activemq.pid"

    def start(self, wait: float = 90.0, fresh: bool = False) -> None:
        ensure_installed()
        if self._alive_pid() is not None and self.answers():
            return
        if stomp_answers("127.0.0.1", self.stomp_port):
            raise BrokerError(f"another broker already answers STOMP on port {self.stomp_port}")
        for sub in ("conf", "data", "tmp"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(self.home / "data" / "kahadb", ignore_errors=True)
        self._write_config()
        with (self.home / "console.log").open("ab") as log:
            # Ends with this process, however it ends (processes.launch).
            self.process = launch(
                self._command(),
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + wait
        while not self.answers():
            if self.process.poll() is not None:
                raise BrokerError(f"ActiveMQ exited while starting; see {self.home}/console.log")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"ActiveMQ not ready after {wait}s; see {self.home}/console.log")
            time.sleep(0.2)

    def stop(self, grace: float = 20.0) -> None:
        pid = self._alive_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=5)
            end_group(self.process)
        self.pid_file.unlink(missing_ok=True)

    def _alive_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if self._pid_alive(pid) else None

    def _pid_alive(self, pid: int) -> bool:
        if self.process is not None and self.process.pid == pid:
            return self.process.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"activemq.jar" in cmdline

    def _command(self) -> list[str]:
        h = self.home
        return [
            "java",
            "-Xms64m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={h}/tmp",
            "--add-opens=java.base/java.lang=ALL-UNNAMED",
            "--add-opens=java.base/java.util=ALL-UNNAMED",
            "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
            "--add-opens=java.base/java.net=ALL-UNNAMED",
            f"-Dactivemq.classpath={h}/conf",
            "-Dactivemq.home=/usr/share/activemq",
            f"-Dactivemq.base={h}",
            f"-Dactivemq.conf={h}/conf",
            f"-Dactivemq.data={h}/data",
            "-jar",
            str(JAR),
            "start",
            f"xbean:file:{h}/conf/activemq.xml",
        ]

    def _write_config(self) -> None:
        conf = self.home / "conf"
        ssl_context, ssl_connector = ("", "")
        if self.tls is not None:
            ssl_context, ssl_connector = self._tls_config(conf)
        config = _BROKER_XML.format(
            openwire=self.openwire_port,
            stomp=self.stomp_port,
            ssl_context=ssl_context,
            ssl_connector=ssl_connector,
            plugins=self._auth_plugin(),
        )
        # It holds the broker's own secrets (users, store passwords).
        _write_private(conf / "activemq.xml", config.encode())
        # Debian's ActiveMQ logs through log4j 1.2: the packaged log4j2 file is ignored.
        (conf / "log4j.properties").write_text(_LOG4J)

    def _tls_config(self, conf: Path) -> tuple[str, str]:
        """The <sslContext> and the stomp+ssl connector; makes the stores."""
        assert self.tls is not None
        password = secrets.token_urlsafe(18)  # fresh each start; only the XML holds it
        keystore = conf / "broker-keystore.p12"
        _write_keystore(keystore, self.tls.cert_file, self.tls.key_file, password)
        context = (
            f'keyStore={quoteattr("file:" + str(keystore))} keyStoreType="pkcs12" '
            f"keyStorePassword={quoteattr(password)}"
        )
        options = "transport.closeAsync=false"
        if self.tls.client_ca_file is not None:
            truststore = conf / "broker-truststore.p12"
            _write_truststore(truststore, self.tls.client_ca_file, password)
            context += (
                f" trustStore={quoteattr('file:' + str(truststore))} "
                f'trustStoreType="pkcs12" trustStorePassword={quoteattr(password)}'
            )
            options += "&amp;transport.needClientAuth=true"
        return (
            f"<sslContext><sslContext {context}/></sslContext>",
            # Before the plain connector: connectors start in order, so once
            # plain STOMP answers, TLS is listening too.
            f'<transportConnector name="stomp+ssl" '
            f'uri="stomp+ssl://127.0.0.1:{self.tls.port}?{options}"/>',
        )

    def _auth_plugin(self) -> str:
        if not self.users:
            return ""
        for name, password in self.users.items():
            # Spring's placeholder configurer would expand these in the XML.
            if "${" in name or "${" in password:
                raise BrokerError("broker user names and passwords must not contain '${'")
        users = "".join(
            f"<authenticationUser username={quoteattr(name)} password={quoteattr(password)} "
            'groups="users"/>'
            for name, password in self.users.items()
        )
        return (
            '<plugins><simpleAuthenticationPlugin anonymousAccessAllowed="false">'
            f"<users>{users}</users></simpleAuthenticationPlugin></plugins>"
        )


def _write_keystore(path: Path, cert_file: Path, key_file: Path, password: str) -> None:
    """A PKCS#12 keystore of the PEM key and certificate chain, for Java."""
    # cryptography comes with Prefect; imported here as only TLS brokers need it.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        load_pem_private_key,
        pkcs12,
    )

    chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    key = load_pem_private_key(key_file.read_bytes(), password=None)
    _write_private(
        path,
        pkcs12.serialize_key_and_certificates(
            b"broker",
            key,  # type: ignore[arg-type]
            chain[0],
            chain[1:] or None,
            BestAvailableEncryption(password.encode()),
        ),
    )


def _write_private(path: Path, content: bytes) -> None:
    """Write a file only its owner can read, from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)


def _write_truststore(path: Path, ca_file: Path, password: str) -> None:
    """A PKCS#12 truststore holding the CA, made by keytool: Java trusts only
    certificates marked as trusted entries, which only its own tool writes."""
    path.unlink(missing_ok=True)
    keytool = shutil.which("keytool")
    if keytool is None:
        raise BrokerError(
            "keytool (from the Java runtime) is needed to require client certificates"
        )
    result = subprocess.run(
        [
            keytool,
            "-importcert",
            "-noprompt",
            "-alias",
            "client-ca",
            "-file",
            str(ca_file),
            "-keystore",
            str(path),
            "-storetype",
            "PKCS12",
            "-storepass:env",
            "SWF_STOREPASS",
        ],
        env={**os.environ, "SWF_STOREPASS": password},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BrokerError(f"keytool could not import {ca_file}: {result.stdout}{result.stderr}")


_BROKER_XML = """<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="localhost"
          useJmx="false" schedulerSupport="false" dataDirectory="${{activemq.data}}">
    {plugins}
    {ssl_context}
    <persistenceAdapter><kahaDB directory="${{activemq.data}}/kahadb"/></persistenceAdapter>
    <systemUsage><systemUsage>
      <storeUsage><storeUsage limit="1 gb"/></storeUsage>
      <tempUsage><tempUsage limit="512 mb"/></tempUsage>
    </systemUsage></systemUsage>
    <transportConnectors>
      {ssl_connector}
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp}?transport.closeAsync=false"/>
    </transportConnectors>
  </broker>
</beans>
"""

_LOG4J = """log4j.rootLogger=INFO, logfile
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.logfile=org.apache.log4j.RollingFileAppender
log4j.appender.logfile.file=${activemq.data}/activemq.log
log4j.appender.logfile.maxFileSize=1024KB
log4j.appender.logfile.maxBackupIndex=2
log4j.appender.logfile.layout=org.apache.log4j.PatternLayout
log4j.appender.logfile.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
"""
