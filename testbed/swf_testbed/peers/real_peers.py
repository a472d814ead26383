"""The real peers wired together, as in the testbed, for the integration tests
and the demo: the real iDDS prompt transceiver (``idds_agent``), with a
``pki``, iDDS's real REST API too (``idds_rest_app``, on the same database,
PanDA's relay going to it), a PanDA
server stand-in (``panda_server``) that starts, for each task iDDS submits,
its jobs as real transformers (``pilots``: idds-prompt's ``run_prompt``,
only the payload simulated), and the simulated control system, which
announces runs, sends their slices and ends them.

    with RealPeers(brokers, workdir, namespace="dev") as peers:
        ...  # the service (or a test) sends create_workflow_task to iDDS
        peers.control.send_slices(run_id, 40, rate=10)
        peers.pilots.wait_for(lambda: peers.pilots.live(run_id) == 0, 60)
        peers.idds.database.records(run_id)

Everything started is stopped by ``stop`` (or the ``with``), and dies with
this process however it ends (``_child_processes``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swf_panda_workers.adapters.stomp_bus import Delivery, Subscription
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.messages import InvalidMessage, Message, parse_message
from swf_testbed.peers._bus import Notifier, PeerBus
from swf_testbed.peers._child_processes import ChildLauncher
from swf_testbed.peers.control_system import ControlSystem
from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.idds_agent import (
    RESULTS_QUEUE,
    SLICES_QUEUE,
    IddsTransceiver,
    PromptBrokers,
)
from swf_testbed.peers.idds_rest_app import IddsRestApp
from swf_testbed.peers.panda_server import (
    IddsRelayTarget,
    PandaServerStandIn,
    TaskSubmission,
)
from swf_testbed.peers.peers_venv_scripts.payload_schedule import PayloadSchedule
from swf_testbed.peers.pilots import Pilots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedResult:
    """A message from the results destination, as received and as parsed."""

    body: dict[str, Any]
    headers: dict[str, str]
    message: Message | None  # None: parse_message refused it (``error`` says why)
    error: str | None = None
    at: float = field(default_factory=time.time)


class SliceResults:
    """Takes what arrives on the results destination. On a queue it takes the
    results from any other consumer (the service's listener): only for tests
    that run without the service. On a topic it only listens."""

    def __init__(self, brokers: Brokers, destination: str) -> None:
        self.destination = destination
        self._state = Notifier()
        self._received: list[ReceivedResult] = []  # guarded by self._state.lock
        self._bus = PeerBus(
            brokers,
            name="real-peers-results",
            subscriptions=(Subscription(destination, ack="auto"),),
            handle=self._take,
        )

    def start(self) -> SliceResults:
        self._bus.start()
        return self

    def stop(self) -> None:
        self._bus.stop()

    @property
    def received(self) -> list[ReceivedResult]:
        with self._state.lock:
            return list(self._received)

    def of_run(self, run_id: str | int) -> list[ReceivedResult]:
        return [r for r in self.received if str(r.body.get("run_id")) == str(run_id)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self._state.wait_for(predicate, timeout)

    def _take(self, delivery: Delivery) -> None:
        try:
            body = json.loads(delivery.body)
        except (ValueError, UnicodeDecodeError):
            body = {"unparsed": delivery.body[:1000].decode(errors="replace")}
        message: Message | None = None
        error = None
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            error = str(exc)  # kept: a test may want to see what the service would refuse
        with self._state.lock:
            self._received.append(
                ReceivedResult(
                    body if isinstance(body, dict) else {}, dict(delivery.headers), message, error
                )
            )
            self._state.notify()


class RealPeers:
    """The real iDDS and transformers, the PanDA stand-in and the control system.

    ``brokers``: the broker, its login, and the workers and transformer
    topics (as the service has them). ``namespace``: iDDS's namespace (the
    service's requests must carry it); ``control_namespace``: the control
    system's (default the same). ``num_threads``: iDDS's workers (each
    handles every request: see the README). ``database_url``: iDDS's
    database, None for SQLite in ``workdir``. ``slices_destination`` /
    ``results_destination``: what iDDS tells the transformers (a queue or a
    topic each). ``schedule``: the payload's times and failures.
    ``collect_results``: record what arrives on the results destination
    (``results``; on a queue this takes the results from the service).
    ``pki``: serve iDDS's REST API too (``rest``), on ``rest_port`` (0: a
    free one), trusting that PKI's CA; PanDA's relay then sends every iDDS
    command to it with the PKI's PanDA proxy."""

    def __init__(
        self,
        brokers: Brokers,
        workdir: Path,
        *,
        namespace: str | None = "dev",
        control_namespace: str | None = None,
        num_threads: int = 1,
        database_url: str | None = None,
        slices_destination: str = SLICES_QUEUE,
        results_destination: str = RESULTS_QUEUE,
        schedule: PayloadSchedule | None = None,
        collect_results: bool = False,
        pki: GridPki | None = None,
        rest_port: int = 0,
    ) -> None:
        self.brokers = brokers
        self.workdir = workdir
        self.prompt = PromptBrokers.on(
            brokers, slices=slices_destination, results=results_destination
        )
        self._launcher: ChildLauncher | None = None
        self.panda = PandaServerStandIn(
            prompt_broker=self.prompt.metainfo(), on_task_submitted=self._task_submitted
        )
        self.control = ControlSystem(
            brokers,
            control_namespace or namespace or "dev",
            workers_topic=brokers.workers_topic,
            slices_destination=slices_destination,
        )
        self.results = SliceResults(brokers, results_destination) if collect_results else None
        self._namespace = namespace
        self._num_threads = num_threads
        self._database_url = database_url
        self._schedule = schedule
        self._pki = pki
        self._rest_port = rest_port
        self._rest: IddsRestApp | None = None
        self._idds: IddsTransceiver | None = None
        self._pilots: Pilots | None = None
        # How to stop what started, in order (what a stop returns is not used).
        self._started: list[Callable[[], object]] = []

    @property
    def idds(self) -> IddsTransceiver:
        if self._idds is None:
            raise RuntimeError("RealPeers is not started")
        return self._idds

    @property
    def rest(self) -> IddsRestApp:
        """iDDS's REST app (with a ``pki`` only)."""
        if self._rest is None:
            raise RuntimeError("RealPeers runs no iDDS REST app (no pki), or is not started")
        return self._rest

    @property
    def pilots(self) -> Pilots:
        if self._pilots is None:
            raise RuntimeError("RealPeers is not started")
        return self._pilots

    def start(self, timeout: float = 90.0) -> RealPeers:
        try:
            # Forks every peer process from one long-lived thread (see
            # _child_processes): they die with this process.
            launcher = self._launcher = ChildLauncher("real-peers-launcher")
            self._started.append(launcher.close)
            self.panda.start()
            self._started.append(self.panda.stop)
            self._pilots = Pilots(
                self.workdir / "pilots",
                self.panda.client_env(),
                schedule=self._schedule,
                launcher=launcher,
            )
            self._started.append(self._pilots.stop_all)
            if self.results is not None:
                self.results.start()
                self._started.append(self.results.stop)
            self.control.start()
            self._started.append(self.control.stop)
            self._idds = IddsTransceiver(
                self.workdir / "idds",
                self.brokers,
                self.prompt,
                self.panda.client_env(),
                namespace=self._namespace,
                num_threads=self._num_threads,
                database_url=self._database_url,
                launcher=launcher,
            )
            self._started.append(self._idds.stop)
            self._idds.start(timeout)
            if self._pki is not None:
                # After the transceiver: its start writes iDDS's configuration
                # and builds the database the app serves.
                self._rest = IddsRestApp(
                    self.workdir / "idds",
                    self._idds.config_path,
                    self.panda.client_env(),
                    self._pki,
                    port=self._rest_port,
                    launcher=launcher,
                )
                self._started.append(self._rest.stop)
                self._rest.start(timeout)
                self.panda.relay_to(
                    IddsRelayTarget(
                        self._rest.url,
                        self._pki.panda.path,
                        self.workdir / "panda-idds-client",
                        ca_certs=self._pki.ca,
                    )
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started, the last started first; nothing keeps running."""
        failures: list[BaseException] = []
        while self._started:
            stop = self._started.pop()
            try:
                stop()
            except Exception as exc:  # the rest must still be stopped; raised after
                log.exception("stopping the real peers: %s failed", stop)
                failures.append(exc)
        if failures:
            raise failures[0]

    def __enter__(self) -> RealPeers:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def set_schedule(self, schedule: PayloadSchedule) -> None:
        """The payload's times and failures for transformers started from now on."""
        self.pilots.set_schedule(schedule)

    def _task_submitted(self, submission: TaskSubmission) -> None:
        # PanDA starts the task's jobs: one transformer each.
        if self._pilots is None:
            log.warning(
                "task %s submitted before the pilots exist: no job started", submission.task_id
            )
            return
        self._pilots.start_task(submission)
