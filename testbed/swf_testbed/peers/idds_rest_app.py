"""iDDS's real REST API (idds-server 2.6.21's Flask app) as a process of the
real peers' interpreter, served over TLS as iDDS's Apache serves it
(``peers_venv_scripts/idds_rest_app.py``), on the transceiver's database and
configuration, so both see the same tasks.

Authentication is iDDS's own ``x509_proxy``: the client's proxy certificate
is verified by TLS against the test CA (``GridPki``), its DN handed to iDDS
as mod_ssl would, and matched by iDDS against the ``allow_users`` of the
auth configuration written here (``IDDS_AUTH_CONFIG``): the operator's DN
and the PanDA server's (also a ``super_users`` entry, so that iDDS takes the
original user PanDA relays for). Its PanDA task submission goes to
``panda_env``'s PanDA server.

``start()`` returns once the app answered ``GET /idds/ping`` with the
operator's proxy over verified TLS (the first request also loads iDDS's
handlers). ``client_env`` is what idds-client needs to reach it.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from swf_testbed.peers._child_processes import ChildLauncher, PeerProcess
from swf_testbed.peers.grid_pki import GridPki, ProxyCredential
from swf_testbed.peers.peers_venv import SCRIPTS, peer_env, peers_python

log = logging.getLogger(__name__)

REST_SCRIPT = SCRIPTS / "idds_rest_app.py"
MOUNT = "/idds"  # where iDDS's Apache mounts the app (WSGIScriptAlias)
_SERVING = re.compile(r"^serving (https://\S+)$", re.MULTILINE)
_REQUEST = re.compile(r"^request (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True)
class AppRequest:
    """One request the app answered, as its server logged it."""

    method: str
    path: str  # with the /idds mount and any query
    status: int
    dn: str | None  # the client certificate's DN (None: no certificate)
    error: str | None  # iDDS's error headers: "<ExceptionClass>: <ExceptionMessage>"
    at: float  # epoch seconds, when answered


class IddsRestFailed(RuntimeError):
    """iDDS's REST app did not start or did not answer; the message quotes its log."""


def auth_config(allow: list[str], super_users: list[str]) -> str:
    """iDDS's auth.cfg: who may call (a DN containing one of ``allow``), and
    who may act for another user (PanDA's relay). iDDS splits the lists on
    commas without stripping, so DNs must not hold one."""
    for dn in (*allow, *super_users):
        if "," in dn:
            raise ValueError(f"iDDS's user lists cannot hold a DN with a comma: {dn!r}")
    text = io.StringIO()
    text.write("[common]\n\n[Users]\n")
    text.write(f"allow_users = {','.join(allow)}\n")
    text.write(f"super_users = {','.join(super_users)}\n")
    return text.getvalue()


def client_env(url: str, proxy: ProxyCredential, ca: Path, config_root: Path) -> dict[str, str]:
    """idds-client's own settings for the app at ``url`` (``https://host:port/idds``),
    as an operator exports them: x509_proxy with ``proxy``; ``IDDS_CA_CERTS``
    for the service (idds-client itself does not verify the server); its local
    configuration under ``config_root`` (not ~/.idds)."""
    return {
        "IDDS_HOST": url,
        "IDDS_AUTH_TYPE": "x509_proxy",
        "X509_USER_PROXY": str(proxy.path),
        "IDDS_CA_CERTS": str(ca),
        "IDDS_LOCAL_CONFIG_ROOT": str(config_root),
    }


class IddsRestApp(PeerProcess):
    """``config_path``: iDDS's configuration (the transceiver's); ``panda_env``:
    panda-client's settings for the PanDA server; ``pki``: the certificates;
    ``port``: 0 takes a free one (``url`` says which)."""

    def __init__(
        self,
        workdir: Path,
        config_path: Path,
        panda_env: Mapping[str, str],
        pki: GridPki,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        launcher: ChildLauncher | None = None,
        python: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.pki = pki
        self.host = host
        self.port = port
        self._python = python or peers_python()
        super().__init__("iDDS REST app", workdir / "idds-rest-app.log", launcher)
        self.auth_path = workdir / "idds-auth.cfg"
        self.env = peer_env(
            {**panda_env, "IDDS_CONFIG": str(config_path), "IDDS_AUTH_CONFIG": str(self.auth_path)}
        )
        self._url: str | None = None
        self.started_in: float | None = None  # seconds from the spawn to the first answer

    # --- life ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> IddsRestApp:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth_path.write_text(
            auth_config([self.pki.user.user_dn, self.pki.panda.user_dn], [self.pki.panda.user_dn])
        )
        begun = time.monotonic()
        deadline = begun + timeout
        self._spawn(
            [
                str(self._python),
                str(REST_SCRIPT),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--cert",
                str(self.pki.server_cert),
                "--key",
                str(self.pki.server_key),
                "--ca",
                str(self.pki.ca),
            ],
            self.env,
            self.workdir,
        )
        try:
            self._wait_until(
                lambda: _SERVING.search(self.log_text()) is not None, deadline, "its 'serving' line"
            )
            match = _SERVING.search(self.log_text())
            assert match is not None
            self._url = match.group(1)
            status, body = self.get("/ping", timeout=max(1.0, deadline - time.monotonic()))
            if status != 200:
                raise IddsRestFailed(
                    f"iDDS's REST app answered ping with {status} {body!r}:\n"
                    f"{self.log_text()[-3000:]}"
                )
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - begun
        log.info(
            "iDDS REST app (pid %s) on %s, answering in %.1fs", self.pid, self.url, self.started_in
        )
        return self

    def __enter__(self) -> IddsRestApp:
        return self.start()

    # --- what it is -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """What IDDS_HOST takes: ``https://host:port/idds``."""
        if self._url is None:
            raise RuntimeError("iDDS's REST app is not started")
        return self._url

    def requests(self) -> list[AppRequest]:
        """Every request answered so far, in order."""
        return [AppRequest(**json.loads(m.group(1))) for m in _REQUEST.finditer(self.log_text())]

    def client_env(self, config_root: Path) -> dict[str, str]:
        """idds-client's settings for the operator (see ``client_env``)."""
        return client_env(self.url, self.pki.user, self.pki.ca, config_root)

    def get(
        self, path: str, credential: ProxyCredential | None = None, timeout: float = 10.0
    ) -> tuple[int, object]:
        """GET ``path`` (under /idds) with ``credential`` (default the
        operator's; verified TLS): the status and the decoded JSON body."""
        proxy = (credential or self.pki.user).path
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(proxy), str(proxy))
        address = self.url.removeprefix("https://").split("/", 1)[0]
        host, port = address.rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)
        try:
            connection.request("GET", MOUNT + path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response.status, json.loads(body) if body else None

    # --- starting -------------------------------------------------------------------

    def _wait_until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        # The app's log is a file: read it until the line is there.
        while not condition():
            if not self.alive:
                code = self._process.poll() if self._process is not None else None
                raise IddsRestFailed(
                    f"iDDS's REST app exited ({code}) before {what}:\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise IddsRestFailed(
                    f"iDDS's REST app: no {what} in time:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)
