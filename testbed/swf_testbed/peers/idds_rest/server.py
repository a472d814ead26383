"""A simulated iDDS REST server (the workflow-task API of iDDS's
``rest/v1/workflowtask.py``), for tests and the demo, spoken to by the real
idds-client ``ClientManager``, with PanDA's relay to it (``panda_relay``)
served beside it.

Served under ``/idds`` (as iDDS's web server mounts its app there):

- ``POST /idds/workflow_task`` ``{"workflow": {...}}`` -> the task's ids
  ``{request_id, transform_id, processing_id, input_coll_id, output_coll_id,
  workload_id}``;
- ``PUT /idds/workflow_task/<request_id>/<transform_id>/<workload_id>/adjust``
  ``{"parameters": {core_count, memory_per_core, site, content}}``;
- ``PUT /idds/workflow_task/<request_id>/close`` (and the legacy
  ``.../<request_id>/<workload_id>/close``) ``{"parameters": {...}}``.

Ids in a path may be ``null``. Errors come back as the real server sends them:
the status, an empty body, and the headers ``ExceptionClass`` (a class of
``idds.common.exceptions``) and ``ExceptionMessage``, which the client raises
as that exception and ``ClientManager`` returns as ``(False, text)``. A
failed authentication is a 401 with ``ExceptionClass: IDDSException`` and the
bare reason, as iDDS's ``before_request_auth`` answers.

The tasks live in a ``TaskBook`` shared with the bus simulator
(``peers.idds``): one task per run, duplicates counted, a close with no ids
and no run_id recorded as a violation (and answered 200, as the real one
would after cancelling everything).

Faults, in-process (``fail_next``, ``delay``, ``clear_faults``) or over HTTP
from another process (``control_client.SimControl``, or ``/_sim/fail``,
``/_sim/delay``, ``/_sim/clear`` and ``GET /_sim/state`` directly).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from idds.common import exceptions as idds_exceptions
from idds.common.constants import ProcessingStatus, RequestStatus, TransformStatus
from idds.common.utils import json_dumps as idds_json_dumps
from pydantic import ValidationError

from swf_panda_workers.core.messages import WorkerSize
from swf_testbed.peers._bus import Notifier
from swf_testbed.peers._http import LocalHTTPServer, PeerRequestHandler
from swf_testbed.peers._panda_relay import RELAY_PREFIX
from swf_testbed.peers.idds_rest.api import (
    CONTROL_PREFIX,
    ENDPOINTS,
    PREFIX,
    Answer,
    Endpoint,
    Route,
    header_safe,
    readable_body,
)
from swf_testbed.peers.idds_rest.panda_relay import PandaRelay
from swf_testbed.peers.idds_tasks import TaskBook, TaskId, TaskInfo, TaskRecords
from swf_testbed.peers.recorder import text_table

log = logging.getLogger(__name__)

# What iDDS 2.6.21's REST create answers after it made the task and its
# PanDA task: its handler unpacks the seven-key result into six names.
CREATE_UNPACK_ERROR = "too many values to unpack (expected 6)"
REDACTED = "<redacted>"
# Header names whose values are credentials (X-IDDS-Auth-Token,
# X-IDDS-Auth-Usertoken-Original, ...-Usercert-Original, Authorization).
_SECRET_HEADER_WORDS = ("token", "authorization", "cookie", "cert", "secret", "password")

_ID = r"(?P<{}>[^/]+)"
_ROUTES: tuple[tuple[re.Pattern[str], Endpoint, str], ...] = (
    (re.compile(r"^/workflow_task$"), "create", "POST"),
    (
        re.compile(
            rf"^/workflow_task/{_ID.format('request_id')}/{_ID.format('transform_id')}/"
            rf"{_ID.format('workload_id')}/adjust$"
        ),
        "adjust",
        "PUT",
    ),
    (re.compile(rf"^/workflow_task/{_ID.format('request_id')}/close$"), "close", "PUT"),
    (
        re.compile(
            rf"^/workflow_task/{_ID.format('request_id')}/{_ID.format('workload_id')}/close$"
        ),
        "close",
        "PUT",
    ),
    # The lookups of idds-client's get_request_id_by_name and get_requests.
    (re.compile(r"^/request/name/(?P<name>[^/]+)$"), "lookup", "GET"),
    (
        re.compile(
            rf"^/request/{_ID.format('request_id')}/{_ID.format('workload_id')}/"
            r"(?P<with_detail>[^/]+)(/[^/]+){0,3}$"
        ),
        "requests",
        "GET",
    ),
)

# What the real app answers for a path or method it has no API for (werkzeug's
# wording, inside iDDS's errorhandler).
_NO_API = {
    404: "404 Not Found: The requested URL was not found on the server. If you entered the "
    "URL manually please check your spelling and try again.",
    405: "405 Method Not Allowed: The method is not allowed for the requested URL.",
}


@dataclass(frozen=True)
class RestCall:
    """One request to the iDDS API, as answered."""

    method: str
    path: str
    endpoint: Endpoint | None  # None: no such API (404/405)
    body: Any  # parsed JSON; the text when it is not JSON; None when empty
    headers: dict[str, str]  # credentials redacted
    status: int
    # ok, bad_request, unauthorized, injected, error, no_api, stopped; relayed
    # calls also refused (ClientManager's guards), not_a_command, relay_failed
    outcome: str
    # panda_relay: through PanDA's relay_idds_command, whose decoded
    # {command_name, args, kwargs, manager} is the body; status is the relay's
    route: Route = "direct"

    @property
    def run_id(self) -> str | None:
        """The run a direct request names in its body (create: the workflow's
        content; adjust: parameters.content; close: parameters)."""
        body = _as_dict(self.body)
        if self.endpoint == "create":
            named = _as_dict(_as_dict(body.get("workflow")).get("content")).get("run_id")
        else:
            parameters = _as_dict(body.get("parameters"))
            inner = _as_dict(parameters.get("content")) if self.endpoint == "adjust" else parameters
            named = inner.get("run_id")
        return None if named is None else str(named)


@dataclass(frozen=True)
class Adjustment:
    """One adjust request. ``run_id`` names the task it changed: the real
    iDDS updates the transform by transform_id, so with none (or an unknown
    one) it changes nothing and ``run_id`` is None."""

    run_id: str | None
    request_id: TaskId
    transform_id: TaskId
    workload_id: TaskId
    size: WorkerSize | None  # None when the parameters are no readable size
    parameters: dict[str, Any]


@dataclass
class _Failure:
    remaining: int
    status: int
    exception_class: str | None
    message: str
    endpoint: Endpoint | None


class _Rejected(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.outcome)
        self.answer = answer


class SimulatedIDDSRest(TaskRecords):
    """The iDDS workflow-task REST API on ``url`` (``http://127.0.0.1:<port>/idds``),
    and PanDA's relay to it on ``relay_url``.

    ``token``: requests must use oidc with this token (and ``vo``, when set),
    else 401 (403 at the relay). ``workload_pending``: creates answer ``workload_id: null``, as
    while iDDS's PanDA submission is pending. ``on_task_created(run_id, task)``
    runs after a run's first create is answered; ``on_adjust(run_id, size)``
    after an adjust that matched a task. ``create_fails_after``: answer a
    create that made the task with HTTP 500, as iDDS 2.6.21 does (the default);
    False answers the ids, as a fixed iDDS would.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        vo: str | None = None,
        workload_pending: bool = False,
        on_task_created: Callable[[str, TaskInfo], None] | None = None,
        on_adjust: Callable[[str, WorkerSize], None] | None = None,
        create_fails_after: bool = True,
        applies_worker_count: bool = False,
    ) -> None:
        self._address = (host, port)
        self.create_fails_after = create_fails_after
        self._token = token
        self._vo = vo
        self._on_task_created = on_task_created
        self._on_adjust = on_adjust
        self._state = Notifier()
        self._book = TaskBook(
            self._state,
            workload_pending=workload_pending,
            applies_worker_count=applies_worker_count,
        )
        self._stopping = threading.Event()
        self._relay = PandaRelay(self._serve_relayed, token, vo)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Records and faults; guarded by self._state.lock.
        self.calls: list[RestCall] = []
        self.adjustments: list[Adjustment] = []
        self._failures: list[_Failure] = []
        self._delays: dict[Endpoint | None, float] = {}

    # --- life ---------------------------------------------------------------

    def start(self) -> SimulatedIDDSRest:
        self._stopping.clear()
        self._server = _Server(self._address, _Handler, self)
        # A short poll interval: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=partial(self._server.serve_forever, 0.05), name="sim-idds-rest", daemon=True
        )
        self._thread.start()
        log.info("simulated iDDS REST server on %s", self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()  # cuts injected delays short
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> SimulatedIDDSRest:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def root(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulated iDDS REST server is not started")
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server: (host, port)
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """What idds-client takes as its host (IDDS_HOST)."""
        return self.root + PREFIX

    @property
    def relay_url(self) -> str:
        """What panda-client takes as its server (PANDA_URL_SSL)."""
        return self.root + RELAY_PREFIX

    @property
    def control_url(self) -> str:
        return self.root + CONTROL_PREFIX

    # --- records, for tests -------------------------------------------------

    def calls_to(self, endpoint: Endpoint | None, route: Route | None = None) -> list[RestCall]:
        """The calls to ``endpoint`` (by either route, unless ``route`` is given)."""
        with self._state.lock:
            return [c for c in self.calls if c.endpoint == endpoint and route in (None, c.route)]

    def calls_for(self, endpoint: Endpoint, run_id: str) -> list[RestCall]:
        """The direct calls to ``endpoint`` about the run ``run_id``."""
        return [c for c in self.calls_to(endpoint, "direct") if c.run_id == run_id]

    def summary_table(self, run_ids: Iterable[str]) -> str:
        """Per run, the HTTP status of each request, e.g. ``500,200``."""
        headings = ("run_id", *ENDPOINTS)
        rows = [
            headings,
            *(
                (
                    run_id,
                    *(
                        ",".join(str(c.status) for c in self.calls_for(e, run_id)) or "-"
                        for e in ENDPOINTS
                    ),
                )
                for run_id in run_ids
            ),
        ]
        return text_table(rows)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` (reading the records) holds."""
        return self._state.wait_for(predicate, timeout)

    def state(self) -> dict[str, Any]:
        """Every record and the pending faults, as JSON-ready data."""
        with self._state.lock:
            return {
                "url": self.url if self._server is not None else None,
                "relay_url": self.relay_url if self._server is not None else None,
                "calls": [asdict(c) for c in self.calls],
                "tasks": {run: asdict(t) for run, t in self.tasks.items()},
                "duplicate_creates": dict(self.duplicate_creates),
                "closed": dict(self.closed),
                "adjustments": [
                    {**asdict(a), "size": a.size.model_dump() if a.size else None}
                    for a in self.adjustments
                ],
                "violations": list(self.violations),
                "faults": {
                    "fail_next": [asdict(f) for f in self._failures],
                    "delay": {k or "all": v for k, v in self._delays.items()},
                },
            }

    # --- faults -------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        exception_class: str | None = "CoreException",
        message: str = "simulated iDDS failure",
        endpoint: Endpoint | None = None,
    ) -> None:
        """Answer the next ``count`` requests (to ``endpoint`` only, when
        given) with ``status`` and ``exception_class(message)``, doing nothing.
        With ``exception_class=None`` the answer has no exception headers and
        ``message`` as its body, like a proxy's error page."""
        if count < 1:
            raise ValueError("count must be at least 1")
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        _check_endpoint(endpoint)
        with self._state.lock:
            self._failures.append(_Failure(count, status, exception_class, message, endpoint))

    def delay(self, seconds: float, *, endpoint: Endpoint | None = None) -> None:
        """Answer every request (to ``endpoint`` only, when given) ``seconds``
        late, until changed; 0 ends it. The request is carried out when the
        delay ends, whether or not the client still waits, as on a slow
        server."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        _check_endpoint(endpoint)
        with self._state.lock:
            if seconds:
                self._delays[endpoint] = float(seconds)
            else:
                self._delays.pop(endpoint, None)

    def clear_faults(self) -> None:
        with self._state.lock:
            self._failures.clear()
            self._delays.clear()

    # --- handling (one server thread per request) ---------------------------

    def _handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        path = urlsplit(target).path
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            return self._control(method, path[len(CONTROL_PREFIX) :], body)
        route: Route = "direct"
        if path.startswith(RELAY_PREFIX + "/"):
            route = "panda_relay"
            endpoint, readable, answer = self._relay.answer(method, path, headers, body)
        else:
            endpoint, ids, answer = _route(method, path)
            readable = readable_body(body)
            if endpoint is not None:
                answer = self._serve(endpoint, ids, headers, body, path)
        call = RestCall(
            method,
            path,
            endpoint,
            readable,
            _redacted(headers),
            answer.status,
            answer.outcome,
            route,
        )
        with self._state.lock:
            self.calls.append(call)
            self._state.notify()
        log.info("%s %s -> %s (%s)", method, path, answer.status, answer.outcome)
        return answer

    def _serve(
        self,
        endpoint: Endpoint,
        ids: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
        path: str,
        *,
        authenticate: bool = True,
    ) -> Answer:
        """One iDDS API request, as iDDS answers it. ``authenticate=False``
        for PanDA's relayed requests: PanDA authenticated the caller itself,
        and iDDS trusts PanDA's own credentials."""
        seconds = self._delay_for(endpoint)
        if seconds and self._stopping.wait(seconds):
            return Answer(503, "stopped")
        try:
            if authenticate:
                self._authenticate({k.lower(): v for k, v in headers.items()})
            self._inject(endpoint)
            if endpoint == "create":
                return self._create(body)
            if endpoint == "adjust":
                return self._adjust(ids, body)
            if endpoint == "lookup":
                return self._lookup(ids["name"])
            if endpoint == "requests":
                return self._requests(ids["request_id"], ids["with_detail"])
            return self._close(ids, body, path)
        except _Rejected as rejected:
            return rejected.answer

    def _serve_relayed(
        self, endpoint: Endpoint, ids: dict[str, str], body: bytes, path: str
    ) -> Answer:
        """An iDDS request PanDA's relay makes: PanDA authenticated the caller."""
        return self._serve(endpoint, ids, {}, body, path, authenticate=False)

    def _delay_for(self, endpoint: Endpoint) -> float:
        with self._state.lock:
            return max(self._delays.get(endpoint, 0.0), self._delays.get(None, 0.0))

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        # As iDDS's before_request_auth: the type defaults to x509_proxy.
        auth_type = headers.get("x-idds-auth-type") or "x509_proxy"
        if auth_type not in ("x509_proxy", "oidc"):
            raise _Rejected(_auth_failed(f"Authentication method {auth_type} is not supported"))
        if self._token is None:
            return
        if auth_type == "x509_proxy":
            # No TLS here, so never a client DN: what iDDS says without one.
            raise _Rejected(_auth_failed("User DN cannot be found."))
        vo = headers.get("x-idds-auth-vo")
        if self._vo is not None and vo != self._vo:
            raise _Rejected(_auth_failed(f"VO {vo} is not allowed."))
        token = headers.get("x-idds-auth-token")
        if not token:
            raise _Rejected(_auth_failed("Failed to verify oidc token: no token"))
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            raise _Rejected(
                _auth_failed(
                    "Failed to verify oidc token: Signature verification "
                    "failed (not the simulated iDDS's token)"
                )
            )

    def _inject(self, endpoint: Endpoint) -> None:
        with self._state.lock:
            failure = next((f for f in self._failures if f.endpoint in (None, endpoint)), None)
            if failure is None:
                return
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failures.remove(failure)
        if failure.exception_class is None:
            raise _Rejected(
                Answer(
                    failure.status,
                    "injected",
                    failure.message.encode(),
                    (("Content-Type", "text/html"),),
                )
            )
        raise _Rejected(
            _error(failure.status, failure.exception_class, failure.message, "injected")
        )

    def _create(self, body: bytes) -> Answer:
        try:
            data = json.loads(body) if body else None
            if not data:
                raise _Rejected(
                    _error(400, "BadRequest", "Request body must not be empty", "bad_request")
                )
            workflow = data.get("workflow")
            if not workflow:
                raise _Rejected(
                    _error(
                        400,
                        "BadRequest",
                        "'workflow' key is required in the request body",
                        "bad_request",
                    )
                )
        except (ValueError, AttributeError):
            return _undecodable()
        workflow = _mapping(workflow)
        _mapping(workflow.get("content", {}))
        made = self._book.create(workflow)
        if not made:  # a task of that name exists: iDDS fails adding the transform
            return _error(500, "DuplicatedObject", "Transform already exists!", "error")
        (task,) = made
        created = self._on_task_created
        then = partial(created, task.run_id, task) if created and task.run_id else None
        if self.create_fails_after:
            # The task and its PanDA task exist; the answer is an error.
            return replace(
                _error(500, "CoreException", CREATE_UNPACK_ERROR, "error", wrap=False), then=then
            )
        return _ok(task.created_ids(), then)

    def _lookup(self, name: str) -> Answer:
        # iDDS's get_request_ids_by_name: a SQL LIKE ("_" any character, "*" any run).
        pattern = re.compile(
            ".*".join(re.escape(part).replace("_", ".") for part in name.split("*")) + r"\Z"
        )
        return _ok(
            {task.name: task.request_id for task in self.all_tasks if pattern.match(task.name)}
        )

    def _requests(self, request_id: str, with_detail: str) -> Answer:
        """A request's row, or with details a row per transform of it (the
        transform's and processing's columns as iDDS labels them); every
        request without an id. A subset of iDDS's columns, statuses encoded
        as iDDS's JSON encoder writes its enums (idds-client decodes them
        back into enums): as the real app answers."""
        wanted = _task_id(request_id)
        rows = [
            {
                "request_id": t.request_id,
                "scope": t.scope,
                "name": t.name,
                "workload_id": None,
                "status": RequestStatus.Transforming,
            }
            | (
                {
                    "transform_id": t.transform_id,
                    "transform_name": t.name,
                    "transform_workload_id": t.workload_id,
                    "transform_status": TransformStatus.New,
                    "processing_id": t.processing_id,
                    "processing_workload_id": t.workload_id,
                    "processing_status": ProcessingStatus[t.status],
                }
                if with_detail.lower() == "true"
                else {}
            )
            for t in self.all_tasks
            if wanted is None or str(t.request_id) == str(wanted)
        ]
        return Answer(200, "ok", idds_json_dumps(rows).encode())

    def _adjust(self, ids: dict[str, str], body: bytes) -> Answer:
        parameters = _mapping(_parameters(body))
        content = parameters.get("content")
        content = content if isinstance(content, Mapping) else {}
        try:
            size: WorkerSize | None = WorkerSize(
                core_count=parameters.get("core_count"),
                memory_per_core=parameters.get("memory_per_core"),
                site=parameters.get("site"),
                target_worker_count=content.get("target_worker_count"),
            )
        except ValidationError:
            size = None  # iDDS stores whatever it is given; nothing to resize
        request_id, transform_id, workload_id = (
            _task_id(ids.get(k)) for k in ("request_id", "transform_id", "workload_id")
        )
        # iDDS updates the transform named in the path; without one, nothing.
        task = self._book.adjust(transform_id, size.target_worker_count if size else None)
        run_id = task.run_id if task is not None else None
        with self._state.lock:
            self.adjustments.append(
                Adjustment(run_id, request_id, transform_id, workload_id, size, dict(parameters))
            )
            self._state.notify()
        adjusted = self._on_adjust
        then = None
        if run_id is not None and size is not None and adjusted is not None:
            then = partial(adjusted, run_id, size)
        return _ok({"status": 0, "message": "adjusted successfully"}, then)

    def _close(self, ids: dict[str, str], body: bytes, path: str) -> Answer:
        parameters = dict(_mapping(_parameters(body) or {}))
        legacy_workload_id = _task_id(ids.get("workload_id"))
        if legacy_workload_id is not None and not parameters.get("workload_id"):
            parameters["workload_id"] = legacy_workload_id
        # iDDS's REST close passes no run id on: given no ids, it filters on nothing.
        self._book.close(
            _task_id(ids.get("request_id")),
            _task_id(parameters.get("transform_id")),
            _task_id(parameters.get("workload_id")),
            None,
            request=f"PUT {path} {json.dumps(parameters, default=str)}",
        )
        # The real iDDS says the same whether it cancelled one, none or all.
        return _ok({"status": 0, "message": "closed successfully"})

    # --- control endpoints --------------------------------------------------

    def _control(self, method: str, action: str, body: bytes) -> Answer:
        try:
            if method == "GET" and action == "/state":
                return _json(200, self.state(), "control")
            if method != "POST" or action not in ("/fail", "/delay", "/clear"):
                return _json(
                    404, {"error": f"no control {method} {CONTROL_PREFIX}{action}"}, "control"
                )
            args = json.loads(body) if body else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            if action == "/fail":
                _only(args, {"count", "status", "exception_class", "message", "endpoint"})
                self.fail_next(**args)
            elif action == "/delay":
                _only(args, {"seconds", "endpoint"})
                self.delay(**args)
            else:
                _only(args, set())
                self.clear_faults()
            return _json(200, {"ok": True}, "control")
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": str(exc)}, "control")


def client_env(port: int, token: str, config_root: Path, vo: str = "eic") -> dict[str, str]:
    """idds-client's own settings for the simulated server on ``port``, as an
    operator would export them: OIDC with ``token``, its local configuration
    under ``config_root`` (not ~/.idds)."""
    return {
        "IDDS_HOST": f"http://127.0.0.1:{port}{PREFIX}",
        "IDDS_AUTH_TYPE": "oidc",
        "IDDS_OIDC_TOKEN": token,
        "IDDS_VO": vo,
        "IDDS_LOCAL_CONFIG_ROOT": str(config_root),
    }


# --- the HTTP side ----------------------------------------------------------


class _Server(LocalHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        sim: SimulatedIDDSRest,
    ) -> None:
        self.sim = sim
        super().__init__(address, handler)


class _Handler(PeerRequestHandler):
    server: _Server
    server_version = "sim-idds"

    def do_DELETE(self) -> None:  # http.server's naming
        self.answer(self._body())

    def answer(self, body: bytes) -> None:
        # A bad Content-Length reads as an empty body: iDDS's own "must not be
        # empty" answers.
        answer = self.server.sim._handle(self.command, self.path, dict(self.headers.items()), body)
        self.reply(
            answer.status,
            [(name, header_safe(value)) for name, value in answer.headers],
            answer.body,
        )
        if answer.then is not None:
            try:
                answer.then()
            except Exception:  # the simulator keeps serving; the log says what broke
                log.exception(
                    "simulated iDDS: callback after %s %s failed", self.command, self.path
                )


# --- helpers ------------------------------------------------------------------


def _route(method: str, path: str) -> tuple[Endpoint | None, dict[str, str], Answer]:
    """The endpoint and path ids; or no endpoint and the 404/405 answer."""
    if path.startswith(PREFIX + "/"):
        api_path = path[len(PREFIX) :]
        methods: set[str] = set()
        for pattern, endpoint, allowed in _ROUTES:
            matched = pattern.match(api_path)
            if matched is None:
                continue
            if method == allowed:
                return endpoint, matched.groupdict(), Answer(200, "ok")
            methods.add(allowed)
        status = 405 if methods else 404
    else:
        status = 404
    return (
        None,
        {},
        _error_raw(
            status,
            "IDDSException",
            f"The requested REST API is not defined: {_NO_API[status]}",
            "no_api",
        ),
    )


def _parameters(body: bytes) -> Any:
    """``body["parameters"]`` as iDDS reads it (missing: {}); a body that is
    not a JSON object is the 400 iDDS answers."""
    try:
        data = (json.loads(body) if body else {}) or {}
        return data.get("parameters", {})
    except (ValueError, AttributeError):
        raise _Rejected(_undecodable()) from None


def _as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mapping(value: Any) -> Mapping[str, Any]:
    # iDDS calls .get on it: anything else fails there, with Python's words.
    if not isinstance(value, Mapping):
        raise _Rejected(
            _error(
                500,
                "CoreException",
                f"'{type(value).__name__}' object has no attribute 'get'",
                "error",
                wrap=False,
            )
        )
    return value


def _task_id(value: Any) -> TaskId:
    """An id as iDDS filters on it: missing, null, "null", "" or 0 filter
    nothing; digits are the integer; any other text matches nothing."""
    if value is None or value in ("null", "", 0) or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def _ok(data: dict[str, Any], then: Callable[[], None] | None = None) -> Answer:
    return Answer(200, "ok", json.dumps(data).encode(), then=then)


def _json(status: int, data: dict[str, Any], outcome: str) -> Answer:
    return Answer(status, outcome, json.dumps(data, default=str).encode())


def _error(
    status: int, exception_class: str, message: str, outcome: str, wrap: bool = True
) -> Answer:
    """As iDDS's generate_http_response after ``raise ExceptionClass(message)``:
    ExceptionMessage is ``{"msg": str(the exception)}``. ``wrap=False`` for a
    plain Python error, whose text iDDS sends as it is."""
    cls = getattr(idds_exceptions, exception_class, None)
    text = str(cls(message)) if wrap and isinstance(cls, type) else message
    return _error_raw(status, exception_class, json.dumps({"msg": text}), outcome)


def _error_raw(status: int, exception_class: str, header_message: str, outcome: str) -> Answer:
    return Answer(
        status,
        outcome,
        b"",
        (
            ("Content-Type", "application/json"),
            ("ExceptionClass", exception_class),
            ("ExceptionMessage", header_message),
        ),
    )


def _auth_failed(reason: str) -> Answer:
    # iDDS's generate_failed_auth_response: IDDSException, the bare reason.
    return _error_raw(401, "IDDSException", reason, "unauthorized")


def _undecodable() -> Answer:
    return _error(
        400, "BadRequest", "Cannot decode JSON parameter dictionary", "bad_request", wrap=False
    )


def _redacted(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: REDACTED if any(w in name.lower() for w in _SECRET_HEADER_WORDS) else value
        for name, value in headers.items()
    }


def _check_endpoint(endpoint: str | None) -> None:
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)} (or none for all)")


def _only(args: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(args) - allowed
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
