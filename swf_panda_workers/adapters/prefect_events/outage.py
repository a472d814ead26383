"""An unreachable or restarting Prefect server: what calls to it raise, and
how long a run waits it out.

A Prefect server restart under a running flow (measured with Prefect 3.8.8):
the events websocket drops, and Prefect's subscriber gives up after its few
reconnection attempts (or ends quietly on a clean close). The run's feed
(``feed``) subscribes again and its history reads (``history``) are tried
again, every RETRY_EVERY seconds, and journal entries (``journal``) are read
back until stored, for OUTAGE_TOLERANCE at most.
"""

from __future__ import annotations

import httpx
from websockets.exceptions import WebSocketException

# How long a run flow waits out an unreachable Prefect server before giving
# up: its feed fails (the flow run fails and Prefect retries it) and an
# unconfirmed journal entry fails the effect that wrote it.
OUTAGE_TOLERANCE = 900.0
RETRY_EVERY = 2.0  # s between attempts to reach a server that is away (subscribe, read)
# What a call to an unreachable or restarting server raises.
SERVER_TROUBLE: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    OSError,
    TimeoutError,
    WebSocketException,
)
# What a call to the server may raise, for ``server_trouble`` to judge: any
# HTTP error (a 4xx is no trouble of the server's) and SERVER_TROUBLE. One
# tuple, so that ``except`` names it as a type checker can read it.
SERVER_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, *SERVER_TROUBLE)


def server_trouble(exc: BaseException) -> bool:
    """The server is unreachable, restarting or failing: waiting may cure it."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    if isinstance(exc, SERVER_TROUBLE):
        return True
    # The subscriber reports a socket closed during its handshake as a bare
    # Exception raised from the ConnectionClosed.
    return isinstance(exc.__cause__, WebSocketException)
