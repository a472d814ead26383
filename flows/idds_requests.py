"""A run's requests to iDDS as Prefect tasks: one task run per request, with
bounded retries of what a retry can fix, in either mode."""

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

from prefect import State, Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.run_view import RunView
from swf_panda_workers.adapters.idds_bus import BusGateway
from swf_panda_workers.adapters.idds_rest_client import rest_gateway
from swf_panda_workers.adapters.stomp_bus import BusUnavailable
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.effects import CloseSent
from swf_panda_workers.core.idds_gateway import Answer, IddsGateway, IddsRequestFailed
from swf_panda_workers.core.messages import WorkflowIds
from swf_panda_workers.core.outbound import Sender
from swf_panda_workers.core.timestamps import utc_now


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


@task(
    name="idds",
    task_run_name="idds-{request}",
    cache_policy=NO_CACHE,
    retry_condition_fn=worth_retrying,
)
async def _ask(request: str, call: Callable[[], Answer | None]) -> Answer | None:
    return await asyncio.to_thread(call)


# The task ``ask_idds`` gives: async, so calling it makes a coroutine.
AskIdds = Task[[str, Callable[[], Answer | None]], Coroutine[Any, Any, Answer | None]]


def ask_idds(settings: Settings) -> AskIdds:
    """``await ask_idds(settings)(request_name, call)``: one request, retried
    after each of ``idds.retry_delays``; the last failure fails the task with
    iDDS's answer in its message."""
    delays = list(settings.idds.retry_delays)
    return _ask.with_options(retries=len(delays), retry_delay_seconds=delays or 0)


async def close_extra_tasks(
    view: RunView, idds: IddsGateway, settings: Settings, workflow_name: str
) -> None:
    """Close, at once, the tasks iDDS made for the run besides its first."""
    await _close(view, idds, settings, workflow_name, view.state.open_extra_tasks)


async def close_open_tasks(
    view: RunView, idds: IddsGateway, settings: Settings, workflow_name: str
) -> None:
    """Close every task of the run not yet asked to close; when iDDS reported
    none and nothing was closed yet, the run's task by its run id (on the bus
    iDDS looks it up so; over REST it is looked up by its workflow name)."""
    state = view.state
    targets: list[WorkflowIds | None] = list(state.open_tasks)
    if state.ids is None and not state.closes_sent:
        targets.append(None)
    await _close(view, idds, settings, workflow_name, targets)


async def _close(
    view: RunView,
    idds: IddsGateway,
    settings: Settings,
    workflow_name: str,
    targets: Sequence[WorkflowIds | None],
) -> None:
    run_id = view.state.run_id
    for ids in targets:
        answer = await ask_idds(settings)(
            "close_workflow_task",
            partial(idds.close_workflow_task, run_id, ids, workflow_name, utc_now()),
        )
        await view.record(CloseSent(ids=ids), answer)
        get_run_logger().info(
            "close_workflow_task sent for run %s: %s",
            run_id,
            "by run id"
            if ids is None
            else f"request {ids.request_id}, transform "
            f"{ids.transform_id}{'' if ids == view.state.ids else ' (an extra task)'}",
        )
