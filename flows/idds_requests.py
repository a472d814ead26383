"""A run's requests to iDDS as Prefect tasks: one task run per request, with
bounded retries of what a retry can fix, in either mode."""

import asyncio
from collections.abc import Callable
from typing import Any

from prefect import State, Task, task
from prefect.cache_policies import NO_CACHE

from swf_panda_workers.adapters.idds_bus import BusGateway
from swf_panda_workers.adapters.idds_rest import rest_gateway
from swf_panda_workers.adapters.stomp_bus import BusUnavailable
from swf_panda_workers.config import Settings
from swf_panda_workers.idds_gateway import Answer, IddsGateway, IddsRequestFailed
from swf_panda_workers.outbound import Sender


def gateway_for(settings: Settings, bus: Sender, dry_run: bool = False) -> IddsGateway:
    """The one configuration key ``transceiver.mode`` decides how iDDS is
    reached; a dry run reaches nothing: its requests are withheld, in the
    shape they take on the bus, whatever the mode."""
    if settings.transceiver.mode == "rest" and not dry_run:
        return rest_gateway(settings)
    return BusGateway(bus, settings)


async def worth_retrying(task: object, task_run: object, state: State[Any]) -> bool:
    """Retry iDDS failures and an unreachable broker; not our own refusals
    (an unsafe message) nor a missing configuration. Async: inside a running
    event loop ``state.result()`` is a coroutine and would raise nothing."""
    outcome = await state.aresult(raise_on_failure=False)
    return isinstance(outcome, IddsRequestFailed | BusUnavailable)


@task(name="idds", task_run_name="idds-{request}", cache_policy=NO_CACHE,
      retry_condition_fn=worth_retrying)
async def _ask(request: str, call: Callable[[], Answer | None]) -> Answer | None:
    return await asyncio.to_thread(call)


def ask_idds(settings: Settings) -> Task[..., Answer | None]:
    """``await ask_idds(settings)(request_name, call)``: one request, retried
    after each of ``idds.retry_delays``; the last failure fails the task with
    iDDS's answer in its message."""
    delays = list(settings.idds.retry_delays)
    return _ask.with_options(retries=len(delays), retry_delay_seconds=delays or 0)
