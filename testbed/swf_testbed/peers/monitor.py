"""A stand-in for swf-monitor's agent heartbeat endpoint, for tests and trying
the heartbeats by hand: ``POST /api/systemagents/heartbeat/`` on a stdlib HTTP
server in a thread.

As the monitor (its SystemAgentViewSet.heartbeat): the agent's record is
created (201) or updated (200) by ``instance_name`` and answered as JSON;
with a ``token``, requests without ``Authorization: Token <token>``, or with
another token, are refused (403, as the monitor's token authentication with
its permission check answers); a body the monitor's serializer would refuse
is a 400 naming the field (``status``, ``operational_state`` outside the
monitor's choices; ``agent_type`` outside ``agent_types`` when given, as
monitor versions with a fixed list answer); an ``instance_name`` longer than
its column (100) gets past the serializer and fails in the database: a 500.

Faults, for the reporter's tests (``behave``): ``fail`` answers 503, as a
gateway in front of a monitor that is down; ``hang`` holds each request
without answering for ``hang_for`` seconds (or until ``stop``); ``redirect``
answers 302 to a login page, as the testbed's OIDC front end did;
``garbage`` answers 200 with a body that is not JSON. Every request is
recorded when it arrives (``calls``), with its headers, the token redacted.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler
from types import FrameType
from typing import Any, Literal

from swf_panda_workers.core.monitor_heartbeat import HEARTBEAT_PATH, INSTANCE_NAME_MAX
from swf_testbed.peers._bus import Notifier
from swf_testbed.peers._http import LocalHTTPServer, PeerRequestHandler

log = logging.getLogger(__name__)

Behaviour = Literal["ok", "fail", "hang", "redirect", "garbage"]
Auth = Literal["ok", "missing", "wrong", "open"]  # open: no token required
STATUSES = ("UNKNOWN", "OK", "WARNING", "ERROR", "EXITED")
OPERATIONAL_STATES = ("STARTING", "READY", "PROCESSING", "EXITED")
LOGIN_PATH = "/login/"
HUNG = 0  # the status recorded for a request held without an answer


@dataclass(frozen=True)
class HeartbeatCall:
    """One request, as it arrived and as it was (to be) answered."""

    method: str
    path: str
    body: Any  # parsed JSON; the text when it is not JSON
    headers: dict[str, str]  # Authorization redacted
    auth: Auth
    status: int  # HUNG: held without an answer
    behaviour: Behaviour

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201)

    def field(self, name: str) -> Any:
        return self.body.get(name) if isinstance(self.body, dict) else None


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


def _json(status: int, data: Any) -> _Answer:
    return _Answer(status, json.dumps(data).encode())


class MonitorStandIn:
    """The heartbeat endpoint on ``url`` (``http://127.0.0.1:<port>``, what
    SWF_MONITOR_URL takes). ``port`` 0 picks a free one; ``start`` again
    after ``stop`` binds the same port (a monitor restarted)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        agent_types: Collection[str] | None = None,
        hang_for: float = 60.0,
    ) -> None:
        self._address = (host, port)
        self._token = token
        self._agent_types = agent_types
        self._hang_for = hang_for
        self._state = Notifier()
        self._released = threading.Event()  # ends hung requests at stop()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # guarded by self._state.lock
        self.calls: list[HeartbeatCall] = []
        self.agents: dict[str, dict[str, Any]] = {}
        self._behaviour: Behaviour = "ok"

    # --- life ---------------------------------------------------------------

    def start(self) -> MonitorStandIn:
        self._released.clear()
        self._server = _Server(self._address, _Handler, self)
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server: (host, port)
        self._address = (host, port)  # the port picked, kept for restarts
        self._thread = threading.Thread(
            target=partial(self._server.serve_forever, 0.05), name="monitor-stand-in", daemon=True
        )
        self._thread.start()
        log.info("swf-monitor stand-in on %s", self.url)
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> MonitorStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://{host}:{port}"

    # --- faults and records -------------------------------------------------

    def behave(self, behaviour: Behaviour) -> None:
        with self._state.lock:
            self._behaviour = behaviour

    def heartbeats(self, instance_name: str | None = None) -> list[HeartbeatCall]:
        """The heartbeats accepted (answered 200 or 201), oldest first."""
        with self._state.lock:
            return [
                c
                for c in self.calls
                if c.accepted and instance_name in (None, c.field("instance_name"))
            ]

    def records(self) -> list[HeartbeatCall]:
        """Every request so far, accepted or not."""
        with self._state.lock:
            return list(self.calls)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` (reading the records) holds."""
        return self._state.wait_for(predicate, timeout)

    # --- one request --------------------------------------------------------

    def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> _Answer:
        body = _parsed(raw)
        auth = self._auth(headers.get("Authorization"))
        with self._state.lock:
            behaviour = self._behaviour
            answer = self._answer(behaviour, method, path, auth, body)
            self.calls.append(
                HeartbeatCall(
                    method, path, body, _redacted(headers), auth, answer.status, behaviour
                )
            )
            self._state.notify()
        if answer.status == HUNG:
            self._released.wait(self._hang_for)
        return answer

    def _answer(
        self, behaviour: Behaviour, method: str, path: str, auth: Auth, body: Any
    ) -> _Answer:
        # What a front end does (gateway errors, login redirects) comes before the app.
        if behaviour == "fail":
            return _Answer(
                503,
                b"<html><body>503 Service Unavailable</body></html>",
                (("Content-Type", "text/html"),),
            )
        if behaviour == "hang":
            return _Answer(HUNG)
        if behaviour == "redirect":
            return _Answer(302, headers=(("Location", f"{self.url}{LOGIN_PATH}?next={path}"),))
        if behaviour == "garbage":
            return _Answer(200, b"<html>Sign in</html>", (("Content-Type", "text/html"),))
        if path != HEARTBEAT_PATH:
            return _json(404, {"detail": "Not found."})
        if method != "POST":
            return _json(405, {"detail": f'Method "{method}" not allowed.'})
        if auth in ("missing", "wrong"):
            detail = (
                "Authentication credentials were not provided."
                if auth == "missing"
                else "Invalid token."
            )
            return _json(403, {"detail": detail})
        if (
            isinstance(body, dict)
            and isinstance(body.get("instance_name"), str)
            and len(body["instance_name"]) > INSTANCE_NAME_MAX
        ):
            return _Answer(500, b"<h1>Server Error (500)</h1>", (("Content-Type", "text/html"),))
        problems = self._problems(body)
        if problems:
            return _json(400, problems)
        return self._store(body)

    def _auth(self, authorization: str | None) -> Auth:
        if self._token is None:
            return "open"
        if not authorization:
            return "missing"
        scheme, _, given = authorization.partition(" ")
        ok = scheme == "Token" and hmac.compare_digest(given.encode(), self._token.encode())
        return "ok" if ok else "wrong"

    def _problems(self, body: Any) -> dict[str, list[str]]:
        """What the monitor's serializer would refuse, by field."""
        if not isinstance(body, dict):
            return {"non_field_errors": ["Invalid data. Expected a dictionary."]}
        problems: dict[str, list[str]] = {}
        name = body.get("instance_name")
        if not isinstance(name, str) or not name:
            problems["instance_name"] = ["This field is required."]
        agent_type = body.get("agent_type")
        if (
            not isinstance(agent_type, str)
            or not 0 < len(agent_type) <= 20
            or (self._agent_types is not None and agent_type not in self._agent_types)
        ):
            problems["agent_type"] = [f'"{agent_type}" is not a valid choice.']
        for field, choices in (("status", STATUSES), ("operational_state", OPERATIONAL_STATES)):
            if body.get(field) not in choices:
                problems[field] = [f'"{body.get(field)}" is not a valid choice.']
        return problems

    def _store(self, body: dict[str, Any]) -> _Answer:
        name = body["instance_name"]
        created = name not in self.agents
        record = self.agents.setdefault(name, {"id": len(self.agents) + 1})
        record.update(body, last_heartbeat=datetime.now(UTC).isoformat())
        return _json(201 if created else 200, record)


def _parsed(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _redacted(headers: dict[str, str]) -> dict[str, str]:
    return {k: "<redacted>" if k.lower() == "authorization" else v for k, v in headers.items()}


class _Server(LocalHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        stand_in: MonitorStandIn,
    ) -> None:
        self.stand_in = stand_in
        super().__init__(address, handler)


class _Handler(PeerRequestHandler):
    server: _Server
    server_version = "swf-monitor-stand-in"

    def answer(self, body: bytes) -> None:
        answer = self.server.stand_in._handle(
            self.command, self.path, dict(self.headers.items()), body
        )
        if answer.status == HUNG:
            self.close_connection = True
            return
        self.reply(answer.status, answer.headers, answer.body)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted, logging each heartbeat; prints the URL
    (what SWF_MONITOR_URL takes)."""
    parser = argparse.ArgumentParser(
        prog="python -m swf_testbed.peers.monitor",
        description="A stand-in for swf-monitor's agent heartbeat endpoint.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="require 'Authorization: Token <the token in this variable>'",
    )
    args = parser.parse_args(argv)
    token = None
    if args.token_env:
        # From the environment, never the command line: ps would show it.
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env {args.token_env}: that variable is empty or unset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with MonitorStandIn(args.host, args.port, token=token) as stand_in:
        print(stand_in.url, flush=True)
        seen = 0
        while not stop.wait(0.5):
            calls = stand_in.records()
            for call in calls[seen:]:
                log.info(
                    "%s %s -> %s: %s",
                    call.method,
                    call.path,
                    call.status,
                    json.dumps(call.body) if isinstance(call.body, dict) else call.body,
                )
            seen = len(calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
