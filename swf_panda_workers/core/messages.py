"""Every message on the panda.workers bus, as pydantic models.

The models accept both the seed's documented shapes and what the real peers
send (shared PROTOCOL.md): ``run_imminent`` and ``run_imminent_worker``;
``end_run``, ``run_end`` and ``run_stop``; ``transformer_heartbeat`` and the
transformer's bare ``heartbeat``; slice results with or without
``processing_time``; run ids as strings or integers. The real peers' own
shapes (shared PROTOCOL.md, "Facts read from the real peers' code") are
accepted as they come: ``result.state`` a JSON boolean, ``workload_id`` an
integer, null or iDDS's ``[task_id, null]``, idds-prompt's
``Thu, 03 Dec 2026 13:04:48 UTC`` times, and a ``slice_result`` whose run_id
is null (``UnroutedSliceResult``: a transformer answering a heartbeat it took
off its slice queue).

``parse_message`` is the single entry point for raw bodies: it returns one of
the models or raises ``InvalidMessage`` whose text names the offending field.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from swf_panda_workers.core.timestamps import Timestamp

# Run ids travel as strings ("100123") from the testbed and as integers from
# other peers; inside the service they are always text. They end up in STOMP
# selectors, Prefect resource ids and file names, so only a safe alphabet.
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _run_id_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("run_id must be a string or an integer")
    text = str(value).strip()
    if not _RUN_ID_PATTERN.match(text):
        raise ValueError("run_id must be 1-64 characters of letters, digits, '_', '.', '-'")
    return text


RunId = Annotated[str, BeforeValidator(_run_id_text)]


def _workload_id(value: object) -> object:
    # One branch of iDDS's PanDA client returns (task_id, None), which iDDS
    # sends on as the JSON array [task_id, null]: the task id is the first.
    if isinstance(value, list | tuple) and len(value) == 2 and value[1] is None:
        return value[0]
    return value


WorkloadId = Annotated[int | None, BeforeValidator(_workload_id)]


class InvalidMessage(ValueError):
    """A bus message that cannot be used; the text says why."""


class _Model(BaseModel):
    # Peers add fields over time; unknown ones are kept, never fatal.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class Envelope(_Model):
    """Fields every message may carry besides its type and content."""

    created_at: Timestamp | None = None
    namespace: str | None = None
    instance: str | None = None
    sender: str | None = None


class RunMessage(Envelope):
    """A message about one run: run_id is required."""

    run_id: RunId


# --- from the control system -------------------------------------------------


class RunSpec(_Model):
    """What a run asks for. Seed names and testbed names are both accepted."""

    target_worker_count: int | None = Field(
        default=None,
        ge=0,
        validation_alias=AliasChoices("target_worker_count", "num_workers"),
        description="workers (PanDA jobs, one transformer each) wanted at the start",
    )
    cores_per_worker: int | None = Field(
        default=None,
        ge=0,
        validation_alias="num_cores_per_worker",
        description="cores per worker (the seed's num_cores_per_worker)",
    )
    core_count: int | None = Field(
        default=None,
        ge=0,
        description="the testbed's core_count: its fast-processing agent sets it to "
        "target_worker_count, so it is no cores-per-worker figure and is not used as one",
    )
    memory_per_core: int | None = Field(
        default=None,
        ge=0,
        validation_alias=AliasChoices("memory_per_core", "num_ram_per_core"),
        description="MB of memory per core",
    )
    site: str | None = None
    slice_processing_time: float | None = Field(
        default=None, gt=0, description="expected seconds per slice"
    )
    worker_rampup_time: float | None = Field(default=None, ge=0)
    worker_rampdown_time: float | None = Field(default=None, ge=0)


class RunImminent(RunMessage):
    """A run is about to start: create its workflow and PanDA task."""

    msg_type: Literal["run_imminent", "run_imminent_worker"]
    content: RunSpec = Field(default_factory=RunSpec)


class RunEnd(RunMessage):
    """The run is over. The testbed may deliver it twice (two topics)."""

    msg_type: Literal["end_run", "run_end", "run_stop"]
    content: dict[str, Any] = Field(default_factory=dict)


# --- between us and iDDS ---------------------------------------------------


class WorkflowIds(_Model):
    """The iDDS handles of a run's workflow and PanDA task."""

    request_id: int
    transform_id: int
    workload_id: WorkloadId = Field(
        default=None, description="the PanDA task id; null when the PanDA submission failed"
    )


class CreatedTaskContent(WorkflowIds):
    run_id: RunId | None = None
    processing_id: int | None = None
    input_coll_id: int | None = None
    output_coll_id: int | None = None


class CreatedWorkflowTask(RunMessage):
    """iDDS's reply to create_workflow_task."""

    msg_type: Literal["created_workflow_task"]
    content: CreatedTaskContent

    @property
    def ids(self) -> WorkflowIds:
        c = self.content
        return WorkflowIds(
            request_id=c.request_id, transform_id=c.transform_id, workload_id=c.workload_id
        )


class WorkerSize(_Model):
    """The size of a run's workers as requested from iDDS."""

    core_count: int | None = Field(default=None, ge=0)
    memory_per_core: int | None = Field(default=None, ge=0)
    site: str | None = None
    target_worker_count: int | None = Field(default=None, ge=0)


class AdjustWorkerContent(WorkerSize):
    run_id: RunId
    created_at: Timestamp | None = None
    request_id: int
    transform_id: int
    workload_id: int | None = None


class AdjustedWorkerContent(WorkerSize):
    run_id: RunId | None = None
    request_id: int | None = None
    transform_id: int | None = None
    workload_id: int | None = None


class AdjustedWorker(RunMessage):
    """iDDS's reply to adjust_worker: the size it applied."""

    msg_type: Literal["adjusted_worker"]
    content: AdjustedWorkerContent


class ClosedContent(_Model):
    run_id: RunId | None = None
    request_id: int | None = None
    transform_id: int | None = None
    workload_id: int | None = None
    status: str = Field(min_length=1, description="ToCancel, or NotFound")


class ClosedWorkflowTask(RunMessage):
    """iDDS's reply to close_workflow_task."""

    msg_type: Literal["closed_workflow_task"]
    content: ClosedContent


class CreateTaskContent(_Model):
    run_id: RunId
    created_at: Timestamp | None = None
    workflow: dict[str, Any]


class CreateWorkflowTask(RunMessage):
    """Ours (message mode): ask iDDS for a workflow and PanDA task."""

    msg_type: Literal["create_workflow_task"]
    content: CreateTaskContent


class AdjustWorker(RunMessage):
    """Ours: ask iDDS to resize a run's workers."""

    msg_type: Literal["adjust_worker"]
    content: AdjustWorkerContent


class CloseContent(_Model):
    run_id: RunId | None = None
    created_at: Timestamp | None = None
    request_id: int | None = None
    transform_id: int | None = None
    workload_id: int | None = None


class CloseWorkflowTask(RunMessage):
    """Ours: close the run's task in iDDS."""

    msg_type: Literal["close_workflow_task"]
    content: CloseContent


class StopTransformer(_Model):
    """Ours, on /topic/panda.transformer. run_id stays as sent (int or str):
    the transformer compares it with ``==`` against an integer."""

    msg_type: Literal["stop_transformer"]
    run_id: int | str
    created_at: Timestamp | None = None
    content: dict[str, Any] = Field(default_factory=dict)


# --- from the transformers -------------------------------------------------


class SliceOutcome(_Model):
    # A JSON boolean from the real transformers; the seed's text ("done") too.
    state: bool | str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class SliceResultContent(_Model):
    requested_at: Timestamp | None = None
    processing_start_at: Timestamp | None = None
    processed_at: Timestamp | None = None
    state: Literal["done", "failed"] = "done"
    hostname: str | None = None
    panda_task_id: int | str | None = None
    panda_id: int | str | None = None
    harvester_id: int | str | None = None
    result: SliceOutcome | None = None
    processing_time: float | None = Field(default=None, ge=0)


class SliceResult(RunMessage):
    """One slice processed (or failed) by a transformer."""

    msg_type: Literal["slice_result"]
    content: SliceResultContent

    @property
    def worker(self) -> str | None:
        """The transformer that sent it: its PanDA job (``panda_id``, the
        pilot's PANDAID), else its host. Not the host first: several pilots
        may run on one node (and a transformer reports socket.getfqdn())."""
        c = self.content
        if c.panda_id is not None and str(c.panda_id):
            return f"panda-{c.panda_id}"
        return c.hostname

    @property
    def processing_seconds(self) -> float | None:
        """Seconds the slice took: the seed's processing_time when present,
        else processed_at - processing_start_at, else the transformer's own
        result.result.actual_processing_time."""
        c = self.content
        if c.processing_time is not None:
            return c.processing_time
        if c.processed_at is not None and c.processing_start_at is not None:
            return max(0.0, (c.processed_at - c.processing_start_at).total_seconds())
        inner = c.result.result if c.result is not None else None
        actual = (inner or {}).get("actual_processing_time")
        if isinstance(actual, int | float) and not isinstance(actual, bool):
            return float(actual)
        return None


class UnroutedSliceResult(Envelope):
    """A slice_result naming no run: a transformer sends one for any message
    it takes off its slice queue that is no slice (a heartbeat of another
    transformer). It belongs to no run; the listener counts and drops it."""

    msg_type: Literal["slice_result"]
    run_id: None
    content: dict[str, Any] = Field(default_factory=dict)


class HeartbeatContent(_Model):
    id: str | int | None = None
    hostname: str | None = None


class TransformerHeartbeat(Envelope):
    """The seed's heartbeat: may name a run."""

    msg_type: Literal["transformer_heartbeat"]
    run_id: RunId | None = None
    content: HeartbeatContent = Field(default_factory=HeartbeatContent)

    @property
    def worker(self) -> str | None:
        """Who sent it; None when it does not say (it then counts no worker)."""
        name = self.content.id or self.content.hostname
        return None if name is None else str(name)

    @property
    def seen_at(self) -> datetime | None:
        return self.created_at


class Heartbeat(Envelope):
    """The real transformer's heartbeat: every 30 s, no run_id."""

    msg_type: Literal["heartbeat"]
    run_id: RunId | None = None
    internal_id: str | int | None = None
    timestamp: Timestamp | None = None

    @property
    def worker(self) -> str | None:
        return None if self.internal_id is None else str(self.internal_id)

    @property
    def seen_at(self) -> datetime | None:
        return self.timestamp or self.created_at


_UNROUTED = "slice_result without run_id"


def _message_tag(data: Any) -> Any:
    """The union member for a body: its msg_type, except that a slice_result
    whose run_id is null is no result of any run."""
    if not isinstance(data, dict):
        return getattr(data, "msg_type", None)
    tag = data.get("msg_type")
    if not isinstance(tag, str):
        return None  # null, a number, a list: no message type at all
    if tag == "slice_result" and "run_id" in data and data["run_id"] is None:
        return _UNROUTED
    return tag


def _tagged(*models: type[BaseModel]) -> list[Any]:
    return [
        Annotated[m, Tag(t)]
        for m in models
        for t in m.model_fields["msg_type"].annotation.__args__  # type: ignore[union-attr]
    ]


_ROUTED_MODELS: tuple[type[BaseModel], ...] = (
    RunImminent,
    RunEnd,
    CreatedWorkflowTask,
    AdjustedWorker,
    ClosedWorkflowTask,
    CreateWorkflowTask,
    AdjustWorker,
    CloseWorkflowTask,
    StopTransformer,
    SliceResult,
    TransformerHeartbeat,
    Heartbeat,
)

Message = (
    RunImminent
    | RunEnd
    | CreatedWorkflowTask
    | AdjustedWorker
    | ClosedWorkflowTask
    | CreateWorkflowTask
    | AdjustWorker
    | CloseWorkflowTask
    | StopTransformer
    | SliceResult
    | UnroutedSliceResult
    | TransformerHeartbeat
    | Heartbeat
)


def _message_form() -> Any:
    """``Message`` as pydantic parses it: a union tagged by ``_message_tag``.
    Built at run time from the models' msg_type literals, so a type checker
    sees no type form in it: ``_MESSAGE`` says what it parses to."""
    return Annotated[
        Union[  # noqa: UP007 (a runtime union of Annotated members)
            tuple([*_tagged(*_ROUTED_MODELS), Annotated[UnroutedSliceResult, Tag(_UNROUTED)]])
        ],
        Discriminator(_message_tag),
    ]


_MESSAGE: TypeAdapter[Message] = TypeAdapter(_message_form())


def parse_message(body: bytes | str | dict[str, Any]) -> Message:
    """Turn a raw bus body into a typed message, or say why it cannot be one."""
    if isinstance(body, dict):
        _check_forwardable(body)
        data = body
    else:
        data = decode_body(body)
    if "msg_type" not in data:
        raise InvalidMessage("msg_type: field required")
    try:
        return _MESSAGE.validate_python(data)
    except ValidationError as exc:
        raise InvalidMessage(_describe(exc)) from None


# Deeper than any message of the protocol (about 5 levels), far below what
# pydantic (about 250) or json (about 1000) can serialize again once the body
# is wrapped in a Prefect event or flow-run parameters.
MAX_DEPTH = 32


def decode_body(body: bytes | str) -> dict[str, Any]:
    """The JSON object a raw body holds, or InvalidMessage saying why not.

    Only strict JSON that can be written out again is accepted: the body goes
    on to Prefect as an event or as flow-run parameters, and a value that
    cannot be serialized there would fail the hand-off of a message already
    judged good, on every redelivery."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON: {exc.msg} at line {exc.lineno}") from None
    except InvalidMessage:  # from _no_constant
        raise
    except RecursionError:
        raise InvalidMessage("body is not JSON: nested too deeply") from None
    except ValueError as exc:  # an integer over Python's 4300-digit conversion limit
        raise InvalidMessage(f"body is not JSON: {str(exc).split(':')[0]}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"body is a JSON {type(data).__name__}, not an object")
    _check_forwardable(data)
    return data


def _no_constant(name: str) -> Any:
    # json accepts NaN and Infinity; RFC 8259 does not, nor does Prefect's client.
    raise InvalidMessage(f"body is not JSON: {name} is not a JSON number")


def _check_forwardable(data: dict[str, Any]) -> None:
    """Nesting within MAX_DEPTH, text without lone surrogates (a JSON escape
    like \\ud800 decodes to one, and UTF-8 cannot encode it), finite numbers.
    Iterative: the point is to bound depth, not to recurse into it."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidMessage(f"body is nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidMessage(f"body holds {value}, which is not a JSON number")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_text(text: str) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        raise InvalidMessage(
            f"body holds the lone surrogate \\u{ord(found.group()):04x}, which is not Unicode text"
        )


def _describe(exc: ValidationError) -> str:
    """'content.request_id: Input should be a valid integer; ...' without the
    union-member prefix pydantic adds for discriminated unions."""
    parts = []
    for error in exc.errors(include_url=False):
        location = [str(p) for p in error["loc"]]
        # A discriminated union's first location element is the tag value.
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = error["input"].get("msg_type") if isinstance(error["input"], dict) else None
            parts.append(f"msg_type: unknown message type {tag!r}")
            continue
        if location and location[0] in _TAGS:
            location = location[1:]
        parts.append(f"{'.'.join(location) or 'body'}: {error['msg']}")
    return "; ".join(parts)


_TAGS = {
    *(
        tag
        for model in _ROUTED_MODELS
        for tag in model.model_fields["msg_type"].annotation.__args__  # type: ignore[union-attr]
    ),
    _UNROUTED,
}
