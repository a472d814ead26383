"""A dry run's bus: every message is withheld, and said in the log instead.

A dry run replays a recorded run through the flows as they are configured
now (``dry_run`` parameter of the run flow): it decides everything the live
run would, and sends nothing, to the bus or to iDDS.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from swf_panda_workers.core.outbound import Outgoing


@dataclass
class WithheldMessages:
    """A Sender that keeps what it is given: the messages a dry run would have sent."""

    log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    withheld: list[Outgoing] = field(default_factory=list)

    def send(self, message: Outgoing, timeout: float = 10.0) -> None:
        self.withheld.append(message)
        self.log.info(
            "dry run, not sent: %s run_id=%s to %s %s",
            message.msg_type,
            message.headers.get("run_id"),
            message.destination,
            json.dumps(message.body.get("content"), sort_keys=True),
        )
