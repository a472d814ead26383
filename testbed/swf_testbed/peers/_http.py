"""What the simulated HTTP peers (iDDS's REST API, swf-monitor) share."""

from __future__ import annotations

import logging
import socketserver
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class LocalHTTPServer(ThreadingHTTPServer):
    """A stdlib HTTP server for a simulated peer: a delayed or held answer
    never holds up its stop (daemon handler threads), and binding does not
    look the host name up (HTTPServer's getfqdn is slow without DNS)."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class PeerRequestHandler(BaseHTTPRequestHandler):
    """Every request to ``answer`` with its body (read by Content-Length; a
    bad length reads as an empty body); ``reply`` writes the answer, and a
    client gone before it is a line in the log, not a traceback."""

    def do_GET(self) -> None:  # http.server's naming
        self.answer(self._body())

    def do_POST(self) -> None:
        self.answer(self._body())

    def do_PUT(self) -> None:
        self.answer(self._body())

    def answer(self, body: bytes) -> None:
        raise NotImplementedError

    def reply(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s %s: the client left before the answer", self.command, self.path)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's naming
        # The request line only (never headers): http.server would print to stderr.
        log.debug("%s %s", self.address_string(), format % args)

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""
