"""The PanDA server stand-in, spoken to by the real panda-client 2.2.0 as iDDS
(task submission) and the transformers (broker information through the
relay) speak to it.

panda-client reads its URLs when ``pandaclient.Client`` is first imported and
looks a host up in DNS then unless PANDA_BEHIND_REAL_LB is set; afterwards
the module's URL globals are read per call, so each test repoints them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from swf_testbed.peers.panda_server import (
    PandaServerStandIn,
    TaskSubmission,
    job_arguments,
    option,
)

pytest.importorskip("pandaclient", reason="panda-client is a test dependency")

META = {
    "transformer_broker": {"broker": "127.0.0.1:61613", "destination": "/queue/s"},
    "transformer_broadcast_broker": {"broker": "127.0.0.1:61613", "destination": "/topic/t"},
    "result_broker": {"broker": "127.0.0.1:61613", "destination": "/topic/r"},
    "ejfat": {},
}
# As iDDS's _build_task_params writes them (the fields the stand-in reads).
TASK = {
    "taskName": "EIC_2026_fastproc_BNL-OSG_20261203_100123",
    "site": "BNL_PanDA_1",
    "jobParameters": [{"type": "constant", "value": "--run_id 100123 --idle_timeout 120"}],
    "nEvents": 3,
    "nEventsPerJob": 1,
    "noInput": True,
    "reqID": 7,
}


@pytest.fixture
def submitted() -> list[TaskSubmission]:
    return []


@pytest.fixture
def stand_in(
    submitted: list[TaskSubmission], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[PandaServerStandIn]:
    with PandaServerStandIn(
        prompt_broker=META, on_task_submitted=submitted.append, first_task_id=500
    ) as server:
        for name, value in server.client_env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("X509_USER_PROXY", "/dev/null")  # silences "No valid grid proxy"
        monkeypatch.setenv("IDDS_LOCAL_CONFIG_ROOT", str(tmp_path / "idds"))
        for name in ("PANDA_AUTH", "PANDA_AUTH_VO", "PANDA_AUTH_ID_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        from pandaclient import Client  # the first import reads the URLs above

        root = server.url.removesuffix("/server/panda")
        monkeypatch.setattr(Client, "baseURLSSL", server.url)
        monkeypatch.setattr(Client, "server_base_path_ssl", f"{root}/api/v1")
        yield server


def test_ids_submission_as_panda_client_sends_and_parses_it(
    stand_in: PandaServerStandIn, submitted: list[TaskSubmission]
) -> None:
    from pandaclient import Client

    assert Client.insertTaskParams(TASK, verbose=False) == (0, (0, "succeeded. new jediTaskID=500"))
    assert Client.insertTaskParams(TASK)[1][1].endswith("=501")
    first = stand_in.submissions[0]
    assert first.task_parameters == TASK and first.parent_tid is None
    assert (first.task_id, first.jobs, first.run_id) == (500, 3, "100123")
    assert first.job_arguments == ["--run_id", "100123", "--idle_timeout", "120"]
    assert stand_in.wait_for(lambda: len(submitted) == 2, 5)  # after each answer
    assert [s.task_id for s in stand_in.submissions_for(100123)] == [500, 501]


def test_the_broker_info_as_the_transformer_asks_for_it(stand_in: PandaServerStandIn) -> None:
    import pandaclient.idds_api as idds_api

    client = idds_api.get_api(json.dumps, idds_host=None, compress=True, manager=True)
    answer = client.get_metainfo(name="prompt_broker")
    # (status, [relay ok, [ClientManager ok, meta info]]), as the transformer unwraps it.
    assert answer == (0, [True, [True, META]])
    assert client.get_metainfo(name="asyncresult_config") == (0, [True, [True, {}]])
    plain = idds_api.get_api(json.dumps, compress=True, manager=False)
    assert plain.get_metainfo(name="prompt_broker") == (0, [True, META])  # iDDS's Client
    calls = stand_in.metainfo_calls()
    assert [(c.manager, c.kwargs) for c in calls[:1]] == [(True, {"name": "prompt_broker"})]


def test_other_idds_commands_are_not_relayed(stand_in: PandaServerStandIn) -> None:
    import pandaclient.idds_api as idds_api

    client = idds_api.get_api(json.dumps, compress=True, manager=True)
    status, (ok, text) = client.create_workflow_task(workflow={})
    assert (status, ok) == (0, False) and "relays only get_metainfo" in text


def test_unreadable_requests(stand_in: PandaServerStandIn) -> None:
    root = stand_in.url.removesuffix("/server/panda")
    status, body = post(f"{root}/api/v1/task/submit", b"not json")
    assert status == 400 and body["success"] is False
    status, body = post(
        f"{root}/api/v1/task/submit",
        json.dumps({"task_parameters": {"jobParameters": "x"}}).encode(),
    )
    assert status == 400 and "jobParameters" in body["message"]
    assert post(f"{root}/api/v1/task/nothing", b"{}")[0] == 404
    assert stand_in.submissions == []


def post(url: str, data: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize(
    ("parameters", "arguments"),
    [
        (
            {"jobParameters": [{"type": "constant", "value": "--run_id 7 --idle_timeout 60"}]},
            ["--run_id", "7", "--idle_timeout", "60"],
        ),
        (
            {
                "jobParameters": [
                    {"type": "constant", "value": "--run_id 7"},
                    {"type": "template", "value": "${IN}"},
                    {"type": "constant", "value": "--verbose"},
                ]
            },
            ["--run_id", "7", "--verbose"],
        ),
        ({}, []),
    ],
)
def test_job_arguments(parameters: dict[str, Any], arguments: list[str]) -> None:
    assert job_arguments(parameters) == arguments


def test_options_and_job_counts() -> None:
    assert option(["--run_id", "7"], "--run_id") == "7"
    assert option(["--run_id=8"], "--run_id") == "8"
    assert option(["--run_id"], "--run_id") is None
    assert TaskSubmission(1, {"nEvents": 5, "nEventsPerJob": 2}, None).jobs == 3
    assert TaskSubmission(1, {}, None).jobs == 0
