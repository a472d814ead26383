"""The whole service on one machine: broker, Prefect server, runner, listener.

Used by the demo, by `swf-panda-workers serve` (without the broker, which the
testbed provides) and by the integration tests, so all three run the same
processes the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swf_panda_workers.config.loading import REPLICA_ENV, settings_from
from swf_panda_workers.config.schema import Brokers, Settings
from swf_panda_workers.service.processes import (
    ManagedProcess,
    PrefectServer,
    StartupError,
    listener_process,
    python_module,
    runner_process,
    service_env,
    wait_for_deployment,
)
from swf_testbed.launchers.activemq import ActiveMQ, stomp_answers

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # launchers, swf_testbed, testbed, the checkout


@dataclass
class EmbeddedStack:
    """``config`` is the configuration as a mapping (the YAML file's content);
    it is written to ``workdir`` for the runner and the listener."""

    workdir: Path
    config: dict[str, Any]
    prefect_port: int = 4200
    own_broker: bool = True  # start one unless something already answers STOMP
    fresh: bool = False  # wipe stored broker messages and the Prefect database
    # The Prefect server's database (postgresql+asyncpg://...); None: SQLite
    # in the server's home.
    database_url: str | None = field(default=None, repr=False)
    # Names of listener replicas to run for the namespace, each a process with
    # its own SWF_LISTENER_REPLICA; empty: one listener, without a name.
    listener_replicas: tuple[str, ...] = ()
    # Another stack's Prefect server to share (a second runner and listener,
    # e.g. in another namespace or iDDS mode), instead of starting one.
    shared_server: PrefectServer | None = None
    # For the runner (its flow runs talk to iDDS) besides the usual: the iDDS
    # client's IDDS_HOST and credentials in REST mode. The listener never
    # needs them, so never gets them.
    runner_env: dict[str, str] = field(default_factory=dict)
    # For the listener(s) besides the usual: e.g. SWF_MONITOR_URL.
    listener_env: dict[str, str] = field(default_factory=dict)
    broker: ActiveMQ | None = field(default=None, init=False)
    server: PrefectServer | None = field(default=None, init=False)
    runner: ManagedProcess | None = field(default=None, init=False)
    listener: ManagedProcess | None = field(default=None, init=False)
    replicas: dict[str, ManagedProcess] = field(default_factory=dict, init=False)

    @property
    def settings(self) -> Settings:
        return settings_from(self.config, os.environ, "embedded configuration")

    @property
    def brokers(self) -> Brokers:
        return self.settings.brokers

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return self.server.api_url

    @property
    def ui_url(self) -> str:
        assert self.server is not None
        return self.server.ui_url

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self) -> EmbeddedStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.start_broker()
        if self.shared_server is not None:
            self.server = self.shared_server
        else:
            self.server = PrefectServer(
                self.workdir / "prefect", self.prefect_port, self.database_url
            )
            if self.fresh:
                (self.workdir / "prefect" / "prefect.db").unlink(missing_ok=True)
            self.server.start()
        self.start_runner()
        if self.listener_replicas:
            for replica in self.listener_replicas:
                self.start_replica(replica)
        else:
            self.start_listener()
        return self

    def start_broker(self) -> None:
        brokers = self.brokers
        if not self.own_broker or stomp_answers(brokers.host, brokers.port):
            return
        self.broker = ActiveMQ(
            self.workdir / "activemq", stomp_port=brokers.port, openwire_port=brokers.port + 3
        )
        self.broker.start(fresh=self.fresh)

    def start_runner(self) -> None:
        env = service_env(self.api_url, self.config_path, self.runner_env)
        self.runner = runner_process(env, self.logs, PROJECT_ROOT).start()
        wait_for_deployment(self.api_url, self.settings.prefect.deployment)

    def start_listener(self, wait: float = 60.0) -> None:
        env = service_env(self.api_url, self.config_path, self.listener_env)
        self.listener = start_subscribed(listener_process(env, self.logs, PROJECT_ROOT), wait)

    def start_replica(self, replica: str, wait: float = 60.0) -> ManagedProcess:
        """Start (or start again) the listener replica ``replica``."""
        env = service_env(
            self.api_url, self.config_path, {**self.listener_env, REPLICA_ENV: replica}
        )
        process = ManagedProcess(
            f"listener-{replica}",
            python_module("listeners"),
            env,
            self.logs / f"listener-{replica}.log",
            PROJECT_ROOT,
        )
        self.replicas[replica] = start_subscribed(process, wait)
        return process

    def stop(self) -> None:
        own_server = self.server if self.server is not self.shared_server else None
        for part in (self.listener, *self.replicas.values(), self.runner, own_server, self.broker):
            if part is not None:
                part.stop()

    def __enter__(self) -> EmbeddedStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_subscribed(listener: ManagedProcess, wait: float = 60.0) -> ManagedProcess:
    """Start a listener process; return once it has subscribed (else stop it
    and raise): messages sent to a topic before that would not reach it."""
    log_path = listener.log_path
    seen = log_path.stat().st_size if log_path.exists() else 0
    listener.start()
    deadline = time.monotonic() + wait
    while b"listening for namespace" not in log_path.read_bytes()[seen:]:
        if not listener.alive:
            raise StartupError(f"{listener.name} exited:\n{listener.tail()}")
        if time.monotonic() > deadline:
            listener.stop()
            raise StartupError(f"{listener.name} not subscribed after {wait}s")
        time.sleep(0.2)
    return listener
