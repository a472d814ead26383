"""Which failures the flows' tasks retry: decided from the failed state's
exception (real Prefect states; the conditions run inside the event loop, as
in the task engine)."""

from __future__ import annotations

import asyncio

import pytest
from prefect.states import Failed

from flows.idds_requests import worth_retrying
from flows.tasks import bus_trouble
from swf_panda_workers.adapters.idds_rest_client import IddsNotConfigured
from swf_panda_workers.adapters.stomp_bus import BusUnavailable
from swf_panda_workers.core.idds_gateway import IddsRequestFailed
from swf_panda_workers.core.outbound import UnsafeMessage


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (IddsRequestFailed("iDDS create_workflow_task failed: database is restarting"), True),
        (BusUnavailable("broker down"), True),
        (IddsNotConfigured("no iDDS host"), False),
        (UnsafeMessage("close without ids"), False),
        (ValueError("a bug"), False),
    ],
)
def test_idds_requests_retry_what_a_retry_can_fix(error: Exception, retried: bool) -> None:
    assert asyncio.run(worth_retrying(None, None, Failed(data=error))) is retried


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (BusUnavailable("broker down"), True),
        (IddsRequestFailed("not the bus's"), False),
        (ValueError("a bug"), False),
    ],
)
def test_publishing_retries_only_an_unreachable_broker(error: Exception, retried: bool) -> None:
    assert asyncio.run(bus_trouble(None, None, Failed(data=error))) is retried
