"""The commands that act on one run or on the bus: ``show`` a run's state,
start a ``dry-run`` of a recorded run in Prefect, ``send`` a test message.
Each parses nothing itself (swf_panda_workers/cli.py does) and returns the
process's exit code; what goes wrong is said in one line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
from prefect.exceptions import PrefectException

from swf_panda_workers.adapters.prefect_recordings import (
    RunNotFound,
    artifact_text,
    final_state,
    parameters_json,
    run_report,
    start_dry_run,
)
from swf_panda_workers.adapters.stomp_bus import BusClient, BusRefused, BusUnavailable
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core import sample_messages
from swf_panda_workers.core.messages import InvalidMessage, parse_message
from swf_panda_workers.core.run_report import artifact_key

# Prefect unreachable, refusing or answering oddly: the operator's to fix, one line each.
PREFECT_TROUBLE = (httpx.HTTPError, OSError, PrefectException)
CONNECT_WAIT = 5.0  # s to reach the broker before `send` gives up


def fail(command: str, text: str) -> int:
    print(f"{command}: {text}", file=sys.stderr)
    return 1


def show(settings: Settings, run_id: str, namespace: str, parameters_only: bool) -> int:
    try:
        report = asyncio.run(run_report(run_id, namespace, settings))
    except RunNotFound as exc:
        return fail("show", str(exc))
    except PREFECT_TROUBLE as exc:
        return fail("show", f"cannot read run {run_id} from Prefect: {exc}")
    print(parameters_json(report.recorded_parameters) if parameters_only else report.text())
    return 0


def dry_run(
    settings: Settings, run_id: str, namespace: str, deployment: str | None, wait: float
) -> int:
    """Start a dry run of the recorded run, wait for it, print its summary."""
    name = deployment or settings.prefect.deployment
    try:
        flow_run_id = asyncio.run(start_dry_run(run_id, namespace, name))
    except RunNotFound as exc:
        return fail("dry-run", str(exc))
    except PREFECT_TROUBLE as exc:
        return fail("dry-run", f"cannot start a dry run of {run_id} with {name}: {exc}")
    print(f"dry run of run {run_id}: flow run {flow_run_id} of {name}")
    if wait <= 0:
        return 0
    flow_run = asyncio.run(final_state(flow_run_id, wait))
    if flow_run.state is None or not flow_run.state.is_final():
        return fail(
            "dry-run",
            f"flow run {flow_run_id} not finished after {wait:g}s "
            f"({flow_run.state_name}); is a runner serving {name}?",
        )
    key = artifact_key("run", namespace, run_id, dry_run=True)
    print(asyncio.run(artifact_text(key)) or f"(no summary {key})")
    return (
        0
        if flow_run.state.is_completed()
        else fail(
            "dry-run",
            f"flow run {flow_run_id} ended {flow_run.state_name}: {flow_run.state.message or ''}",
        )
    )


def send(
    settings: Settings,
    message: sample_messages.Sample | None,
    raw: bytes | None,
    destination: str | None,
) -> int:
    """Send one message and wait for the broker's receipt. A raw body is sent
    as it is, even one the listener will set aside (to try exactly that), and
    what the listener will make of it is said first."""
    if message is None:
        assert raw is not None, "either a sample or a raw body"
        verdict = _verdict(raw)
        print(verdict, file=sys.stderr)
        body, headers, target = raw, {"persistent": "true"}, destination
        if target is None:
            return fail("send", "a raw message needs --destination")
    else:
        body = json.dumps(message.body).encode()
        headers, target = message.headers, destination or message.destination
    bus = BusClient(settings.brokers, name="swf-send")
    try:
        bus.start(timeout=CONNECT_WAIT)  # an operator at a prompt: not the service's patience
        try:
            bus.send_raw(target, body, headers)
        finally:
            bus.stop()
    except (BusUnavailable, BusRefused) as exc:
        return fail("send", f"{settings.brokers.host}:{settings.brokers.port}: {exc}")
    what = message.body["msg_type"] if message else "raw message"
    print(f"sent {what} to {target} ({len(body)} bytes)")
    return 0


def read_body(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _verdict(raw: bytes) -> str:
    try:
        parsed = parse_message(raw)
    except InvalidMessage as exc:
        return f"note: the listener will set this aside: {str(exc).splitlines()[0]}"
    return f"note: a valid {parsed.msg_type}"
