"""Reading back from the broker what the integration tests assert on: what is
still waiting on a queue, browsed (ActiveMQ's STOMP ``browser: true``
subscription sends the queue's messages that match the selector, then a
frame with ``browser: end``), taking nothing from it."""

from __future__ import annotations

import threading
import uuid

import stomp

from swf_panda_workers.config.schema import Brokers


class _Browser(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.messages = 0
        self.ended = threading.Event()

    def on_message(self, frame: stomp.utils.Frame) -> None:
        if frame.headers.get("browser") == "end":
            self.ended.set()
        else:
            self.messages += 1


def queued(brokers: Brokers, queue: str, selector: str | None = None, timeout: float = 10.0) -> int:
    """How many messages (matching ``selector``) wait on ``queue``."""
    if not queue.startswith("/queue/"):
        raise ValueError(f"only a queue can be browsed, not {queue}")
    connection = stomp.Connection12([(brokers.host, brokers.port)])
    browser = _Browser()
    connection.set_listener("browser", browser)
    password = brokers.password.get_secret_value() if brokers.password else None
    connection.connect(brokers.username, password, wait=True)
    try:
        headers = {"browser": "true", **({"selector": selector} if selector else {})}
        connection.subscribe(queue, f"browse-{uuid.uuid4().hex[:8]}", ack="auto", headers=headers)
        if not browser.ended.wait(timeout):
            raise TimeoutError(f"the broker did not finish browsing {queue} in {timeout:g}s")
        return browser.messages
    finally:
        connection.disconnect()


def ids_of(body: dict[str, object]) -> tuple[object, ...]:
    """The task ids (request, transform, workload) a recorded iDDS message names."""
    content = body["content"]
    assert isinstance(content, dict)
    return tuple(content[k] for k in ("request_id", "transform_id", "workload_id"))
