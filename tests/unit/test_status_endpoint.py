"""The listener's HTTP endpoint (/metrics, /healthz) on a real socket, and
``swf-panda-workers healthcheck`` asking it: no broker, the health given."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from listeners.bus_listener import ListenerHealth
from listeners.metrics import ListenerMetrics
from listeners.status_server import StatusServer, health_answer, status_endpoint
from swf_panda_workers.cli import main
from swf_panda_workers.config.loading import settings_from
from swf_panda_workers.config.schema import Metrics, Settings
from swf_panda_workers.healthcheck import default_url, problem

HEALTHY = ListenerHealth(listening=True, bus_connected=True, prefect_reachable=True, runs_active=2)


class Health:
    """A health snapshot the test changes."""

    def __init__(self, health: ListenerHealth = HEALTHY) -> None:
        self.now = health

    def __call__(self) -> ListenerHealth:
        return self.now


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def server(health: Health) -> Iterator[StatusServer]:
    metrics = ListenerMetrics(health)
    served = StatusServer("127.0.0.1", 0, metrics.registry, health).start()
    yield served
    served.stop()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.mark.parametrize(
    ("health", "code", "status"),
    [
        pytest.param(HEALTHY, 200, "ok", id="all well"),
        # Messages wait unacked, nothing is lost; a restart would not bring Prefect back.
        pytest.param(ListenerHealth(True, True, False, None), 200, "degraded", id="Prefect away"),
        pytest.param(ListenerHealth(True, False, True, 2), 503, "unavailable", id="broker lost"),
        pytest.param(ListenerHealth(False, True, True, 2), 503, "unavailable", id="not subscribed"),
        pytest.param(ListenerHealth(False, False, False, None), 503, "unavailable", id="starting"),
    ],
)
def test_healthz_says_healthy_while_the_listener_takes_messages(
    health: ListenerHealth,
    code: int,
    status: str,
) -> None:
    answer, body = health_answer(health)
    assert (answer, body["status"]) == (code, status)
    assert body["prefect_reachable"] is health.prefect_reachable
    assert body["runs_active"] == health.runs_active


def test_the_endpoint_serves_metrics_and_health(server: StatusServer, health: Health) -> None:
    base = f"http://127.0.0.1:{server.port}"
    code, content_type, body = get(f"{base}/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {
        "swf_panda_workers_messages_received",
        "swf_panda_workers_messages_acked",
        "swf_panda_workers_handoff_seconds",
        "swf_panda_workers_runs_active",
        "swf_panda_workers_bus_connected",
    } <= names

    code, content_type, body = get(f"{base}/healthz")
    assert (code, content_type) == (200, "application/json")
    assert json.loads(body) == {
        "status": "ok",
        "listening": True,
        "bus_connected": True,
        "prefect_reachable": True,
        "runs_active": 2,
    }
    health.now = ListenerHealth(True, False, True, 2)
    code, _, body = get(f"{base}/healthz?verbose=1")
    assert (code, json.loads(body)["status"]) == (503, "unavailable")
    assert get(f"{base}/")[0] == 404


def test_port_zero_in_the_configuration_opens_no_endpoint(health: Health) -> None:
    settings = Settings.model_validate({"metrics": {"port": 0}})
    with status_endpoint(settings, health) as metrics:
        assert metrics.registry.get_sample_value("swf_panda_workers_listening") == 1


def test_a_taken_port_is_logged_and_the_listener_goes_on(
    health: Health,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings.model_validate({"metrics": {"port": taken.getsockname()[1]}})
        with caplog.at_level(logging.ERROR), status_endpoint(settings, health) as metrics:
            assert isinstance(metrics, ListenerMetrics)
    assert "no metrics or health endpoint: cannot listen on 127.0.0.1" in caplog.text


def test_the_metrics_section_comes_from_the_environment() -> None:
    settings = settings_from({}, {"SWF_METRICS_HOST": "0.0.0.0", "SWF_METRICS_PORT": "9700"})
    assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", 9700)
    assert Settings().metrics == Metrics(host="127.0.0.1", port=9640)
    assert settings_from({}, {"SWF_METRICS_PORT": "0"}).metrics.port == 0


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 9640, "http://127.0.0.1:9640/healthz"),
        ("0.0.0.0", 9641, "http://127.0.0.1:9641/healthz"),
        ("::", 9640, "http://[::1]:9640/healthz"),
        ("listener.example", 80, "http://listener.example:80/healthz"),
        ("127.0.0.1", 0, None),
    ],
)
def test_the_health_check_asks_the_configured_port_on_this_host(
    host: str,
    port: int,
    url: str | None,
) -> None:
    assert default_url(Metrics(host=host, port=port)) == url


def test_healthcheck_exits_0_when_healthy_and_1_with_one_line_when_not(
    server: StatusServer,
    health: Health,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert main(["healthcheck", "--url", url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"

    health.now = ListenerHealth(True, True, False, None)  # Prefect away: still healthy
    assert main(["healthcheck", "--url", url]) == 0
    capsys.readouterr()

    health.now = ListenerHealth(True, False, True, 2)
    assert main(["healthcheck", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"healthcheck: {url} answered 503: ")
    assert err.count("\n") == 1 and '"status":"unavailable"' in err


def test_healthcheck_exits_1_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/healthz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("healthcheck: nothing answers at ") and err.count("\n") == 1


def test_a_listener_that_never_answers_is_unhealthy() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/healthz"
        wrong, answer = problem(url, timeout=0.3)
    assert (wrong, answer) == (f"no answer from {url} within 0.3 s", "")


@pytest.mark.parametrize(
    ("config", "err"),
    [
        (
            "metrics:\n  port: 0\n",
            "healthcheck: metrics.port is 0: the listener serves no /healthz",
        ),
        ("metrics:\n  prot: 1\n", "healthcheck: configuration error: "),
    ],
)
def test_healthcheck_without_an_endpoint_to_ask_exits_1_not_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config: str,
    err: str,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    # 1, not the CLI's usual 2 for a configuration error: Docker reserves 2.
    assert main(["healthcheck", "--config", str(path)]) == 1
    assert capsys.readouterr().err.startswith(err)
