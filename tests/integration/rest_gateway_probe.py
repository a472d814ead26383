"""The service's own REST gateway (``rest_gateway``: idds-client or, through
PanDA, panda-client) against an iDDS, in a process of its own: both clients
read their settings from the environment (panda-client once, at import), so
the test process's environment must not decide them. Run by the service's
interpreter:

    python rest_gateway_probe.py '{"route": "direct", "run_id": "100123", "workers": 1}'

Creates the run's task twice (the second attempt must find the first task
by its name, as a retried flow run does), then closes it by its ids. Prints
one JSON line: the answers' contents and the seconds each call took.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

from swf_panda_workers.adapters.idds_rest_client import rest_gateway
from swf_panda_workers.config.schema import Idds, Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.messages import RunImminent, parse_message


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    settings = Settings(idds=Idds(route=args["route"], timeout=15, retry_delays=()))
    run = parse_message(
        {
            "msg_type": "run_imminent_worker",
            "run_id": args["run_id"],
            "content": {"target_worker_count": args["workers"]},
        }
    )
    assert isinstance(run, RunImminent)
    now = datetime.now(UTC)
    workflow = outbound.workflow_for(run, settings, now)
    gateway = rest_gateway(settings)
    report: dict[str, object] = {"name": workflow["name"]}
    started = time.monotonic()
    created = gateway.create_workflow_task(run, workflow, now)
    report["create_s"] = round(time.monotonic() - started, 3)
    report["created"] = created.content.model_dump(mode="json")
    started = time.monotonic()
    again = gateway.create_workflow_task(run, workflow, now)
    report["create_again_s"] = round(time.monotonic() - started, 3)
    report["created_again"] = again.content.model_dump(mode="json")
    started = time.monotonic()
    closed = gateway.close_workflow_task(run.run_id, created.ids, workflow["name"], now)
    report["close_s"] = round(time.monotonic() - started, 3)
    report["closed"] = closed.content.model_dump(mode="json")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
