"""iDDS's REST API, idds-server's own Flask app (``idds.rest.v1.app.create_app()``),
served the way iDDS's Apache serves it (its ``httpd-idds-443-*.conf``):

- under ``/idds`` (``WSGIScriptAlias /idds .../idds.wsgi``);
- over TLS that asks for a client certificate and verifies it when one is
  given (``SSLVerifyClient optional``), X.509 proxies accepted (what
  mod_gridsite adds: ``GridSiteGSIProxyLimit``);
- with the verified peer's DN and certificate in the WSGI environ, as
  mod_ssl's ``SSLOptions +StdEnvVars +ExportCertData`` puts them
  (``SSL_CLIENT_S_DN``, ``SSL_CLIENT_I_DN``, ``SSL_CLIENT_CERT``,
  ``SSL_CLIENT_VERIFY``), DNs in the legacy one-line form
  (``/DC=org/.../CN=...``). That is what iDDS's ``before_request_auth``
  reads for ``x509_proxy`` and matches against its ``allow_users``.

Only the web server is ours (werkzeug's, threaded, which idds-server
installs); every request is handled by iDDS's own code, on the database and
configuration ``IDDS_CONFIG`` names, with the users ``IDDS_AUTH_CONFIG``
names. Run by the real peers' interpreter, by path:

    python idds_rest_app.py --port 8443 --cert hostcert.pem --key hostkey.pem --ca ca.pem

It prints ``serving <url>`` once it listens, then a line per request
(``request {"method", "path", "status", "dn", "error", "at"}``; ``error``:
iDDS's ExceptionClass and ExceptionMessage), and stops on
SIGTERM or SIGINT.
Standard library, werkzeug, cryptography and idds only.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import sqlite_md5  # noqa: F401  (registers md5() on SQLite before iDDS's code runs)
from cryptography import x509
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import WSGIRequestHandler, make_server

MOUNT = "/idds"
REQUEST_LOG = "request "  # what each request's log line starts with
ERROR_KEY = "swf.idds_error"  # iDDS's error headers of the answer, for the log line
# OpenSSL's short names, as its one-line (legacy) DN form writes them.
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "0.9.2342.19200300.100.1.25": "DC",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.1": "UID",
}


def legacy_dn(name: x509.Name) -> str:
    return "".join(
        f"/{_SHORT_NAMES.get(a.oid.dotted_string, a.oid.dotted_string)}={a.value!s}" for a in name
    )


class ModSslRequestHandler(WSGIRequestHandler):
    """werkzeug's handler, adding what mod_ssl exports about the client, and
    logging each request as one JSON line (``REQUEST_LOG`` + JSON: method,
    path, status, the client's DN) for tests to read."""

    client_dn: str | None = None

    def make_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().make_environ()
        environ["HTTPS"] = "on"
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if der:  # only a certificate that verified gets here (else no handshake)
            peer = x509.load_der_x509_certificate(der)
            self.client_dn = legacy_dn(peer.subject)
            environ["SSL_CLIENT_S_DN"] = self.client_dn
            environ["SSL_CLIENT_I_DN"] = legacy_dn(peer.issuer)
            environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
            environ["SSL_CLIENT_VERIFY"] = "SUCCESS"
        else:
            environ["SSL_CLIENT_VERIFY"] = "NONE"
        return environ

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code if isinstance(code, int) else int(code) if str(code).isdigit() else 0
        environ = getattr(self, "environ", {})
        line = {
            "method": self.command,
            "path": self.path,
            "status": int(status),
            "dn": self.client_dn,
            "error": environ.get(ERROR_KEY),
            "at": time.time(),
        }
        print(REQUEST_LOG + json.dumps(line), flush=True)


def with_errors_noted(app: Callable[..., Any]) -> Callable[..., Any]:
    """iDDS answers an error with empty body and the headers ExceptionClass
    and ExceptionMessage: noted in the environ for the request's log line."""

    def noting(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def start(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            named = dict(headers)
            if "ExceptionClass" in named:
                environ[ERROR_KEY] = (
                    f"{named['ExceptionClass']}: {named.get('ExceptionMessage', '')}"
                )[:500]
            return start_response(status, headers, *args)

        return app(environ, start)

    return noting


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_OPTIONAL  # SSLVerifyClient optional
    context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return context


def _not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    # Outside the mount Apache answers; iDDS's app never sees the request.
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [f"not under {MOUNT}\n".encode()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="the host certificate (PEM)")
    parser.add_argument("--key", required=True, help="its key (PEM)")
    parser.add_argument("--ca", required=True, help="the CA(s) client certificates chain to")
    args = parser.parse_args(argv)

    from idds.rest.v1.app import create_app

    application = with_errors_noted(DispatcherMiddleware(_not_found, {MOUNT: create_app()}))
    server = make_server(
        args.host,
        args.port,
        application,
        threaded=True,
        request_handler=ModSslRequestHandler,
        ssl_context=tls_context(args.cert, args.key, args.ca),
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="idds-rest", daemon=True
    )
    serving.start()
    print(f"serving https://{args.host}:{server.server_port}{MOUNT}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
