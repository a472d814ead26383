"""RunState is a fold: the same inputs in the same order give the same state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import reduce
from typing import Any

import pytest

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.effects import (
    Adjustment,
    AdjustSent,
    CloseSent,
    CreateSent,
    StopSent,
)
from swf_panda_workers.core.messages import RunImminent, WorkerSize, WorkflowIds, parse_message
from swf_panda_workers.core.policies import (
    Observation,
    ReferencePolicy,
    ScalingMemory,
    WorkerPlan,
)
from swf_panda_workers.core.run_state import (
    RunState,
    apply,
    initial_state,
)
from swf_panda_workers.core.slice_window import SliceObservation

T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings()
RUN = RunImminent.model_validate(
    {
        "msg_type": "run_imminent_worker",
        "run_id": "100123",
        "content": {"core_count": 2, "target_worker_count": 30, "slice_processing_time": 30},
    }
)
# Cores per worker as configured: the testbed's core_count is its worker count.
SIZE = WorkerSize(core_count=1, memory_per_core=4000, site="BNL-OSG", target_worker_count=30)
BIGGER = SIZE.model_copy(update={"target_worker_count": 36})
BIGGEST = SIZE.model_copy(update={"target_worker_count": 45})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def adjust(size: WorkerSize, decided: float, sent: float, reason: str = "") -> AdjustSent:
    return AdjustSent(size=size, reason=reason, decided_at=at(decided), sent_at=at(sent))


def fold(inputs: Sequence[tuple[object, float]], start: RunState | None = None) -> RunState:
    state = start or initial_state(RUN, SETTINGS)
    return reduce(lambda s, step: apply(step[0], s, at(step[1])), inputs, state)


def msg(msg_type: str, **fields: Any) -> object:
    return parse_message({"msg_type": msg_type, "run_id": "100123", **fields})


def created(request_id: int, workload_id: int | None = 3, transform_id: int = 2) -> object:
    return msg(
        "created_workflow_task",
        content={
            "request_id": request_id,
            "transform_id": transform_id,
            "workload_id": workload_id,
        },
    )


def closed(status: str, transform_id: int | None = None) -> object:
    return msg("closed_workflow_task", content={"status": status, "transform_id": transform_id})


IDS = WorkflowIds(request_id=1, transform_id=2, workload_id=3)
EXTRA = WorkflowIds(request_id=9, transform_id=12, workload_id=13)


def done(seconds: float | None, hostname: str | None = "wn-1") -> object:
    content: dict[str, Any] = {"state": "done", "hostname": hostname}
    if seconds is not None:
        content["processing_time"] = seconds
    return msg("slice_result", content=content)


def failed() -> object:
    return msg("slice_result", content={"state": "failed", "result": {"error": "boom"}})


def seed_heartbeat(worker: str) -> object:
    return parse_message({"msg_type": "transformer_heartbeat", "content": {"id": worker}})


def heartbeat(worker: str) -> object:
    return parse_message({"msg_type": "heartbeat", "internal_id": worker, "timestamp": 1.0e9})


# --- the initial state ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param({"core_count": 2, "target_worker_count": 30}, SIZE, id="testbed"),
        pytest.param(
            {"num_workers": 4, "num_cores_per_worker": 8, "num_ram_per_core": 2000, "site": "CERN"},
            WorkerSize(core_count=8, memory_per_core=2000, site="CERN", target_worker_count=4),
            id="seed",
        ),
        pytest.param(
            {},
            WorkerSize(core_count=1, memory_per_core=4000, site="BNL-OSG", target_worker_count=1),
            id="configured defaults",
        ),
    ],
)
def test_initial_state(content: dict[str, Any], expected: WorkerSize) -> None:
    run = parse_message({"msg_type": "run_imminent", "run_id": 42, "content": content})
    assert isinstance(run, RunImminent)

    state = initial_state(run, SETTINGS)

    assert state == RunState(run_id="42", plan=WorkerPlan(initial=expected, current=expected))
    assert not state.ended and not state.closed
    assert (state.slices_done, state.slices_failed, state.workers_seen) == (0, 0, frozenset())


# --- the fold ------------------------------------------------------------------

BASE = initial_state(RUN, SETTINGS)

FOLDS = [
    pytest.param([], {}, id="nothing seen"),
    pytest.param(
        [(created(1), 5)],
        {"ids": WorkflowIds(request_id=1, transform_id=2, workload_id=3)},
        id="created reply gives the ids",
    ),
    pytest.param(
        [(created(1, workload_id=None), 5)],
        {"ids": WorkflowIds(request_id=1, transform_id=2, workload_id=None)},
        id="created with a null workload_id",
    ),
    pytest.param(
        [(created(1), 5), (created(1), 6)],
        {"ids": IDS},
        id="a created reply heard twice",
    ),
    pytest.param(
        [(created(1), 5), (created(9, 13, 12), 6), (created(9, 13, 12), 7)],
        {"ids": IDS, "extra_tasks": (EXTRA,)},
        id="another task for the run: the first is the run's, the other an extra",
    ),
    pytest.param(
        [(created(1), 5), (created(9, 13, 12), 6), (closed("ToCancel", 12), 7)],
        {"ids": IDS, "extra_tasks": (EXTRA,)},
        id="an extra task's close confirmation is not the run's",
    ),
    pytest.param(
        [(created(1), 5), (closed("ToCancel", 2), 7)],
        {"ids": IDS, "closed_status": "ToCancel"},
        id="the run's task's close confirmation",
    ),
    pytest.param([(msg("end_run"), 100)], {"ended_at": at(100)}, id="end_run ends the run"),
    pytest.param(
        [(msg("end_run"), 100), (msg("end_run"), 101), (msg("run_end"), 102)],
        {"ended_at": at(100)},
        id="duplicate end keeps the first time",
    ),
    pytest.param([(closed("ToCancel"), 7)], {"closed_status": "ToCancel"}, id="closed"),
    pytest.param(
        [(closed("NotFound"), 7), (closed("ToCancel"), 8)],
        {"closed_status": "NotFound"},
        id="first close reply wins",
    ),
    pytest.param(
        [
            (
                msg(
                    "adjusted_worker",
                    content={
                        "request_id": 1,
                        "core_count": 1,
                        "memory_per_core": 4000,
                        "site": "BNL-OSG",
                        "target_worker_count": 36,
                    },
                ),
                9,
            )
        ],
        {"applied": BIGGER},
        id="adjusted_worker is what iDDS applied",
    ),
    pytest.param(
        [(CreateSent(), 1)],
        {"create_sent": True, "plan": WorkerPlan(initial=SIZE, current=SIZE, requested_at=at(1))},
        id="create_sent: the initial size is requested",
    ),
    pytest.param([(StopSent(), 1)], {"stop_sent": True}, id="stop_sent"),
    pytest.param([(CloseSent(), 1)], {"closes_sent": (None,)}, id="close_sent by run id"),
    pytest.param(
        [(created(1), 1), (CloseSent(ids=IDS), 2)],
        {"ids": IDS, "closes_sent": (IDS,)},
        id="close_sent of the run's task",
    ),
    pytest.param(
        [(CreateSent(), 1), (CreateSent(), 2)],
        {"create_sent": True, "plan": WorkerPlan(initial=SIZE, current=SIZE, requested_at=at(1))},
        id="effects are idempotent",
    ),
    pytest.param(
        [(adjust(BIGGER, 50, 50, "slow"), 50)],
        {
            "plan": WorkerPlan(
                initial=SIZE, current=BIGGER, last_adjusted_at=at(50), requested_at=at(50)
            ),
            "adjustments": (adjust(BIGGER, 50, 50, "slow"),),
        },
        id="adjust_sent moves the plan",
    ),
    pytest.param(
        [(adjust(BIGGER, 50, 50, "slow"), 50), (adjust(BIGGEST, 200, 200), 200)],
        {
            "plan": WorkerPlan(
                initial=SIZE, current=BIGGEST, last_adjusted_at=at(200), requested_at=at(200)
            ),
            "adjustments": (adjust(BIGGER, 50, 50, "slow"), adjust(BIGGEST, 200, 200)),
        },
        id="adjustments accumulate",
    ),
    pytest.param(
        [(adjust(BIGGER, 20, 89, "slow"), 90)],
        {
            "plan": WorkerPlan(
                initial=SIZE, current=BIGGER, last_adjusted_at=at(20), requested_at=at(90)
            ),
            "adjustments": (adjust(BIGGER, 20, 89, "slow"),),
        },
        id="a decision taken on stored results cools down from their time",
    ),
    pytest.param(
        [(done(40), 10)],
        {
            "slices_done": 1,
            "slowest_slice": 40.0,
            "workers_seen": frozenset({"wn-1"}),
            "last_slice": SliceObservation(at=at(10), processing_seconds=40.0, worker="wn-1"),
        },
        id="one done slice",
    ),
    pytest.param(
        [(done(40, "wn-1"), 10), (done(20, "wn-2"), 11), (done(55, "wn-1"), 12)],
        {
            "slices_done": 3,
            "slowest_slice": 55.0,
            "workers_seen": frozenset({"wn-1", "wn-2"}),
            "last_slice": SliceObservation(at=at(12), processing_seconds=55.0, worker="wn-1"),
        },
        id="slowest of several",
    ),
    pytest.param(
        [(done(None, hostname=None), 10)],
        {"slices_done": 1, "last_slice": SliceObservation(at=at(10), processing_seconds=None)},
        id="done slice without time or host",
    ),
    pytest.param(
        [(failed(), 10)],
        {
            "slices_failed": 1,
            "last_slice": SliceObservation(at=at(10), processing_seconds=None, failed=True),
        },
        id="failed slice counted apart",
    ),
    pytest.param(
        [(done(40), 10), (failed(), 11), (failed(), 12)],
        {
            "slices_done": 1,
            "slices_failed": 2,
            "slowest_slice": 40.0,
            "workers_seen": frozenset({"wn-1"}),
            "last_slice": SliceObservation(at=at(12), processing_seconds=None, failed=True),
        },
        id="failed slices do not touch the done count",
    ),
    pytest.param(
        [
            (
                msg(
                    "slice_result",
                    content={"state": "failed", "processing_time": 99, "hostname": "wn-9"},
                ),
                10,
            )
        ],
        {
            "slices_failed": 1,
            "workers_seen": frozenset({"wn-9"}),
            "last_slice": SliceObservation(
                at=at(10), processing_seconds=99.0, worker="wn-9", failed=True
            ),
        },
        id="a failed slice's time is not the slowest",
    ),
    pytest.param(
        [
            (seed_heartbeat("tf-1"), 1),
            (heartbeat("tf-2"), 2),
            (seed_heartbeat("tf-1"), 3),
            (done(10, "wn-3"), 4),
        ],
        {
            "slices_done": 1,
            "slowest_slice": 10.0,
            "workers_seen": frozenset({"tf-1", "tf-2", "wn-3"}),
            "last_slice": SliceObservation(at=at(4), processing_seconds=10.0, worker="wn-3"),
        },
        id="workers seen from heartbeats and results",
    ),
    pytest.param(
        [
            (msg("create_workflow_task", content={"run_id": "100123", "workflow": {}}), 1),
            (msg("stop_transformer", content={}), 2),
            (msg("run_imminent"), 3),
        ],
        {},
        id="our own echoes and a repeated run_imminent change nothing",
    ),
]


@pytest.mark.parametrize(("inputs", "changes"), FOLDS)
def test_fold(inputs: list[tuple[object, float]], changes: dict[str, Any]) -> None:
    assert fold(inputs) == replace(BASE, **changes)


def test_fold_is_deterministic_and_does_not_touch_its_input() -> None:
    inputs = [
        (created(1), 1),
        (done(40), 2),
        (adjust(BIGGER, 3, 3), 3),
        (failed(), 4),
        (msg("end_run"), 5),
        (closed("ToCancel"), 6),
    ]
    start = initial_state(RUN, SETTINGS)

    first, second = fold(inputs, start), fold(inputs, start)

    assert first == second
    assert start == BASE
    assert first.ended and first.closed


def test_anything_else_is_ignored() -> None:
    assert apply(object(), BASE, T0) is BASE


def decide(
    policy: ReferencePolicy, plan: WorkerPlan, seen: SliceObservation | None
) -> Adjustment | None:
    assert seen is not None
    return policy.decide(plan, Observation(seen.at, seen), ScalingMemory()).decision


def test_fold_feeds_the_policy() -> None:
    policy = ReferencePolicy(expected_seconds=30, cooldown_seconds=60)

    slow = fold([(done(40), 10)])
    decision = decide(policy, slow.plan, slow.last_slice)
    assert decision is not None and decision.size == BIGGER

    adjusted = fold([(AdjustSent.of(decision, sent_at=at(11)), 11), (done(40), 12)], start=slow)
    assert decide(policy, adjusted.plan, adjusted.last_slice) is None  # same size again

    slower = fold([(done(50), 30)], start=adjusted)
    assert decide(policy, slower.plan, slower.last_slice) is None  # within the cooldown

    later = fold([(done(50), 71)], start=adjusted)
    decision = decide(policy, later.plan, later.last_slice)
    assert decision is not None and decision.size == BIGGEST


@pytest.mark.parametrize(
    "anonymous",
    [
        {"msg_type": "heartbeat", "namespace": "dev", "timestamp": 1_760_000_000.0},
        {"msg_type": "transformer_heartbeat", "run_id": "100123", "content": {}},
    ],
    ids=["heartbeat without internal_id", "transformer_heartbeat without id or hostname"],
)
def test_a_heartbeat_that_names_no_worker_counts_no_worker(anonymous: dict[str, Any]) -> None:
    state = fold([(heartbeat("wn-1"), 1), (parse_message(anonymous), 2)])
    assert state.workers_seen == frozenset({"wn-1"})


def test_the_tasks_still_open() -> None:
    state = fold([(created(1), 1), (created(9, 13, 12), 2)])
    assert state.open_tasks == (IDS, EXTRA) and state.open_extra_tasks == (EXTRA,)
    assert not state.close_sent
    state = fold([(CloseSent(ids=EXTRA), 3)], state)
    assert state.open_tasks == (IDS,) and state.open_extra_tasks == ()
    assert not state.close_sent
    state = fold([(CloseSent(ids=IDS), 4)], state)
    assert state.open_tasks == () and state.close_sent


def test_a_task_reported_after_a_close_by_run_id_is_still_open() -> None:
    # end_run came first: closed by run id; iDDS's late reply names a task,
    # which is closed by its ids too (iDDS may have made it after the close).
    state = fold([(CloseSent(), 1)])
    assert state.close_sent and state.open_tasks == ()
    state = fold([(created(1), 2)], state)
    assert state.close_sent and state.open_tasks == (IDS,)
