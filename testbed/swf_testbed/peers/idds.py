"""A simulated iDDS prompt transceiver, message mode: answers
create_workflow_task, adjust_worker and close_workflow_task on
/topic/panda.workers as iDDS 2.6.21 does (``peers.idds_tasks``).

The integration tests run the real transceiver (``peers.idds_agent``); this
simulator is for what the real one cannot be made to do on cue: stay silent,
answer late, handle one request twice (``copies``), and the benchmark's
hundreds of workers. It speaks as the real one:

- it subscribes with a selector on its own namespace (none: it hears all)
  and answers with its own namespace header (none when it has none), not the
  requester's; its replies are ``{msg_type, run_id, created_at, content}``
  with ``created_at`` in milliseconds and ``Z``, and the real publisher's
  headers (persistent, ttl, vo, msg_type, run_id, client-id, namespace);
- adjusted_worker carries no worker count (2.6.21 does not read one);
- a create of a name it has (a second create of a run) gets no reply.

A close whose ids and run_id are all null is recorded in ``violations`` (the
real iDDS would cancel every processing it has) and gets no reply.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from swf_panda_workers.adapters.stomp_bus import Delivery, Subscription, namespace_selector
from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.messages import (
    AdjustWorker,
    AdjustWorkerContent,
    CloseWorkflowTask,
    CreateWorkflowTask,
    InvalidMessage,
    Message,
    parse_message,
)
from swf_testbed.peers._bus import Notifier, PeerBus, zulu_iso
from swf_testbed.peers.idds_tasks import TaskBook, TaskInfo, TaskRecords

__all__ = ["SimulatedIDDS", "TaskInfo"]

TTL_MS = 12 * 3600 * 1000  # the real publisher's timetolive


class SimulatedIDDS(TaskRecords):
    """Answers the service's requests; records everything for tests."""

    def __init__(
        self,
        brokers: Brokers,
        namespace: str | None,
        on_task_created: Callable[[str, TaskInfo], None] | None = None,
        reply_delay: float = 0.0,
        answer_create: bool = True,
        on_adjust: Callable[[str, AdjustWorkerContent], None] | None = None,
        workers_topic: str = "/topic/panda.workers",
        workers_before_reply: bool = False,
        workload_pending: bool = False,
        copies: int = 1,
        applies_worker_count: bool = False,
    ) -> None:
        """``namespace``: iDDS's own ([prompt] namespace). ``workload_pending``:
        creates are answered with workload_id null, as when iDDS's PanDA
        submission failed. ``copies``: each create is handled that many times
        at once (several tasks, several replies), as the real transceiver's
        worker threads may. ``applies_worker_count``: an adjust changes the
        task's worker count (2.6.21 does not; a what-if for scaling tests)."""
        self.namespace = namespace
        self.workers_topic = workers_topic
        self.reply_delay = reply_delay
        self.answer_create = answer_create
        self.copies = copies
        # With a reply_delay: the task's transformers run (and send results)
        # before its creator hears the ids, as when iDDS's reply is slow.
        self.workers_before_reply = workers_before_reply
        self._on_task_created = on_task_created
        self._on_adjust = on_adjust
        self._state = Notifier()
        self._book = TaskBook(
            self._state,
            workload_pending=workload_pending,
            applies_worker_count=applies_worker_count,
        )
        self._client_id = f"{namespace}.WorkerPublisher.sim.{uuid.uuid4().hex[:8]}"
        # Records for tests; guarded by self._state.lock. The book's records
        # (tasks, duplicate_creates, closed, violations) are properties.
        self.requests: list[Message] = []
        self.invalid: list[str] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            CreateWorkflowTask: self._create,
            AdjustWorker: self._adjust,
            CloseWorkflowTask: self._close,
        }
        selector = namespace_selector(namespace) if namespace else None
        self._bus = PeerBus(
            brokers,
            name="sim-idds",
            subscriptions=(Subscription(workers_topic, selector=selector, ack="auto"),),
            handle=self._on_delivery,
        )

    def start(self) -> SimulatedIDDS:
        self._bus.start()
        return self

    def stop(self) -> None:
        self._bus.stop()

    def resync(self, timeout: float) -> bool:
        """True once this peer's connection is live again (after a broker restart)."""
        return self._bus.resync(timeout)

    def __enter__(self) -> SimulatedIDDS:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- for tests -----------------------------------------------------------

    def requests_of(self, kind: type) -> list[Message]:
        with self._state.lock:
            return [m for m in self.requests if isinstance(m, kind)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` (reading the records above) holds."""
        return self._state.wait_for(predicate, timeout)

    # --- handling (inbox worker thread) -------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = parse_message(delivery.body)
        except InvalidMessage as exc:
            self._invalid(delivery.body, str(exc))
            return
        handler = self._handlers.get(type(message))
        if handler is None:
            return  # its own replies, announcements, heartbeats: not for iDDS
        with self._state.lock:
            self.requests.append(message)
            self._state.notify()
        handler(message)

    def _invalid(self, body: bytes, reason: str) -> None:
        # Real iDDS does not validate: a close with no ids at all (even one our
        # models reject, e.g. with a null run_id) would still cancel everything.
        if _is_unfiltered_close(body):
            self._book.violation(f"close_workflow_task with no ids: {body[:300]!r}")
            return
        with self._state.lock:
            self.invalid.append(reason)
            self._state.notify()

    def _create(self, message: CreateWorkflowTask) -> None:
        run_id = message.run_id
        made = self._book.create(message.content.workflow, self.namespace, self.copies)
        if made and self.workers_before_reply and self._on_task_created is not None:
            self._on_task_created(run_id, made[0])
        if not self.answer_create:
            return
        for task in made:  # none: the name existed, iDDS failed without a reply
            self._reply(
                "created_workflow_task", run_id, {"run_id": task.run_id, **task.created_ids()}
            )
        if made and not self.workers_before_reply and self._on_task_created is not None:
            self._on_task_created(run_id, made[0])

    def _adjust(self, message: AdjustWorker) -> None:
        c = message.content
        task = self._book.adjust(c.transform_id, c.target_worker_count)
        # What 2.6.21's handler answers: the ids as given, and the size it
        # stored; never a worker count.
        self._reply(
            "adjusted_worker",
            message.run_id,
            {
                "run_id": c.run_id,
                "request_id": c.request_id,
                "transform_id": c.transform_id,
                "workload_id": c.workload_id,
                "core_count": c.core_count,
                "memory_per_core": c.memory_per_core,
                "site": c.site,
            },
        )
        if task is not None and self._on_adjust is not None:
            self._on_adjust(task.run_id, c)

    def _close(self, message: CloseWorkflowTask) -> None:
        c = message.content
        closed = self._book.close(
            c.request_id, c.transform_id, c.workload_id, c.run_id, request=repr(message)
        )
        if closed is None:
            return  # the close that would cancel everything: recorded, unanswered
        self._reply("closed_workflow_task", message.run_id, closed.reply(c.run_id))

    def _reply(self, msg_type: str, run_id: str, content: dict[str, Any]) -> None:
        if self.reply_delay > 0 and not self._bus.pause(self.reply_delay):
            return
        body = {
            "msg_type": msg_type,
            "run_id": run_id,
            "created_at": zulu_iso(),
            "content": content,
        }
        headers = {
            "persistent": "true",
            "ttl": str(TTL_MS),
            "vo": "eic",
            "msg_type": msg_type,
            "run_id": run_id,
            "client-id": self._client_id,
        }
        if self.namespace:
            headers["namespace"] = self.namespace
        # stomp.py sends the publisher's id= and ack= arguments as headers too.
        headers |= {"id": self._client_id, "ack": "auto"}
        self._bus.send(self.workers_topic, body, headers)


def _is_unfiltered_close(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict) or data.get("msg_type") != "close_workflow_task":
        return False
    content = data.get("content")
    if not isinstance(content, dict):
        return True  # iDDS would read every id as missing
    return all(
        content.get(k) is None for k in ("request_id", "transform_id", "workload_id", "run_id")
    )
