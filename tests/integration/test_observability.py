"""The listener's metrics and health endpoint against the real broker and
Prefect server, and the container image's entrypoint run as a plain process
(Docker does not run here).

- A whole run of the simulated peers through a listener with its endpoint
  on: each message type the listener was sent (counted on the bus by the
  recorder and the transformers) is counted received, every one acked, each
  hand-off timed, the run's workers equal its last adjust_worker, and the
  runs in progress are 1 before its end and back to 0 afterwards.
- The image: its COPY instructions applied to a folder and the project
  pip-installed from there (no dependencies: they are this venv's), then
  ENTRYPOINT + CMD started with only the environment the Containerfile and
  the compose snippet give; /healthz answers, a message sent to it is
  counted, the HEALTHCHECK command passes, SIGTERM ends it with 0 within the
  compose grace period, and the HEALTHCHECK then fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import once
from dockerfile_parse import DockerfileParser
from prometheus_client.parser import text_string_to_metric_families
from stacks import OBSERVED_NAMESPACE, free_port

from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.healthcheck import problem
from swf_panda_workers.service.processes import ManagedProcess
from swf_testbed.launchers.stack import PROJECT_ROOT, EmbeddedStack
from swf_testbed.peers._bus import PeerBus, peer_headers
from swf_testbed.peers.harness import PeerHarness
from swf_testbed.peers.scenario import slowdown_in_the_middle

pytestmark = [pytest.mark.integration, once("the listener's metrics and health check")]

NAMESPACE = OBSERVED_NAMESPACE  # observed_stack's (stacks.py)
IMAGE_NAMESPACE = "itestimage"
SLICES = 30
WAIT = 180.0  # generous: the machine is shared; waits end as soon as met
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"swf_panda_workers_{name}", frozenset(labels.items())))


def scrape_until(port: int, condition: Callable[[Samples], bool], timeout: float = WAIT) -> Samples:
    """Scrape until ``condition`` holds; the last scrape either way."""
    deadline = time.monotonic() + timeout
    samples = scrape(port)
    while not condition(samples) and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = scrape(port)
    return samples


# --- a whole run -----------------------------------------------------------------------


def test_the_metrics_count_a_whole_run(
    observed_stack: EmbeddedStack,
    metrics_port: int,
    new_run_id: Callable[[], str],
) -> None:
    brokers = observed_stack.brokers
    # Slices slow in the middle: the run asks for more workers (adjust_worker).
    with PeerHarness(
        brokers,
        NAMESPACE,
        slices_per_run=SLICES,
        idle_timeout=3,
        processing_time=slowdown_in_the_middle(0.2, 1.0, 5, 12),
        heartbeat_every=3600,
    ) as peers:
        run_id = new_run_id()
        peers.control.announce(run_id, "testbed", target_workers=3, slice_processing_time=0.5)
        assert peers.wait_until(lambda: peers.task_created(run_id), WAIT)
        farm_run = peers.farm.run(run_id, WAIT)
        assert peers.farm.wait_for(
            lambda: farm_run.slices_sent + farm_run.failed_sent >= SLICES, WAIT
        )
        # In progress until its end: counted within 15 s.
        during = scrape_until(metrics_port, lambda s: value(s, "runs_active") == 1, 60)
        assert value(during, "runs_active") == 1
        peers.control.end(run_id, "testbed")
        assert peers.wait_until(lambda: peers.task_closed(run_id), WAIT)
        assert peers.recorder.wait_for(
            lambda: bool(peers.recorder.of_type("stop_transformer", run_id)), 30
        )
        assert peers.recorder.settle(30)
        # What the listener was sent: the topic's messages of its namespace
        # and of none (its subscription's selector: iDDS may answer without
        # one), and the results on its queue. Those of no namespace are the
        # recorder's markers, heartbeats naming no run: ignored unread.
        on_topic = Counter(
            r.msg_type
            for r in peers.recorder.records
            if r.destination == brokers.workers_topic and r.headers.get("namespace") == NAMESPACE
        )
        markers = sum(
            1
            for r in peers.recorder.records
            if r.destination == brokers.workers_topic and r.headers.get("namespace") is None
        )
        results = farm_run.slices_sent + farm_run.failed_sent
        adjusts = peers.recorder.of_type("adjust_worker", run_id)

    sent = sum(on_topic.values()) + results + markers
    samples = scrape_until(metrics_port, lambda s: (value(s, "messages_acked_total") or 0) >= sent)
    for msg_type, count in on_topic.items():
        assert (
            value(samples, "messages_received_total", msg_type=msg_type, destination="topic")
            == count
        ), msg_type
    assert (
        markers
        and value(samples, "messages_received_total", msg_type="unread", destination="topic")
        == markers
    )
    assert (
        value(samples, "messages_received_total", msg_type="slice_result", destination="queue")
        == results
    )
    assert value(samples, "messages_acked_total") == sent
    assert not any(
        name == "swf_panda_workers_messages_rejected_total" and count
        for (name, _), count in samples.items()
    )

    # Timed: each announcement to its flow run, each other message of the run
    # to its stored event; our own requests echoed by the topic are not hand-offs.
    starts = on_topic["run_imminent"] + on_topic["run_imminent_worker"]
    echoes = sum(
        on_topic[t] for t in ("create_workflow_task", "adjust_worker", "close_workflow_task")
    )
    assert starts == 1 and echoes >= 3
    assert value(samples, "handoff_seconds_count", stored="flow_run") == starts
    events = sent - starts - echoes - markers
    assert value(samples, "handoff_seconds_count", stored="event") == events
    assert value(samples, "handoff_seconds_bucket", stored="event", le="+Inf") == events

    assert adjusts, "the slow stretch asked for no workers"
    assert (
        value(samples, "workers_requested", run_id=run_id)
        == adjusts[-1]["content"]["target_worker_count"]
    )
    for gauge in ("listening", "bus_connected", "prefect_reachable"):
        assert value(samples, gauge) == 1, gauge
    assert problem(f"http://127.0.0.1:{metrics_port}/healthz")[0] is None

    # The run's flow run has finished: counted every 15 s.
    samples = scrape_until(metrics_port, lambda s: value(s, "runs_active") == 0, 60)
    assert value(samples, "runs_active") == 0


# --- the image's entrypoint ------------------------------------------------------------

CONTAINERFILE = PROJECT_ROOT / "deployments" / "Containerfile"
COMPOSE = PROJECT_ROOT / "deployments" / "compose.listener.yaml"
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def image_instructions() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(CONTAINERFILE.read_bytes()))


def install_as_the_image_does(parsed: DockerfileParser, root: Path) -> tuple[Path, Path]:
    """The Containerfile's COPYs into ``root``/app (its WORKDIR), then pip's
    install of it into ``root``/site, without the dependencies (this venv's).
    Returns (app, site)."""
    app, site = root / "app", root / "site"
    for instruction in parsed.structure:
        if instruction["instruction"] != "COPY":
            continue
        *sources, target = shlex.split(instruction["value"])
        for source in sources:
            origin = PROJECT_ROOT / source
            into = app / target / origin.name if target.endswith("/") else app / target
            if origin.is_dir():
                shutil.copytree(
                    origin, into, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                )
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, into)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(app),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return app, site


def compose_environment(given: dict[str, str]) -> tuple[dict[str, str], dict[str, object]]:
    """The compose service's environment, its ${VAR:-default} filled from
    ``given`` as the shell would; and the service."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["panda-workers-listener"]

    def filled(text: str) -> str:
        return VARIABLE.sub(lambda m: given.get(m.group(1), m.group(2) or ""), text)

    return {name: filled(str(text)) for name, text in service["environment"].items()}, service


def test_the_image_entrypoint_runs_on_its_environment_alone(
    stack: EmbeddedStack,
    tmp_path: Path,
) -> None:
    parsed = image_instructions()
    app, site = install_as_the_image_does(parsed, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    brokers = stack.brokers
    environment, service = compose_environment(
        {
            "ACTIVEMQ_HOST": brokers.host,
            "ACTIVEMQ_PORT": str(brokers.port),
            "SWF_NAMESPACE": IMAGE_NAMESPACE,
            "PREFECT_API_URL": stack.api_url,
        }
    )
    # The compose's own port may be taken on a machine shared with other
    # tests; the host stays the container's 0.0.0.0.
    port = free_port()
    environment["SWF_METRICS_PORT"] = str(port)
    image_env = {
        name: text.replace("/app", str(app)).replace("/home/swf", str(home))
        for name, text in parsed.envs.items()
    }
    env = {
        "PATH": f"{site / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(site),
        **image_env,
        **environment,
    }
    command = [*json.loads(_last(parsed, "ENTRYPOINT")), *json.loads(_last(parsed, "CMD"))]
    check = json.loads(_last(parsed, "HEALTHCHECK").partition("CMD")[2])
    grace = float(str(service["stop_grace_period"]).removesuffix("s"))

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check, env=env, cwd=app, capture_output=True, text=True, timeout=30)

    listener = ManagedProcess(
        "image-listener", command, env, tmp_path / "listener.log", app
    ).start()
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + WAIT
        while problem(url)[0] is not None:
            assert listener.alive, f"the listener exited:\n{listener.tail()}"
            assert time.monotonic() < deadline, f"/healthz never 200:\n{listener.tail()}"
            time.sleep(0.5)
        assert healthcheck().returncode == 0

        sender = PeerBus(Brokers(host=brokers.host, port=brokers.port), "obs-image-test")
        sender.start()
        try:
            sender.send(
                brokers.workers_topic,
                {
                    "msg_type": "heartbeat",
                    "internal_id": "obs-image-test",
                    "namespace": IMAGE_NAMESPACE,
                    "timestamp": time.time(),
                },
                peer_headers("heartbeat", None, IMAGE_NAMESPACE),
            )
        finally:
            sender.stop()
        samples = scrape_until(port, lambda s: value(s, "messages_acked_total") == 1)
        assert (
            value(samples, "messages_received_total", msg_type="heartbeat", destination="topic")
            == 1
        )
        assert value(samples, "messages_acked_total") == 1
        assert value(samples, "handoff_seconds_count", stored="event") == 1
        assert (
            value(
                samples,
                "listener_info",
                namespace=IMAGE_NAMESPACE,
                listener_id=f"swf-panda-workers-{IMAGE_NAMESPACE}",
            )
            == 1
        )

        assert listener.process is not None
        listener.process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert listener.process.wait(timeout=grace) == 0, listener.tail()
    finally:
        listener.stop()
    unhealthy = healthcheck()
    assert unhealthy.returncode == 1
    assert unhealthy.stderr.startswith("healthcheck: nothing answers at ")
    assert unhealthy.stderr.count("\n") == 1


def _last(parsed: DockerfileParser, name: str) -> str:
    return [i["value"] for i in parsed.structure if i["instruction"] == name][-1]
