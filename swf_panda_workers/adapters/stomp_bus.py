"""The STOMP edge: connect, subscribe, send with receipts, reconnect.

stomp.py runs every callback on one receiver thread; an exception there drops
the connection and a slow callback starves heart-beats. So ``on_message`` only
wraps the frame in a ``Delivery`` and hands it to the owner's callback, which
must return at once (queue it). stomp.py neither reconnects nor resubscribes
after the broker goes away: a watchdog thread here does both, with backoff.

Acks carry the connection epoch they were received on: an ack for a message
of a lost connection is dropped, because the broker redelivers that message on
the new one.

With ``brokers.use_ssl`` the connection is STOMP over TLS, the broker's
certificate verified against ``ssl_ca_certs`` (and its host name checked),
optionally with a client certificate. A refusal that retrying cannot cure (an
untrusted certificate, a rejected client certificate, a refused login, an
unreadable certificate file) is ``BusRefused`` with the reason, raised by
``start`` at once rather than after its whole timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import stomp
from stomp.exception import ConnectFailedException, StompException

from swf_panda_workers.config.schema import Brokers
from swf_panda_workers.core.outbound import Outgoing

log = logging.getLogger(__name__)


class BusUnavailable(ConnectionError):
    """The broker could not be reached, or did not confirm a send in time."""


class BusRefused(RuntimeError):
    """The broker, or TLS, turned us away for a reason that needs a change of
    configuration or credentials (not a ConnectionError: nothing should retry
    it as if the broker were merely down)."""


class ClientIdTaken(StompException):
    """The broker holds our client-id for another connection: our own
    previous one for a moment (a restart), else another listener with the
    same id. Retried until the start's deadline, then BusRefused."""


# ERROR answers to CONNECT that a retry will not cure: ActiveMQ Classic's
# "User name [x] or password is invalid.", "User x is not authorized ...",
# Artemis's "Unable to validate user ...". Narrow on purpose: anything else
# passes, and is retried ("Client: <id> already connected" as ClientIdTaken).
_LOGIN_REFUSED = re.compile(
    r"password is invalid|is not authori[sz]ed|unable to validate user|authentication failed",
    re.IGNORECASE,
)
CONNECT_TIMEOUT = 10.0  # s for the TCP connect and the TLS handshake of one attempt
REFUSED_RETRY_MAX = 30.0  # s between reconnects while the broker refuses us


@dataclass(frozen=True)
class Subscription:
    destination: str
    selector: str | None = None
    ack: Literal["auto", "client-individual"] = "client-individual"
    durable_name: str | None = None  # a durable topic subscription's name
    name: str | None = None  # its id, where one destination has several (by selector)

    @property
    def id(self) -> str:
        return self.name or self.durable_name or self.destination


@dataclass(frozen=True)
class Delivery:
    """One received frame, as raw as it came (the body may not even be UTF-8)."""

    headers: dict[str, str]
    body: bytes
    subscription: str
    epoch: int
    # time.monotonic() when the frame came in: the listener's hand-off latency
    received_at: float = field(default_factory=time.monotonic, compare=False)

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
    """A self-healing STOMP connection. Its subscriptions are those it was
    made with plus those added since (``subscribe``), less those removed
    (``unsubscribe``); all of them are made again on every new connection."""

    def __init__(
        self,
        brokers: Brokers,
        subscriptions: tuple[Subscription, ...] = (),
        on_delivery: Callable[[Delivery], None] | None = None,
        name: str = "swf-panda-workers",
        client_id: str | None = None,
    ) -> None:
        self._brokers = brokers
        self._subscriptions = {sub.id: sub for sub in subscriptions}
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
        self._refusal: str | None = None  # the ERROR frame answering our CONNECT
        self._answered = threading.Event()  # CONNECTED, ERROR or the connection gone
        self.connected = threading.Event()

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> BusClient:
        """Connect now (raising BusUnavailable after ``timeout``), then keep
        the connection up in the background until ``stop``."""
        self._connect_with_retry(deadline=timeout)
        self._watchdog = threading.Thread(
            target=self._keep_connected, name=f"{self._name}-watchdog", daemon=True
        )
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
        self.send_raw(
            message.destination, json.dumps(message.body).encode(), message.headers, timeout
        )

    def send_raw(
        self, destination: str, body: bytes, headers: dict[str, str], timeout: float = 10.0
    ) -> None:
        receipt = uuid.uuid4().hex
        arrived = threading.Event()
        self._receipts[receipt] = arrived
        try:
            conn = self._require_connection()
            try:
                conn.send(
                    destination,
                    body,
                    content_type="application/json",
                    headers={**headers, "receipt": receipt},
                )
            except StompException as exc:
                raise BusUnavailable(f"send to {destination} failed: {exc}") from exc
            if not arrived.wait(timeout):
                raise BusUnavailable(
                    f"broker did not confirm a send to {destination} in {timeout}s"
                )
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

    # --- subscriptions that come and go -------------------------------------

    def subscribe(self, sub: Subscription, timeout: float = 10.0) -> None:
        """Add a subscription, live once this returns (the broker confirmed
        it) or, while disconnected, made with the next connection."""
        # Under the lock that also guards a new connection's subscribing: either
        # that connection's round includes this one, or it is ours to make.
        with self._lock:
            self._subscriptions[sub.id] = sub
            conn = self._conn
            if conn is None:
                return
            try:
                pending = self._subscribe(conn, sub)
            except StompException as exc:  # lost: the next connection makes it
                log.info("subscription %s waits for the next connection: %s", sub.id, exc)
                return
        self._await_receipt(*pending, timeout, what=f"subscription {sub.id}")

    def unsubscribe(self, sub_id: str, timeout: float = 10.0) -> None:
        """Remove a subscription (made with ``subscribe``, or from the start)."""
        with self._lock:
            if self._subscriptions.pop(sub_id, None) is None:
                return
            conn = self._conn
            if conn is None:
                return
            receipt, arrived = uuid.uuid4().hex, threading.Event()
            self._receipts[receipt] = arrived
            try:
                conn.unsubscribe(sub_id, headers={"receipt": receipt})
            except StompException as exc:  # the connection went: nothing to undo there
                log.info("unsubscribe %s: %s", sub_id, exc)
                self._receipts.pop(receipt, None)
                return
        self._await_receipt(receipt, arrived, timeout, what=f"unsubscribe {sub_id}")

    @property
    def subscription_ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._subscriptions)

    def _await_receipt(
        self, receipt: str, arrived: threading.Event, timeout: float, what: str
    ) -> None:
        try:
            if not arrived.wait(timeout):
                raise BusUnavailable(f"the broker did not confirm {what} in {timeout:g}s")
        finally:
            self._receipts.pop(receipt, None)

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

    def on_connected(self, frame: stomp.utils.Frame) -> None:
        self._answered.set()

    def on_error(self, frame: stomp.utils.Frame) -> None:
        if not self.connected.is_set():  # the answer to our CONNECT: a refused login?
            self._refusal = str(frame.headers.get("message") or "no reason given")
            self._answered.set()
        log.error("broker error: %s %s", frame.headers.get("message"), frame.body[:500])

    def on_disconnected(self) -> None:
        self.connected.clear()
        self._answered.set()
        if not self._stopping.is_set():
            log.warning(
                "lost the broker %s:%s; reconnecting", self._brokers.host, self._brokers.port
            )
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
            except ClientIdTaken as exc:
                if deadline is not None and waited >= deadline:
                    raise BusRefused(str(exc)) from exc
                log.warning("%s; trying again in %.1fs", exc, delay)
                self._stopping.wait(delay)
                waited += delay
                delay = min(delay * 2, 5.0 if deadline is not None else REFUSED_RETRY_MAX)
            except BusRefused as exc:
                if deadline is not None:  # starting: say so now, the caller must fix it
                    raise
                # Reconnecting: a renewed certificate or password may cure it
                # without a restart, so keep trying, slowly and loudly.
                log.error("%s; trying again in %.0fs", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, REFUSED_RETRY_MAX)
            except (StompException, OSError) as exc:
                # stomp.py's ConnectFailedException carries no text (it logs the cause).
                reason = str(exc) or (
                    "no answer to STOMP CONNECT (is the broker up? "
                    "is its TLS port reached with brokers.use_ssl?)"
                )
                if deadline is not None and waited >= deadline:
                    raise BusUnavailable(
                        f"cannot reach the broker {self._brokers.host}:{self._brokers.port}: "
                        f"{reason}"
                    ) from exc
                log.info("broker not reachable (%s); retrying in %.1fs", reason, delay)
                self._stopping.wait(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def _connect_once(self) -> None:
        b = self._brokers
        if b.use_ssl:
            # stomp.py loops forever on a missing certificate file.
            _check_readable(b)
        conn = stomp.Connection12(
            [(b.host, b.port)],
            # We send heart-beats; we do not ask for them: ActiveMQ Classic
            # never sends any, and stomp.py would drop the connection after
            # missing them.
            heartbeats=(b.heartbeat_ms, 0),
            auto_decode=False,  # bodies stay bytes: invalid UTF-8 must not kill the receiver
            reconnect_attempts_max=1,
            # Bounds the TCP connect and TLS handshake (a TLS client on a
            # plain port would wait forever); reads are not affected.
            timeout=CONNECT_TIMEOUT,
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
        self._refusal = None
        self._answered.clear()
        try:
            conn.connect(b.username, password, wait=False, headers=headers)
            # Not stomp.py's wait: it has no deadline, and never ends when a
            # TLS broker drops us after the handshake (a refused client
            # certificate): its receiver then spins.
            if not self._answered.wait(CONNECT_TIMEOUT):
                raise ConnectFailedException(f"no answer to CONNECT in {CONNECT_TIMEOUT:.0f}s")
            if not conn.is_connected():
                raise ConnectFailedException()
        except ConnectFailedException:
            conn.transport.disconnect_socket()  # also stops a spinning receiver
            self._explain_failure()
            raise
        with self._lock:
            self._epoch += 1
            self._conn = conn
            self._lost.clear()
            receipts = [self._subscribe(conn, sub) for sub in self._subscriptions.values()]
        # A subscription is live once the broker confirms it; a message sent
        # to a topic before then would never reach us.
        for receipt, arrived in receipts:
            if not arrived.wait(10.0):
                conn.disconnect()
                raise StompException(f"broker did not confirm subscription {receipt}")
            self._receipts.pop(receipt, None)
        self.connected.set()
        log.info("connected to %s:%s (%d subscriptions)", b.host, b.port, len(self._subscriptions))

    def _explain_failure(self) -> None:
        """Raise what a failed connect was, when it can be told (stomp.py only
        logs it): BusRefused for a refused login or a TLS failure, else a
        StompException carrying the broker's ERROR (e.g. our client-id still
        connected, which passes), to be retried."""
        b = self._brokers
        if self._refusal is not None:
            reason = self._refusal
            if _LOGIN_REFUSED.search(reason):
                raise BusRefused(f"the broker {b.host}:{b.port} refused the login: {reason}")
            if self._client_id and "already connected" in reason:
                raise ClientIdTaken(
                    f"the broker {b.host}:{b.port} refuses client-id {self._client_id}: another "
                    f"connection holds it ({reason}). Another listener with this id is running "
                    "(a second `serve` or `listen` of this namespace, or one left over): stop "
                    "it, or give each listener its own name with SWF_LISTENER_REPLICA "
                    "(transceiver.replica)"
                )
            raise StompException(f"the broker answered CONNECT with an error: {reason}")
        if b.use_ssl:
            problem = tls_problem(b)
            if problem is not None:
                raise BusRefused(f"the broker {b.host}:{b.port} failed TLS: {problem}")

    def _subscribe(
        self, conn: stomp.Connection12, sub: Subscription
    ) -> tuple[str, threading.Event]:
        receipt, arrived = uuid.uuid4().hex, threading.Event()
        self._receipts[receipt] = arrived
        try:
            conn.subscribe(
                sub.destination,
                sub.id,
                ack=sub.ack,
                headers={**self._sub_headers(sub), "receipt": receipt},
            )
        except StompException:
            self._receipts.pop(receipt, None)
            raise
        return receipt, arrived

    def _sub_headers(self, sub: Subscription) -> dict[str, str]:
        headers = {"activemq.prefetchSize": str(self._brokers.prefetch_size)}
        if sub.selector:
            headers["selector"] = sub.selector
        if sub.durable_name:
            headers["activemq.subscriptionName"] = sub.durable_name
        return headers


@asynccontextmanager
async def connected_bus(brokers: Brokers, name: str) -> AsyncIterator[BusClient]:
    """A started BusClient for async code. Connecting (which waits out an
    unreachable broker) and disconnecting happen in a thread: the event loop
    may be shared by many flow runs (the in-process runner)."""
    bus = BusClient(brokers, name=name)
    await asyncio.to_thread(bus.start)
    try:
        yield bus
    finally:
        await asyncio.to_thread(bus.stop)


def _check_readable(b: Brokers) -> None:
    for key, path in (
        ("ssl_ca_certs", b.ssl_ca_certs),
        ("ssl_cert_file", b.ssl_cert_file),
        ("ssl_key_file", b.ssl_key_file),
    ):
        if path is None:
            continue
        try:
            path.open("rb").close()
        except OSError as exc:
            raise BusRefused(f"brokers.{key}: cannot read {path}: {exc.strerror}") from None


def tls_problem(b: Brokers, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """What goes wrong with TLS to the broker, with the same settings stomp.py
    uses; None if the handshake works (or the broker is simply unreachable)."""
    try:
        context = ssl.create_default_context(cafile=str(b.ssl_ca_certs) if b.ssl_ca_certs else None)
        if b.ssl_cert_file is not None:
            context.load_cert_chain(b.ssl_cert_file, b.ssl_key_file)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load the certificates: {exc}"
    try:
        raw = socket.create_connection((b.host, b.port), timeout=timeout)
    except OSError:
        return None  # unreachable: a later attempt may succeed
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=b.host)
        except TimeoutError:
            return f"no TLS handshake in {timeout:.0f}s (is {b.port} the broker's TLS port?)"
        except ssl.SSLError as exc:
            return _tls_refusal(exc, b)
        except OSError:
            return None
        with tls:
            # In TLS 1.3 the server judges our client certificate after the
            # handshake: its verdict is the first thing to read.
            tls.settimeout(1.0)
            try:
                tls.recv(1)
            except ssl.SSLError as exc:
                return _tls_refusal(exc, b)
            except OSError:  # a timeout: the broker waits for our CONNECT, TLS is fine
                return None
    return None


def _tls_refusal(exc: ssl.SSLError, b: Brokers) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = f"the CAs in {b.ssl_ca_certs}" if b.ssl_ca_certs else "the system's CAs"
        return (
            f"its certificate failed verification against {trusted} "
            f"(brokers.ssl_ca_certs): {exc.verify_message}"
        )
    reason = exc.reason or str(exc)
    if "CERTIFICATE" in reason:  # the server's alert: bad, unknown or missing client certificate
        ours = b.ssl_cert_file or "none (brokers.ssl_cert_file)"
        return f"it refused our client certificate ({reason}); ours: {ours}"
    return str(exc)


def namespace_selector(namespace: str) -> str:
    """The selector the peers use. The namespace is validated to a safe
    alphabet by the configuration, so it cannot break out of the quotes."""
    return f"namespace='{namespace}'"


def workers_selector(namespace: str, idds_namespace: str | None = None) -> str:
    """Our namespace, and what iDDS's prompt transceiver answers in: its own
    namespace, or none when it has none (both from the configuration, in a
    safe alphabet)."""
    names = [namespace] + ([idds_namespace] if idds_namespace not in (None, namespace) else [])
    return " OR ".join([*(namespace_selector(n) for n in names), "namespace IS NULL"])


def run_selector(run_id: str) -> str:
    """One run's messages by their run_id header (a string on the wire). Run
    ids are validated to a safe alphabet by the message models."""
    return f"run_id = '{run_id}'"


NO_RUN_SELECTOR = "run_id IS NULL"  # heartbeats, and results naming no run
