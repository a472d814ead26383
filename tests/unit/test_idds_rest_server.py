"""The simulated iDDS REST server, driven over HTTP by the real idds-client
ClientManager: answers, records, authentication, faults, and what the client
makes of each (the ``(False, text)`` it returns instead of raising)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from idds.common.constants import ProcessingStatus, RequestStatus, TransformStatus

from swf_panda_workers.core.messages import WorkerSize
from swf_testbed.peers.idds_rest.control_client import SimControl
from swf_testbed.peers.idds_rest.server import REDACTED, RestCall, SimulatedIDDSRest
from swf_testbed.peers.idds_tasks import TaskInfo

if TYPE_CHECKING:
    from conftest import Seen  # the shared fixtures' type (tests/unit/conftest.py)

    # Imported where used, after IDDS_LOCAL_CONFIG_ROOT is set: importing the
    # client reads (and creates) its local config directory, ~/.idds by default.
    from idds.client.clientmanager import ClientManager

TOKEN = f"sim-token-{uuid.uuid4().hex}"  # unique, so finding it anywhere means a leak
VO = "eic"
WAIT = 10.0
FIRST_IDS = {
    "request_id": 1001,
    "transform_id": 2001,
    "processing_id": 3001,
    "input_coll_id": 40002,
    "output_coll_id": 40003,
    "workload_id": 60001,
}
OK_ADJUSTED = {"status": 0, "message": "adjusted successfully"}
OK_CLOSED = {"status": 0, "message": "closed successfully"}

# Anything that would make the client read credentials or settings from
# elsewhere than what a test sets.
CLIENT_ENV = (
    "IDDS_HOST",
    "IDDS_CONFIG",
    "IDDS_AUTH_TYPE",
    "IDDS_OIDC_TOKEN",
    "IDDS_OIDC_TOKEN_FILE",
    "IDDS_VO",
    "OIDC_AUTH_ID_TOKEN",
    "OIDC_AUTH_TOKEN_FILE",
    "OIDC_AUTH_VO",
    "IDDS_ENABLE_JSON_OUTPUTS",
    "IDDS_CLIENT_MAX_RETRIES",
    "X509_USER_PROXY",
)


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Sets the client's environment as an operator would (and its local
    config directory to a temporary one, not ~/.idds)."""
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDDS_LOCAL_CONFIG_ROOT", str(tmp_path / "idds"))

    def set_env(host: str, token: str | None = TOKEN, vo: str = VO) -> None:
        monkeypatch.setenv("IDDS_HOST", host)
        monkeypatch.setenv("IDDS_AUTH_TYPE", "oidc")
        monkeypatch.setenv("IDDS_VO", vo)
        if token is not None:
            monkeypatch.setenv("IDDS_OIDC_TOKEN", token)

    return set_env


@pytest.fixture
def manager(server: SimulatedIDDSRest, client_env: Callable[..., None]) -> ClientManager:
    client_env(server.url)
    return connect()


def connect(timeout: float = 10) -> ClientManager:
    from idds.client.clientmanager import ClientManager

    m = ClientManager(timeout=timeout)
    m.setup_client()
    # The client retries refused connections after random sleeps of up to 30 s.
    m.client.retries = 1
    return m


def workflow(run_id: str, target: int = 3) -> dict[str, Any]:
    return {
        "scope": "eic",
        "name": f"eic_EIC_fastprocessing_BNL_20260305_{run_id}",
        "requester": "swf",
        "username": "swf",
        "transform_tag": "EIC",
        "cloud": "US",
        "campaign": "EIC",
        "campaign_scope": "eic",
        "campaign_group": "fastprocessing",
        "campaign_tag": "test",
        "content": {
            "run_id": run_id,
            "core_count": 1,
            "memory_per_core": 2000,
            "site": "BNL",
            "target_worker_count": target,
        },
    }


def auth_headers(token: str | None = TOKEN, auth_type: str = "oidc") -> dict[str, str]:
    headers = {"X-IDDS-Auth-Type": auth_type, "X-IDDS-Auth-VO": VO}
    if token is not None:
        headers["X-IDDS-Auth-Token"] = token
    return headers


def raw(
    server: SimulatedIDDSRest,
    method: str,
    path: str,
    body: str | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """A request the client would not send, as plain HTTP."""
    return requests.request(
        method,
        server.url + path,
        data=body,
        timeout=WAIT,
        headers=auth_headers() if headers is None else headers,
    )


def exception_message(response: requests.Response) -> str:
    return response.headers["ExceptionMessage"]


# --- answers ------------------------------------------------------------------


def test_create_answers_the_ids_and_starts_the_run(
    server: SimulatedIDDSRest, manager: ClientManager, created: Seen
) -> None:
    wf = workflow("100123")
    assert manager.create_workflow_task(wf) == FIRST_IDS

    assert created.wait_len(1)
    run_id, task = created.items[0]
    assert run_id == "100123"
    assert isinstance(task, TaskInfo)
    assert (task.request_id, task.workload_id, task.target_worker_count) == (1001, 60001, 3)
    assert server.tasks == {"100123": task}
    (call,) = server.calls
    assert (call.method, call.path, call.endpoint, call.status) == (
        "POST",
        "/idds/workflow_task",
        "create",
        200,
    )
    assert call.body == {"workflow": wf}
    assert call.headers["X-IDDS-Auth-Type"] == "oidc"
    assert call.headers["X-IDDS-Auth-VO"] == VO
    assert call.headers["X-IDDS-Auth-Token"] == REDACTED


def test_a_repeated_create_fails_and_starts_nothing(
    server: SimulatedIDDSRest, manager: ClientManager, created: Seen
) -> None:
    # iDDS keeps one transform per request and name: the second fails adding it.
    first = manager.create_workflow_task(workflow("100"))
    assert first == FIRST_IDS
    ok, text = manager.create_workflow_task(workflow("100", target=7))
    assert ok is False and "Transform already exists" in text
    assert server.duplicate_creates == {"100": 1}
    assert server.tasks["100"].target_worker_count == 3

    # Another run gets the next ids; its start is the only other one.
    other = manager.create_workflow_task(workflow("101"))
    assert isinstance(other, dict) and other["request_id"] == 1002
    assert created.wait_len(2)
    assert [run for run, _ in created.items] == ["100", "101"]


def test_workload_pending_answers_a_null_workload_id(
    client_env: Callable[..., None], created: Seen
) -> None:
    with SimulatedIDDSRest(
        token=TOKEN, workload_pending=True, create_fails_after=False, on_task_created=created.add
    ) as sim:
        client_env(sim.url)
        answer = connect().create_workflow_task(workflow("100"))
        assert answer == {**FIRST_IDS, "workload_id": None}
        assert created.wait_len(1)
        assert sim.tasks["100"].workload_id is None


def test_adjust_with_a_null_workload_id_reaches_the_run(
    server: SimulatedIDDSRest, manager: ClientManager, adjusted: Seen
) -> None:
    manager.create_workflow_task(workflow("100"))
    parameters = {
        "core_count": 2,
        "memory_per_core": 3000,
        "site": "BNL",
        "content": {
            "run_id": "100",
            "request_id": 1001,
            "transform_id": 2001,
            "workload_id": None,
            "target_worker_count": 5,
        },
    }
    assert manager.adjust_worker(1001, 2001, None, parameters) == OK_ADJUSTED

    assert adjusted.wait_len(1)
    assert adjusted.items == [
        ("100", WorkerSize(core_count=2, memory_per_core=3000, site="BNL", target_worker_count=5))
    ]
    # iDDS 2.6.21 stores core_count, memory_per_core and site, no worker count.
    assert server.tasks["100"].target_worker_count == 3
    (call,) = server.calls_to("adjust")
    assert (call.method, call.path, call.status) == (
        "PUT",
        "/idds/workflow_task/1001/2001/null/adjust",
        200,
    )
    (adjustment,) = server.adjustments
    assert (adjustment.run_id, adjustment.request_id, adjustment.workload_id) == ("100", 1001, None)


def test_adjust_without_a_transform_id_changes_nothing(
    server: SimulatedIDDSRest, manager: ClientManager, adjusted: Seen
) -> None:
    # iDDS updates the transform the path names: with "null" there is none,
    # and it still answers that it adjusted.
    manager.create_workflow_task(workflow("100"))
    grow = {"content": {"run_id": "100", "target_worker_count": 9}}
    assert manager.adjust_worker(1001, None, 60001, grow) == OK_ADJUSTED
    assert server.calls_to("adjust")[0].path == "/idds/workflow_task/1001/null/60001/adjust"
    assert server.adjustments[0].run_id is None
    assert server.tasks["100"].target_worker_count == 3

    assert (
        manager.adjust_worker(1001, 2001, 60001, {"content": {"target_worker_count": 4}})
        == OK_ADJUSTED
    )
    assert adjusted.wait_len(1)
    assert [(run, size.target_worker_count) for run, size in adjusted.items] == [("100", 4)]


def test_close_of_a_known_task_is_to_cancel(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    manager.create_workflow_task(workflow("100"))
    parameters = {"run_id": "100", "request_id": 1001, "transform_id": 2001, "workload_id": 60001}
    assert manager.close_workflow_task(1001, parameters) == OK_CLOSED
    assert server.closed == {"100": "ToCancel"}
    assert server.calls_to("close")[0].path == "/idds/workflow_task/1001/close"
    assert server.violations == []


def test_close_of_an_unknown_task_is_answered_ok_and_recorded_not_found(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    manager.create_workflow_task(workflow("100"))
    assert manager.close_workflow_task(4242, {"run_id": "999"}) == OK_CLOSED
    # Every id given must match, as iDDS filters: this transform is not run 100's.
    assert manager.close_workflow_task(1001, {"run_id": "100", "transform_id": 9999}) == OK_CLOSED
    # iDDS's REST close passes no run id on: the records name the request.
    assert server.closed == {"request_id=4242": "NotFound", "request_id=1001": "NotFound"}


def test_the_legacy_close_path_reads_the_workload_id_from_the_path(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    manager.create_workflow_task(workflow("100"))
    reply = raw(server, "PUT", "/workflow_task/null/60001/close", json.dumps({"parameters": {}}))
    assert (reply.status_code, reply.json()) == (200, OK_CLOSED)
    assert server.closed == {"100": "ToCancel"}
    assert server.violations == []


def test_a_close_with_no_ids_at_all_is_a_violation(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    # ClientManager itself refuses a null request_id, without asking iDDS...
    assert manager.close_workflow_task(None, {"run_id": "100"}) == (-1, "request_id is None")
    assert server.calls == []
    # ...but its REST client sends it, and iDDS would cancel every processing.
    nothing = {"run_id": None, "request_id": None, "transform_id": None, "workload_id": None}
    assert manager.client.close_workflow_task(None, nothing) == OK_CLOSED
    assert server.calls_to("close")[0].path == "/idds/workflow_task/null/close"
    assert len(server.violations) == 1
    assert "close_workflow_task with no ids" in server.violations[0]
    assert server.closed == {}


def test_a_create_without_a_run_id_is_a_violation(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    answer = manager.create_workflow_task({"scope": "eic", "name": "x", "content": {}})
    assert isinstance(answer, dict) and answer["request_id"] == 1001
    assert server.tasks == {}
    assert len(server.violations) == 1 and "without content.run_id" in server.violations[0]


# --- errors, as the client reports them ---------------------------------------------


def test_bad_requests_are_400_bad_request(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    ok, text = manager.create_workflow_task({})
    assert ok is False
    assert text.startswith("Bad request exception.")
    assert "'workflow' key is required in the request body" in text

    empty = raw(server, "POST", "/workflow_task")
    assert empty.status_code == 400
    assert empty.headers["ExceptionClass"] == "BadRequest"
    assert "Request body must not be empty" in exception_message(empty)
    garbled = raw(server, "PUT", "/workflow_task/1/2/3/adjust", "{not json")
    assert garbled.status_code == 400
    assert json.loads(exception_message(garbled)) == {
        "msg": "Cannot decode JSON parameter dictionary"
    }
    assert server.tasks == {}
    assert [c.status for c in server.calls] == [400, 400, 400]


def test_an_unknown_api_is_404_and_a_wrong_method_405(server: SimulatedIDDSRest) -> None:
    wrong_method = raw(server, "GET", "/workflow_task")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["ExceptionClass"] == "IDDSException"
    assert exception_message(wrong_method).startswith("The requested REST API is not defined")
    assert raw(server, "PUT", "/workflow_task/1/2/3/4/close").status_code == 404
    assert [(c.endpoint, c.status) for c in server.calls] == [(None, 405), (None, 404)]


def test_a_wrong_token_is_refused_and_creates_nothing(
    server: SimulatedIDDSRest, client_env: Callable[..., None], created: Seen
) -> None:
    client_env(server.url, token="not-the-token")
    ok, text = connect().create_workflow_task(workflow("100"))
    assert ok is False
    assert text.startswith("An unknown IDDS exception occurred.")  # iDDS sends IDDSException
    assert "Failed to verify oidc token" in text
    assert server.tasks == {}
    assert [(c.status, c.outcome) for c in server.calls] == [(401, "unauthorized")]
    assert created.items == []


def test_a_wrong_vo_is_refused(server: SimulatedIDDSRest, client_env: Callable[..., None]) -> None:
    client_env(server.url, vo="atlas")
    ok, text = connect().create_workflow_task(workflow("100"))
    assert ok is False and "VO atlas is not allowed." in text
    assert server.tasks == {}


def test_without_a_token_the_client_does_not_even_ask(
    server: SimulatedIDDSRest, client_env: Callable[..., None]
) -> None:
    client_env(server.url, token=None)
    from idds.client.clientmanager import ClientManager

    # ClientManager.setup_client raises here; the workflow-task calls turn
    # that into (False, text) too, since they set the client up inside.
    manager = ClientManager(timeout=10)
    ok, text = manager.create_workflow_task(workflow("100"))
    assert ok is False and "Cannot find oidc token." in text
    assert server.calls == []


def test_requests_without_the_token_or_with_x509_are_401(server: SimulatedIDDSRest) -> None:
    body = json.dumps({"workflow": workflow("100")})
    no_token = raw(server, "POST", "/workflow_task", body, auth_headers(token=None))
    x509 = raw(server, "POST", "/workflow_task", body, auth_headers(auth_type="x509_proxy"))
    other = raw(server, "POST", "/workflow_task", body, auth_headers(auth_type="kerberos"))
    assert [r.status_code for r in (no_token, x509, other)] == [401, 401, 401]
    assert {r.headers["ExceptionClass"] for r in (no_token, x509, other)} == {"IDDSException"}
    assert exception_message(no_token) == "Failed to verify oidc token: no token"
    assert exception_message(x509) == "User DN cannot be found."
    assert exception_message(other) == "Authentication method kerberos is not supported"
    assert server.tasks == {}


def test_an_injected_failure_reaches_the_caller_with_its_message(
    server: SimulatedIDDSRest, manager: ClientManager, created: Seen
) -> None:
    server.fail_next(message="database is down")
    ok, text = manager.create_workflow_task(workflow("100"))
    assert ok is False
    assert text.startswith("Core exception.")
    assert "database is down" in text
    assert server.tasks == {}
    # Only the next request failed; the failed one took no ids.
    assert manager.create_workflow_task(workflow("100")) == FIRST_IDS
    assert [(c.status, c.outcome) for c in server.calls] == [(500, "injected"), (200, "ok")]


def test_injected_failures_of_one_endpoint_leave_the_others_alone(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    server.fail_next(
        2, endpoint="close", exception_class="DatabaseException", message="table locked"
    )
    assert manager.create_workflow_task(workflow("100")) == FIRST_IDS
    assert manager.adjust_worker(1001, 2001, 60001, {}) == OK_ADJUSTED
    for _ in range(2):
        ok, text = manager.close_workflow_task(1001, {"run_id": "100"})
        assert ok is False
        assert text.startswith("Database exception.") and "table locked" in text
    assert server.closed == {}
    assert manager.close_workflow_task(1001, {"run_id": "100"}) == OK_CLOSED
    assert server.closed == {"100": "ToCancel"}


def test_an_error_page_without_exception_headers_loses_the_status(
    server: SimulatedIDDSRest, manager: ClientManager
) -> None:
    # What a proxy in front of iDDS sends: the client parses the page as
    # JSON and returns only the decoding error.
    server.fail_next(status=502, exception_class=None, message="<html>Bad Gateway</html>")
    assert manager.create_workflow_task(workflow("100")) == (
        False,
        "Expecting value: line 1 column 1 (char 0)",
    )
    # A 500 page keeps the page's text.
    server.fail_next(status=500, exception_class=None, message="<html>Oops</html>")
    ok, text = manager.create_workflow_task(workflow("100"))
    assert ok is False and "<html>Oops</html>" in text


def test_a_delay_beyond_the_client_timeout_is_a_timeout_but_the_task_is_made(
    server: SimulatedIDDSRest, client_env: Callable[..., None], created: Seen
) -> None:
    client_env(server.url)
    server.delay(1.5, endpoint="create")
    ok, text = connect(timeout=0.5).create_workflow_task(workflow("100"))
    assert ok is False
    assert "Read timed out" in text
    # Like a slow real server, it finishes the request anyway.
    assert server.wait_for(lambda: "100" in server.tasks, WAIT)
    assert created.wait_len(1)
    assert server.calls[0].status == 200


def test_fault_arguments_are_checked(server: SimulatedIDDSRest) -> None:
    with pytest.raises(ValueError, match="status"):
        server.fail_next(status=200)
    with pytest.raises(ValueError, match="endpoint"):
        server.fail_next(endpoint="delete")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        server.fail_next(0)
    with pytest.raises(ValueError, match="seconds"):
        server.delay(-1)


# --- secrets --------------------------------------------------------------------


def test_the_token_is_never_recorded_or_logged(
    server: SimulatedIDDSRest, client_env: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{uuid.uuid4().hex}"
    client_env(server.url)
    manager = connect()
    manager.create_workflow_task(workflow("100"))
    manager.adjust_worker(1001, 2001, 60001, {"content": {"target_worker_count": 2}})
    manager.close_workflow_task(1001, {"run_id": "100"})
    client_env(server.url, token=wrong)
    assert connect().create_workflow_task(workflow("101"))[0] is False

    assert len(server.calls) == 4
    assert all(c.headers["X-IDDS-Auth-Token"] == REDACTED for c in server.calls)
    records = repr(server.calls) + json.dumps(server.state())
    logged = caplog.text
    assert "POST /idds/workflow_task" in logged  # the server did log the requests
    for secret in (TOKEN, wrong):
        assert secret not in records
        assert secret not in logged


# --- another process ------------------------------------------------------------


def test_the_command_line_server_is_driven_over_http(client_env: Callable[..., None]) -> None:
    env = {**os.environ, "SIM_IDDS_TOKEN": TOKEN}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swf_testbed.peers.idds_rest",
            "--port",
            "0",
            "--token-env",
            "SIM_IDDS_TOKEN",
            "--vo",
            VO,
            "--create-answers-ids",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/idds")
        client_env(url)
        manager = connect()
        control = SimControl(url)

        control.fail_next(endpoint="create", message="remote failure")
        assert control.state()["faults"]["fail_next"][0]["message"] == "remote failure"
        ok, text = manager.create_workflow_task(workflow("100"))
        assert ok is False and "remote failure" in text
        assert manager.create_workflow_task(workflow("100")) == FIRST_IDS

        control.delay(2.5, endpoint="adjust")
        assert control.state()["faults"]["delay"] == {"adjust": 2.5}
        control.clear_faults()
        assert control.state()["faults"] == {"fail_next": [], "delay": {}}
        refused = requests.post(control.control_url + "/fail", json={"colour": "red"}, timeout=WAIT)
        assert refused.status_code == 400 and "unknown field" in refused.json()["error"]
        with pytest.raises(ValueError, match="status"):
            control.fail_next(status=200)

        state = control.state()
        assert list(state["tasks"]) == ["100"]
        assert [c["status"] for c in state["calls"]] == [500, 200]
        assert TOKEN not in json.dumps(state)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=WAIT)
    assert process.returncode == 0
    assert TOKEN not in out + err


@pytest.mark.parametrize(
    ("endpoint", "body", "run_id"),
    [
        ("create", {"workflow": {"content": {"run_id": 100123}}}, "100123"),
        ("adjust", {"parameters": {"core_count": 2, "content": {"run_id": "7"}}}, "7"),
        ("close", {"parameters": {"request_id": 1, "run_id": "8"}}, "8"),
        ("close", {"parameters": {"request_id": 1}}, None),
        ("create", "not json at all", None),
    ],
)
def test_a_recorded_call_names_its_run(endpoint: str, body: object, run_id: str | None) -> None:
    call = RestCall(
        "PUT",
        "/idds/workflow_task",
        endpoint,  # type: ignore[arg-type]
        body,
        {},
        200,
        "ok",
    )

    assert call.run_id == run_id


def test_as_idds_2_6_21_a_create_answers_500_after_making_the_task(
    client_env: Callable[..., None], created: Seen
) -> None:
    # Its REST handler unpacks its seven-key result into six names: the task
    # and its PanDA task exist, and the answer is an error. The run's task is
    # found by the workflow's name, as the service looks for it.
    with SimulatedIDDSRest(token=TOKEN, on_task_created=created.add) as sim:
        client_env(sim.url)
        manager = connect()
        wf = workflow("100")
        ok, text = manager.create_workflow_task(wf)
        assert ok is False and "too many values to unpack" in text
        assert created.wait_len(1) and sim.tasks["100"].request_id == 1001

        assert manager.get_request_id_by_name(wf["name"]) == {wf["name"]: 1001}
        (row,) = manager.get_requests(request_id=1001, with_detail=True)
        assert (row["transform_id"], row["transform_workload_id"], row["transform_name"]) == (
            2001,
            60001,
            wf["name"],
        )
        # Statuses as the real app encodes iDDS's enums, decoded back by the client.
        assert (row["status"], row["transform_status"], row["processing_status"]) == (
            RequestStatus.Transforming,
            TransformStatus.New,
            ProcessingStatus.New,
        )
        assert row["scope"] == wf["scope"]
        # idds-client 2.6.21's ClientManager.get_transforms cannot work: it
        # passes its client a workload_id its get_transforms does not take.
        ok, text = manager.get_transforms(request_id=1001)
        assert ok is False and "workload_id" in text
        # iDDS's lookup is a LIKE: "_" stands for any character.
        assert manager.get_request_id_by_name(wf["name"][:-1] + "_") == {wf["name"]: 1001}
        assert manager.get_request_id_by_name("nothing_like_it") == {}
