"""The simulated iDDS REST server on its own, until interrupted:
``python -m swf_testbed.peers.idds_rest --port 8443 --token-env MY_TOKEN``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from swf_testbed.peers.idds_rest.server import SimulatedIDDSRest


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; prints its URL (what IDDS_HOST takes),
    and its relay URL (what PANDA_URL_SSL takes) on stderr."""
    parser = argparse.ArgumentParser(
        prog="python -m swf_testbed.peers.idds_rest",
        description="A simulated iDDS workflow-task REST server, for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="require oidc with the token in this environment variable",
    )
    parser.add_argument("--vo", help="require this VO (X-IDDS-Auth-VO)")
    parser.add_argument(
        "--create-answers-ids",
        action="store_true",
        help="answer a create with the task's ids, as a fixed iDDS would "
        "(iDDS 2.6.21 answers 500 after making the task)",
    )
    parser.add_argument(
        "--workload-pending", action="store_true", help="answer creates with workload_id null"
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
    with SimulatedIDDSRest(
        args.host,
        args.port,
        token=token,
        vo=args.vo,
        workload_pending=args.workload_pending,
        create_fails_after=not args.create_answers_ids,
    ) as server:
        print(server.url, flush=True)
        print(f"# PanDA relay (PANDA_URL_SSL): {server.relay_url}", file=sys.stderr, flush=True)
        print(
            f"# faults and records: {server.control_url} (GET /state; POST /fail, "
            f"/delay, /clear); auth: {'oidc token from $' + args.token_env if token else 'any'}",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
