"""iDDS's side of the workflow tasks, shared by both simulated iDDS front ends
(the bus transceiver in ``peers.idds`` and the REST server in
``peers.idds_rest``) so the two cannot drift. It does what iDDS 2.6.21's
prompt handlers do (idds-prompt ``idds/prompt/handlers/workflowtaskhandler.py``,
run for real by the integration tests through ``peers.idds_agent``):

- a create makes a request, a transform (the task) and its PanDA task, named
  by the workflow's name; a second create of a name that exists fails inside
  iDDS ("Transform already exists"): no task, and no reply at all. iDDS's
  transceiver may handle one request on several threads at once, each making
  its own request and task: ``copies`` > 1 does that;
- an adjust is answered and changes nothing: iDDS means to store core_count,
  memory_per_core and site, but its update_transform drops
  transform_metadata (bus and REST alike, checked on the real ones), and it
  ignores a worker count (``applies_worker_count`` makes it apply one, as an
  iDDS that acted on it would: a what-if for the scaling tests, off by default);
- a close filters processings by request_id, transform_id and workload_id;
  given no request_id it takes the first task of the run_id (the transceiver;
  iDDS's REST close passes no run_id), answering NotFound when there is none;
  given nothing at all it would cancel every processing it has: recorded in
  ``violations``, unanswered.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from swf_testbed.peers._bus import Notifier

TaskId = int | str | None  # ids as a request gives them: a path may carry text


@dataclass(frozen=True)
class TaskInfo:
    """What iDDS created for a run."""

    run_id: str
    name: str  # the workflow's, which is also the PanDA task's
    request_id: int
    transform_id: int
    processing_id: int
    input_coll_id: int
    output_coll_id: int
    workload_id: int | None  # None: the PanDA submission failed
    target_worker_count: int | None
    namespace: str | None
    status: str = "New"  # the processing's: ToCancel once closed
    scope: str = ""  # the workflow's (the request's scope in iDDS)

    def reply_ids(self) -> dict[str, int | None]:
        return {
            "request_id": self.request_id,
            "transform_id": self.transform_id,
            "workload_id": self.workload_id,
        }

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

    def matches(self, request_id: TaskId, transform_id: TaskId, workload_id: TaskId) -> bool:
        """As iDDS filters processings: on each id given (as text or number)."""
        return all(
            given is None or str(given) == str(own)
            for given, own in (
                (request_id, self.request_id),
                (transform_id, self.transform_id),
                (workload_id, self.workload_id),
            )
        )


@dataclass(frozen=True)
class Closed:
    """What a close did: iDDS's answer, and the tasks it cancelled."""

    status: str  # "ToCancel" or "NotFound", as iDDS answers
    request_id: TaskId
    transform_id: TaskId
    workload_id: TaskId
    cancelled: tuple[TaskInfo, ...]

    def reply(self, run_id: str | None) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "request_id": self.request_id,
            "transform_id": self.transform_id,
            "workload_id": self.workload_id,
            "status": self.status,
        }


class TaskBook:
    """The tasks and what happened to them. Every method takes the owner's
    ``Notifier`` lock and notifies; tests read the attributes under it."""

    def __init__(
        self, state: Notifier, workload_pending: bool = False, applies_worker_count: bool = False
    ) -> None:
        self._state = state
        # PanDA's submission failed (or is not made): workload_id null.
        self.workload_pending = workload_pending
        self.applies_worker_count = applies_worker_count
        self._ids = itertools.count(1)
        self.all_tasks: list[TaskInfo] = []  # in creation order
        self.duplicate_creates: dict[str, int] = {}  # run_id -> creates refused
        self.closed: dict[str, str] = {}  # run (or request) -> what its last close did
        self.violations: list[str] = []

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        """run_id -> the run's first task."""
        with self._state.lock:
            first: dict[str, TaskInfo] = {}
            for task in self.all_tasks:
                if task.run_id:
                    first.setdefault(task.run_id, task)
            return first

    def tasks_of(self, run_id: str) -> list[TaskInfo]:
        with self._state.lock:
            return [task for task in self.all_tasks if task.run_id == run_id]

    def create(
        self, workflow: Mapping[str, Any], namespace: str | None = None, copies: int = 1
    ) -> list[TaskInfo]:
        """The tasks this create made: one, ``copies`` when handled that many
        times at once, or none when a task of that name exists already."""
        content = workflow.get("content") or {}
        run_id = content.get("run_id") if isinstance(content, Mapping) else None
        name = str(workflow.get("name") or "")
        with self._state.lock:
            if any(task.name == name for task in self.all_tasks):
                key = str(run_id)
                self.duplicate_creates[key] = self.duplicate_creates.get(key, 0) + 1
                self._state.notify()
                return []
            made = [self._new_task(run_id, name, workflow, namespace) for _ in range(copies)]
            self.all_tasks.extend(made)
            if run_id is None or not str(run_id).strip():
                self.violations.append(
                    f"create_workflow_task without content.run_id: {str(dict(workflow))[:300]}"
                )
            self._state.notify()
            return made

    def _new_task(
        self, run_id: object, name: str, workflow: Mapping[str, Any], namespace: str | None
    ) -> TaskInfo:
        content = workflow.get("content") or {}
        target = content.get("target_worker_count") if isinstance(content, Mapping) else None
        n = next(self._ids)
        return TaskInfo(
            run_id="" if run_id is None else str(run_id).strip(),
            name=name,
            request_id=1000 + n,
            transform_id=2000 + n,
            processing_id=3000 + n,
            input_coll_id=40000 + 2 * n,
            output_coll_id=40001 + 2 * n,
            workload_id=None if self.workload_pending else 60000 + n,
            target_worker_count=_int_or_none(target),
            namespace=namespace,
            scope=str(workflow.get("scope") or ""),
        )

    def adjust(self, transform_id: TaskId, target_worker_count: int | None) -> TaskInfo | None:
        """The task an adjust names by its transform (None: no such task);
        its worker count changes only with ``applies_worker_count``."""
        with self._state.lock:
            task = self.find(transform_id=transform_id) if transform_id is not None else None
            if task is not None and self.applies_worker_count and target_worker_count is not None:
                task = self._replace(task, target_worker_count=target_worker_count)
            self._state.notify()
            return task

    def find(
        self, request_id: TaskId = None, transform_id: TaskId = None, workload_id: TaskId = None
    ) -> TaskInfo | None:
        """The first task every given id matches."""
        with self._state.lock:
            return next(
                (
                    task
                    for task in self.all_tasks
                    if task.matches(request_id, transform_id, workload_id)
                ),
                None,
            )

    def named(self, name: str) -> list[TaskInfo]:
        with self._state.lock:
            return [task for task in self.all_tasks if task.name == name]

    def close(
        self,
        request_id: TaskId,
        transform_id: TaskId,
        workload_id: TaskId,
        run_id: str | None,
        request: str,
    ) -> Closed | None:
        """Close as iDDS does (see the module's text); None for the close
        that would cancel everything, recorded in ``violations``. ``request``
        describes the request for that record."""
        if request_id is None and run_id is None and transform_id is None and workload_id is None:
            self.violation(f"close_workflow_task with no ids: {request[:300]}")
            return None
        with self._state.lock:
            if request_id is None and run_id is not None:
                of_run = [task for task in self.all_tasks if task.run_id == run_id]
                if not of_run:
                    self.closed[run_id] = "NotFound"
                    self._state.notify()
                    return Closed("NotFound", None, None, None, ())
                request_id = of_run[0].request_id
                transform_id = transform_id or of_run[0].transform_id
            if request_id is None and transform_id is None and workload_id is None:
                self.violation(f"close_workflow_task with no ids: {request[:300]}")
                return None
            cancelled = tuple(
                self._replace(task, status="ToCancel")
                for task in self.all_tasks
                if task.matches(request_id, transform_id, workload_id)
            )
            key = run_id or (cancelled[0].run_id if cancelled else f"request_id={request_id}")
            self.closed[key] = "ToCancel" if cancelled else "NotFound"
            self._state.notify()
            # iDDS answers ToCancel whether or not a processing matched.
            return Closed("ToCancel", request_id, transform_id, workload_id, cancelled)

    def violation(self, text: str) -> None:
        with self._state.lock:
            self.violations.append(text)
            self._state.notify()

    def _replace(self, task: TaskInfo, **changes: Any) -> TaskInfo:
        """Call with the lock held."""
        updated = replace(task, **changes)
        self.all_tasks[self.all_tasks.index(task)] = updated
        return updated


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
    def all_tasks(self) -> list[TaskInfo]:
        return self._book.all_tasks

    def tasks_of(self, run_id: str) -> list[TaskInfo]:
        return self._book.tasks_of(run_id)

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
