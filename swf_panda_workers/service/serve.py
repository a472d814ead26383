"""`swf-panda-workers serve`: the service on one machine, supervised.

Its children, the Prefect server (unless PREFECT_API_URL names one), the
runner and the listener, end with it however it ends (processes.launch); a
child that exits is started again with a backoff (supervisor.py). SIGTERM or
SIGINT stops them all within STOP_WITHIN seconds: the listener and the
runner first (the runner leaves its runs in flight to the next start's
recovery), then the server. The server's database and the logs live in the
state directory (state_dir.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from swf_panda_workers.config.schema import Settings
from swf_panda_workers.service.processes import (
    PrefectServer,
    deployment_registered,
    listener_process,
    runner_process,
    service_env,
)
from swf_panda_workers.service.supervisor import Child, Fatal, Supervisor
from swf_panda_workers.state_dir import StateDir, earlier_databases, state_dir

log = logging.getLogger("swf.serve")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Under docker's and supervisord's default grace (10 s) before their SIGKILL.
STOP_WITHIN = 9.0
LISTENING = b"listening for namespace"  # the listener's line once subscribed
SERVER_READY_WITHIN = 180.0  # s; a server not answering by then is killed and started again


def serve(settings: Settings, config: Path, environ: Mapping[str, str] = os.environ) -> int:
    """Run until SIGTERM or SIGINT (0), or until something makes going on
    wrong (1, with the reason logged)."""
    state = state_dir(settings, environ)
    warn_of_lost_history(state, environ)
    supervisor = Supervisor(service_children(settings, config, state, environ))
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    api_url = environ.get("PREFECT_API_URL")
    ui = f"Prefect UI at {api_url or _own_server_url(settings)}"

    def announce() -> None:
        log.info(
            "serving namespace %s (%s); state in %s (%s), logs in %s",
            settings.transceiver.namespace,
            ui,
            state.path,
            state.chosen_by,
            state.logs,
        )

    supervisor.on_all_ready = announce
    code = 0
    try:
        supervisor.run(stopping)
        log.info("stopping (signal received)")
    except Fatal as exc:
        log.error("%s", exc)
        code = 1
    finally:
        supervisor.stop(STOP_WITHIN)
    log.info("stopped")
    return code


def warn_of_lost_history(state: StateDir, environ: Mapping[str, str]) -> None:
    """Say when the runs' history may be lost, or left behind."""
    if state.temporary():
        log.warning(
            "the state directory %s (%s) is under the temporary directory: a reboot "
            "or a cleaner may take the runs' history with it",
            state.path,
            state.chosen_by,
        )
    if environ.get("PREFECT_API_URL") or (state.prefect_home / "prefect.db").exists():
        return
    for earlier in earlier_databases(environ):
        log.warning(
            "an earlier version of serve kept its database in %s; this one starts a "
            "new one in %s. To keep the runs' history, stop serve and move %s (with "
            "its -wal and -shm files, if any) into %s",
            earlier,
            state.prefect_home,
            earlier.name,
            state.prefect_home,
        )


def service_children(
    settings: Settings, config: Path, state: StateDir, environ: Mapping[str, str]
) -> list[Child]:
    children: list[Child] = []
    api_url = environ.get("PREFECT_API_URL")
    if not api_url:
        server = PrefectServer(
            state.prefect_home,
            settings.prefect.server_port,
            logs=state.logs,
            another_port="set prefect.server_port to another port",
        )
        children.append(
            Child(
                "prefect-server",
                server.process,
                server.launch,
                server.ready,
                stop_phase=1,
                ready_within=SERVER_READY_WITHIN,
            )
        )
        api_url = server.api_url
    env = service_env(api_url, config)
    runner = runner_process(env, state.logs, PROJECT_ROOT)
    listener = listener_process(env, state.logs, PROJECT_ROOT)
    deployment = settings.prefect.deployment
    # All start at once: the runner and the listener wait for the server (its
    # start is mostly Python's imports, as theirs are: two cores do both
    # together), and an announcement that comes before the runner serves the
    # deployment waits, unacked, until it does.
    children.append(
        Child("runner", runner, runner.start, lambda: deployment_registered(api_url, deployment))
    )
    children.append(
        Child("listener", listener, listener.start, lambda: listener.logged_since_start(LISTENING))
    )
    return children


def _own_server_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prefect.server_port}"
