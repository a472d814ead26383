"""One line per input, with run_id and msg_type (or the effect) first."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from swf_panda_workers.core.effects import AdjustSent, StopSent
from swf_panda_workers.core.log_lines import StreamSummary, input_line
from swf_panda_workers.core.messages import WorkerSize, parse_message

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (
            {
                "msg_type": "slice_result",
                "run_id": 7,
                "content": {
                    "processing_start_at": "2026-11-24T10:00:00",
                    "processed_at": "2026-11-24T10:00:02.5",
                    "state": "done",
                    "hostname": "node-3",
                },
            },
            "msg_type=slice_result run_id=7 state=done took=2.50s worker=node-3",
        ),
        (
            {
                "msg_type": "created_workflow_task",
                "run_id": "7",
                "content": {"request_id": 1, "transform_id": 2, "workload_id": 3},
            },
            "msg_type=created_workflow_task run_id=7 request_id=1 transform_id=2 workload_id=3",
        ),
        ({"msg_type": "end_run", "run_id": "7", "content": {}}, "msg_type=end_run run_id=7"),
        (
            {
                "msg_type": "closed_workflow_task",
                "run_id": "7",
                "content": {
                    "request_id": 1,
                    "transform_id": 2,
                    "workload_id": 3,
                    "status": "ToCancel",
                },
            },
            "msg_type=closed_workflow_task run_id=7 status=ToCancel",
        ),
    ],
)
def test_message_lines(body: dict[str, object], line: str) -> None:
    assert input_line(parse_message(body), "7") == line


def test_effect_lines() -> None:
    size = WorkerSize(core_count=1, memory_per_core=2000, site="BNL", target_worker_count=6)
    assert (
        input_line(AdjustSent(size=size, reason="r", decided_at=NOW, sent_at=NOW), "7")
        == "effect=adjust_sent run_id=7 workers=6"
    )
    assert input_line(StopSent(), "7") == "effect=stop_sent run_id=7"


def test_a_run_s_stream_is_summed_up_in_one_line() -> None:
    summary = StreamSummary()
    assert not summary
    for took, state in ((2.0, "done"), (3.0, "done"), (9.0, "failed")):
        summary.add(
            parse_message(
                {
                    "msg_type": "slice_result",
                    "run_id": 7,
                    "content": {
                        "processing_start_at": "2026-11-24T10:00:00",
                        "processed_at": f"2026-11-24T10:00:0{took:.0f}",
                        "state": state,
                    },
                }
            )
        )
    summary.add(parse_message({"msg_type": "transformer_heartbeat", "content": {}}))
    assert summary
    assert summary.line("7", 30.2) == (
        "stream run_id=7 last=30s slice_results=2 failed=1 "
        "took_median=3.00s took_max=9.00s heartbeats=1"
    )
