"""The iDDS prompt transceiver, message mode: answers create_workflow_task,
adjust_worker and close_workflow_task on /topic/panda.workers.

Like the real one it subscribes without a selector, hears its own replies
(and everything else on the topic) and ignores them; it copies the request's
namespace header onto the reply so the requester's selector matches. A close
whose ids and run_id are all null is recorded in ``violations`` (the real iDDS
would cancel every processing it has) and gets no reply. The tasks live in
a ``TaskBook``, shared with the REST simulator (``peers.idds_rest``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from swf_panda_workers.adapters.stomp_bus import Delivery, Subscription
from swf_panda_workers.config import Brokers
from swf_panda_workers.messages import (
    AdjustWorker,
    AdjustWorkerContent,
    CloseWorkflowTask,
    CreateWorkflowTask,
    InvalidMessage,
    Message,
    parse_message,
)
from swf_panda_workers.peers._bus import Notifier, PeerBus, peer_headers, zulu_iso
from swf_panda_workers.peers.idds_tasks import TaskBook, TaskInfo, TaskRecords

__all__ = ["SimulatedIDDS", "TaskInfo"]


class SimulatedIDDS(TaskRecords):
    """Answers the service's requests; records everything for tests."""

    def __init__(
        self,
        brokers: Brokers,
        on_task_created: Callable[[str, TaskInfo], None] | None = None,
        reply_delay: float = 0.0,
        answer_create: bool = True,
        on_adjust: Callable[[str, AdjustWorkerContent], None] | None = None,
        workers_topic: str = "/topic/panda.workers",
        workers_before_reply: bool = False,
        workload_pending: bool = False,
    ) -> None:
        """``workload_pending``: creates are answered with workload_id null,
        as while iDDS's PanDA submission is pending."""
        self.workers_topic = workers_topic
        self.reply_delay = reply_delay
        self.answer_create = answer_create
        # With a reply_delay: the task's transformers run (and send results)
        # before its creator hears the ids, as when iDDS's reply is slow.
        self.workers_before_reply = workers_before_reply
        self._on_task_created = on_task_created
        self._on_adjust = on_adjust
        self._state = Notifier()
        self._book = TaskBook(self._state, workload_pending=workload_pending)
        # Records for tests; guarded by self._state.lock. The book's records
        # (tasks, duplicate_creates, closed, violations) are properties below.
        self.requests: list[Message] = []
        self.invalid: list[str] = []
        self._handlers: dict[type, Callable[[Any, str | None], None]] = {
            CreateWorkflowTask: self._create,
            AdjustWorker: self._adjust,
            CloseWorkflowTask: self._close,
        }
        self._bus = PeerBus(
            brokers, name="sim-idds",
            subscriptions=(Subscription(workers_topic, ack="auto"),),
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
        namespace = delivery.headers.get("namespace")
        try:
            message = parse_message(delivery.body)
        except InvalidMessage as exc:
            self._invalid(delivery.body, str(exc))
            return
        handler = self._handlers.get(type(message))
        if handler is None:
            return  # our own replies, announcements, heartbeats: not for iDDS
        with self._state.lock:
            self.requests.append(message)
            self._state.notify()
        handler(message, namespace)

    def _invalid(self, body: bytes, reason: str) -> None:
        # Real iDDS does not validate: a close with no ids at all (even one our
        # models reject, e.g. with a null run_id) would still cancel everything.
        if _is_unfiltered_close(body):
            self._book.violation(f"close_workflow_task with no ids: {body[:300]!r}")
            return
        with self._state.lock:
            self.invalid.append(reason)
            self._state.notify()

    def _create(self, message: CreateWorkflowTask, namespace: str | None) -> None:
        run_id = message.run_id
        task, first = self._book.create(run_id, message.content.workflow, namespace)
        if first and self.workers_before_reply and self._on_task_created is not None:
            self._on_task_created(run_id, task)
        if not self.answer_create:
            return
        self._reply("created_workflow_task", run_id, namespace,
                    {"run_id": run_id, **task.created_ids()})
        if first and not self.workers_before_reply and self._on_task_created is not None:
            self._on_task_created(run_id, task)

    def _adjust(self, message: AdjustWorker, namespace: str | None) -> None:
        c = message.content
        self._book.resize(message.run_id, c.target_worker_count)
        reply = {
            "run_id": message.run_id,
            "request_id": c.request_id,
            "transform_id": c.transform_id,
            "workload_id": c.workload_id,
            "core_count": c.core_count,
            "memory_per_core": c.memory_per_core,
            "site": c.site,
        }
        if c.target_worker_count is not None:
            reply["target_worker_count"] = c.target_worker_count
        self._reply("adjusted_worker", message.run_id, namespace, reply)
        if self._on_adjust is not None:
            self._on_adjust(message.run_id, c)

    def _close(self, message: CloseWorkflowTask, namespace: str | None) -> None:
        c = message.content
        status, task = self._book.close(c.request_id, c.transform_id, c.workload_id, c.run_id,
                                        key=message.run_id, request=repr(message))
        if status is None:
            return  # the close that would cancel everything: recorded, unanswered
        ids = task.reply_ids() if task is not None else {
            "request_id": c.request_id, "transform_id": c.transform_id,
            "workload_id": c.workload_id}
        self._reply("closed_workflow_task", message.run_id, namespace,
                    {"run_id": c.run_id or message.run_id, **ids, "status": status})

    def _reply(self, msg_type: str, run_id: str, namespace: str | None,
               content: dict[str, Any]) -> None:
        if self.reply_delay > 0 and not self._bus.pause(self.reply_delay):
            return
        body = {"msg_type": msg_type, "run_id": run_id, "created_at": zulu_iso(),
                "content": content}
        self._bus.send(self.workers_topic, body, peer_headers(msg_type, run_id, namespace))


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
    return all(content.get(k) is None
               for k in ("request_id", "transform_id", "workload_id", "run_id"))
