"""The simulated iDDS REST server's fault-injection endpoints
(``/_sim/fail``, ``/_sim/delay``, ``/_sim/clear``, ``GET /_sim/state``), from
another process: the same calls as on the server object."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from swf_testbed.peers.idds_rest.api import CONTROL_PREFIX, Endpoint


class SimControl:
    """The fault-injection endpoints of a simulated iDDS REST server running
    elsewhere (another process): the same calls as on the server object."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        """``url``: the server's ``url`` or ``control_url``, or its root."""
        parts = urlsplit(url)
        self.control_url = f"{parts.scheme}://{parts.netloc}{CONTROL_PREFIX}"
        self.timeout = timeout

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        exception_class: str | None = "CoreException",
        message: str = "simulated iDDS failure",
        endpoint: Endpoint | None = None,
    ) -> None:
        self._post(
            "/fail",
            {
                "count": count,
                "status": status,
                "exception_class": exception_class,
                "message": message,
                "endpoint": endpoint,
            },
        )

    def delay(self, seconds: float, *, endpoint: Endpoint | None = None) -> None:
        self._post("/delay", {"seconds": seconds, "endpoint": endpoint})

    def clear_faults(self) -> None:
        self._post("/clear", {})

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.control_url + "/state", timeout=self.timeout) as reply:
            data: dict[str, Any] = json.load(reply)
            return data

    def _post(self, action: str, args: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.control_url + action,
            data=json.dumps(args).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout):
                pass
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{action}: {exc.read().decode(errors='replace')}") from None
