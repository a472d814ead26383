"""What the simulated HTTP peers (iDDS's REST API, swf-monitor) share."""

from __future__ import annotations

import socketserver
from http.server import ThreadingHTTPServer


class LocalHTTPServer(ThreadingHTTPServer):
    """A stdlib HTTP server for a simulated peer: a delayed or held answer
    never holds up its stop (daemon handler threads), and binding does not
    look the host name up (HTTPServer's getfqdn is slow without DNS)."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
