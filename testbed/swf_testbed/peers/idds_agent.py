"""The real iDDS prompt transceiver (idds-server 2.6.21's
``idds.agents.prompt.transceiver``), run as a process in the real peers'
interpreter, on its own database built by its own code.

``IddsTransceiver.start()`` writes iDDS's configuration (found through
``IDDS_CONFIG``) and a copy of its alembic.ini (``ALEMBIC_CONFIG``), builds
the database with ``idds.orm.base.utils.build_database()``, starts the agent
(``idds/agents/main.py`` with ``IDDS_AGENTS=transceiver``, what its
``run-idds`` script runs), and returns once each of its ``num_threads``
workers is subscribed to the workers topic: it waits for each worker's
"Subscribed to" log line, then sends a probe (a ``stop_transformer`` naming
a run of its own, a type iDDS does not handle, and which the service's
listener ignores as a request to another peer), again each second under a
new name (a probe before the broker registered the subscription is lost),
until every worker has logged one as unknown. A worker subscribes about a second after
the one before it (the agent's main loop submits one per second).

Only PanDA's task submission is not real: panda-client goes to
``panda_env``'s PanDA server (``PandaServerStandIn``).

The database is SQLite in the work directory, or a PostgreSQL URL
(``postgresql://user:password@host:port/database``; iDDS uses psycopg2 for
it). ``database`` reads back what iDDS wrote, through iDDS's own code.
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swf_panda_workers.config.schema import Brokers
from swf_testbed.peers._bus import PeerBus
from swf_testbed.peers._child_processes import ChildLauncher, PeerProcess, stop_process
from swf_testbed.peers.peers_venv import IDDS_SCRIPT, peer_env, peers_python

log = logging.getLogger(__name__)

SLICES_QUEUE = "/queue/panda.transformer.slices"  # iDDS's sample configuration
RESULTS_QUEUE = "/queue/panda.results.worker"  # the seed's; /topic/panda.results also works
SUBSCRIBED = "Subscribed to {destination} with selector"  # the agent's log line, per worker
UNKNOWN_TYPE = "Unknown msg_type from worker: {msg_type}, run_id={run_id}"
PROBE_TYPE = "stop_transformer"
PROBE_EVERY = 1.0  # s between probes, until one is handled by every worker
SCHEMA = "doma_idds"  # iDDS's production schema's name, in the case its SQL folds it to


class IddsFailed(RuntimeError):
    """iDDS did not build its database or did not start; the message quotes its log."""


@dataclass(frozen=True)
class BrokerAddress:
    """One broker setting of iDDS's ``[prompt]`` section."""

    host: str
    port: int
    destination: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: int = 10  # broker_timeout

    def as_config(self) -> dict[str, Any]:
        """As iDDS's configuration (and its meta info) spells it."""
        return {
            "broker": f"{self.host}:{self.port}",
            "destination": self.destination,
            "username": self.username,
            "password": self.password,
            "broker_timeout": self.timeout,
        }


@dataclass(frozen=True)
class PromptBrokers:
    """Where iDDS listens and answers (``workers``: its
    worker_subscriber_broker and worker_publisher_broker), and what it tells
    the transformers (its meta info ``prompt_broker``): slices from
    ``slices``, ``stop_transformer`` on ``broadcast``, results to ``results``."""

    workers: BrokerAddress
    slices: BrokerAddress
    broadcast: BrokerAddress
    results: BrokerAddress

    @classmethod
    def on(
        cls,
        brokers: Brokers,
        *,
        slices: str = SLICES_QUEUE,
        results: str = RESULTS_QUEUE,
        timeout: int = 10,
    ) -> PromptBrokers:
        """All four on the service's broker, with its login; the workers and
        broadcast topics as the service has them."""
        password = brokers.password.get_secret_value() if brokers.password else None

        def at(destination: str) -> BrokerAddress:
            return BrokerAddress(
                brokers.host, brokers.port, destination, brokers.username, password, timeout
            )

        return cls(
            at(brokers.workers_topic), at(slices), at(brokers.transformer_topic), at(results)
        )

    def metainfo(self) -> dict[str, Any]:
        """What iDDS's REST API answers for meta info ``prompt_broker``
        (``get_prompt_broker_config()`` plus the active ejfat items: none)."""
        return {
            "transformer_broker": self.slices.as_config(),
            "transformer_broadcast_broker": self.broadcast.as_config(),
            "result_broker": self.results.as_config(),
            "ejfat": {},
        }


def database_schema(database_url: str) -> str | None:
    """The schema iDDS's tables go in: none on SQLite; on PostgreSQL one is
    needed (iDDS's stored procedures name it), lower case because iDDS's SQL
    writes it unquoted."""
    return None if database_url.startswith("sqlite") else SCHEMA


def idds_config(
    database_url: str,
    namespace: str | None,
    num_threads: int,
    brokers: PromptBrokers,
    logdir: Path,
    log_level: str = "INFO",
    timetolive_ms: int = 43_200_000,
) -> str:
    """iDDS's configuration file for the transceiver alone. The transformer
    brokers are written too, where iDDS's REST API would read them."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, not {num_threads}")
    prompt: dict[str, str] = {
        "num_threads": str(num_threads),
        "timetolive": str(timetolive_ms),
        "worker_subscriber_broker": json.dumps(brokers.workers.as_config()),
        "worker_publisher_broker": json.dumps(brokers.workers.as_config()),
        "transformer_broker": json.dumps(brokers.slices.as_config()),
        "transformer_broadcast_broker": json.dumps(brokers.broadcast.as_config()),
        "result_broker": json.dumps(brokers.results.as_config()),
    }
    if namespace:
        prompt = {"namespace": namespace, **prompt}
    database = {
        "default": database_url,
        "pool_size": "10",
        "pool_recycle": "3600",
        "echo": "0",
        "pool_reset_on_return": "rollback",
    }
    schema = database_schema(database_url)
    if schema:
        database["schema"] = schema
    sections = {
        # logdir: where the agent writes its availability file (else /var/log/idds).
        "common": {"loglevel": log_level, "logdir": str(logdir)},
        "database": database,
        "main": {"agents": "transceiver"},
        "prompt": prompt,
    }
    return _ini(sections)


def alembic_config(template: str, database_url: str) -> str:
    """iDDS's alembic.ini with our database, and its version table in iDDS's
    schema (none on SQLite), not the template's DOMA_IDDS."""
    schema = database_schema(database_url)
    lines = []
    for line in template.splitlines():
        if re.match(r"\s*version_table_schema\s*=", line):
            if schema is None:
                continue
            line = f"version_table_schema = {schema}"
        if re.match(r"\s*sqlalchemy\.url\s*=", line):
            line = f"sqlalchemy.url = {_escaped(_alembic_url(database_url))}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _alembic_url(database_url: str) -> str:
    # As iDDS's own engine (orm/base/session.py): psycopg2 for a bare postgresql://.
    if database_url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + database_url[len("postgresql://") :]
    return database_url


def _escaped(value: str) -> str:
    # Both iDDS and alembic read with ConfigParser's interpolation.
    return value.replace("%", "%%")


def _ini(sections: Mapping[str, Mapping[str, str]]) -> str:
    parser = configparser.RawConfigParser()
    for name, options in sections.items():
        parser[name] = {key: _escaped(value) for key, value in options.items()}
    text = io.StringIO()
    parser.write(text)
    return text.getvalue()


@dataclass(frozen=True)
class IddsRecords:
    """iDDS's transforms and processings (of a run, or all), as its core API
    returns them: statuses by name (``New``, ``Submitted``, ``ToCancel``, ...)."""

    transforms: list[dict[str, Any]]
    processings: list[dict[str, Any]]

    def processing_statuses(self) -> list[str]:
        return [str(p["status"]) for p in self.processings]

    def of_run(self, run_id: str | int) -> IddsRecords:
        """Those of one run (one read of all runs, then each run's part)."""
        run = str(run_id)
        return IddsRecords(
            [t for t in self.transforms if t["run_id"] == run],
            [p for p in self.processings if p["run_id"] == run],
        )


class IddsDatabase:
    """Reads iDDS's database with iDDS's own code (``idds.core``), in the
    real peers' interpreter: about a second and a half per read."""

    def __init__(self, python: Path, env: Mapping[str, str], workdir: Path) -> None:
        self._python = python
        self._env = dict(env)
        self._workdir = workdir

    def records(self, run_id: str | int | None = None, timeout: float = 60) -> IddsRecords:
        argv = [
            str(self._python),
            str(IDDS_SCRIPT),
            "records",
            *([] if run_id is None else [str(run_id)]),
        ]
        done = subprocess.run(
            argv,
            env=self._env,
            cwd=self._workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise IddsFailed(
                f"reading iDDS's database failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        # iDDS's modules may print; the JSON is the last line.
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return IddsRecords(data["transforms"], data["processings"])

    def wait_for(
        self, predicate: Callable[[IddsRecords], bool], run_id: str | int | None, timeout: float
    ) -> IddsRecords | None:
        """Read until ``predicate`` holds (the records then), or None after
        ``timeout``. The database sends no notice: each read is a poll."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(run_id)
            if predicate(records):
                return records
            if time.monotonic() >= deadline:
                return None


class IddsTransceiver(PeerProcess):
    """iDDS's prompt transceiver as a process; see the module docstring.

    ``brokers``: the broker for the probe (and the login it uses);
    ``prompt``: what iDDS's configuration names; ``panda_env``: panda-client's
    settings (``PandaServerStandIn.client_env()``); ``namespace``: iDDS's own
    (its selector and its replies' header; None: none); ``num_threads``: its
    workers, each with its own subscription (the sample configuration has 4);
    ``database_url``: None for SQLite in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        brokers: Brokers,
        prompt: PromptBrokers,
        panda_env: Mapping[str, str],
        *,
        namespace: str | None = "dev",
        num_threads: int = 1,
        database_url: str | None = None,
        launcher: ChildLauncher | None = None,
        python: Path | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.workdir = workdir
        self.brokers = brokers
        self.prompt = prompt
        self.namespace = namespace
        self.num_threads = num_threads
        self.log_level = log_level  # INFO at least: start() reads the agent's INFO lines
        self.database_url = database_url or f"sqlite:///{workdir / 'idds.db'}"
        self._python = python or peers_python()
        super().__init__("iDDS transceiver", workdir / "idds-transceiver.log", launcher)
        self.config_path = workdir / "idds.cfg"
        self.alembic_path = workdir / "alembic.ini"
        self.env = peer_env(
            {
                **panda_env,
                "IDDS_CONFIG": str(self.config_path),
                "ALEMBIC_CONFIG": str(self.alembic_path),
                "IDDS_AGENTS": "transceiver",
            }
        )
        self.database = IddsDatabase(self._python, self.env, workdir)
        self.started_in: float | None = None  # seconds from the spawn to all subscribed

    # --- life ---------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> IddsTransceiver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            idds_config(
                self.database_url,
                self.namespace,
                self.num_threads,
                self.prompt,
                self.workdir,
                self.log_level,
            )
        )
        self.alembic_path.write_text(
            alembic_config(self._alembic_template().read_text(), self.database_url)
        )
        self._build(timeout)
        begun = time.monotonic()
        self._spawn([str(self._python), str(IDDS_SCRIPT), "run"], self.env, self.workdir)
        try:
            self._wait_subscribed(begun + timeout)
            self._probe(begun + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - begun
        log.info(
            "iDDS transceiver (pid %s, %s worker(s), namespace %s) subscribed in %.1fs",
            self.pid,
            self.num_threads,
            self.namespace,
            self.started_in,
        )
        return self

    def __enter__(self) -> IddsTransceiver:
        return self.start()

    def count_in_log(self, text: str) -> int:
        return self.log_text().count(text)

    def wait_for_log(self, texts: str | tuple[str, ...], count: int, timeout: float) -> bool:
        """Wait until the agent's log holds ``texts`` (together) ``count``
        times; False after ``timeout``. A log file sends no notice: polled."""
        wanted = (texts,) if isinstance(texts, str) else texts
        deadline = time.monotonic() + timeout
        while sum(self.count_in_log(text) for text in wanted) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # --- starting -------------------------------------------------------------------

    def _alembic_template(self) -> Path:
        # idds-server installs its alembic.ini as data beside the interpreter's prefix.
        template = self._python.parent.parent / "config_default" / "alembic.ini"
        if not template.exists():
            raise IddsFailed(
                f"iDDS's alembic.ini is not at {template}: is idds-server "
                f"installed in {self._python.parent.parent}?"
            )
        return template

    def _build(self, timeout: float) -> None:
        build_log = self.workdir / "idds-build.log"
        process = self._launcher.spawn(
            [str(self._python), str(IDDS_SCRIPT), "build"], self.env, build_log, self.workdir
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, 5)
            raise IddsFailed(f"building iDDS's database took over {timeout}s") from None
        if code != 0:
            raise IddsFailed(
                f"building iDDS's database failed ({code}):\n"
                f"{build_log.read_text(errors='replace')[-3000:]}"
            )

    def _wait_until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        # The agent's log is a file: read it until the line is there.
        while not condition():
            if not self.alive:
                raise IddsFailed(
                    f"iDDS's agent exited ({self.exit_code}) before {what}:\n"
                    f"{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise IddsFailed(f"iDDS's agent: no {what} in time:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def _wait_subscribed(self, deadline: float) -> None:
        line = SUBSCRIBED.format(destination=self.prompt.workers.destination)
        self._wait_until(
            lambda: self.count_in_log(line) >= self.num_threads,
            deadline,
            f"{self.num_threads} subscription(s)",
        )

    def _probe(self, deadline: float) -> None:
        """A message only a subscribed worker can log, until one was logged
        once per worker. Sent again, under a new run id, every PROBE_EVERY
        seconds: a worker logs its subscription as it sends it, and a topic
        drops what comes before the broker has registered it (seen on a
        loaded machine: the only probe was lost)."""
        bus = PeerBus(self.brokers, name="idds-probe")
        bus.start()
        sent: list[str] = []
        next_at = time.monotonic()

        def handled() -> bool:
            nonlocal next_at
            if time.monotonic() >= next_at:
                sent.append(self._send_probe(bus))
                next_at = time.monotonic() + PROBE_EVERY
            text = self.log_text()
            return any(
                text.count(UNKNOWN_TYPE.format(msg_type=PROBE_TYPE, run_id=run_id))
                >= self.num_threads
                for run_id in sent
            )

        try:
            self._wait_until(handled, deadline, f"a probe handled by {self.num_threads} worker(s)")
        finally:
            bus.stop()

    def _send_probe(self, bus: PeerBus) -> str:
        run_id = f"idds-probe-{secrets.token_hex(6)}"
        headers = {"persistent": "false", "vo": "eic", "msg_type": PROBE_TYPE, "run_id": run_id}
        if self.namespace:
            headers["namespace"] = self.namespace
        bus.send(
            self.prompt.workers.destination,
            {"msg_type": PROBE_TYPE, "run_id": run_id, "content": {}},
            headers,
        )
        return run_id
