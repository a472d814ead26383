"""REST mode against the real iDDS REST API: idds-server 2.6.21's own Flask app
(``peers/idds_rest_app.py``: over TLS, x509 proxies, the DN handed to iDDS as
mod_ssl does) on the real transceiver's database; the PanDA stand-in starting
real transformers (idds-prompt's run_prompt) for each task iDDS submits,
which fetch their brokers through PanDA's relay, itself relaying to the real
app with PanDA's own proxy. The service is the REST stack
(``real_rest_stack``) with nothing but its environment changed: idds-client
holding the operator's proxy and the CA to verify iDDS with. The peers are
``real_rest_peers`` (stacks.py), the stack is conftest.py's.

The simulator (``peers/idds_rest/``) stays for what needs fault injection
(test_rest_mode.py, test_idds_quirks.py). Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from broker_reads import queued
from conftest import REAL_REST_NAMESPACE
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_reads import final_flow_run, slices_reported

from swf_panda_workers.adapters.prefect_events.history import run_history
from swf_panda_workers.adapters.prefect_events.schema import run_resource_id
from swf_panda_workers.adapters.stomp_bus import run_selector
from swf_panda_workers.config.schema import Settings, Transceiver
from swf_panda_workers.core import outbound
from swf_testbed.launchers.stack import EmbeddedStack
from swf_testbed.peers._bus import PeerBus
from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.idds_rest_app import AppRequest
from swf_testbed.peers.peers_venv import peer_env
from swf_testbed.peers.peers_venv_scripts.payload_schedule import (
    PayloadSchedule,
    SliceRule,
)
from swf_testbed.peers.real_peers import RealPeers
from swf_testbed.peers.recorder import BusRecorder

pytestmark = pytest.mark.integration

WAIT = 60.0  # s; every wait returns as soon as its condition holds
SLICES = 12
SLOW = (4, 6)  # these slices of each run take SLOW_SECONDS ...
SLOW_SECONDS = 1.2
EXPECTED = 0.5  # ... over 1.5x the announced time: the reference policy asks for 1.5x
STOP_IDLE = 5  # a stopped transformer leaves once its slice queue was idle this long
PROBE = Path(__file__).with_name("rest_gateway_probe.py")


def test_two_runs_go_through_their_whole_life_over_the_real_idds_rest_api(
    real_rest_stack: EmbeddedStack,
    real_rest_peers: RealPeers,
    idds_pki: GridPki,
    new_run_id: Callable[[], str],
) -> None:
    runs = [new_run_id(), new_run_id()]
    real_rest_peers.set_schedule(
        PayloadSchedule(
            0.1, tuple(SliceRule(run_id, *SLOW, seconds=SLOW_SECONDS) for run_id in runs)
        )
    )
    brokers = real_rest_stack.brokers
    app = real_rest_peers.rest
    seen_before = len(app.requests())
    figures: dict[str, object] = {"rest_app_start_s": round(app.started_in or 0, 2)}
    with BusRecorder(brokers, topics=(brokers.transformer_topic,)) as recorder:
        started = time.monotonic()
        for run_id in runs:
            real_rest_peers.control.announce(
                run_id, "testbed", target_workers=2, slice_processing_time=EXPECTED
            )

        # --- created: the real create answers 500 after making the task and
        # its PanDA task, whose jobs start real transformers
        assert real_rest_peers.pilots.wait_for(
            lambda: all(len(real_rest_peers.pilots.of_run(r)) == 2 for r in runs), WAIT
        )
        figures["announce_to_transformers_s"] = round(time.monotonic() - started, 2)

        # --- the slices, to real transformers; each result stored for its run
        # (the listener acked it) before the run ends
        for run_id in runs:
            real_rest_peers.control.send_slices(run_id, SLICES, rate=20)
        for run_id in runs:
            assert wait_stored_results(real_rest_stack.api_url, run_id, SLICES), (
                f"run {run_id}: not every slice result reached the service"
            )
        for run_id in runs:
            real_rest_peers.control.end(run_id, "testbed")
        ended = time.time()

        flow_runs = {
            r: asyncio.run(
                final_flow_run(real_rest_stack.api_url, REAL_REST_NAMESPACE, r, wait=WAIT)
            )
            for r in runs
        }
        assert {r: f.state_name for r, f in flow_runs.items()} == dict.fromkeys(runs, "Completed")
        for run_id in runs:
            assert slices_reported(real_rest_stack.api_url, REAL_REST_NAMESPACE, run_id) == (
                SLICES,
                0,
            )

        # --- the stop, in both forms; idds-prompt obeys the integer one
        assert recorder.wait_for(
            lambda: all(recorder.stop_forms(r) == [int(r), r] for r in runs), WAIT
        )
        assert real_rest_peers.pilots.wait_for(
            lambda: all(real_rest_peers.pilots.live(r) == 0 for r in runs), STOP_IDLE + WAIT
        )
    for run_id in runs:
        for pilot in real_rest_peers.pilots.of_run(run_id):
            assert pilot.exit_code == 0
            # Kept on the log: exit 0 is the same for the stop and for the idle
            # timeout; only the real transformer's log tells which ended it.
            assert (
                f"Received stop_transformer broadcast for current run_id={run_id}"
                in pilot.log_text()
            )
    figures["end_to_transformer_exit_s"] = sorted(
        round((p.exited_at or 0) - ended, 1) for r in runs for p in real_rest_peers.pilots.of_run(r)
    )

    # --- what iDDS holds and what its REST API was asked, run by run
    records = real_rest_peers.idds.database.records()
    answered = app.requests()[seen_before:]
    # The service with the operator's proxy; the transformers' broker look-ups
    # relayed by PanDA with its own (iDDS answers them from its configuration).
    requests = [q for q in answered if q.dn == idds_pki.user.dn]
    relayed = [q for q in answered if q.dn == idds_pki.panda.dn]
    assert len(requests) + len(relayed) == len(answered)
    assert [(q.path, q.status) for q in relayed] == [("/idds/metainfo/prompt_broker", 200)] * 4
    creates = [q for q in requests if q.method == "POST" and q.path == "/idds/workflow_task"]
    assert {q.status for q in creates} == {500}
    # One per run answered 500 after making the task; another, if any, failed
    # otherwise (found no task after it, so was retried), and made none.
    made = [q for q in creates if "too many values to unpack" in (q.error or "")]
    assert len(made) == len(runs)
    figures["create_posts"] = len(creates)
    if len(creates) > len(made):
        figures["other_create_errors"] = [(q.error or "")[:160] for q in creates if q not in made]
    for run_id in runs:
        (transform,) = records.of_run(run_id).transforms
        (submission,) = real_rest_peers.panda.submissions_for(run_id)
        assert transform["workload_id"] == submission.task_id
        assert records.of_run(run_id).processing_statuses() == ["ToCancel"]
        # Nothing of the run left waiting: no slice, no result.
        for queue in (
            real_rest_peers.prompt.slices.destination,
            real_rest_stack.brokers.results_destination,
        ):
            assert queued(real_rest_stack.brokers, queue, run_selector(run_id)) == 0, queue
        ids = (transform["request_id"], transform["transform_id"], submission.task_id)
        mine = of_task(requests, transform["name"], ids)
        # Before each create, and after each failed answer (the 500).
        assert len(mine["lookup"]) >= 2 and {q.status for q in mine["lookup"]} == {200}
        assert [q.status for q in mine["details"]] == [200]
        assert mine["adjust"], f"run {run_id} saw slow slices but asked for no workers"
        assert {q.status for q in mine["adjust"]} == {200}
        assert [q.status for q in mine["close"]] == [200]
        figures[f"create_{run_id}_500_and_lookup_s"] = round(
            mine["details"][0].at - mine["lookup"][0].at, 3
        )
    figures["rest_app_rss_mb"] = round((app.rss_kb() or 0) / 1024, 1)
    figures["idds_transceiver_rss_mb"] = round((real_rest_peers.idds.rss_kb() or 0) / 1024, 1)
    print(f"\nREST mode, real iDDS REST API: {figures}")


def test_the_rest_gateway_on_both_routes_survives_the_real_api(
    real_rest_peers: RealPeers,
    idds_pki: GridPki,
    new_run_id: Callable[[], str],
    tmp_path: Path,
) -> None:
    """The service's gateway by itself (no Prefect), directly with idds-client
    and through PanDA's relay with panda-client: the create's 500 is survived
    by a lookup, a second create finds the task instead of making another,
    the close answers 200; through the relay iDDS sees PanDA's DN."""
    figures: dict[str, object] = {}
    routes = {
        "direct": (idds_pki.user.dn, real_rest_peers.rest.client_env(tmp_path / "idds-client")),
        "panda_relay": (
            idds_pki.panda.dn,
            {
                **real_rest_peers.panda.client_env(),
                "IDDS_LOCAL_CONFIG_ROOT": str(tmp_path / "idds-client"),
                "X509_USER_PROXY": "/dev/null",
            },
        ),
    }  # plain http: no proxy is sent
    for route, (dn, env) in routes.items():
        run_id = new_run_id()
        seen_before = len(real_rest_peers.rest.requests())
        report = probe(route, run_id, env)
        created, again, closed = report["created"], report["created_again"], report["closed"]
        ids = (created["request_id"], created["transform_id"], created["workload_id"])
        assert (again["request_id"], again["transform_id"], again["workload_id"]) == ids
        assert closed["status"] == "closed successfully"
        records = real_rest_peers.idds.database.records(run_id)
        assert [t["transform_id"] for t in records.transforms] == [ids[1]]
        assert records.processing_statuses() == ["ToCancel"]
        (submission,) = real_rest_peers.panda.submissions_for(run_id)
        assert submission.task_id == ids[2]
        # Less the broker look-ups of the run's transformer, relayed by PanDA.
        requests = [
            q
            for q in real_rest_peers.rest.requests()[seen_before:]
            if not q.path.startswith("/idds/metainfo/")
        ]
        assert {q.dn for q in requests} == {dn}
        posts = [q for q in requests if q.method == "POST"]
        assert [q.status for q in posts] == [500]  # the second create found the task
        assert "too many values to unpack" in (posts[0].error or "")
        figures[route] = {k: report[k] for k in ("create_s", "create_again_s", "close_s")}
        stop_transformers(real_rest_peers, run_id)
    print(f"\nthe REST gateway against the real iDDS REST API: {figures}")


# --- helpers ------------------------------------------------------------------------


def of_task(
    requests: list[AppRequest], name: str, ids: tuple[int, int, int]
) -> dict[str, list[AppRequest]]:
    """The requests about one task: its lookups by name, its details, its
    adjusts and closes (by the ids in the path)."""
    request_id, transform_id, workload_id = ids
    return {
        "lookup": [q for q in requests if q.path == f"/idds/request/name/{name}"],
        "details": [
            q for q in requests if q.path.startswith(f"/idds/request/{request_id}/null/True/")
        ],
        "adjust": [
            q
            for q in requests
            if q.path == f"/idds/workflow_task/{request_id}/{transform_id}/{workload_id}/adjust"
        ],
        "close": [q for q in requests if q.path == f"/idds/workflow_task/{request_id}/close"],
    }


def wait_stored_results(api_url: str, run_id: str, count: int) -> bool:
    """Wait until the run's stored events hold ``count`` slice results (the
    listener stores each before it acks it); False after WAIT."""
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    resource = run_resource_id(REAL_REST_NAMESPACE, run_id)
    deadline = time.monotonic() + WAIT
    while True:
        with temporary_settings({PREFECT_API_URL: api_url}):
            events = asyncio.run(run_history(resource, since))
        if sum(1 for e in events if e.event == "swf.bus.slice_result") >= count:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)  # the events API sends no notice: a poll


def probe(route: str, run_id: str, client_env: dict[str, str]) -> dict:
    """rest_gateway_probe.py with only the client's own environment."""
    env = peer_env(client_env)  # ours, less IDDS_*, PANDA_*, X509_*, ...
    done = subprocess.run(
        [sys.executable, str(PROBE), json.dumps({"route": route, "run_id": run_id, "workers": 1})],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"the {route} probe failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def stop_transformers(peers: RealPeers, run_id: str) -> None:
    """The probe's run has a transformer too: stop it as the service would
    (the module's end stops whatever is left)."""
    settings = Settings(
        brokers=peers.brokers, transceiver=Transceiver(namespace=REAL_REST_NAMESPACE)
    )
    bus = PeerBus(peers.brokers, name="probe-stop")
    bus.start()
    try:
        for stop in outbound.stop_transformers(run_id, settings, datetime.now(UTC)):
            bus.send(stop.destination, stop.body, stop.headers)
    finally:
        bus.stop()
