"""Serve the run deployment from this process (the runner).

    python -m deployments.serve [--config PATH]

``prefect.flow_runs`` says where the flow runs execute: ``in_process`` (the
default), each as a task of this process (deployments/in_process.py), or
``subprocess``, each as a subprocess of Prefect's runner (``flow.serve``; set
PREFECT_RUNNER_POLL_FREQUENCY=1 for a prompt start, the default polls every
10 s). Either way the runner also runs again the deployment's flow runs whose
process died, e.g. with an earlier runner (deployments/recovery.py).
prefect.yaml declares the same deployment for `prefect deploy` (a worker then
runs the flow runs, and nothing recovers orphans).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from datetime import timedelta

from prefect.settings import PREFECT_API_URL

from deployments.in_process import InProcessRunner, serve_in_process
from deployments.recovery import RunRecovery
from flows.run_lifecycle import run_lifecycle
from swf_panda_workers.adapters.idds_rest_client import IddsNotConfigured, check_rest_client
from swf_panda_workers.config.loading import CONFIG_ENV, config_path, load_settings
from swf_panda_workers.service.processes import healthy

log = logging.getLogger("swf.runner")

TAGS = ["swf-panda-workers"]
DESCRIPTION = "One flow run per data-taking run, started by the STOMP listener."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $SWF_PANDA_WORKERS_CONFIG)")
    args = parser.parse_args(argv)
    # Flow runs are subprocesses that load the configuration themselves.
    os.environ[CONFIG_ENV] = str(config_path(args.config).resolve())
    settings = load_settings()
    flow_name, _, deployment_name = settings.prefect.deployment.partition("/")
    if flow_name != run_lifecycle.name or not deployment_name:
        raise SystemExit(
            f"prefect.deployment must be '{run_lifecycle.name}/<name>', "
            f"not {settings.prefect.deployment!r}"
        )
    if settings.transceiver.mode == "rest":
        try:
            check_rest_client(settings)
        except IddsNotConfigured as exc:
            raise SystemExit(f"REST mode cannot reach iDDS: {exc}") from None
    # Prefect's logging setup shows warnings only; the recovery says what it does.
    logging.getLogger("swf").setLevel(logging.INFO)
    wait_for_server()
    horizon = timedelta(seconds=settings.timeouts.run_end)
    if settings.prefect.flow_runs == "in_process":
        runner = InProcessRunner(
            run_lifecycle, deployment_name, settings.prefect.runner_limit, TAGS, DESCRIPTION
        )
        # A run this process executes is alive, whatever the server says of it.
        RunRecovery(settings.prefect.deployment, horizon, runner.executing_ids).start()
        serve_in_process(runner)
    else:
        RunRecovery(settings.prefect.deployment, horizon).start()
        run_lifecycle.serve(
            name=deployment_name,
            limit=settings.prefect.runner_limit,
            tags=TAGS,
            description=DESCRIPTION,
        )


def wait_for_server(every: float = 0.2, say_every: float = 30.0) -> None:
    """Started beside its Prefect server (`serve` starts them together), the
    runner waits for the server to answer rather than fail at its first call."""
    api_url = PREFECT_API_URL.value()
    if not api_url:
        return  # no server named: Prefect runs an ephemeral one in this process
    waited = 0.0
    while not healthy(api_url):
        if waited % say_every < every:
            log.info("waiting for the Prefect server at %s", api_url)
        time.sleep(every)
        waited += every


if __name__ == "__main__":
    main()
