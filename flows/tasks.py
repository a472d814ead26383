"""Small Prefect tasks the run flows share: each one side effect, with its
retry policy in the decorator."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import State, task
from prefect.cache_policies import NO_CACHE

from swf_panda_workers.adapters.stomp_bus import BusUnavailable
from swf_panda_workers.core.outbound import Outgoing, Sender


async def bus_trouble(task: object, task_run: object, state: State[Any]) -> bool:
    """Retry only what a retry can fix: the broker being unreachable. Async:
    inside a running event loop ``state.result()`` is a coroutine."""
    return isinstance(await state.aresult(raise_on_failure=False), BusUnavailable)


@task(
    name="publish",
    task_run_name="publish-{message.msg_type}",
    retries=4,
    retry_delay_seconds=[1, 2, 5, 10],
    retry_condition_fn=bus_trouble,
    cache_policy=NO_CACHE,
)
async def publish(bus: Sender, message: Outgoing) -> None:
    """Send one message and wait for the broker's receipt. A retry after a lost
    receipt may send it twice: delivery to the bus is at least once."""
    await asyncio.to_thread(bus.send, message)
