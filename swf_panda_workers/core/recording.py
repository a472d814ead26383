"""A run as recorded: its announcement, its slice results, the sizes it asked
for and when it ended. Built from the run's stored events (the same inputs
its flow folded), written to and read from JSON, and replayed offline
(``replay``) through any policy."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from swf_panda_workers.core.effects import AdjustSent
from swf_panda_workers.core.messages import RunEnd, RunImminent, SliceResult

FORMAT = "swf-panda-workers/run-recording/1"


class RecordedSlice(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: datetime  # received
    requested_at: datetime | None = None  # queued for the transformers
    started_at: datetime | None = None  # taken by a transformer
    processing_seconds: float | None = None
    failed: bool = False
    worker: str | None = None

    @classmethod
    def of(cls, result: SliceResult, at: datetime) -> RecordedSlice:
        content = result.content
        return cls(
            at=at,
            requested_at=content.requested_at,
            started_at=content.processing_start_at,
            processing_seconds=result.processing_seconds,
            failed=content.state == "failed",
            worker=result.worker,
        )


class RunRecording(BaseModel):
    format: str = FORMAT
    run_id: str
    namespace: str
    announcement: dict[str, Any]  # the run_imminent message as received
    announced_at: datetime
    ended_at: datetime | None = None
    slices: list[RecordedSlice] = []
    adjustments: list[AdjustSent] = []

    @field_validator("adjustments", mode="before")
    @classmethod
    def _earlier_format(cls, entries: Any) -> Any:
        # Recordings written before adjustments kept when they were decided
        # and sent hold one time, ``at``: it stands for both.
        if not isinstance(entries, list):
            return entries
        return [
            {"decided_at": e["at"], "sent_at": e["at"], **{k: v for k, v in e.items() if k != "at"}}
            if isinstance(e, dict) and "at" in e
            else e
            for e in entries
        ]

    @property
    def run(self) -> RunImminent:
        return RunImminent.model_validate(self.announcement)


def recording_from(
    run_id: str,
    namespace: str,
    announcement: dict[str, Any],
    announced_at: datetime,
    inputs: Iterable[tuple[datetime, object]],
) -> RunRecording:
    """A recording from the run's inputs (message or effect, and when), in order."""
    slices: list[RecordedSlice] = []
    adjustments: list[AdjustSent] = []
    ended_at: datetime | None = None
    for at, item in inputs:
        if isinstance(item, SliceResult):
            slices.append(RecordedSlice.of(item, at))
        elif isinstance(item, RunEnd) and ended_at is None:
            ended_at = at
        elif isinstance(item, AdjustSent):
            adjustments.append(item)
    return RunRecording(
        run_id=run_id,
        namespace=namespace,
        announcement=announcement,
        announced_at=announced_at,
        ended_at=ended_at,
        slices=slices,
        adjustments=adjustments,
    )
