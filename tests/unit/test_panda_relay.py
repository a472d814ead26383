"""The panda_relay route end to end: the service's own REST gateway
(``rest_gateway`` with ``idds.route: panda_relay``), the real panda-client
2.2.0 over HTTP, and the simulated PanDA relay in front of the simulated iDDS
(``SimulatedIDDSRest.relay_url``).

panda-client reads its server URLs once, when ``pandaclient.Client`` is first
imported, and looks the cache server's host up in DNS then unless
PANDA_BEHIND_REAL_LB is set; its auth settings (PANDA_AUTH, PANDA_AUTH_VO,
PANDA_AUTH_ID_TOKEN) are read on every call. So the ``panda`` fixture sets
the environment before the first import, and repoints the module's URL
globals (read on every call) at each test's server afterwards.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from swf_panda_workers.adapters.idds_rest_client import IddsNotConfigured, RestGateway, rest_gateway
from swf_panda_workers.config.schema import Idds, Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.idds_gateway import IddsRequestFailed
from swf_panda_workers.core.messages import (
    CreatedWorkflowTask,
    RunImminent,
    WorkerSize,
    WorkflowIds,
    parse_message,
)
from swf_testbed.peers.idds_rest.server import REDACTED, SimulatedIDDSRest

if TYPE_CHECKING:
    from conftest import Seen  # the shared fixtures' type (tests/unit/conftest.py)
    from idds.client.clientmanager import ClientManager

pytest.importorskip("pandaclient", reason="the relay route needs panda-client (extra 'panda')")

TOKEN = f"relay-token-{uuid.uuid4().hex}"  # unique, so finding it anywhere means a leak
VO = "eic"
WAIT = 10.0
NOW = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)
IDS = WorkflowIds(request_id=1001, transform_id=2001, workload_id=60001)
SIZE = WorkerSize(core_count=2, memory_per_core=3000, site="BNL", target_worker_count=7)
RELAY_PATH = "/server/panda/relay_idds_command"

# Anything that would make panda-client (or idds-client, for the comparison
# with the direct route) read settings from elsewhere than what a test sets.
PANDA_ENV = (
    "PANDA_URL",
    "PANDA_URL_SSL",
    "PANDACACHE_URL",
    "PANDA_AUTH",
    "PANDA_AUTH_VO",
    "PANDA_AUTH_ID_TOKEN",
    "OIDC_AUTH_ID_TOKEN",
    "OIDC_AUTH_TOKEN_FILE",
    "OIDC_AUTH_VO",
    "PANDA_VERIFY_HOST",
    "PANDA_BEHIND_REAL_LB",
    "X509_USER_PROXY",
    "IDDS_HOST",
    "IDDS_CONFIG",
    "IDDS_AUTH_TYPE",
    "IDDS_OIDC_TOKEN",
    "IDDS_OIDC_TOKEN_FILE",
    "IDDS_VO",
    "IDDS_ENABLE_JSON_OUTPUTS",
    "IDDS_CLIENT_MAX_RETRIES",
)

PointPanda = Callable[..., None]


@pytest.fixture
def panda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> PointPanda:
    """Sets panda-client's environment as an operator would, for a relay URL."""
    for name in PANDA_ENV:
        monkeypatch.delenv(name, raising=False)
    # The server imports idds-client's ClientManager for unknown commands:
    # its local config directory goes here, not to ~/.idds.
    monkeypatch.setenv("IDDS_LOCAL_CONFIG_ROOT", str(tmp_path / "idds"))
    # No DNS look-up of the PanDA cache server at import, nor per call.
    monkeypatch.setenv("PANDA_BEHIND_REAL_LB", "1")
    # Over http no proxy is used; this only silences "No valid grid proxy".
    monkeypatch.setenv("X509_USER_PROXY", "/dev/null")

    def point(url: str, token: str | None = TOKEN, vo: str | None = VO) -> None:
        monkeypatch.setenv("PANDA_URL_SSL", url)
        monkeypatch.setenv("PANDA_URL", url)
        if token is not None:  # else x509, which plain http cannot carry
            monkeypatch.setenv("PANDA_AUTH", "oidc")
            monkeypatch.setenv("PANDA_AUTH_ID_TOKEN", token)
        if vo is not None:
            monkeypatch.setenv("PANDA_AUTH_VO", vo)
        from pandaclient import Client  # the first import reads the URLs above

        # Later, repoint the imported module: call_idds_command reads it per call.
        monkeypatch.setattr(Client, "baseURLSSL", url)
        monkeypatch.setattr(Client, "baseURL", url)

    return point


@pytest.fixture
def gateway(server: SimulatedIDDSRest, panda: PointPanda) -> RestGateway:
    panda(server.relay_url)
    return relay_gateway()


def relay_gateway(host: str | None = None) -> RestGateway:
    return rest_gateway(Settings(idds=Idds(route="panda_relay", host=host)))


def announced(run_id: str = "100123", target: int = 30) -> RunImminent:
    message = parse_message(
        {
            "msg_type": "run_imminent",
            "run_id": run_id,
            "content": {"target_worker_count": target, "core_count": 2},
        }
    )
    assert isinstance(message, RunImminent)
    return message


def creating(
    run_id: str = "100123", target: int = 30
) -> tuple[RunImminent, dict[str, Any], datetime]:
    """The arguments of a run's create_workflow_task, as the run flow makes them."""
    run = announced(run_id, target)
    return run, outbound.workflow_for(run, Settings(), NOW), NOW


def name_of(run_id: str) -> str:
    return outbound.workflow_name(announced(run_id), Settings(), NOW)


def panda_api(**options: Any) -> Any:
    """panda-client's relay API as the service makes it (or with ``options``)."""
    from pandaclient import idds_api

    return idds_api.get_api(json.dumps, **{"compress": True, "manager": True, **options})


def direct_manager(server: SimulatedIDDSRest, monkeypatch: pytest.MonkeyPatch) -> ClientManager:
    """idds-client's ClientManager on the direct endpoints of the same server."""
    monkeypatch.setenv("IDDS_HOST", server.url)
    monkeypatch.setenv("IDDS_AUTH_TYPE", "oidc")
    monkeypatch.setenv("IDDS_VO", VO)
    monkeypatch.setenv("IDDS_OIDC_TOKEN", TOKEN)
    from idds.client.clientmanager import ClientManager

    manager = ClientManager(timeout=WAIT)
    manager.setup_client()
    manager.client.retries = 1  # no random sleeps of up to 30 s on a refused connection
    return manager


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def relay_post(
    server: SimulatedIDDSRest, params: dict[str, Any], headers: dict[str, str] | None = None
) -> requests.Response:
    """A relay request as panda-client sends it (gzip JSON), by hand."""
    auth = {"Authorization": f"Bearer {TOKEN}", "Origin": VO} if headers is None else headers
    return requests.post(
        server.relay_url + "/relay_idds_command",
        data=gzip.compress(json.dumps(params).encode()),
        timeout=WAIT,
        headers={"Content-Type": "application/json", **auth},
    )


# --- the three requests, through the service's gateway ----------------------------------


def test_create_returns_the_servers_ids_and_starts_the_run(
    server: SimulatedIDDSRest, gateway: RestGateway, created: Seen
) -> None:
    answer = gateway.create_workflow_task(*creating("100123"))

    assert isinstance(answer, CreatedWorkflowTask)
    assert answer.run_id == "100123"
    assert answer.ids == IDS
    assert (
        answer.content.processing_id,
        answer.content.input_coll_id,
        answer.content.output_coll_id,
    ) == (3001, 40002, 40003)
    assert created.wait_len(1)
    assert created.items[0][0] == "100123"
    assert server.tasks["100123"].target_worker_count == 30
    # The run's task looked for first (a retry must not make a second).
    lookup, call = server.calls
    assert (lookup.endpoint, lookup.status, lookup.body["command_name"]) == (
        "lookup",
        200,
        "get_request_id_by_name",
    )
    assert (call.route, call.method, call.path, call.endpoint, call.status, call.outcome) == (
        "panda_relay",
        "POST",
        RELAY_PATH,
        "create",
        200,
        "ok",
    )
    assert call.body["command_name"] == "create_workflow_task"
    assert call.body["manager"] == "True"  # JSON true, as PanDA's entry hands it on
    (workflow,) = call.body["args"]
    assert workflow["content"]["run_id"] == "100123"
    # panda-client's compressed form, and its OIDC headers (the token redacted).
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["Authorization"] == REDACTED
    assert call.headers["Origin"] == VO


def test_adjust_and_close_reach_the_server_with_the_runs_ids(
    server: SimulatedIDDSRest, gateway: RestGateway, adjusted: Seen
) -> None:
    gateway.create_workflow_task(*creating("100123"))

    answer = gateway.adjust_worker("100123", IDS, SIZE, NOW)
    assert answer.content.target_worker_count == 7
    assert adjusted.wait_len(1)
    assert adjusted.items == [("100123", SIZE)]
    # iDDS 2.6.21 stores no worker count.
    assert server.tasks["100123"].target_worker_count == 30
    (adjustment,) = server.adjustments
    assert (
        adjustment.run_id,
        adjustment.request_id,
        adjustment.transform_id,
        adjustment.workload_id,
        adjustment.size,
    ) == ("100123", 1001, 2001, 60001, SIZE)
    assert adjustment.parameters["content"]["run_id"] == "100123"

    closed = gateway.close_workflow_task("100123", IDS, name_of("100123"), NOW)
    assert closed.content.status == "closed successfully"
    assert server.closed == {"100123": "ToCancel"}
    assert server.violations == []

    adjust_call, close_call = server.calls_to("adjust", "panda_relay") + server.calls_to(
        "close", "panda_relay"
    )
    assert adjust_call.body["args"][:3] == [1001, 2001, 60001]
    assert adjust_call.body["args"][3]["core_count"] == 2
    request_id, parameters = close_call.body["args"]
    assert request_id == 1001
    assert {k: parameters[k] for k in ("run_id", "request_id", "transform_id", "workload_id")} == {
        "run_id": "100123",
        "request_id": 1001,
        "transform_id": 2001,
        "workload_id": 60001,
    }
    assert {c.route for c in server.calls} == {"panda_relay"}
    assert [(c.endpoint, c.status) for c in server.calls] == [
        ("lookup", 200),
        ("create", 200),
        ("adjust", 200),
        ("close", 200),
    ]


def test_idds_host_goes_with_the_command_name(server: SimulatedIDDSRest, panda: PointPanda) -> None:
    panda(server.relay_url)
    gateway = relay_gateway(host="https://idds.example:443/idds")

    assert gateway.create_workflow_task(*creating()).ids == IDS
    assert [c.body["command_name"] for c in server.calls] == [
        "get_request_id_by_name+https://idds.example:443/idds",
        "create_workflow_task+https://idds.example:443/idds",
    ]


def test_the_relay_and_the_direct_endpoints_share_the_tasks(
    server: SimulatedIDDSRest,
    gateway: RestGateway,
    panda: PointPanda,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway.create_workflow_task(*creating("100"))
    manager = direct_manager(server, monkeypatch)

    # The same run's create, directly, fails on the relayed create's task...
    _, workflow, _ = creating("100")
    ok, text = manager.create_workflow_task(workflow)
    assert ok is False and "Transform already exists" in text
    assert server.duplicate_creates == {"100": 1}
    # ...and a direct close closes it.
    assert manager.close_workflow_task(1001, {"run_id": "100"})["message"] == "closed successfully"
    assert server.closed == {"100": "ToCancel"}
    assert [c.route for c in server.calls] == ["panda_relay"] * 2 + ["direct"] * 2
    assert [c.route for c in server.calls_to("create", "direct")] == ["direct"]


def test_the_client_follows_each_servers_port(panda: PointPanda) -> None:
    # Repointing pandaclient.Client's URL globals after import is enough.
    with (
        SimulatedIDDSRest(token=TOKEN, vo=VO) as first,
        SimulatedIDDSRest(token=TOKEN, vo=VO) as second,
    ):
        for sim in (first, second):
            panda(sim.relay_url)
            assert relay_gateway().create_workflow_task(*creating()).ids == IDS
        # As iDDS 2.6.21: a lookup, the create (500 after making the task),
        # and the lookup that finds it.
        for sim in (first, second):
            assert [(c.endpoint, c.status) for c in sim.calls] == [
                ("lookup", 200),
                ("create", 200),
                ("lookup", 200),
                ("requests", 200),
            ]


# --- failures ----------------------------------------------------------------------------


def test_an_injected_idds_failure_on_create_is_a_failed_request_with_its_message(
    server: SimulatedIDDSRest, gateway: RestGateway, created: Seen
) -> None:
    server.fail_next(message="database is down", endpoint="create")

    with pytest.raises(IddsRequestFailed, match="database is down") as caught:
        gateway.create_workflow_task(*creating("100"))
    assert "create_workflow_task" in str(caught.value)
    assert server.tasks == {}
    # The failed create made no task: a second look finds none, so it fails.
    assert [(c.endpoint, c.status, c.outcome) for c in server.calls] == [
        ("lookup", 200, "ok"),
        ("create", 200, "injected"),
        ("lookup", 200, "ok"),
    ]
    # Only the next request failed.
    assert gateway.create_workflow_task(*creating("100")).ids == IDS
    assert created.wait_len(1)


def test_the_relay_answers_idds_failures_as_panda_client_returns_them(
    server: SimulatedIDDSRest, panda: PointPanda
) -> None:
    # What the gateway's relay_result gets from panda-client: JSON lists, not
    # tuples, down to iDDS's own (False, text) and ClientManager's (-1, text).
    panda(server.relay_url)
    api = panda_api()
    server.fail_next(endpoint="adjust", message="table locked")
    status, (ok, (failed, text)) = api.adjust_worker(1001, 2001, 60001, {})
    assert (status, ok, failed) == (0, True, False)
    assert text.startswith("Core exception.") and "table locked" in text
    assert api.close_workflow_task(None, {"run_id": "100"}) == (
        0,
        [True, [-1, "request_id is None"]],
    )
    # ClientManager's guard: iDDS was never asked.
    assert server.closed == {} and server.violations == []
    assert [c.outcome for c in server.calls] == ["injected", "refused"]


@pytest.mark.parametrize("request_name", ["adjust_worker", "close_workflow_task"])
def test_an_injected_idds_failure_on_adjust_or_close_is_a_failed_request(
    server: SimulatedIDDSRest, gateway: RestGateway, request_name: str
) -> None:
    gateway.create_workflow_task(*creating("100123"))
    server.fail_next(message="table locked")

    with pytest.raises(IddsRequestFailed, match="table locked"):
        if request_name == "adjust_worker":
            gateway.adjust_worker("100123", IDS, SIZE, NOW)
        else:
            gateway.close_workflow_task("100123", IDS, name_of("100123"), NOW)


@pytest.mark.parametrize(
    "fault",
    [
        {"message": "database is down"},
        {"status": 500, "exception_class": "DatabaseException", "message": "table locked"},
        {"status": 401, "exception_class": "NotAnIddsException", "message": "odd"},
        {"status": 502, "exception_class": None, "message": "<html>Bad Gateway</html>"},
        {"status": 500, "exception_class": None, "message": "<html>Oops</html>"},
    ],
)
def test_the_relay_passes_on_what_client_manager_says(
    server: SimulatedIDDSRest,
    panda: PointPanda,
    monkeypatch: pytest.MonkeyPatch,
    fault: dict[str, Any],
) -> None:
    # The same fault, asked directly with ClientManager and through the relay:
    # PanDA relays the very (False, text) its own ClientManager returns.
    panda(server.relay_url)
    manager = direct_manager(server, monkeypatch)
    workflow = {"scope": "eic", "name": "x", "content": {"run_id": "100"}}

    server.fail_next(**fault)
    direct = manager.create_workflow_task(workflow)
    server.fail_next(**fault)
    relayed = panda_api().create_workflow_task(workflow)

    assert isinstance(direct, tuple) and direct[0] is False
    assert relayed == (0, [True, [False, direct[1]]])
    assert server.tasks == {}


def test_a_bad_request_is_relayed_as_client_manager_says(
    server: SimulatedIDDSRest, panda: PointPanda, monkeypatch: pytest.MonkeyPatch
) -> None:
    panda(server.relay_url)
    direct = direct_manager(server, monkeypatch).create_workflow_task({})
    assert isinstance(direct, tuple) and "'workflow' key is required" in direct[1]
    assert panda_api().create_workflow_task({}) == (0, [True, [False, direct[1]]])
    assert [(c.route, c.outcome) for c in server.calls] == [
        ("direct", "bad_request"),
        ("panda_relay", "bad_request"),
    ]


def test_a_delay_holds_the_relayed_answer_too(
    server: SimulatedIDDSRest, gateway: RestGateway
) -> None:
    server.delay(0.5, endpoint="create")
    started = time.monotonic()
    assert gateway.create_workflow_task(*creating()).ids == IDS
    assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize(
    ("token", "vo", "words"),
    [
        ("not-the-token", VO, "Invalid token. Signature verification failed"),
        (TOKEN, "atlas", "Unknown vo : atlas"),
    ],
)
def test_a_refused_token_is_a_failed_request_naming_the_refusal(
    server: SimulatedIDDSRest, panda: PointPanda, created: Seen, token: str, vo: str, words: str
) -> None:
    panda(server.relay_url, token=token, vo=vo)

    with pytest.raises(IddsRequestFailed) as caught:
        relay_gateway().create_workflow_task(*creating())
    text = str(caught.value)
    # PanDA's entry answers 403, which panda-client returns as status 255.
    assert "status 255" in text
    assert f"Token authentication failed. {words}" in text
    assert server.tasks == {}
    assert [(c.route, c.status, c.outcome) for c in server.calls] == [
        ("panda_relay", 403, "unauthorized")
    ]
    assert created.items == []


def test_without_a_token_the_relay_wants_a_certificate(
    server: SimulatedIDDSRest, panda: PointPanda
) -> None:
    panda(server.relay_url, token=None, vo=None)  # x509: nothing in the headers over http

    with pytest.raises(IddsRequestFailed, match="via PanDA failed: SSL secure connection"):
        relay_gateway().create_workflow_task(*creating())
    assert server.tasks == {}
    (call,) = server.calls
    assert (call.status, call.outcome) == (200, "unauthorized")
    assert "Authorization" not in call.headers


def test_a_server_that_is_down_is_a_failed_request_with_status_255(panda: PointPanda) -> None:
    panda(f"http://127.0.0.1:{free_port()}/server/panda")

    with pytest.raises(IddsRequestFailed) as caught:
        relay_gateway().create_workflow_task(*creating())
    assert "status 255" in str(caught.value)
    assert "Connection refused" in str(caught.value)


def test_oidc_without_a_vo_is_not_configured_rather_than_an_exit(
    server: SimulatedIDDSRest, panda: PointPanda
) -> None:
    panda(server.relay_url, vo=None)  # PANDA_AUTH=oidc, a token, no PANDA_AUTH_VO

    # panda-client calls sys.exit here; the gateway must not let it through.
    with pytest.raises(IddsNotConfigured, match="PANDA_AUTH_VO"):
        relay_gateway().create_workflow_task(*creating())
    assert server.calls == []


# --- the relay endpoint itself ------------------------------------------------------------


def test_form_bodies_kwargs_and_client_are_served(
    server: SimulatedIDDSRest, gateway: RestGateway
) -> None:
    gateway.create_workflow_task(*creating("100"))
    # compress=False: a form; kwargs; manager=False: iDDS's Client, whose
    # failures fail the relay itself.
    api = panda_api(compress=False, manager=False, idds_host="https://idds.example/idds")
    server.fail_next(endpoint="close", message="table locked")
    status, (ok, text) = api.close_workflow_task(request_id=1001, parameters={"run_id": "100"})
    assert (status, ok) == (0, False)
    assert text.startswith("failed to execute command with Core exception.")
    assert "table locked" in text
    assert api.close_workflow_task(request_id=1001, parameters={"run_id": "100"}) == (
        0,
        [True, {"status": 0, "message": "closed successfully"}],
    )
    assert server.closed == {"100": "ToCancel"}

    call = server.calls[-1]
    # panda-client sends its form without a Content-Type: not JSON, so a form.
    assert "Content-Type" not in call.headers
    assert call.body == {
        "command_name": "close_workflow_task+https://idds.example/idds",
        "kwargs": {"request_id": 1001, "parameters": {"run_id": "100"}},
    }


def test_unknown_and_unserved_commands_fail_the_relay(
    server: SimulatedIDDSRest, panda: PointPanda
) -> None:
    panda(server.relay_url)
    api = panda_api()
    assert api.no_such_command(1) == (
        0,
        [False, "no_such_command is not a command of iDDS ClientManager"],
    )
    status, (ok, text) = api.get_status(request_id=1)
    assert (status, ok) == (0, False)
    assert "simulated iDDS serves only" in text and "get_status" in text
    assert [(c.endpoint, c.outcome) for c in server.calls] == [
        (None, "not_a_command"),
        (None, "relay_failed"),
    ]


def test_the_relay_refuses_what_panda_would(server: SimulatedIDDSRest) -> None:
    close = {"command_name": "close_workflow_task", "args": json.dumps([1, {}]), "manager": True}
    no_origin = relay_post(server, close, {"Authorization": f"Bearer {TOKEN}"})
    assert (no_origin.status_code, no_origin.text) == (
        403,
        "ERROR : Token authentication failed. Token decode failure. "
        "no HTTP_ORIGIN to identify the VO",
    )
    assert no_origin.headers["Content-Type"] == "text/plain"

    other = requests.post(server.relay_url + "/getJob", timeout=WAIT)
    assert (other.status_code, other.text) == (403, "ERROR : getJob is forbidden")

    bad_args = relay_post(server, {**close, "args": "[1, {"})
    assert bad_args.status_code == 200
    ok, text = bad_args.json()
    assert ok is False and text.startswith("failed to execute command with")

    missing = relay_post(server, {**close, "args": json.dumps([1])})
    ok, (failed, text) = missing.json()
    assert (ok, failed) == (True, False) and "parameters" in text

    not_gzip = requests.post(
        server.relay_url + "/relay_idds_command",
        data=json.dumps(close),
        timeout=WAIT,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {TOKEN}",
            "Origin": VO,
        },
    )
    assert not_gzip.status_code == 500 and "gzip" in not_gzip.text
    assert server.closed == {}
    assert [c.outcome for c in server.calls] == [
        "unauthorized",
        "no_api",
        "relay_failed",
        "bad_request",
        "bad_request",
    ]


# --- secrets ----------------------------------------------------------------------------


def test_the_token_is_never_recorded_or_logged(
    server: SimulatedIDDSRest, panda: PointPanda, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{uuid.uuid4().hex}"
    panda(server.relay_url)
    gateway = relay_gateway()
    gateway.create_workflow_task(*creating("100"))
    gateway.adjust_worker("100", IDS, SIZE, NOW)
    gateway.close_workflow_task("100", IDS, name_of("100"), NOW)
    panda(server.relay_url, token=wrong)
    with pytest.raises(IddsRequestFailed):
        relay_gateway().create_workflow_task(*creating("101"))

    # A lookup, the create, the adjust and the close; the refused lookup.
    assert len(server.calls) == 5
    assert all(c.headers["Authorization"] == REDACTED for c in server.calls)
    records = repr(server.calls) + json.dumps(server.state())
    assert RELAY_PATH in caplog.text  # the server did log the requests
    for secret in (TOKEN, wrong):
        assert secret not in records
        assert secret not in caplog.text
