"""What a run flow is connected to: the bus it sends on, and its run's event
feed. Live, or for a dry run: the recorded history alone, and a bus that sends
nothing."""

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime

from prefect import get_run_logger

from swf_panda_workers.adapters.prefect_events.feed import RunFeed, follow_run, recorded_run
from swf_panda_workers.adapters.stomp_bus import connected_bus
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.dry_run import WithheldMessages
from swf_panda_workers.core.outbound import Sender


@asynccontextmanager
async def run_bus(settings: Settings, name: str, dry_run: bool) -> AsyncIterator[Sender]:
    if dry_run:
        yield WithheldMessages(get_run_logger())
        return
    async with connected_bus(settings.brokers, name=name) as bus:
        yield bus


def run_events(
    resource_id: str, since: datetime, dry_run: bool, exclude: tuple[str, ...] = ()
) -> AbstractAsyncContextManager[RunFeed]:
    if dry_run:
        return recorded_run(resource_id, since, exclude)
    return follow_run(resource_id, since, exclude=exclude)
