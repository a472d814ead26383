"""Flow runs executed inside the runner process, one asyncio task each
(``prefect.flow_runs: in_process``).

Prefect's runner (``flow.serve``) starts one subprocess per flow run, about
90-100 MB each. This runner registers the same deployment as ``flow.serve``
(same name, tags and description, no work pool, so ``run_deployment``, the
listener's idempotency key and ``prefect deployment run`` work unchanged),
and itself:

- polls every POLL_EVERY seconds for the deployment's Scheduled flow runs that
  are due (``runs_to_take``);
- claims each by proposing Pending: Prefect's orchestration refuses the
  proposal when another runner took the run first (PreventPendingTransitions),
  and the run is then left to it;
- runs the claimed flow run with Prefect's engine (``run_flow``, as
  ``prefect flow-run execute`` does in its subprocess), as a task of its event
  loop, at most ``prefect.runner_limit`` at once. The engine does here what it
  does in a subprocess: Running, the flow's ``retries`` (AwaitingRetry, then
  Running again, in the same task), the final state.

One run failing or crashing leaves the others alone: its task ends, with the
state the engine reported. A task that ends without a final state (the
engine could not report one, say the server was away) is reported Crashed,
again until the server takes it, and the recovery (deployments/recovery.py)
reschedules it. A run cancelled from Prefect (Cancelling) has its task
cancelled and is then marked Cancelled; the recovery never reruns it.

All runs claim the runner's own process (``claim_run``: host, boot id, pid,
start time), so when the runner dies they are all orphans, and a restarted
runner's recovery reschedules every one of them.

SIGTERM or SIGINT: the runner stops taking runs and exits at once. Its runs in
flight are neither cancelled nor marked: they stay Running, claimed by a
process that is then gone, which is what the recovery of the next start looks
for. Cancelling them would end them for good (cancelled runs are not
recovered); marking them Crashed or rescheduling them here would let another
runner start them while this process still executes them; waiting for them
could take the length of a run (days).

What is shared, and so not isolated as a subprocess would be: memory, the
event loop (a flow that blocks it stalls every run; the flows do their
blocking work in threads) and the process itself (a run that brings it down,
e.g. by exhausting memory, brings down all its runs, which the next start
then recovers). The engine runs in a thread of its own so that Prefect's
per-run SIGTERM handler (installed only from the main thread) is never
installed: the signals stay the runner's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from prefect import Flow
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.logging.handlers import APILogWorker
from prefect.states import Cancelled, Crashed, Pending, State

from swf_panda_workers.adapters.prefect_runs import claim_run
from swf_panda_workers.core.timestamps import utc_now

log = logging.getLogger("swf.runner")

POLL_EVERY = 0.5  # s between two looks for due runs: a run starts within about this
CANCEL_CHECK_EVERY = 5.0  # s between two looks for runs cancelled from Prefect
REPORT_RETRY_EVERY = 5.0  # s between two attempts to report a run's end the server refused
STOP_GRACE = 5.0  # s a stopping runner waits for a claim in progress to be started
FLUSH_TIMEOUT = 3.0  # s to hand Prefect the last logs, then events, before exiting
# Threads for the flows' blocking calls (bus sends, iDDS requests, connects):
# a few per run, or runs would queue for asyncio's default handful.
THREADS_PER_RUN = 4


def runs_to_take(
    scheduled: Iterable[FlowRun], executing: Collection[UUID], free: int, now: datetime
) -> list[FlowRun]:
    """The Scheduled runs to claim now: due, not executing here already (a run
    of this runner waiting out its flow's retry delay is Scheduled too, and
    stays this runner's), earliest first, no more than ``free``."""
    due = [
        run
        for run in scheduled
        if run.id not in executing
        and run.state is not None
        and run.state.type == StateType.SCHEDULED
        and (run.next_scheduled_start_time is None or run.next_scheduled_start_time <= now)
    ]
    due.sort(key=lambda run: run.next_scheduled_start_time or now)
    return due[: max(free, 0)]


def ends_with(current: State[Any] | None, end: StateType) -> bool:
    """Whether a run whose task is over, in state ``current``, is to be marked
    ``end`` (CRASHED: its engine stopped; CANCELLED: it was cancelled from
    Prefect). Not a run with a final state, which the engine reported, except
    the Crashed the engine reports for a task cancelled on request; not a run
    Scheduled again (rescheduled meanwhile)."""
    if current is None or current.type == StateType.SCHEDULED:
        return False
    if current.is_final():
        return end == StateType.CANCELLED and current.type == StateType.CRASHED
    return True


def server_away(exc: BaseException) -> bool:
    """The server is unreachable or failing: looking again later may cure it.
    A 4xx (a refused auth string, say) will not, and ends the runner."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


class InProcessRunner:
    """Serves one deployment of ``flow``, executing its runs in this process."""

    def __init__(
        self,
        flow: Flow[..., Any],
        deployment_name: str,
        limit: int,
        tags: list[str],
        description: str,
    ) -> None:
        if not flow.isasync:
            # run_flow would run a sync flow there and then, blocking every run.
            raise TypeError(f"flow {flow.name} is not async: it cannot run in this process")
        self.flow = flow
        self.deployment_name = deployment_name
        self.limit = limit
        self.tags = tags
        self.description = description
        self._executing: dict[UUID, asyncio.Task[None]] = {}
        # The same runs, readable from other threads (the recovery's).
        self._executing_ids: frozenset[UUID] = frozenset()
        self._cancelling: set[UUID] = set()  # cancelled from Prefect: end them Cancelled
        self._cancel_taken: set[UUID] = set()  # their engine has ended on the cancel
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polling_ended = threading.Event()  # no claim can be in progress
        self.failure: BaseException | None = None

    # --- the runner's thread -------------------------------------------------

    def run(self) -> None:
        """Serve until stopped; records what ended it in ``failure``."""
        try:
            asyncio.run(self.serve())
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self._polling_ended.set()

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_default_executor(
            ThreadPoolExecutor(
                max_workers=THREADS_PER_RUN * self.limit, thread_name_prefix="swf-flow-io"
            )
        )
        async with get_client() as client:
            deployment_id = await self.register()
            log.info(
                "serving %s/%s: flow runs in this process (pid %d), at most %d at once",
                self.flow.name,
                self.deployment_name,
                os.getpid(),
                self.limit,
            )
            await self.poll(client, deployment_id)
        self._polling_ended.set()
        # The runs go on until the process exits; returning would make
        # asyncio.run cancel them, and their engines would report them Crashed.
        await asyncio.Future()

    async def register(self) -> UUID:
        """The deployment as ``flow.serve`` makes it: no work pool, so runs
        of it are for a runner that polls for them."""
        deployment = await self.flow.ato_deployment(
            name=self.deployment_name, tags=self.tags, description=self.description
        )
        deployment.work_pool_name = None
        deployment.work_queue_name = None
        return await deployment.aapply()

    async def poll(self, client: PrefectClient, deployment_id: UUID) -> None:
        loop = asyncio.get_running_loop()
        cancels_checked = loop.time()
        while not self._stopping.is_set():
            try:
                await self.take_due_runs(client, deployment_id)
                if self._executing and loop.time() - cancels_checked > CANCEL_CHECK_EVERY:
                    cancels_checked = loop.time()
                    await self.cancel_requested(client)
            except httpx.HTTPError as exc:
                if not server_away(exc):
                    raise
                log.warning("cannot look for flow runs now: %s", exc)
            with suppress(TimeoutError):  # the poll's pace, unless stopped meanwhile
                await asyncio.wait_for(self._stopping.wait(), POLL_EVERY)

    async def take_due_runs(self, client: PrefectClient, deployment_id: UUID) -> None:
        now = utc_now()
        scheduled = await client.get_scheduled_flow_runs_for_deployments(
            deployment_ids=[deployment_id], scheduled_before=now
        )
        due = runs_to_take(
            scheduled, self._executing.keys(), self.limit - len(self._executing), now
        )
        # Claimed together: on SQLite each claim may wait for the database a
        # second or more when runs start together, and one after the other
        # twenty runs took half a minute to start.
        claimed = await asyncio.gather(*(self.claim(client, flow_run) for flow_run in due))
        for flow_run, taken in zip(due, claimed, strict=True):
            if taken:
                self.start(flow_run)

    async def claim(self, client: PrefectClient, flow_run: FlowRun) -> bool:
        """Scheduled -> Pending, refused by the server if another runner took it."""
        result: OrchestrationResult[Any] = await client.set_flow_run_state(flow_run.id, Pending())
        if result.status != SetStateStatus.ACCEPT:
            log.info(
                "flow run %s (%s) not taken: %s %s",
                flow_run.name,
                flow_run.id,
                result.status.value,
                result.details,
            )
            return False
        return True

    async def record_process(self, flow_run_id: UUID, attempt: int) -> None:
        """This process as the one that runs the attempt about to start (the
        recovery's proof of life), before the engine starts it: a runner
        killed a moment later leaves a run whose process is provably gone,
        rescheduled at once rather than after UNCLAIMED_GRACE."""
        try:
            async with get_client() as client:
                await claim_run(client, flow_run_id, attempt)
        except httpx.HTTPError as exc:
            if not server_away(exc):
                raise
            # The flow records its process itself too, as soon as it starts.
            log.warning(
                "flow run %s: this process not recorded as its own yet: %s", flow_run_id, exc
            )

    def start(self, flow_run: FlowRun) -> None:
        # The attempt Running will begin: run_count counts it from then on.
        task = asyncio.create_task(
            self.execute(flow_run.id, flow_run.run_count + 1), name=f"flow-run-{flow_run.name}"
        )
        self._executing[flow_run.id] = task
        self._executing_ids = frozenset(self._executing)
        task.add_done_callback(lambda _: self._forget(flow_run.id))
        log.info(
            "flow run %s (%s) started; %d running", flow_run.name, flow_run.id, len(self._executing)
        )

    def _forget(self, flow_run_id: UUID) -> None:
        self._executing.pop(flow_run_id, None)
        self._executing_ids = frozenset(self._executing)
        self._cancelling.discard(flow_run_id)
        self._cancel_taken.discard(flow_run_id)

    def executing_ids(self) -> frozenset[UUID]:
        """The flow runs this process executes now; safe from any thread."""
        return self._executing_ids

    # --- one flow run ----------------------------------------------------------

    async def execute(self, flow_run_id: UUID, attempt: int) -> None:
        """Run the flow run to its end; whatever happens stays with this run."""
        try:
            await self.record_process(flow_run_id, attempt)
            await self.run_engine(flow_run_id)
        except asyncio.CancelledError:
            if flow_run_id not in self._cancelling:
                raise
            self._cancel_taken.add(flow_run_id)
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # the cancel asked for is done; what follows must not see it
            await self.report_end(flow_run_id, Cancelled(message="Cancelled as asked"))
            return
        except BaseException:
            # Not re-raised: a task's exception would go nowhere, and SystemExit
            # would stop the loop of every run. The run is reported below.
            log.exception("flow run %s: the engine stopped", flow_run_id)
        await self.report_end(
            flow_run_id,
            Crashed(message="The flow run's engine stopped before reporting a final state"),
        )

    async def run_engine(self, flow_run_id: UUID) -> None:
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)  # as claimed: Pending
        # For an async flow, run_flow returns the engine's coroutine, with the
        # parameters from the flow run (as `prefect flow-run execute` has it).
        engine = run_flow(self.flow, flow_run=flow_run, return_type="state")
        assert inspect.isawaitable(engine)
        state = await engine
        log.info("flow run %s (%s) finished: %s", flow_run.name, flow_run_id, state)

    async def report_end(self, flow_run_id: UUID, end: State[Any]) -> None:
        """Set ``end`` (Crashed, Cancelled) when ``ends_with`` says so; retried
        while the server is away, since a run left Running under this live
        process would never be recovered."""
        while True:
            try:
                async with get_client() as client:
                    current = (await client.read_flow_run(flow_run_id)).state
                    if ends_with(current, end.type):
                        # Forced: this runner claimed the run and its task is over.
                        await client.set_flow_run_state(flow_run_id, end, force=True)
                        log.warning("flow run %s marked %s: %s", flow_run_id, end.name, end.message)
                    return
            except ObjectNotFound:
                return  # deleted meanwhile: nothing left to end
            except httpx.HTTPError as exc:
                if not server_away(exc):
                    # Refused for good (4xx): retrying cannot help, and this
                    # task ends here; the log is what is left of it.
                    log.error("flow run %s cannot be marked %s: %s", flow_run_id, end.name, exc)
                    return
                log.warning("cannot mark flow run %s %s yet: %s", flow_run_id, end.name, exc)
            await asyncio.sleep(REPORT_RETRY_EVERY)

    # --- cancellation and stopping ---------------------------------------------

    async def cancel_requested(self, client: PrefectClient) -> None:
        """Cancel the tasks of the runs Prefect asks to cancel (Cancelling)."""
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(self._executing)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        for flow_run in runs:
            task = self._executing.get(flow_run.id)
            if task is None or flow_run.id in self._cancel_taken:
                continue
            if flow_run.id not in self._cancelling:
                log.warning("flow run %s (%s) cancelled from Prefect", flow_run.name, flow_run.id)
                self._cancelling.add(flow_run.id)
            # Again at every look until the engine ends on it: code that
            # swallows a cancel (asyncio.wait_for before Python 3.12, when
            # the awaited result comes with it) would leave the run
            # Cancelling for good.
            task.cancel()

    def stop(self, timeout: float = STOP_GRACE) -> list[str]:
        """From another thread: take no more runs; returns the runs in flight
        once no claim is in progress (or after ``timeout``)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._polling_ended.wait(timeout)
        return [task.get_name() for task in list(self._executing.values())]


def serve_in_process(runner: InProcessRunner) -> None:
    """Run ``runner`` in a thread of its own until SIGTERM or SIGINT, then
    exit this process, leaving the runs in flight to the next start's recovery."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=runner.run, name="swf-flow-runs", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    if not thread.is_alive():
        raise SystemExit(f"the runner stopped: {runner.failure!r}")
    left = runner.stop()
    if left:
        log.warning(
            "stopping with %d flow runs in flight, left Running for the recovery "
            "of the next start: %s",
            len(left),
            ", ".join(left),
        )
    else:
        log.info("stopping; no flow run in flight")
    # The last logs and events of the runs; bounded, the server may be away.
    APILogWorker.drain_all(timeout=FLUSH_TIMEOUT)
    EventsWorker.drain_all(timeout=FLUSH_TIMEOUT)
    logging.shutdown()
    # Not sys.exit: the interpreter would wait for the flows' threads (a bus
    # send or an iDDS request in flight) and for Prefect's services, without
    # bound while the server is away.
    os._exit(0)
