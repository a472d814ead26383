"""Heartbeats to swf-monitor, as the testbed's agents send them: the first at
start (it registers the listener), then every ``monitor.interval`` seconds,
and at once when the state the monitor shows changes (STARTING -> READY,
READY <-> PROCESSING, the bus lost or regained); the last, EXITED, at
shutdown. What they say is ``swf_panda_workers.core.monitor_heartbeat`` (pure);
this module sends it.

The monitor is a bystander: it never blocks nor stops the listener. Requests
are async on the listener's event loop, each cut off after
``monitor.timeout`` seconds whatever the server does (connect, send, a
trickled answer), so the last heartbeat delays a SIGTERM by that at most.
Redirects are not followed: a front end's redirect (to an OIDC login) would
drop the Authorization header; it is reported instead. A failure is logged
when it starts and when it changes, not at every heartbeat; the token never
appears in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.monitor_heartbeat import (
    HEARTBEAT_PATH,
    AgentIdentity,
    AgentState,
    HealthSnapshot,
    agent_state,
    default_instance_name,
    describe,
    exit_state,
    heartbeat_payload,
)

log = logging.getLogger("swf.monitor")

STATE_POLL = 1.0  # s between looks at the listener's health for a change to report
RETRY_AFTER = 10.0  # s before trying again after a failed heartbeat (if below the interval)
EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Outcome:
    """How one heartbeat went. ``kind`` is what a change of is logged."""

    delivered: bool
    kind: str
    detail: str


def answer_outcome(status: int, location: str | None, body: bytes) -> Outcome:
    """What the monitor's answer means for the heartbeat."""
    if status in (200, 201):
        try:
            agent = json.loads(body)
        except ValueError:
            agent = None
        if isinstance(agent, dict):
            return Outcome(True, "delivered", f"HTTP {status}")
        return Outcome(
            False,
            "not the agent's JSON",
            f"HTTP {status} with a body that is not "
            f"the agent's JSON (a login page or a proxy?): {_excerpt(body)}",
        )
    if 300 <= status < 400:
        return Outcome(
            False,
            "redirect",
            (
                f"HTTP {status}, a redirect to {_without_query(location)}, not followed: "
                "a redirect (to an OIDC login, say) drops the Authorization header. "
                "Give SWF_MONITOR_URL the address that serves /api/ itself, "
                "or exempt /api/ from the redirect"
            ),
        )
    if status in (401, 403):
        return Outcome(
            False,
            f"HTTP {status}",
            f"HTTP {status}, the token was refused "
            f"({_excerpt(body)}); check SWF_API_TOKEN or SWF_API_TOKEN_FILE",
        )
    if status == 400:
        return Outcome(
            False,
            "HTTP 400",
            f"HTTP 400, the heartbeat was refused: "
            f"{_excerpt(body)} (an agent_type this monitor does not list? see "
            "monitor.agent_type)",
        )
    return Outcome(False, f"HTTP {status}", f"HTTP {status}: {_excerpt(body)}")


def _excerpt(body: bytes) -> str:
    """The start of an answer as one printable line."""
    text = " ".join(body.decode("utf-8", errors="replace").split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return (text[:EXCERPT_CHARS] + "...") if len(text) > EXCERPT_CHARS else text or "no body"


def _without_query(location: str | None) -> str:
    # A login redirect's query carries the login's state; the place is enough.
    if not location:
        return "nowhere (no Location)"
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else parts.path


class MonitorClient:
    """POSTs heartbeats to ``{url}/api/systemagents/heartbeat/``."""

    def __init__(
        self,
        url: str,
        token: SecretStr | None,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/") + HEARTBEAT_PATH
        self.timeout = timeout
        self._token = token.get_secret_value() if token else None
        headers = {"Authorization": f"Token {self._token}"} if self._token else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=timeout, follow_redirects=False, transport=transport
        )

    async def post(self, payload: dict[str, object]) -> Outcome:
        try:
            # httpx's timeout is per step; this one bounds the whole request.
            async with asyncio.timeout(self.timeout):
                response = await self._http.post(self.url, json=payload)
                body = await response.aread()
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(False, "timeout", f"no answer within {self.timeout:g}s")
        except (httpx.HTTPError, OSError) as exc:
            return Outcome(
                False,
                f"unreachable ({type(exc).__name__})",
                f"unreachable: {type(exc).__name__}: {self._scrubbed(str(exc))}",
            )
        return answer_outcome(response.status_code, response.headers.get("location"), body)

    def _scrubbed(self, text: str) -> str:
        # A library's error may quote the request's headers.
        return text.replace(self._token, "<token>") if self._token else text

    async def aclose(self) -> None:
        await self._http.aclose()


class HeartbeatReporter:
    """Reports the listener's health (``health()``, the running listener's
    snapshot) to the monitor until stopped; ``send_exit`` says goodbye."""

    def __init__(
        self,
        client: MonitorClient,
        identity: AgentIdentity,
        listener_id: str,
        health: Callable[[], HealthSnapshot],
        interval: float,
        poll: float = STATE_POLL,
    ) -> None:
        self.client = client
        self.identity = identity
        self.listener_id = listener_id
        self.health = health
        self.interval = interval
        self.poll = poll
        self.attempts = 0
        self.delivered = 0
        self._reported: AgentState | None = None  # the last state sent, delivered or not
        self._last_kind: str | None = None  # of the last outcome

    async def run(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stopping.is_set():
            health = self.health()
            state = agent_state(health)
            if state != self._reported or loop.time() >= due:
                delivered = await self._send(state, describe(health, self.listener_id))
                due = loop.time() + (
                    self.interval if delivered else min(self.interval, RETRY_AFTER)
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.poll)

    async def send_exit(self, failure: BaseException | None = None) -> bool:
        """The last heartbeat: EXITED, or ERROR when the listener ended on
        ``failure`` (named by its type only: its text may quote anything)."""
        health = self.health()
        reason = "stopped" if failure is None else f"on {type(failure).__name__}, see its log"
        state = exit_state(health, failed=failure is not None)
        delivered = await self._send(state, describe(health, self.listener_id, reason))
        return delivered

    async def _send(self, state: AgentState, description: str) -> bool:
        previous, self._reported = self._reported, state
        self.attempts += 1
        outcome = await self.client.post(heartbeat_payload(self.identity, state, description))
        if outcome.delivered:
            self.delivered += 1
        self._log(outcome, previous, state)
        self._last_kind = outcome.kind
        return outcome.delivered

    def _log(self, outcome: Outcome, previous: AgentState | None, state: AgentState) -> None:
        shown = f"{state.status}/{state.operational_state}"
        if not outcome.delivered:
            if state.operational_state == "EXITED":
                log.warning(
                    "swf-monitor: the last heartbeat (%s) was not delivered to %s: %s",
                    shown,
                    self.client.url,
                    outcome.detail,
                )
            elif outcome.kind != self._last_kind:
                log.warning(
                    "swf-monitor: heartbeat (%s) to %s failed: %s; trying again every "
                    "%gs, logged again when this changes",
                    shown,
                    self.client.url,
                    outcome.detail,
                    min(self.interval, RETRY_AFTER),
                )
            else:
                log.debug("swf-monitor: heartbeat failed again: %s", outcome.detail)
            return
        if self._last_kind is None:
            log.info(
                "swf-monitor: registered as %s at %s (%s, %s)",
                self.identity.instance_name,
                self.client.url,
                outcome.detail,
                shown,
            )
        elif self._last_kind != outcome.kind:
            log.info("swf-monitor: heartbeats delivered again (%s, %s)", outcome.detail, shown)
        elif previous != state:
            log.info("swf-monitor: %s", shown)
        else:
            log.debug("swf-monitor: heartbeat delivered (%s)", shown)


def agent_identity(settings: Settings) -> AgentIdentity:
    hostname = socket.gethostname()
    namespace = settings.transceiver.namespace
    name = settings.monitor.instance_name or default_instance_name(
        namespace, settings.transceiver.replica, hostname
    )
    return AgentIdentity(name, settings.monitor.agent_type, namespace, os.getpid(), hostname)


@asynccontextmanager
async def monitor_heartbeats(
    settings: Settings,
    health: Callable[[], HealthSnapshot],
    stopping: asyncio.Event,
    poll: float = STATE_POLL,
) -> AsyncIterator[HeartbeatReporter | None]:
    """Heartbeats while the body runs (the listener), until ``stopping`` is
    set; the last one on the way out. Nothing when ``monitor.url`` is unset."""
    monitor = settings.monitor
    if monitor.url is None:
        log.info("swf-monitor heartbeats off (SWF_MONITOR_URL unset)")
        yield None
        return
    client = MonitorClient(monitor.url, monitor.token, monitor.timeout)
    reporter = HeartbeatReporter(
        client,
        agent_identity(settings),
        settings.transceiver.listener_id,
        health,
        monitor.interval,
        poll,
    )
    log.info(
        "swf-monitor heartbeats to %s as %s every %gs",
        client.url,
        reporter.identity.instance_name,
        monitor.interval,
    )
    beating = asyncio.create_task(reporter.run(stopping), name="swf-monitor heartbeats")
    beating.add_done_callback(_log_if_broken)
    failure: BaseException | None = None
    try:
        yield reporter
    except Exception as exc:
        failure = exc
        raise
    finally:
        beating.cancel()
        await asyncio.wait([beating])  # never raises: a failure was logged when it happened
        try:
            await reporter.send_exit(failure)
        finally:
            await client.aclose()


def _log_if_broken(task: asyncio.Task[None]) -> None:
    # Kept from the listener on purpose: a reporting bug must not stop the
    # service; the heartbeats stop, the monitor shows the agent going stale.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error(
            "swf-monitor heartbeats stopped by an error; the listener goes on without them",
            exc_info=exc,
        )
