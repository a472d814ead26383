"""What every simulated peer shares: a bus client whose deliveries are handled
off the receiver thread, a condition to wait on, and the peers' wire habits
(headers, timestamp shapes)."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from swf_panda_workers.adapters.stomp_bus import BusClient, BusUnavailable, Delivery, Subscription
from swf_panda_workers.config.schema import Brokers

log = logging.getLogger(__name__)

_STOP = object()  # tells the inbox worker to exit

SYNC_TOPIC = "/topic/swf.peers.sync"  # nobody listens: only its receipt matters


class PeerBus:
    """A BusClient plus one worker thread. The stomp receiver thread only
    enqueues (a slow or failing callback there would drop the connection);
    ``handle`` runs on the worker thread, one delivery at a time."""

    def __init__(
        self,
        brokers: Brokers,
        name: str,
        subscriptions: tuple[Subscription, ...] = (),
        handle: Callable[[Delivery], None] | None = None,
    ) -> None:
        self._name = name
        self._handle = handle
        self._subscriptions = subscriptions
        self._inbox: queue.Queue[Delivery | object] = queue.Queue()
        self._client = BusClient(
            brokers, subscriptions, self._inbox.put if handle else None, name=name
        )
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, timeout: float = 30.0) -> None:
        if self._handle is not None:
            self._worker = threading.Thread(
                target=self._drain, name=f"{self._name}-inbox", daemon=True
            )
            self._worker.start()
        self._client.start(timeout)
        if self._subscriptions:
            # BusClient.start returns once SUBSCRIBE is written, not once the
            # broker has it: a message sent right away by another connection
            # could miss us. The broker handles a connection's frames in
            # order, so a receipt for a later frame proves the subscriptions.
            self._client.send_raw(SYNC_TOPIC, b"{}", {"persistent": "false"}, timeout)

    def stop(self) -> None:
        # The worker may still be sending: let it finish before disconnecting.
        self._stopping.set()
        self._inbox.put(_STOP)
        if self._worker is not None:
            self._worker.join(timeout=10)
        self._client.stop()

    def pause(self, seconds: float) -> bool:
        """Sleep (on a worker thread); False when cut short by ``stop``."""
        return not self._stopping.wait(seconds)

    def send(self, destination: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._client.send_raw(destination, json.dumps(body).encode(), headers)

    def resync(self, timeout: float) -> bool:
        """After the broker came back: True once a send is confirmed on a live
        connection. The client subscribes before it reports a new connection,
        so the receipt also proves the subscriptions are back."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                # A connection whose loss was not noticed yet fails the send.
                self._client.send_raw(SYNC_TOPIC, b"{}", {"persistent": "false"}, min(left, 5.0))
                return True
            except BusUnavailable as exc:
                log.info("%s: not reconnected yet (%s)", self._name, exc)
                self._stopping.wait(0.2)

    def _drain(self) -> None:
        assert self._handle is not None
        while (item := self._inbox.get()) is not _STOP:
            assert isinstance(item, Delivery)
            try:
                self._handle(item)
            except Exception:  # a simulated peer keeps serving; the log says what broke
                log.exception("%s: handling %s failed", self._name, item.message_id)


class Notifier:
    """A condition for tests to wait on instead of sleeping."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)

    def notify(self) -> None:
        """Call with ``lock`` held, after changing the guarded state."""
        self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """``timeout`` None: as long as it takes."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)


def poll_until(condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Poll ``condition`` (for conditions no single Notifier covers: several
    peers' records, a file, a database) until it holds; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def peer_headers(
    msg_type: str, run_id: str | int | None, namespace: str | None = None
) -> dict[str, str]:
    """The headers the real peers put on what they publish."""
    headers = {"persistent": "true", "vo": "eic", "msg_type": msg_type}
    if run_id is not None:
        headers["run_id"] = str(run_id)
    if namespace:
        headers["namespace"] = namespace
    return headers


def naive_iso(moment: datetime | None = None, timespec: str = "seconds") -> str:
    """The testbed's and the transformer's shape: ISO without zone, UTC implied."""
    return (
        (moment or datetime.now(UTC))
        .astimezone(UTC)
        .replace(tzinfo=None)
        .isoformat(timespec=timespec)
    )


def zulu_iso(moment: datetime | None = None) -> str:
    """The iDDS replies' shape: ISO with milliseconds and ``Z``."""
    return naive_iso(moment, timespec="milliseconds") + "Z"
