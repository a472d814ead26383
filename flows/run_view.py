"""A run as its flow sees it: the folded state of the run's event feed, and the
place where the flow records what it did.

In a dry run the feed is a recorded run's stored history: what the run
received is replayed, what its flow did then (the journaled effects) is left
out, and what the dry run does is applied here only, never journaled."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from uuid import UUID

from prefect import get_run_logger
from prefect.events import Event
from prefect.runtime import flow_run

from swf_panda_workers.adapters.prefect_events.feed import RunFeed
from swf_panda_workers.adapters.prefect_events.journal import emit, until_stored
from swf_panda_workers.adapters.prefect_events.schema import answer_event, decode, effect_event
from swf_panda_workers.core.adjustment_journal import AdjustmentJournal
from swf_panda_workers.core.effects import EFFECT_TYPES, Effect
from swf_panda_workers.core.idds_gateway import Answer
from swf_panda_workers.core.log_lines import (
    STREAM_INPUTS,
    STREAM_SUMMARY_EVERY,
    StreamSummary,
    input_line,
)
from swf_panda_workers.core.messages import Message
from swf_panda_workers.core.run_progress import RunProgress
from swf_panda_workers.core.run_state import RunState, apply
from swf_panda_workers.core.timestamps import plain_utc, utc_now


class RunView:
    def __init__(
        self, feed: RunFeed, state: RunState, namespace: str, dry_run: bool = False
    ) -> None:
        self._feed = feed
        self._namespace = namespace
        self.dry_run = dry_run
        self.state = state
        self._clock: datetime | None = None  # when the last input applied arrived
        self._stream = StreamSummary()
        self._stream_since = time.monotonic()
        self.progress: RunProgress | None = None  # reported stalls (flows/progress_watch.py)

    def journaled_adjustments(self) -> AdjustmentJournal:
        """The adjustments an earlier attempt journaled, as the stored
        history holds them (a dry run leaves the recorded flow's journal out)."""
        if self.dry_run:
            return AdjustmentJournal()
        return AdjustmentJournal.of(map(decode, self._feed.backlog()))

    def clock(self) -> datetime:
        """Now: in a dry run, on the recorded run's clock (when its last input
        arrived), which the policy's cooldown and ramp-up run on."""
        if self.dry_run and self._clock is not None:
            return self._clock
        return utc_now()

    @property
    def replaying(self) -> bool:
        """True while the inputs come from the stored history."""
        return self._feed.replaying

    @property
    def exhausted(self) -> bool:
        """True once a dry run has read the whole recorded history."""
        return self._feed.exhausted

    async def next_input(self, timeout: float) -> Message | Effect | None:
        """Apply the next event to the state and return what it carried;
        None when none came within ``timeout``."""
        while True:
            event = await self._feed.next(timeout)
            if event is None:
                return None
            item = decode(event)
            if item is None:
                continue  # unreadable (decode logged why): not an input
            if self.dry_run and isinstance(item, EFFECT_TYPES):
                continue  # what the recorded run's flow did: the dry run decides afresh
            self._clock = plain_utc(event.occurred)
            self.state = apply(item, self.state, self._clock)
            self._log(item)
            self._moved()
            return item

    def waits_for(self, what: str, expected: bool = True) -> None:
        """What the flow waits for from now on (see RunProgress)."""
        if self.progress is not None:
            self._say_moving(self.progress.waits_for(what, time.monotonic(), expected))

    def _moved(self) -> None:
        if self.progress is not None:
            self._say_moving(self.progress.moved(time.monotonic()))

    def _say_moving(self, stalled: float | None) -> None:
        if stalled is not None:
            get_run_logger().info(
                "run_id=%s moves again after %.0fs without progress", self.state.run_id, stalled
            )

    def _log(self, item: Message | Effect) -> None:
        logger = get_run_logger()
        if not isinstance(item, STREAM_INPUTS):
            logger.info(input_line(item, self.state.run_id))
            return
        if logger.isEnabledFor(logging.DEBUG):  # hundreds a second: built only when shown
            logger.debug(input_line(item, self.state.run_id))
        self._stream.add(item)
        now = time.monotonic()
        if now - self._stream_since >= STREAM_SUMMARY_EVERY:
            logger.info(self._stream.line(self.state.run_id, now - self._stream_since))
            self._stream, self._stream_since = StreamSummary(), now

    async def catch_up(self) -> RunState:
        """Apply everything already stored."""
        while self.replaying:
            await self.next_input(timeout=0)
        return self.state

    async def settle(self) -> RunState:
        """Apply everything stored before the feed opened, and all arrived
        since: once done, the state holds every input the run had when its
        feed opened, even one stored late (see ``RunFeed.settled``)."""
        await self._feed.settled()
        return await self.drain()

    async def drain(self) -> RunState:
        """Apply everything stored or already arrived, waiting for nothing."""
        while await self.next_input(timeout=0) is not None:
            pass
        return self.state

    async def until(
        self,
        done: Callable[[RunState], bool],
        timeout: float,
        after_each: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Follow the feed until ``done(state)``; False if ``timeout`` passes
        first. ``after_each``: what to do after each input applied."""
        loop_deadline = utc_now() + timedelta(seconds=timeout)
        while not done(self.state):
            left = (loop_deadline - utc_now()).total_seconds()
            if left <= 0 or self.exhausted:
                return False
            if await self.next_input(timeout=left) is not None and after_each is not None:
                await after_each()
        return True

    async def record(self, effect: Effect, answer: Answer | None = None) -> None:
        """Journal an effect the flow performed, and iDDS's answer when the
        request returned one (REST mode), and apply them at once. The journal
        is what stops a retried flow run from repeating the effect, so this
        returns only once the server has stored it: a flow-run process killed
        after that is never retried into doing the effect again. A dry run
        journals nothing: the recorded run's history stays as it was."""
        if self.dry_run:
            self.state = apply(effect, self.state, self.clock())
            return
        events = [
            self._journal(
                effect, effect_event(effect, self._namespace, self.state.run_id, _flow_run_id())
            )
        ]
        if answer is not None:
            events.append(
                self._journal(answer, answer_event(answer, self._namespace, _flow_run_id()))
            )
        progress = self.progress
        waited = (progress.waiting_for, progress.expected) if progress else None
        self.waits_for(f"Prefect to store the journal entry of {effect.kind}")
        await until_stored(events)
        if waited is not None:
            self.waits_for(*waited)

    def _journal(self, item: Effect | Answer, event: Event) -> Event:
        self._feed.mark_seen(event)
        emit(event)
        self.state = apply(item, self.state, plain_utc(event.occurred))
        return event


def _flow_run_id() -> UUID | None:
    value = flow_run.id
    return UUID(value) if value else None
