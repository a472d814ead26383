"""A stand-in for the PanDA server, as the real iDDS and the real transformers
reach it through panda-client 2.2.0 (``PANDA_URL``/``PANDA_URL_SSL`` at
``url``, ``PANDA_BEHIND_REAL_LB=1``; see ``client_env``). Two endpoints:

- ``POST /api/v1/task/submit``: iDDS's PanDA task submission
  (``Client.insertTaskParams``): a JSON body ``{"task_parameters": {...},
  "parent_tid": ...}``, answered 200 ``{"success": true, "message":
  "succeeded. new jediTaskID=<N>", "data": <N>}``; iDDS parses N out of the
  message and makes it the run's ``workload_id``. The task's ``nEvents`` is
  the number of jobs PanDA would start (one transformer each), its
  ``jobParameters`` their command line (``--run_id <id> --idle_timeout <s>``).
  ``on_task_submitted(submission)`` is called once the answer is written:
  where the pilots start.
- ``POST /server/panda/relay_idds_command``: PanDA's relay to iDDS, which the
  transformer calls for its broker information
  (``pandaclient.idds_api.get_api(..., manager=True).get_metainfo(name="prompt_broker")``).
  PanDA would ask iDDS's REST API, which answers ``prompt_broker`` with its
  ``[prompt]`` configuration (``transformer_broker``,
  ``transformer_broadcast_broker``, ``result_broker``, and ``ejfat``): here
  that answer is ``prompt_broker``, given by whoever wrote iDDS's
  configuration. ClientManager returns ``(True, <meta info>)``, which the
  relay wraps: ``[true, [true, {...}]]``. A name iDDS does not know gets
  ``{}``, as its REST API answers. Other iDDS commands are not relayed:
  ``[false, "failed to execute command with ..."]``.

  With ``relay_to(IddsRelayTarget(...))`` (the real iDDS REST app runs) every
  command goes to iDDS, as PanDA's ``relay_idds_command`` sends it: idds-client's
  ``ClientManager`` (``manager`` true) or ``Client`` on iDDS's host (the one
  ``command_name`` names after ``+``, else the target's), authenticated with
  the PanDA server's own proxy; the answer ``[true, <what it returned>]``, or
  ``[false, "failed to execute command with <error>"]`` when it raised.

No authentication of the caller: the stand-in serves plain HTTP and answers
as if TLS had brought a client certificate (PanDA's ``isSecure``); so it
has no caller DN to pass on as iDDS's original user, which real PanDA does.
Every request is recorded (``requests``), submissions and relay calls in
detail, for tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from swf_panda_workers.adapters.idds_rest_client import verify_server
from swf_testbed.peers._bus import Notifier
from swf_testbed.peers._http import LocalHTTPServer, PeerRequestHandler
from swf_testbed.peers._panda_relay import (
    RELAY_METHOD,
    RELAY_PREFIX,
    TEXT_PLAIN,
    entry_failure,
    panda_error_text,
    relay_command,
    relay_json,
    relay_params,
    relay_text,
)

log = logging.getLogger(__name__)

SUBMIT_PATH = "/api/v1/task/submit"
PROMPT_BROKER = "prompt_broker"
_JSON: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


def job_arguments(task_parameters: Mapping[str, Any]) -> list[str]:
    """The command-line arguments of a task's jobs: its ``jobParameters``'
    ``constant`` values joined by spaces, split as the pilot's shell splits
    them. iDDS sends one: ``--run_id <id> --idle_timeout <s>``."""
    items = task_parameters.get("jobParameters") or []
    if not isinstance(items, list):
        raise ValueError(f"jobParameters is not a list: {items!r}")
    text = " ".join(
        str(item.get("value", ""))
        for item in items
        if isinstance(item, Mapping) and item.get("type") == "constant"
    )
    return shlex.split(text)


def option(arguments: list[str], name: str) -> str | None:
    """The value of ``--name value`` (or ``--name=value``) in ``arguments``."""
    for i, argument in enumerate(arguments):
        if argument == name and i + 1 < len(arguments):
            return arguments[i + 1]
        if argument.startswith(name + "="):
            return argument[len(name) + 1 :]
    return None


@dataclass(frozen=True)
class TaskSubmission:
    """One task iDDS submitted, as PanDA accepted it."""

    task_id: int  # the jediTaskID answered, iDDS's workload_id
    task_parameters: dict[str, Any]
    parent_tid: Any
    at: float = field(default_factory=time.time)  # epoch seconds

    @property
    def task_name(self) -> str | None:
        name = self.task_parameters.get("taskName")
        return None if name is None else str(name)

    @property
    def jobs(self) -> int:
        """How many jobs PanDA starts: nEvents / nEventsPerJob (iDDS: one event each)."""
        events = int(self.task_parameters.get("nEvents") or 0)
        per_job = int(self.task_parameters.get("nEventsPerJob") or 1)
        return -(-events // per_job) if events > 0 else 0

    @property
    def job_arguments(self) -> list[str]:
        return job_arguments(self.task_parameters)

    @property
    def run_id(self) -> str | None:
        """The run the jobs are started for (their ``--run_id``)."""
        return option(self.job_arguments, "--run_id")


@dataclass(frozen=True)
class IddsRelayTarget:
    """Where PanDA's relay sends iDDS commands, and as whom: ``host`` is
    iDDS's REST base URL (``https://host:port/idds``), ``proxy`` the PanDA
    server's own X.509 proxy, ``config_root`` idds-client's local
    configuration directory (not ~/.idds)."""

    host: str
    proxy: Path
    config_root: Path
    timeout: float = 30.0
    # The CAs iDDS's certificate must chain to. PanDA's own idds-client does
    # not verify it (verify=False); the stand-in does, when given them.
    ca_certs: Path | None = None


@dataclass(frozen=True)
class RelayCall:
    """One call through relay_idds_command, and the relay's answer."""

    command: str
    manager: bool
    args: list[Any]
    kwargs: dict[str, Any]
    answer: Any  # the decoded answer ([ok, result]); None when not a 200
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PandaRequest:
    method: str
    path: str
    status: int
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = _JSON
    then: Callable[[], None] | None = field(default=None, compare=False)


class PandaServerStandIn:
    """``start()`` (or ``with``), then give the real peers ``client_env()``.
    ``prompt_broker``: the meta info iDDS would answer (see the module
    docstring; None: iDDS configured without brokers, each None).
    ``first_task_id``: the first jediTaskID handed out."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        prompt_broker: Mapping[str, Any] | None = None,
        on_task_submitted: Callable[[TaskSubmission], None] | None = None,
        first_task_id: int = 31870,
    ) -> None:
        self._address = (host, port)
        self._prompt_broker = (
            dict(prompt_broker)
            if prompt_broker is not None
            else {
                "transformer_broker": None,
                "transformer_broadcast_broker": None,
                "result_broker": None,
                "ejfat": {},
            }
        )
        self._on_task_submitted = on_task_submitted
        self._relay_target: IddsRelayTarget | None = None
        self._task_ids = itertools.count(first_task_id)
        self._state = Notifier()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Guarded by self._state.lock.
        self.submissions: list[TaskSubmission] = []
        self.relay_calls: list[RelayCall] = []
        self.requests: list[PandaRequest] = []

    # --- life -----------------------------------------------------------------

    def start(self) -> PandaServerStandIn:
        self._server = _Server(self._address, _Handler, self)
        self._thread = threading.Thread(
            target=partial(self._server.serve_forever, 0.05), name="panda-stand-in", daemon=True
        )
        self._thread.start()
        log.info("PanDA server stand-in on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> PandaServerStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """What PANDA_URL and PANDA_URL_SSL take (panda-client keeps the path
        for the relay and puts /api/v1 on the host for the rest)."""
        if self._server is None:
            raise RuntimeError("the PanDA server stand-in is not started")
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server: (host, port)
        return f"http://{host}:{port}{RELAY_PREFIX}"

    def client_env(self) -> dict[str, str]:
        """panda-client's settings for this server: plain http, and no DNS
        lookup of the cache server at import (PANDA_BEHIND_REAL_LB)."""
        return {"PANDA_URL": self.url, "PANDA_URL_SSL": self.url, "PANDA_BEHIND_REAL_LB": "1"}

    def relay_to(self, target: IddsRelayTarget | None) -> None:
        """Relay every iDDS command to a real iDDS from now on (None: answer
        get_metainfo here, as without one)."""
        with self._state.lock:
            self._relay_target = target

    # --- records, for tests ----------------------------------------------------

    def submissions_for(self, run_id: str | int) -> list[TaskSubmission]:
        with self._state.lock:
            return [s for s in self.submissions if s.run_id == str(run_id)]

    def metainfo_calls(self) -> list[RelayCall]:
        with self._state.lock:
            return [c for c in self.relay_calls if c.command == "get_metainfo"]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (woken by each request) until ``predicate`` holds."""
        return self._state.wait_for(predicate, timeout)

    # --- handling (one server thread per request) ------------------------------

    def _handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Answer:
        path = urlsplit(target).path
        lowered = {k.lower(): v for k, v in headers.items()}
        if path == SUBMIT_PATH:
            answer = (
                self._submit(body)
                if method == "POST"
                else _envelope(405, False, f"{method} is not allowed on {path}")
            )
        elif path.startswith(RELAY_PREFIX + "/"):
            answer = self._relay(method, path, lowered.get("content-type"), body)
        else:
            answer = _envelope(404, False, f"{path} is not served by the PanDA stand-in")
        with self._state.lock:
            self.requests.append(PandaRequest(method, path, answer.status))
            self._state.notify()
        log.info("%s %s -> %s", method, path, answer.status)
        return answer

    def _submit(self, body: bytes) -> _Answer:
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or not isinstance(data.get("task_parameters"), dict):
                raise ValueError('the body is no {"task_parameters": {...}} object')
            submission = TaskSubmission(
                next(self._task_ids), data["task_parameters"], data.get("parent_tid")
            )
            job_arguments(submission.task_parameters)  # readable, or refused now
        except ValueError as exc:
            # The real server answers a request it cannot read with success false.
            return _envelope(400, False, f"cannot read the task parameters: {exc}")
        with self._state.lock:
            self.submissions.append(submission)
            self._state.notify()
        log.info(
            "task %s submitted: %s, %s jobs, %s",
            submission.task_id,
            submission.task_name,
            submission.jobs,
            " ".join(submission.job_arguments),
        )
        then = partial(self._on_task_submitted, submission) if self._on_task_submitted else None
        return _envelope(
            200, True, f"succeeded. new jediTaskID={submission.task_id}", submission.task_id, then
        )

    def _relay(self, method: str, path: str, content_type: str | None, body: bytes) -> _Answer:
        name = path[len(RELAY_PREFIX) + 1 :]
        if name != RELAY_METHOD:
            # PanDA's entry refuses any method it does not export.
            return _Answer(403, panda_error_text(f"{name} is forbidden"), TEXT_PLAIN)
        if method != "POST":
            return _Answer(405, panda_error_text(f"{name} takes POST"), TEXT_PLAIN)
        params: dict[str, Any] | None = None
        unreadable = ""
        try:
            params = relay_params(content_type, body)
        except ValueError as exc:
            unreadable = str(exc)
        failure = entry_failure(params, unreadable)
        if params is None or failure is not None:
            return _Answer(500, (failure or "").encode(), TEXT_PLAIN)
        command, manager = relay_command(params)
        named_host = str(params.get("command_name") or "").partition("+")[2]
        with self._state.lock:
            target = self._relay_target
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        try:
            args = relay_json(params.get("args"), list)
            kwargs = relay_json(params.get("kwargs"), dict)
            if target is not None:
                result = _relayed(target, named_host or target.host, command, manager, args, kwargs)
            else:
                result = self._idds_answer(command, manager, args, kwargs)
        except (ValueError, TypeError) as exc:
            result = [False, f"failed to execute command with {exc}"]
        with self._state.lock:
            self.relay_calls.append(RelayCall(command, manager, args, kwargs, result))
            self._state.notify()
        return _Answer(200, relay_text(result), TEXT_PLAIN)

    def _idds_answer(
        self, command: str, manager: bool, args: list[Any], kwargs: dict[str, Any]
    ) -> list[Any]:
        """What relay_idds_command returns for the call."""
        if command != "get_metainfo":
            return [
                False,
                f"failed to execute command with the PanDA stand-in relays only "
                f"get_metainfo, not {command or '(none)'}",
            ]
        if len(args) + len(kwargs) != 1 or (kwargs and "name" not in kwargs):
            raise TypeError(f"get_metainfo() takes one argument, name; got {args} {kwargs}")
        name = kwargs["name"] if kwargs else args[0]
        meta = dict(self._prompt_broker) if name == PROMPT_BROKER else {}
        # ClientManager.get_metainfo returns (True, meta); Client.get_metainfo the meta.
        return [True, [True, meta]] if manager else [True, meta]


def _relayed(
    target: IddsRelayTarget,
    host: str,
    command: str,
    manager: bool,
    args: list[Any],
    kwargs: dict[str, Any],
) -> list[Any]:
    """What PanDA's relay_idds_command returns for a command run by the real
    iDDS: a ClientManager or Client on ``host`` (PanDA's own credential)
    runs it."""
    # Imported here: importing idds-client makes its local configuration
    # directory, which only relaying needs.
    from idds.client.client import Client
    from idds.client.clientmanager import ClientManager

    client = Client(
        host=host,
        auth={"auth_type": "x509_proxy", "client_proxy": str(target.proxy)},
        timeout=target.timeout,
    )
    client.retries = 1  # one try: the caller decides about retrying
    if target.ca_certs is not None:
        verify_server(client.session, target.ca_certs)
    runner: Any = client
    if manager:
        runner = ClientManager(host=host, timeout=target.timeout)
        runner.local_config_root = str(target.config_root)
        runner.client = client  # its own set-up would read this process's environment
    if not hasattr(runner, command):
        return [False, f"{command} is not a command of iDDS {type(runner).__name__}"]
    try:
        return [True, getattr(runner, command)(*args, **kwargs)]
    except Exception as exc:  # as PanDA: any failure of the call is the relay's answer
        return [False, f"failed to execute command with {exc}"]


def _envelope(
    status: int,
    success: bool,
    message: str,
    data: Any = None,
    then: Callable[[], None] | None = None,
) -> _Answer:
    """The PanDA server's JSON answer: {success, message, data}."""
    body = json.dumps({"success": success, "message": message, "data": data}).encode()
    return _Answer(status, body, _JSON, then)


class _Server(LocalHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        stand_in: PandaServerStandIn,
    ) -> None:
        self.stand_in = stand_in
        super().__init__(address, handler)


class _Handler(PeerRequestHandler):
    server: _Server
    server_version = "panda-stand-in"

    def answer(self, body: bytes) -> None:
        answer = self.server.stand_in._handle(
            self.command, self.path, dict(self.headers.items()), body
        )
        self.reply(answer.status, answer.headers, answer.body)
        if answer.then is not None:
            try:
                answer.then()
            except Exception:  # the stand-in keeps serving; the log says what broke
                log.exception(
                    "PanDA stand-in: callback after %s %s failed", self.command, self.path
                )
