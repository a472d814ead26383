"""One log line per input a run flow takes in: ``msg_type=... run_id=...``
and what matters of it, so the run's log in the Prefect UI reads as the run's
story, and a line is found by grepping either key."""

from __future__ import annotations

from functools import singledispatch

from swf_panda_workers.core.effects import EFFECT_TYPES, AdjustSent, Effect
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    Heartbeat,
    Message,
    SliceResult,
    TransformerHeartbeat,
)


def input_line(item: Message | Effect, run_id: str) -> str:
    kind = f"effect={item.kind}" if isinstance(item, EFFECT_TYPES) else f"msg_type={item.msg_type}"
    detail = _detail(item)
    return f"{kind} run_id={run_id}" + (f" {detail}" if detail else "")


@singledispatch
def _detail(item: object) -> str:
    return ""


@_detail.register
def _slice(item: SliceResult) -> str:
    c, seconds = item.content, item.processing_seconds
    took = "-" if seconds is None else f"{seconds:.2f}s"
    return f"state={c.state} took={took} worker={item.worker or '-'}"


@_detail.register
def _created(item: CreatedWorkflowTask) -> str:
    ids = item.ids
    return (
        f"request_id={ids.request_id} transform_id={ids.transform_id} workload_id={ids.workload_id}"
    )


@_detail.register
def _adjusted(item: AdjustedWorker) -> str:
    return f"workers={item.content.target_worker_count}"


@_detail.register
def _closed(item: ClosedWorkflowTask) -> str:
    return f"status={item.content.status}"


@_detail.register
def _adjust_sent(item: AdjustSent) -> str:
    return f"workers={item.size.target_worker_count}"


# The stream of a run (its slice results and heartbeats, hundreds a second in
# a busy run) is summed up in one line every STREAM_SUMMARY_EVERY seconds;
# each item has its own line at DEBUG only. One line per result was a log
# record per result for the Prefect server to store: a fifth of its writes.
STREAM_INPUTS = (SliceResult, TransformerHeartbeat, Heartbeat)
STREAM_SUMMARY_EVERY = 30.0  # s


class StreamSummary:
    """What a run's stream brought since the last summary line."""

    def __init__(self) -> None:
        self.done = self.failed = self.heartbeats = 0
        self._seconds: list[float] = []

    def __bool__(self) -> bool:
        return bool(self.done or self.failed or self.heartbeats)

    def add(self, item: Message) -> None:
        if isinstance(item, SliceResult):
            if item.content.state == "failed":
                self.failed += 1
            else:
                self.done += 1
            if item.processing_seconds is not None:
                self._seconds.append(item.processing_seconds)
        else:
            self.heartbeats += 1

    def line(self, run_id: str, seconds: float) -> str:
        took = sorted(self._seconds)
        median = f"{took[len(took) // 2]:.2f}s" if took else "-"
        longest = f"{took[-1]:.2f}s" if took else "-"
        return (
            f"stream run_id={run_id} last={seconds:.0f}s slice_results={self.done} "
            f"failed={self.failed} took_median={median} took_max={longest} "
            f"heartbeats={self.heartbeats}"
        )
