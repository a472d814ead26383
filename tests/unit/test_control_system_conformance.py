"""The simulated control system against what the testbed's fast-processing
agent really sends (tests/real_messages/*.testbed.json): the same headers,
the same fields at every level, the same types and timestamp shapes; only
the run's own values differ. No broker: the messages are built, not sent."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.messages import RunEnd, RunImminent, parse_message
from swf_testbed.peers.control_system import ControlMessage, ControlSystem

REAL = Path(__file__).resolve().parents[1] / "real_messages"
NAIVE_MICROSECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
RUN = "100123"


def real(name: str) -> dict[str, Any]:
    return json.loads((REAL / name).read_text())


@pytest.fixture
def control() -> ControlSystem:
    # Never started: only its message builders are used.
    return ControlSystem(Brokers(), "dev", slices_destination="/topic/panda.slices")


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what must match the real message."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__


def headers_of(message: dict[str, Any]) -> dict[str, str]:
    # The recorded headers include the destination the broker adds.
    return {k: v for k, v in message["headers"].items() if k != "destination"}


def test_the_announcement_is_the_agents(control: ControlSystem) -> None:
    expected = real("run_imminent_worker.testbed.json")
    built = control.announcement(
        RUN, "testbed", target_workers=30, core_count=4, slice_processing_time=30
    )
    assert built.destination == expected["destination"]
    assert built.headers == headers_of(expected)  # persistent false, no ttl
    assert shape(built.body) == shape(expected["body"])
    # core_count is the agent's target_worker_count, not cores per worker.
    assert built.body["content"]["core_count"] == built.body["content"]["target_worker_count"]
    assert {k: built.body["content"][k] for k in ("msg_type", "namespace", "run_id")} == {
        "msg_type": "run_imminent",
        "namespace": "dev",
        "run_id": RUN,
    }
    for stamp in (built.body["created_at"], built.body["content"]["timestamp"]):
        assert NAIVE_MICROSECONDS.match(stamp), stamp
    assert isinstance(parse_message(built.body), RunImminent)


def test_the_end_is_the_agents(control: ControlSystem) -> None:
    expected = real("end_run.testbed.json")
    built = control.ending(RUN, "testbed")
    assert built.destination == expected["destination"]
    assert built.headers == headers_of(expected)
    assert shape(built.body) == shape(expected["body"])
    assert NAIVE_MICROSECONDS.match(built.body["created_at"])
    assert isinstance(parse_message(built.body), RunEnd)


def test_a_slice_is_the_agents(control: ControlSystem) -> None:
    expected = real("slice.testbed.json")
    built = control.slice_message(RUN, 3)
    assert built.destination == expected["destination"]
    assert built.headers == headers_of(expected)  # persistent, a 12 h ttl, the run_id
    assert shape(built.body) == shape(expected["body"])
    content = built.body["content"]
    expected_content = expected["body"]["content"]
    same = (
        "run_id",
        "filename",
        "tf_filename",
        "slice_id",
        "start",
        "end",
        "tf_count",
        "state",
        "substate",
    )
    assert {k: content[k] for k in same} == {k: expected_content[k] for k in same}
    assert uuid.UUID(content["req_id"]).version == 4
    assert NAIVE_MICROSECONDS.match(built.body["created_at"])


def test_slices_number_within_their_super_time_frame(
    control: ControlSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[ControlMessage] = []

    def send(message: ControlMessage) -> dict[str, Any]:
        sent.append(message)
        return message.body

    monkeypatch.setattr(control, "_send", send)
    control.send_slices(RUN, 5, first=2, slices_per_stf=3, destination="/queue/elsewhere")
    assert [(m.body["content"]["filename"], m.body["content"]["slice_id"]) for m in sent] == [
        (f"swf.{RUN}.000001.stf", 2),
        (f"swf.{RUN}.000002.stf", 0),
        (f"swf.{RUN}.000002.stf", 1),
        (f"swf.{RUN}.000002.stf", 2),
        (f"swf.{RUN}.000003.stf", 0),
    ]
    assert {m.destination for m in sent} == {"/queue/elsewhere"}
    assert len({m.body["content"]["req_id"] for m in sent}) == 5


def test_the_seed_shape_is_kept(control: ControlSystem) -> None:
    built = control.announcement(RUN, "seed", target_workers=4, core_count=2, memory_per_core=3000)
    assert built.body["msg_type"] == "run_imminent"
    assert built.headers["persistent"] == "true"
    assert built.body["content"] == {
        "num_workers": 4,
        "num_cores_per_worker": 2,
        "num_ram_per_core": 3000,
        "site": "BNL-OSG",
    }
    assert built.body["created_at"].endswith("Z")
    assert control.ending(RUN, "seed").body["msg_type"] == "run_end"
