"""The runner runs again the flow runs whose process died (orphans).

What Prefect 3.8.8 does by itself when a flow-run process dies:

- The process dies alone (the OOM killer, kill -9 of the subprocess): the
  runner sees it exit non-zero and marks the flow run Crashed. The flow's
  ``retries`` do not apply: they are the engine's, in the process that died.
- The runner dies with it (SIGKILL of the runner's process group, the machine
  or the container going away): nobody reports anything and the flow run
  stays Running (or Pending) for ever. A restarted runner only polls for
  Scheduled runs, so it never looks at it.
- Prefect's documented answer to the second case ("zombie flows") is flow-run
  heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, at least 30 s) and an
  automation whose proactive trigger marks a run Crashed once its heartbeats
  stop. That still runs nothing again, and its verdict rests on missing
  events: a Prefect server outage longer than the window (events are not
  received while it is down) marks live runs Crashed, and a reschedule
  action on that verdict would run a live run twice.

What is done here instead, with proof of death rather than absence of news:
every attempt of the run flow first records which process executes it (the
flow-run label ``swf.process``: host, boot id, pid, the process's start time,
attempt; see ``RunProcess``). The runner process, at start-up and then every
RECOVERY_EVERY seconds, reads its deployment's top-level flow runs that are
unfinished or Crashed and reschedules (``AwaitingRetry``, due now) those
whose process is known to be gone:

- Crashed: the runner saw its process die (but not a run that crashed while
  being cancelled: the in-process runner cancels a run's task, its engine
  reports Crashed, and the runner then marks it Cancelled);
- Running, claimed by its current attempt on this host, and that process no
  longer exists (or is a zombie, or its pid belongs to a later process);
- Pending, or Running but never claimed by its current attempt, for longer
  than UNCLAIMED_GRACE (a runner died between taking the run and starting
  its process).

The runner then picks the run up like any scheduled run. The run flow
rebuilds the run's state from its stored events and skips the effects its
journal says are done (flows/run_view.py), so a rerun repeats nothing already
sent. A server outage changes nothing here: a run is only rescheduled on
what is read from the server and from this machine's process table.

Limits: a run claimed on another host is left alone (its process cannot be
checked from here), so serve a deployment from one host, or from runners with
stable host names. A run is rescheduled at most MAX_RECOVERIES times; after
that it is left Crashed, with the reason, for an operator. Runs that started
more than the run's ``timeouts.run_end`` ago are not looked at.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry, Crashed

from swf_panda_workers.adapters.prefect_runs import PROCESS_LABEL, RunProcess
from swf_panda_workers.core.timestamps import utc_now

log = logging.getLogger("swf.recovery")

RECOVERY_EVERY = 10.0  # s between two looks at the deployment's runs
UNCLAIMED_GRACE = 120.0  # s a run may stay Pending, or Running unclaimed, before it is an orphan
MAX_RECOVERIES = 3
RECOVERIES_LABEL = "swf.recoveries"  # flow-run label: how often it was rescheduled here
_LOOKED_AT = [StateType.RUNNING, StateType.PENDING, StateType.CRASHED]


def orphaned(run: FlowRun, now: datetime) -> str | None:
    """Why the run has no live process, or None when it may have one."""
    state = run.state
    if state is None:
        return None
    if state.type == StateType.CRASHED:
        return f"it crashed ({state.message or 'no reason given'})"
    process = RunProcess.from_label(run.labels.get(PROCESS_LABEL))
    if state.type == StateType.RUNNING and process and process.attempt == run.run_count:
        if process.alive() is False:
            return f"its process {process.pid} on {process.host} is gone"
        return None  # alive, or on another host: nothing to go on
    waited = (now - state.timestamp).total_seconds()
    if waited > UNCLAIMED_GRACE:
        return f"no process took it up in {waited:.0f}s ({state.name})"
    return None


def crash_ends_a_cancel(states: list[State]) -> bool:
    """Whether a run's states (oldest first) end in a crash that followed a
    request to cancel it (Cancelling): such a run is never to run again."""
    return (
        len(states) >= 2
        and states[-1].type == StateType.CRASHED
        and states[-2].type == StateType.CANCELLING
    )


async def recover_orphans(
    client: PrefectClient,
    deployment_id: UUID,
    horizon: timedelta,
    executing_here: Collection[UUID] = (),
) -> list[FlowRun]:
    """One look at the deployment's runs: reschedule the orphans; returns them.
    ``executing_here``: runs this very process executes (in-process runner),
    never orphans, whatever their labels say (a claim still on its way, say)."""
    now = utc_now()
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),  # not sub-flows
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_LOOKED_AT)),
            expected_start_time=FlowRunFilterExpectedStartTime(after_=now - horizon),
        )
    )
    rescheduled = []
    for run in runs:
        if run.id in executing_here:
            continue
        reason = orphaned(run, now)
        if reason is not None and await reschedule(client, run, reason):
            rescheduled.append(run)
    return rescheduled


async def reschedule(client: PrefectClient, run: FlowRun, reason: str) -> bool:
    """Schedule the run again, now, unless it was rescheduled MAX_RECOVERIES
    times already (then it is left Crashed) or was being cancelled."""
    assert run.state is not None
    done = int(run.labels.get(RECOVERIES_LABEL) or 0)
    if done >= MAX_RECOVERIES:
        if run.state.type != StateType.CRASHED:
            message = f"{reason}; rescheduled {done} times already, so left for an operator"
            log.error("flow run %s (%s): %s", run.name, run.id, message)
            await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        return False
    if run.state.type == StateType.CRASHED and crash_ends_a_cancel(
        await client.read_flow_run_states(run.id)
    ):
        return False
    await client.update_flow_run_labels(run.id, {RECOVERIES_LABEL: done + 1})
    # Forced: the runner that would have reported this run's end is gone,
    # and no rule of the server knows better.
    result: OrchestrationResult[Any] = await client.set_flow_run_state(
        run.id,
        AwaitingRetry(
            scheduled_time=utc_now(),
            message=f"Rescheduled by the runner ({done + 1} of {MAX_RECOVERIES}): {reason}",
        ),
        force=True,
    )
    if result.status != SetStateStatus.ACCEPT:
        log.error(
            "flow run %s (%s) could not be rescheduled: %s %s",
            run.name,
            run.id,
            result.status.value,
            result.details,
        )
        return False
    log.warning("flow run %s (%s) rescheduled: %s", run.name, run.id, reason)
    return True


class RunRecovery:
    """Looks for orphans of one deployment from a thread of the runner
    process, at start-up and then every RECOVERY_EVERY seconds."""

    def __init__(
        self,
        deployment_name: str,
        horizon: timedelta,
        executing_here: Callable[[], Collection[UUID]] = frozenset,
    ) -> None:
        self.deployment_name = deployment_name
        self.horizon = horizon
        self.executing_here = executing_here

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="swf-run-recovery", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            asyncio.run(self.run_forever())
        except BaseException:
            # The runner goes on serving, but recovers nothing more: say so loudly.
            log.critical(
                "recovery of orphaned runs of %s stopped", self.deployment_name, exc_info=True
            )
            raise

    async def run_forever(self) -> None:
        async with get_client() as client:
            deployment_id = await self._deployment_id(client)
            log.info(
                "recovering orphaned runs of %s every %gs", self.deployment_name, RECOVERY_EVERY
            )
            while True:
                try:
                    await recover_orphans(
                        client, deployment_id, self.horizon, self.executing_here()
                    )
                except httpx.TransportError as exc:  # Prefect down: look again later
                    log.warning("cannot look for orphaned runs now: %s", exc)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code < 500:
                        raise
                    log.warning("cannot look for orphaned runs now: %s", exc)
                await asyncio.sleep(RECOVERY_EVERY)

    async def _deployment_id(self, client: PrefectClient) -> UUID:
        """The deployment's id, once the runner has registered it."""
        while True:
            try:
                return (await client.read_deployment_by_name(self.deployment_name)).id
            except (ObjectNotFound, httpx.TransportError) as exc:
                log.info("deployment %s not readable yet (%s)", self.deployment_name, exc)
                await asyncio.sleep(1.0)
