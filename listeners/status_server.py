"""The listener's HTTP endpoint, on a daemon thread: ``/metrics`` (Prometheus
text format, from the listener's own registry) and ``/healthz``.

``/healthz`` answers 200 while the listener is subscribed and connected to
the broker, 503 otherwise (starting, stopping, broker lost), with the health
snapshot as JSON. Prefect unreachable alone is still 200, marked "degraded":
the listener then keeps its messages unacked and retries, so nothing is lost,
and restarting it would not bring Prefect back, only drop the broker
connection and have the broker redeliver what it held. Metrics and the body
say so (prefect_reachable), for alerting.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from listeners.metrics import ListenerMetrics
from swf_panda_workers.config.schema import Settings

if TYPE_CHECKING:
    from listeners.bus_listener import ListenerHealth

log = logging.getLogger("swf.listener.status")


@contextmanager
def status_endpoint(
    settings: Settings, health: Callable[[], ListenerHealth]
) -> Iterator[ListenerMetrics]:
    """The listener process's metrics, served on ``metrics.host``:``metrics.port``
    (unless the port is 0) while the block runs. An endpoint that cannot
    listen (the port taken) is logged as an error and left out: the messages
    come first; the health check, finding nothing, then reports the problem."""
    transceiver = settings.transceiver
    metrics = ListenerMetrics(
        health, {"namespace": transceiver.namespace, "listener_id": transceiver.listener_id}
    )
    host, port = settings.metrics.host, settings.metrics.port
    server = None
    if port:
        try:
            server = StatusServer(host, port, metrics.registry, health).start()
            log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)
        except OSError as exc:
            log.error(
                "no metrics or health endpoint: cannot listen on %s:%d: %s",
                host,
                port,
                exc.strerror or exc,
            )
    try:
        yield metrics
    finally:
        if server is not None:
            server.stop()


def health_answer(health: ListenerHealth) -> tuple[int, dict[str, Any]]:
    """The /healthz status code and body for a health snapshot."""
    serving = health.listening and health.bus_connected
    status = ("ok" if health.prefect_reachable else "degraded") if serving else "unavailable"
    body = {
        "status": status,
        "listening": health.listening,
        "bus_connected": health.bus_connected,
        "prefect_reachable": health.prefect_reachable,
        "runs_active": health.runs_active,
    }
    return (HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE), body


class StatusServer:
    """Serves until ``stop``. ``port`` 0 binds any free port (tests); the
    configuration's port 0, no endpoint at all, is the caller's to honour."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], ListenerHealth],
    ) -> None:
        server = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._server = server((host, port), _handler(registry, health))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(
    registry: CollectorRegistry, health: Callable[[], ListenerHealth]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                code, body = health_answer(health())
                self._send(code, "application/json", json.dumps(body).encode())
            else:
                self._send(
                    HTTPStatus.NOT_FOUND,
                    "text/plain; charset=utf-8",
                    b"not found: try /metrics or /healthz\n",
                )

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # A scrape every few seconds: not worth a line each at INFO.
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
