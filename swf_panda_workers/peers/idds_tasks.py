"""iDDS's side of the workflow tasks, shared by both simulated iDDS front ends
(the bus transceiver in ``peers.idds`` and the REST server in
``peers.idds_rest``) so the two cannot drift: what a task is, how its ids are
allocated, one task per run, the duplicate-create count, the resize on adjust,
how a close finds its task, and the close that would cancel everything.

Where the simulation is kinder than the real iDDS: the real create adds a new transform and
PanDA task for every request, even a repeated one for the same run; the real
close filters processings by request_id, transform_id and workload_id only
(a run_id alone does not narrow it); the real adjust stores core_count,
memory_per_core and site on the transform and ignores target_worker_count.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from swf_panda_workers.peers._bus import Notifier

TaskId = int | str | None  # ids as a request gives them: a path may carry text


@dataclass(frozen=True)
class TaskInfo:
    """What iDDS created for a run."""

    run_id: str
    request_id: int
    transform_id: int
    processing_id: int
    input_coll_id: int
    output_coll_id: int
    workload_id: int | None  # None while the PanDA submission is pending
    target_worker_count: int | None
    namespace: str | None

    def reply_ids(self) -> dict[str, int | None]:
        return {"request_id": self.request_id, "transform_id": self.transform_id,
                "workload_id": self.workload_id}

    def created_ids(self) -> dict[str, int | None]:
        """What iDDS answers to a create."""
        return {
            "request_id": self.request_id,
            "transform_id": self.transform_id,
            "processing_id": self.processing_id,
            "input_coll_id": self.input_coll_id,
            "output_coll_id": self.output_coll_id,
            "workload_id": self.workload_id,
        }


class TaskBook:
    """The tasks and what happened to them. Every method takes the owner's
    ``Notifier`` lock and notifies; tests read the attributes under it."""

    def __init__(self, state: Notifier, workload_pending: bool = False) -> None:
        self._state = state
        # The real iDDS answers workload_id null while PanDA has not taken
        # the task yet.
        self.workload_pending = workload_pending
        self._ids = itertools.count(1)
        self.tasks: dict[str, TaskInfo] = {}
        self.duplicate_creates: dict[str, int] = {}
        self.closed: dict[str, str] = {}  # run_id -> "ToCancel" or "NotFound"
        self.violations: list[str] = []

    def create(self, run_id: str, workflow: Mapping[str, Any],
               namespace: str | None = None) -> tuple[TaskInfo, bool]:
        """The run's task, and whether this call created it (a repeated
        create gets the first task's ids and is counted)."""
        with self._state.lock:
            task = self.tasks.get(run_id)
            first = task is None
            if task is None:
                task = self._new_task(run_id, workflow, namespace)
                self.tasks[run_id] = task
            else:
                self.duplicate_creates[run_id] = self.duplicate_creates.get(run_id, 0) + 1
            self._state.notify()
            return task, first

    def create_without_run(self, workflow: Mapping[str, Any], request: str) -> TaskInfo:
        """A create whose workflow names no run: the real iDDS still makes a
        task (whose transformers get no run to serve). It gets fresh ids, is
        not kept in ``tasks``, and is recorded in ``violations``."""
        with self._state.lock:
            task = self._new_task("", workflow, None)
            self.violation(f"create_workflow_task without content.run_id: {request[:300]}")
            return task

    def _new_task(self, run_id: str, workflow: Mapping[str, Any],
                  namespace: str | None) -> TaskInfo:
        content = workflow.get("content") or {}
        target = content.get("target_worker_count") if isinstance(content, Mapping) else None
        n = next(self._ids)
        return TaskInfo(
            run_id=run_id,
            request_id=1000 + n,
            transform_id=2000 + n,
            processing_id=3000 + n,
            input_coll_id=40000 + 2 * n,
            output_coll_id=40001 + 2 * n,
            workload_id=None if self.workload_pending else 60000 + n,
            target_worker_count=_int_or_none(target),
            namespace=namespace,
        )

    def resize(self, run_id: str, target_worker_count: int | None) -> TaskInfo | None:
        """Record an adjust's target on the run's task (None: no such task)."""
        with self._state.lock:
            task = self.tasks.get(run_id)
            if task is not None and target_worker_count is not None:
                task = replace(task, target_worker_count=target_worker_count)
                self.tasks[run_id] = task
            self._state.notify()
            return task

    def find(self, request_id: TaskId = None, transform_id: TaskId = None,
             workload_id: TaskId = None, run_id: str | None = None) -> TaskInfo | None:
        """The task every given id matches (as iDDS filters its processings);
        with no ids, the run's task."""
        given = {k: v for k, v in (("request_id", request_id), ("transform_id", transform_id),
                                   ("workload_id", workload_id)) if v is not None}
        with self._state.lock:
            if given:
                return next((t for t in self.tasks.values()
                             if all(getattr(t, k) == v for k, v in given.items())), None)
            return self.tasks.get(run_id) if run_id is not None else None

    def close(
        self, request_id: TaskId, transform_id: TaskId, workload_id: TaskId,
        run_id: str | None, key: str | None, request: str,
    ) -> tuple[str | None, TaskInfo | None]:
        """Close the matching task. Returns ("ToCancel", task) or ("NotFound",
        None), recorded in ``closed`` under ``key`` (else the run); or (None,
        None) for a close with no ids and no run_id at all, recorded in
        ``violations``: the real iDDS would cancel every processing it has.
        ``request`` describes the request for that record."""
        if request_id is None and transform_id is None and workload_id is None and run_id is None:
            self.violation(f"close_workflow_task with no ids: {request[:300]}")
            return None, None
        task = self.find(request_id, transform_id, workload_id, run_id)
        status = "ToCancel" if task is not None else "NotFound"
        with self._state.lock:
            name = key or run_id or (task.run_id if task else None) or f"request_id={request_id}"
            self.closed[name] = status
            self._state.notify()
        return status, task

    def violation(self, text: str) -> None:
        with self._state.lock:
            self.violations.append(text)
            self._state.notify()


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value is not None else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


class TaskRecords:
    """A simulator's records, read from its ``TaskBook`` (``_book``), for tests."""

    _book: TaskBook

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        return self._book.tasks

    @property
    def duplicate_creates(self) -> dict[str, int]:
        return self._book.duplicate_creates

    @property
    def closed(self) -> dict[str, str]:
        """run_id -> ToCancel (a task matched) or NotFound (none did; over
        REST the real iDDS still answers "closed successfully")."""
        return self._book.closed

    @property
    def violations(self) -> list[str]:
        return self._book.violations
