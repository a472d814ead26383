"""A private ActiveMQ Classic broker (Debian package ``activemq``) for the demo
and the tests: STOMP on 127.0.0.1, its own instance directory, no systemd.

Java is started directly rather than through /usr/bin/activemq, whose wrapper
forces its own options and base directory and hides the JVM's pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

JAR = Path("/usr/share/activemq/bin/activemq.jar")


class BrokerError(RuntimeError):
    pass


def stomp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """A real STOMP CONNECT -> CONNECTED round trip."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"CONNECT\naccept-version:1.2\nhost:localhost\n\n\0")
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


@dataclass
class ActiveMQ:
    """One broker instance. ``start`` is idempotent for the same directory."""

    home: Path
    stomp_port: int = 61613
    openwire_port: int = 61616
    heap: str = "256m"
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.home / "activemq.pid"

    def start(self, wait: float = 90.0, fresh: bool = False) -> None:
        ensure_installed()
        if self._alive_pid() is not None and stomp_answers("127.0.0.1", self.stomp_port):
            return
        if stomp_answers("127.0.0.1", self.stomp_port):
            raise BrokerError(f"another broker already answers STOMP on port {self.stomp_port}")
        for sub in ("conf", "data", "tmp"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(self.home / "data" / "kahadb", ignore_errors=True)
        self._write_config()
        log = (self.home / "console.log").open("ab")
        self.process = subprocess.Popen(
            self._command(), cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + wait
        while not stomp_answers("127.0.0.1", self.stomp_port):
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
            "java", "-Xms64m", f"-Xmx{self.heap}", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={h}/tmp",
            "--add-opens=java.base/java.lang=ALL-UNNAMED",
            "--add-opens=java.base/java.util=ALL-UNNAMED",
            "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
            "--add-opens=java.base/java.net=ALL-UNNAMED",
            f"-Dactivemq.classpath={h}/conf", "-Dactivemq.home=/usr/share/activemq",
            f"-Dactivemq.base={h}", f"-Dactivemq.conf={h}/conf", f"-Dactivemq.data={h}/data",
            "-jar", str(JAR), "start", f"xbean:file:{h}/conf/activemq.xml",
        ]

    def _write_config(self) -> None:
        (self.home / "conf" / "activemq.xml").write_text(
            _BROKER_XML.format(openwire=self.openwire_port, stomp=self.stomp_port))
        # Debian's ActiveMQ logs through log4j 1.2: the packaged log4j2 file is ignored.
        (self.home / "conf" / "log4j.properties").write_text(_LOG4J)


_BROKER_XML = """<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="localhost"
          useJmx="false" schedulerSupport="false" dataDirectory="${{activemq.data}}">
    <persistenceAdapter><kahaDB directory="${{activemq.data}}/kahadb"/></persistenceAdapter>
    <systemUsage><systemUsage>
      <storeUsage><storeUsage limit="1 gb"/></storeUsage>
      <tempUsage><tempUsage limit="512 mb"/></tempUsage>
    </systemUsage></systemUsage>
    <transportConnectors>
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
