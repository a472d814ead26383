"""swf-panda-workers: the command line.

    swf-panda-workers demo      a whole session on this machine (embedded everything)
    swf-panda-workers serve     the service against the configured broker
    swf-panda-workers listen    the STOMP listener alone (container entrypoint)
    swf-panda-workers runner    the Prefect runner serving the run deployment alone
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from swf_panda_workers.config import CONFIG_ENV, ConfigError, config_path, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swf-panda-workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a whole session on this machine")
    demo.add_argument("--runs", type=int, default=2, help="concurrent runs (default 2)")
    demo.add_argument("--shape", choices=["testbed", "seed"], default="testbed",
                      help="message shapes the control system uses")
    demo.add_argument("--slices", type=int, default=40, help="slices per run")
    demo.add_argument("--prefect-port", type=int, default=4200)
    demo.add_argument("--workdir", type=Path, default=Path(".swf-local/demo"),
                      help="broker data, Prefect database and logs")
    demo.add_argument("--keep", action="store_true", help="keep the stack up afterwards")
    demo.add_argument("--mode", choices=["message", "rest"], default="message",
                      help="how the service reaches iDDS: on the bus (default), or its REST "
                           "API (a simulated iDDS REST server, via idds-client)")

    for name, text in (("serve", "Prefect server (unless PREFECT_API_URL is set), runner "
                                 "and listener, against the configured broker"),
                       ("listen", "the STOMP listener alone"),
                       ("runner", "the Prefect runner alone")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", help=f"configuration file (or ${CONFIG_ENV})")
    args = parser.parse_args(argv)

    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from swf_panda_workers.demo import run_demo

        return run_demo(args.workdir.resolve(), args.runs, args.shape, args.slices,
                        args.prefect_port, args.keep, args.mode)
    os.environ[CONFIG_ENV] = str(config_path(args.config).resolve())
    load_settings()  # a bad file fails here, with its reason, before anything starts
    if args.command == "listen":
        from listeners.__main__ import main as listen

        listen([])
        return 0
    if args.command == "runner":
        from deployments.serve import main as serve_runner

        serve_runner([])
        return 0
    return _serve()


def _serve() -> int:
    """Run until SIGTERM/SIGINT, then stop everything started here."""
    from swf_panda_workers.embedded.processes import (
        ManagedProcess,
        PrefectServer,
        listener_process,
        runner_process,
        service_env,
        wait_for_deployment,
    )
    from swf_panda_workers.embedded.stack import PROJECT_ROOT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings()
    state = Path(os.environ.get("SWF_STATE_DIR", tempfile.gettempdir())) / "swf-panda-workers"
    started: list[PrefectServer | ManagedProcess] = []
    server = None
    api_url = os.environ.get("PREFECT_API_URL")
    stop_now = False

    def request_stop(*_: object) -> None:
        nonlocal stop_now
        stop_now = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        if not api_url:
            server = PrefectServer(state / "prefect").start()
            started.append(server)
            api_url = server.api_url
            logging.info("Prefect server and UI at %s", server.ui_url)
        env = service_env(api_url, Path(os.environ[CONFIG_ENV]))
        runner = runner_process(env, state / "logs", PROJECT_ROOT).start()
        started.append(runner)
        wait_for_deployment(api_url, settings.prefect.deployment)
        listener = listener_process(env, state / "logs", PROJECT_ROOT).start()
        started.append(listener)
        logging.info("serving namespace %s; logs in %s", settings.transceiver.namespace,
                     state / "logs")
        while not stop_now and runner.alive and listener.alive:
            time.sleep(0.5)
        if not stop_now:
            logging.error("a service process exited; stopping the rest")
        return 0 if stop_now else 1
    finally:
        for part in reversed(started):
            part.stop()
