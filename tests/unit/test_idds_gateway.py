"""REST mode's pure part: what the iDDS clients return becomes the answer
message the run flow expects, or an error carrying iDDS's own words; and the
REST gateway sends iDDS exactly what its handlers read."""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from swf_panda_workers.adapters.idds_rest_client import (
    IddsNotConfigured,
    RestGateway,
    check_rest_client,
    direct_api,
)
from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.config.schema import Idds, Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.idds_gateway import (
    IddsRequestFailed,
    adjusted_answer,
    client_result,
    closed_answer,
    created_answer,
    relay_result,
)
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    RunImminent,
    WorkerSize,
    WorkflowIds,
    parse_message,
)
from swf_panda_workers.core.outbound import UnsafeMessage
from swf_panda_workers.core.run_state import apply, initial_state
from swf_testbed.peers.grid_pki import GridPki

NOW = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)
IDS = WorkflowIds(request_id=1001, transform_id=2001, workload_id=60001)
CREATED = {
    "request_id": 1001,
    "transform_id": 2001,
    "processing_id": 3001,
    "input_coll_id": 40002,
    "output_coll_id": 40003,
    "workload_id": 60001,
}
SIZE = WorkerSize(core_count=2, memory_per_core=4000, site="BNL", target_worker_count=36)


def announced(run_id: str = "100123") -> RunImminent:
    message = parse_message(
        {
            "msg_type": "run_imminent",
            "run_id": run_id,
            "content": {"target_worker_count": 30, "core_count": 2},
        }
    )
    assert isinstance(message, RunImminent)
    return message


# --- unwrapping -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        CREATED,
        {"status": 0, "message": "closed successfully"},
        None,
        [1, 2],
        (0, "zero is not False"),
        [True, "ok"],
    ],
)
def test_client_result_passes_any_answer_through(answer: object) -> None:
    assert client_result(answer, "close_workflow_task") == answer


@pytest.mark.parametrize(
    "failure",
    [
        (False, "Core exception.: {}\nDetails: database is gone"),
        (-1, "request_id is None"),
        [False, "relayed through PanDA: a JSON list"],
    ],
)
def test_client_failure_pairs_become_errors_with_the_message(failure: Sequence[Any]) -> None:
    with pytest.raises(IddsRequestFailed) as caught:
        client_result(failure, "close_workflow_task")

    assert "close_workflow_task" in str(caught.value)
    assert failure[1] in str(caught.value)


def test_relay_success_unwraps_to_the_answer() -> None:
    assert relay_result((0, (True, CREATED)), "create_workflow_task") == CREATED
    assert relay_result([0, [True, CREATED]], "create_workflow_task") == CREATED


@pytest.mark.parametrize(
    ("wrapped", "words"),
    [
        ((255, "dialog failed: connection refused"), "status 255"),
        ((0, [False, "Core exception.: no such request"]), "no such request"),
        ((0, [True, [False, "Bad request exception."]]), "Bad request exception."),
        ((0, [True, [-1, "request_id is None"]]), "request_id is None"),
        ((0, "not a pair"), "unreadable"),
        ("garbage", "unreadable"),
    ],
)
def test_relay_failures_name_what_went_wrong(wrapped: object, words: str) -> None:
    with pytest.raises(IddsRequestFailed, match=words):
        relay_result(wrapped, "adjust_worker")


def test_a_huge_answer_is_cut_in_the_error_message() -> None:
    with pytest.raises(IddsRequestFailed) as caught:
        client_result((False, "x" * 100_000), "create_workflow_task")

    assert len(str(caught.value)) < 700
    assert "100000 characters" in str(caught.value)


# --- answers ----------------------------------------------------------------------


def test_created_answer_is_the_reply_message_mode_would_get() -> None:
    answer = created_answer("100123", CREATED, NOW)

    assert isinstance(answer, CreatedWorkflowTask)
    assert answer.run_id == "100123"
    assert answer.ids == IDS
    assert answer.content.processing_id == 3001
    # It folds into the run state like the bus reply does.
    state = apply(answer, initial_state(announced(), Settings()), NOW)
    assert state.ids == IDS


def test_created_answer_accepts_a_pending_workload() -> None:
    answer = created_answer("100123", {**CREATED, "workload_id": None}, NOW)

    assert answer.ids.workload_id is None


@pytest.mark.parametrize(
    "result",
    [
        None,
        "ok",
        {"request_id": None, "transform_id": 2},
        {"transform_id": 2},
        {"request_id": "abc", "transform_id": 2},
    ],
)
def test_a_create_answer_without_ids_is_a_failed_request(result: object) -> None:
    with pytest.raises(IddsRequestFailed, match="create_workflow_task"):
        created_answer("100123", result, NOW)


def test_adjusted_answer_confirms_the_size_asked_for() -> None:
    answer = adjusted_answer("100123", IDS, SIZE, NOW)

    assert isinstance(answer, AdjustedWorker)
    state = apply(answer, initial_state(announced(), Settings()), NOW)
    assert state.applied == SIZE


def test_closed_answer_keeps_idds_words_as_the_status() -> None:
    answer = closed_answer("100123", IDS, {"status": 0, "message": "closed successfully"}, NOW)

    assert isinstance(answer, ClosedWorkflowTask)
    assert answer.content.status == "closed successfully"
    assert answer.content.request_id == 1001
    state = apply(answer, initial_state(announced(), Settings()), NOW)
    assert state.closed_status == "closed successfully"


def test_closed_answer_without_a_message_still_closes() -> None:
    assert closed_answer("7", IDS, None, NOW).content.status == "closed (None)"


# --- what the REST gateway sends ---------------------------------------------------


class RecordingApi:
    """Stands in for an iDDS client object: records the calls, answers as told.
    ``tasks``: what iDDS holds, by workflow name (``make`` on a create adds
    one, as iDDS 2.6.21 does even when it answers the create with an error)."""

    def __init__(
        self,
        answers: dict[str, object],
        make: bool = False,
        tasks: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.answers = answers
        self.make = make
        self.tasks = dict(tasks or {})
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def create_workflow_task(self, workflow: dict[str, Any]) -> object:
        self.calls.append(("create", (workflow,)))
        if self.make:
            self.tasks[workflow["name"]] = {
                **CREATED,
                "name": workflow["name"],
                "run_id": workflow["content"]["run_id"],
            }
        return self.answers["create"]

    def get_request_id_by_name(self, name: str) -> object:
        self.calls.append(("lookup", (name,)))
        # As iDDS: a SQL LIKE, where "_" stands for any character.
        pattern = re.compile(re.escape(name).replace("_", ".") + r"\Z")
        return {n: t["request_id"] for n, t in self.tasks.items() if pattern.match(n)}

    def get_requests(self, request_id: int, with_detail: bool = False) -> object:
        self.calls.append(("transforms", (request_id, with_detail)))
        return [
            {
                "request_id": request_id,
                "name": n,
                "transform_id": t["transform_id"],
                "transform_workload_id": t["workload_id"],
                "transform_name": n,
            }
            for n, t in self.tasks.items()
            if t["request_id"] == request_id
        ]

    def adjust_worker(
        self,
        request_id: int,
        transform_id: int,
        workload_id: int | None,
        parameters: dict[str, Any],
    ) -> object:
        self.calls.append(("adjust", (request_id, transform_id, workload_id, parameters)))
        return self.answers["adjust"]

    def close_workflow_task(self, request_id: int, parameters: dict[str, Any]) -> object:
        self.calls.append(("close", (request_id, parameters)))
        return self.answers["close"]


def gateway(api: RecordingApi) -> RestGateway:
    return RestGateway(lambda: api, client_result, Settings())


def workflow(run: RunImminent | None = None) -> dict[str, Any]:
    return outbound.workflow_for(run or announced(), Settings(), NOW)


NAME = "EIC_2026_fastproc_BNL-OSG_20260305_100123"


def test_rest_create_sends_the_workflow_and_returns_the_ids() -> None:
    api = RecordingApi({"create": CREATED})

    answer = gateway(api).create_workflow_task(announced(), workflow(), NOW)

    assert answer.ids == IDS
    # The run's task looked for first: an earlier attempt may have made it.
    assert [kind for kind, _ in api.calls] == ["lookup", "create"]
    ((_, (sent,)),) = [call for call in api.calls if call[0] == "create"]
    assert sent["content"]["run_id"] == "100123"
    assert sent["content"]["target_worker_count"] == 30
    assert sent["name"] == NAME


def test_idds_2_6_21_answers_a_create_with_500_after_making_the_task() -> None:
    # Its REST handler fails unpacking its own result: the task exists.
    api = RecordingApi(
        {"create": (False, "Core exception.: {}\nDetails: too many values to unpack (expected 6)")},
        make=True,
    )

    answer = gateway(api).create_workflow_task(announced(), workflow(), NOW)

    assert answer.ids == IDS
    assert [kind for kind, _ in api.calls] == ["lookup", "create", "lookup", "transforms"]


def test_a_retried_create_finds_the_task_and_makes_no_second() -> None:
    api = RecordingApi({"create": CREATED}, tasks={NAME: {**CREATED, "run_id": "100123"}})

    answer = gateway(api).create_workflow_task(announced(), workflow(), NOW)

    assert answer.ids == IDS
    assert "create" not in [kind for kind, _ in api.calls]


def test_a_similar_name_is_not_the_runs_task() -> None:
    # iDDS's name lookup is a LIKE: "_" matches any character.
    similar = NAME.replace("BNL-OSG_", "BNL-OSGx")
    api = RecordingApi({"create": CREATED}, tasks={similar: {**CREATED, "run_id": "100123"}})

    gateway(api).create_workflow_task(announced(), workflow(), NOW)

    assert "create" in [kind for kind, _ in api.calls]


def test_a_failed_create_that_made_no_task_fails() -> None:
    api = RecordingApi({"create": (False, "Core exception.: {}\nDetails: PanDA is down")})

    with pytest.raises(IddsRequestFailed, match="PanDA is down"):
        gateway(api).create_workflow_task(announced(), workflow(), NOW)
    assert [kind for kind, _ in api.calls] == ["lookup", "create", "lookup"]


def test_a_create_whose_lookup_fails_is_not_sent() -> None:
    # Not knowing whether the run has a task, a create could make a second.
    class Unreachable(RecordingApi):
        def get_request_id_by_name(self, name: str) -> object:
            return (False, "Connection refused")

    api = Unreachable({"create": CREATED})
    with pytest.raises(IddsRequestFailed, match="Connection refused"):
        gateway(api).create_workflow_task(announced(), workflow(), NOW)
    assert api.calls == []


def test_rest_adjust_sends_what_the_idds_handler_reads() -> None:
    api = RecordingApi({"adjust": {"status": 0, "message": "adjusted successfully"}})

    answer = gateway(api).adjust_worker("100123", IDS, SIZE, NOW)

    ((_, (request_id, transform_id, workload_id, parameters)),) = api.calls
    assert (request_id, transform_id, workload_id) == (1001, 2001, 60001)
    assert parameters["core_count"] == 2
    assert parameters["memory_per_core"] == 4000
    assert parameters["site"] == "BNL"
    assert parameters["content"]["target_worker_count"] == 36
    assert parameters["content"]["request_id"] == 1001
    assert parameters["content"]["run_id"] == "100123"
    assert answer.content.target_worker_count == 36


def test_rest_close_filters_on_the_run_ids() -> None:
    api = RecordingApi({"close": {"status": 0, "message": "closed successfully"}})

    answer = gateway(api).close_workflow_task("100123", IDS, NAME, NOW)

    ((_, (request_id, parameters)),) = api.calls
    assert request_id == 1001
    assert {k: parameters[k] for k in ("request_id", "transform_id", "workload_id", "run_id")} == {
        "request_id": 1001,
        "transform_id": 2001,
        "workload_id": 60001,
        "run_id": "100123",
    }
    assert answer.content.status == "closed successfully"


def test_rest_close_without_ids_closes_the_task_found_by_name() -> None:
    # iDDS's REST close ignores the run id: given no ids it would cancel
    # every processing it has. The task is looked up by its name instead.
    api = RecordingApi(
        {"close": {"status": 0, "message": "closed successfully"}},
        tasks={NAME: {**CREATED, "run_id": "100123"}},
    )

    answer = gateway(api).close_workflow_task("100123", None, NAME, NOW)

    assert [kind for kind, _ in api.calls] == ["lookup", "transforms", "close"]
    (_, (request_id, parameters)) = api.calls[-1]
    assert request_id == 1001 and parameters["transform_id"] == 2001
    assert answer.content.status == "closed successfully"


def test_rest_close_without_ids_of_a_run_without_task_sends_nothing() -> None:
    api = RecordingApi({"close": {"status": 0}})

    answer = gateway(api).close_workflow_task("100123", None, NAME, NOW)

    assert [kind for kind, _ in api.calls] == ["lookup"]
    assert answer.content.status == "NotFound"


def test_rest_adjust_without_ids_is_never_sent() -> None:
    api = RecordingApi({"adjust": {"status": 0}})

    with pytest.raises(UnsafeMessage):
        gateway(api).adjust_worker("100123", None, SIZE, NOW)  # type: ignore[arg-type]
    assert api.calls == []


def test_the_client_is_made_once_on_first_use() -> None:
    made: list[RecordingApi] = []
    api = RecordingApi({"adjust": {"status": 0}, "close": {"status": 0}})

    def connect() -> RecordingApi:
        made.append(api)
        return api

    rest = RestGateway(connect, client_result, Settings())
    assert made == []
    rest.adjust_worker("1", IDS, SIZE, NOW)
    rest.close_workflow_task("1", IDS, NAME, NOW)
    assert len(made) == 1


# --- the runner's start-up check ---------------------------------------------------

IDDS_CLIENT_ENV = (
    "IDDS_HOST",
    "IDDS_CONFIG",
    "IDDS_AUTH_TYPE",
    "IDDS_OIDC_TOKEN",
    "IDDS_OIDC_TOKEN_FILE",
    "IDDS_VO",
    "OIDC_AUTH_ID_TOKEN",
    "OIDC_AUTH_TOKEN_FILE",
    "OIDC_AUTH_VO",
    "X509_USER_PROXY",
)


@pytest.fixture
def idds_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """idds-client's environment, empty, with its local config in tmp_path."""
    for name in IDDS_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDDS_LOCAL_CONFIG_ROOT", str(tmp_path))
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "no-such-proxy"))
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"IDDS_HOST": "http://idds.example:443/idds"}, "Cannot find a valid x509 proxy"),
        (
            {
                "IDDS_HOST": "http://idds.example:443/idds",
                "IDDS_AUTH_TYPE": "oidc",
                "IDDS_OIDC_TOKEN": "t0ken",
            },
            "vo is not defined",
        ),
        (
            {"IDDS_AUTH_TYPE": "oidc", "IDDS_OIDC_TOKEN": "t0ken", "IDDS_VO": "eic"},
            "set idds.host in the configuration or IDDS_HOST",
        ),
    ],
)
def test_the_runner_refuses_rest_mode_without_host_or_credentials(
    idds_env: pytest.MonkeyPatch,
    env: dict[str, str],
    words: str,
) -> None:
    for name, value in env.items():
        idds_env.setenv(name, value)

    with pytest.raises(IddsNotConfigured, match=words) as caught:
        check_rest_client(Settings())
    assert "t0ken" not in str(caught.value)


def test_the_runner_accepts_a_complete_oidc_setup_without_calling_idds(
    idds_env: pytest.MonkeyPatch,
) -> None:
    # Nothing listens on the host: building the client must not call it.
    for name, value in {
        "IDDS_HOST": "http://127.0.0.1:9/idds",
        "IDDS_AUTH_TYPE": "oidc",
        "IDDS_OIDC_TOKEN": "t0ken",
        "IDDS_VO": "eic",
    }.items():
        idds_env.setenv(name, value)

    check_rest_client(Settings())


# --- iDDS's server certificate ----------------------------------------------------
# idds-client 2.6.21 sends every request with verify=False; idds.ca_certs
# (IDDS_CA_CERTS) makes the direct route verify it anyway.


@pytest.fixture(scope="module")
def tls_idds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, GridPki]]:
    """An HTTPS server with the test PKI's host certificate, answering every
    GET as iDDS answers a lookup of an unknown name (``{}``)."""
    pki = GridPki.make(tmp_path_factory.mktemp("pki"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:  # http.server's naming
            pass  # the test reads answers, not the log

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/idds", pki
    server.shutdown()
    server.server_close()


def _lookup_through(
    idds_env: pytest.MonkeyPatch, url: str, pki: GridPki, ca_certs: Path | None
) -> object:
    idds_env.setenv("IDDS_HOST", url)
    idds_env.setenv("X509_USER_PROXY", str(pki.user.path))
    api = direct_api(Idds(ca_certs=ca_certs))
    return api.get_request_id_by_name("EIC_2026_fastproc_BNL_20260305_100123")


def test_the_direct_route_verifies_idds_certificate_against_the_configured_cas(
    idds_env: pytest.MonkeyPatch,
    tls_idds: tuple[str, GridPki],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    url, pki = tls_idds
    other = GridPki.make(tmp_path_factory.mktemp("other-pki"))

    assert _lookup_through(idds_env, url, pki, pki.ca) == {}
    refused = _lookup_through(idds_env, url, pki, other.ca)
    assert isinstance(refused, tuple) and refused[0] is False
    assert "CERTIFICATE_VERIFY_FAILED" in refused[1]


def test_without_cas_the_certificate_goes_unverified_and_the_runner_says_so(
    idds_env: pytest.MonkeyPatch,
    tls_idds: tuple[str, GridPki],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, pki = tls_idds
    # idds-client's own behaviour: any certificate is accepted.
    assert _lookup_through(idds_env, url, pki, None) == {}

    with caplog.at_level(logging.WARNING):
        check_rest_client(Settings())
    assert f"iDDS's server certificate at {url} is not verified" in caplog.text

    caplog.clear()
    settings = settings_from({}, {"IDDS_CA_CERTS": str(pki.ca)})
    assert settings.idds.ca_certs == pki.ca
    check_rest_client(settings)
    assert "not verified" not in caplog.text


def test_missing_cas_stop_the_runner(idds_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    idds_env.setenv("IDDS_HOST", "https://127.0.0.1:9/idds")
    proxy = tmp_path / "x509up"
    proxy.write_text("a proxy\n")
    idds_env.setenv("X509_USER_PROXY", str(proxy))

    with pytest.raises(IddsNotConfigured, match="does not exist"):
        check_rest_client(Settings(idds=Idds(ca_certs=tmp_path / "no-such-ca.pem")))
