"""The STOMP edge: connect, subscribe, send with receipts, reconnect.

stomp.py runs every callback on one receiver thread; an exception there drops
the connection and a slow callback starves heart-beats. So ``on_message`` only
wraps the frame in a ``Delivery`` and hands it to the owner's callback, which
must return at once (queue it). stomp.py neither reconnects nor resubscribes
after the broker goes away: a watchdog thread here does both, with backoff.

Acks carry the connection epoch they were received on: an ack for a message
of a lost connection is dropped, because the broker redelivers that message on
the new one.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import stomp
from stomp.exception import StompException

from swf_panda_workers.config import Brokers
from swf_panda_workers.outbound import Outgoing

log = logging.getLogger(__name__)


class BusUnavailable(ConnectionError):
    """The broker could not be reached, or did not confirm a send in time."""


@dataclass(frozen=True)
class Subscription:
    destination: str
    selector: str | None = None
    ack: Literal["auto", "client-individual"] = "client-individual"
    durable_name: str | None = None  # a durable topic subscription's name

    @property
    def id(self) -> str:
        return self.durable_name or self.destination


@dataclass(frozen=True)
class Delivery:
    """One received frame, as raw as it came (the body may not even be UTF-8)."""

    headers: dict[str, str]
    body: bytes
    subscription: str
    epoch: int

    @property
    def message_id(self) -> str:
        return self.headers.get("message-id", "")

    @property
    def destination(self) -> str:
        return self.headers.get("destination", "")

    @property
    def redelivered(self) -> bool:
        return self.headers.get("redelivered") == "true"


class BusClient(stomp.ConnectionListener):
    """A self-healing STOMP connection with fixed subscriptions."""

    def __init__(
        self,
        brokers: Brokers,
        subscriptions: tuple[Subscription, ...] = (),
        on_delivery: Callable[[Delivery], None] | None = None,
        name: str = "swf-panda-workers",
        client_id: str | None = None,
    ) -> None:
        self._brokers = brokers
        self._subscriptions = subscriptions
        self._on_delivery = on_delivery
        self._name = name
        self._client_id = client_id
        self._conn: stomp.Connection12 | None = None
        self._epoch = 0
        self._lock = threading.RLock()
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._receipts: dict[str, threading.Event] = {}
        self._watchdog: threading.Thread | None = None
        self.connected = threading.Event()

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> BusClient:
        """Connect now (raising BusUnavailable after ``timeout``), then keep
        the connection up in the background until ``stop``."""
        self._connect_with_retry(deadline=timeout)
        self._watchdog = threading.Thread(
            target=self._keep_connected, name=f"{self._name}-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._lost.set()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and conn.is_connected():
            try:
                conn.disconnect()
            except StompException as exc:  # already going away: nothing left to close
                log.debug("disconnect: %s", exc)
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)

    def __enter__(self) -> BusClient:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- sending and acking -------------------------------------------------

    def send(self, message: Outgoing, timeout: float = 10.0) -> None:
        """Send and wait for the broker's receipt: once this returns, the
        broker has the (persistent) message."""
        self.send_raw(message.destination, json.dumps(message.body).encode(), message.headers,
                      timeout)

    def send_raw(self, destination: str, body: bytes, headers: dict[str, str],
                 timeout: float = 10.0) -> None:
        receipt = uuid.uuid4().hex
        arrived = threading.Event()
        self._receipts[receipt] = arrived
        try:
            conn = self._require_connection()
            try:
                conn.send(destination, body, content_type="application/json",
                          headers={**headers, "receipt": receipt})
            except StompException as exc:
                raise BusUnavailable(f"send to {destination} failed: {exc}") from exc
            if not arrived.wait(timeout):
                raise BusUnavailable(
                    f"broker did not confirm a send to {destination} in {timeout}s")
        finally:
            self._receipts.pop(receipt, None)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, accept=True)

    def nack(self, delivery: Delivery) -> None:
        self._settle(delivery, accept=False)

    def _settle(self, delivery: Delivery, accept: bool) -> None:
        ack_id = delivery.headers.get("ack")
        with self._lock:
            conn = self._conn
            if ack_id is None or conn is None or delivery.epoch != self._epoch:
                return  # that connection is gone: the broker redelivers
            try:
                (conn.ack if accept else conn.nack)(ack_id)  # STOMP 1.2: the ack header alone
            except StompException as exc:
                log.warning("could not settle message %s: %s", delivery.message_id, exc)

    def _require_connection(self) -> stomp.Connection12:
        if not self.connected.wait(timeout=30):
            raise BusUnavailable(f"not connected to {self._brokers.host}:{self._brokers.port}")
        with self._lock:
            if self._conn is None:
                raise BusUnavailable("bus client stopped")
            return self._conn

    # --- stomp.py callbacks (receiver thread: hand off, never block) ---------

    def on_message(self, frame: stomp.utils.Frame) -> None:
        if self._on_delivery is None:
            return
        headers = dict(frame.headers)
        body = frame.body if isinstance(frame.body, bytes) else str(frame.body).encode()
        self._on_delivery(Delivery(headers, body, headers.get("subscription", ""), self._epoch))

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        waiter = self._receipts.get(frame.headers.get("receipt-id", ""))
        if waiter is not None:
            waiter.set()

    def on_error(self, frame: stomp.utils.Frame) -> None:
        log.error("broker error: %s %s", frame.headers.get("message"), frame.body[:500])

    def on_disconnected(self) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker %s:%s; reconnecting",
                        self._brokers.host, self._brokers.port)
        self._lost.set()

    # --- connection management ---------------------------------------------

    def _keep_connected(self) -> None:
        while not self._stopping.is_set():
            self._lost.wait()
            if self._stopping.is_set():
                return
            self._connect_with_retry(deadline=None)

    def _connect_with_retry(self, deadline: float | None) -> None:
        waited, delay = 0.0, 0.2
        while not self._stopping.is_set():
            try:
                self._connect_once()
                return
            except (StompException, OSError) as exc:
                if deadline is not None and waited >= deadline:
                    raise BusUnavailable(
                        f"cannot reach the broker {self._brokers.host}:{self._brokers.port}: {exc}"
                    ) from exc
                log.info("broker not reachable (%s); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def _connect_once(self) -> None:
        b = self._brokers
        conn = stomp.Connection12(
            [(b.host, b.port)],
            # We send heart-beats; we do not ask for them: ActiveMQ Classic
            # never sends any, and stomp.py would drop the connection after
            # missing them.
            heartbeats=(b.heartbeat_ms, 0),
            auto_decode=False,  # bodies stay bytes: invalid UTF-8 must not kill the receiver
            reconnect_attempts_max=1,
        )
        if b.use_ssl:
            conn.set_ssl(
                for_hosts=[(b.host, b.port)],
                key_file=str(b.ssl_key_file) if b.ssl_key_file else None,
                cert_file=str(b.ssl_cert_file) if b.ssl_cert_file else None,
                ca_certs=str(b.ssl_ca_certs) if b.ssl_ca_certs else None,
            )
        conn.set_listener(self._name, self)
        headers = {"client-id": self._client_id} if self._client_id else {}
        password = b.password.get_secret_value() if b.password else None
        conn.connect(b.username, password, wait=True, headers=headers)
        with self._lock:
            self._epoch += 1
            self._conn = conn
            self._lost.clear()
            receipts = [self._subscribe(conn, sub) for sub in self._subscriptions]
        # A subscription is live once the broker confirms it; a message sent
        # to a topic before then would never reach us.
        for receipt, arrived in receipts:
            if not arrived.wait(10.0):
                conn.disconnect()
                raise StompException(f"broker did not confirm subscription {receipt}")
            self._receipts.pop(receipt, None)
        self.connected.set()
        log.info("connected to %s:%s (%d subscriptions)", b.host, b.port, len(self._subscriptions))

    def _subscribe(self, conn: stomp.Connection12,
                   sub: Subscription) -> tuple[str, threading.Event]:
        receipt, arrived = uuid.uuid4().hex, threading.Event()
        self._receipts[receipt] = arrived
        conn.subscribe(sub.destination, sub.id, ack=sub.ack,
                       headers={**self._sub_headers(sub), "receipt": receipt})
        return receipt, arrived

    def _sub_headers(self, sub: Subscription) -> dict[str, str]:
        headers = {"activemq.prefetchSize": str(self._brokers.prefetch_size)}
        if sub.selector:
            headers["selector"] = sub.selector
        if sub.durable_name:
            headers["activemq.subscriptionName"] = sub.durable_name
        return headers


def namespace_selector(namespace: str) -> str:
    """The selector the peers use. The namespace is validated to a safe
    alphabet by the configuration, so it cannot break out of the quotes."""
    return f"namespace='{namespace}'"
