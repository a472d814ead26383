"""What a run's flow did, as data: the scaling loop's adjustments and the
effects the flow journals so that a retried flow run does not do them again.

An ``Adjustment`` is a decision of the scaling loop with the figures it was
decided on; the journaled ``AdjustSent`` is that adjustment plus when it was
sent. Each effect is its own small model, told apart on the wire by ``kind``
(the journal stores them as JSON; ``effect_from`` reads one back).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from swf_panda_workers.core.messages import WorkerSize, WorkflowIds
from swf_panda_workers.core.slice_window import Demand


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Adjustment(_Frozen):
    """A worker size the scaling loop asks for, and why."""

    size: WorkerSize
    reason: str
    inputs: Demand | None = None  # what the policy saw (None: a rule on one slice)
    # On the clock of the results the policy looked at: the cooldown runs
    # from it, so a flow catching up on stored results decides at their
    # times, not at the moment it happens to read them.
    decided_at: datetime


class CreateSent(_Frozen):
    kind: Literal["create_sent"] = "create_sent"


class AdjustSent(Adjustment):
    """An adjustment asked of iDDS, and when."""

    kind: Literal["adjust_sent"] = "adjust_sent"
    sent_at: datetime

    @classmethod
    def of(cls, adjustment: Adjustment, sent_at: datetime) -> AdjustSent:
        return cls(**dict(adjustment), sent_at=sent_at)


class StopSent(_Frozen):
    kind: Literal["stop_sent"] = "stop_sent"


class CloseSent(_Frozen):
    kind: Literal["close_sent"] = "close_sent"
    # The task the close was for; None: the run's, by its run id (no ids known).
    ids: WorkflowIds | None = None


Effect = Annotated[CreateSent | AdjustSent | StopSent | CloseSent, Field(discriminator="kind")]
EFFECT_TYPES = (CreateSent, AdjustSent, StopSent, CloseSent)  # for isinstance
_EFFECT: TypeAdapter[Effect] = TypeAdapter(Effect)


def effect_from(payload: Any, journaled_at: datetime) -> Effect:
    """An effect from its journaled JSON (pydantic's ValidationError, a
    ValueError, if it is none). Entries journaled before adjustments kept
    ``sent_at`` were sent when they were journaled."""
    if isinstance(payload, dict) and payload.get("kind") == "adjust_sent":
        payload = {"sent_at": journaled_at, **payload}
    return _EFFECT.validate_python(payload)
