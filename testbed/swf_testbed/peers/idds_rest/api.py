"""What the simulated iDDS REST server (``server``) and PanDA's relay in front
of it (``panda_relay``) both speak: the endpoints, where they are served, and
an answer as it goes on the wire."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

PREFIX = "/idds"  # where iDDS's web server mounts its app
CONTROL_PREFIX = "/_sim"  # the simulator's own fault-injection and records endpoints
Endpoint = Literal["create", "adjust", "close", "lookup", "requests"]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
# direct: to the iDDS API; panda_relay: through PanDA's relay_idds_command.
Route = Literal["direct", "panda_relay"]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, with the outcome the records keep."""

    status: int
    outcome: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    # Runs after the answer is written: iDDS's PanDA jobs start after it replied.
    then: Callable[[], None] | None = field(default=None, compare=False)


def header_safe(value: str) -> str:
    # A header value must be one latin-1 line.
    one_line = value.replace("\r", " ").replace("\n", " ")
    return one_line.encode("latin-1", errors="replace").decode("latin-1")


def readable_body(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
