"""python -m listeners [--config PATH]: the STOMP listener alone (the container's
entrypoint). PREFECT_API_URL names the Prefect server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from prefect.settings import PREFECT_API_URL

from listeners.bus_listener import HealthSource, serve_listener
from listeners.status_server import status_endpoint
from swf_panda_workers.adapters.swf_monitor import monitor_heartbeats
from swf_panda_workers.config.loading import load_settings
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.service.processes import healthy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m listeners", description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $SWF_PANDA_WORKERS_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per request to Prefect would bury the one line per message.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = load_settings(args.config)
    asyncio.run(_run(settings))


async def _run(settings: Settings) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    health = HealthSource()  # read by the health check, the metrics and the monitor
    with status_endpoint(settings, health) as metrics:
        async with monitor_heartbeats(settings, health, stopping):
            await _server_answering(stopping)
            await serve_listener(settings, stopping, health, metrics)


async def _server_answering(stopping: asyncio.Event, every: float = 0.2) -> None:
    """Started beside its Prefect server (`serve` starts them together), the
    listener waits for it quietly at first; serve_listener retries, loudly,
    if it goes away later."""
    api_url = PREFECT_API_URL.value()
    while api_url and not stopping.is_set() and not await asyncio.to_thread(healthy, api_url):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), every)


if __name__ == "__main__":
    main()
