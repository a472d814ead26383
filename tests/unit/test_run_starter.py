"""RunStarter: a missing run deployment is DeploymentMissing (waited out by
the listener), and the deployment is looked up again afterwards."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

from swf_panda_workers.adapters import prefect_runs
from swf_panda_workers.adapters.prefect_runs import (
    QUICK_RETRIES,
    DeploymentMissing,
    RunStarter,
    quickly_retried,
)
from swf_panda_workers.core.messages import RunImminent, parse_message

RUN = parse_message({"msg_type": "run_imminent", "run_id": "5", "content": {}})


class Client:
    """Prefect's client as far as RunStarter uses it: the deployment appears
    after ``missing_reads`` reads; creating may answer ``create_status``."""

    def __init__(self, missing_reads: int = 0, create_status: int | None = None) -> None:
        self.missing_reads = missing_reads
        self.create_status = create_status
        self.reads = 0

    async def read_deployment_by_name(self, name: str) -> Any:
        self.reads += 1
        if self.reads <= self.missing_reads:
            raise ObjectNotFound(http_exc=Exception("404"))
        return SimpleNamespace(id=uuid.uuid4())

    async def create_flow_run_from_deployment(self, deployment_id: uuid.UUID, **_: Any) -> Any:
        if self.create_status is not None:
            request = httpx.Request("POST", "http://prefect/api/deployments/x/create_flow_run")
            response = httpx.Response(self.create_status, request=request)
            raise httpx.HTTPStatusError("no", request=request, response=response)
        return SimpleNamespace(id=uuid.uuid4())


def start(client: Client) -> uuid.UUID:
    assert isinstance(RUN, RunImminent)
    starter = RunStarter(client, "swf-run/panda-workers")  # type: ignore[arg-type]
    return asyncio.run(starter.start(RUN, "ns", {}, datetime.now(UTC)))


def test_a_deployment_not_there_yet_is_deployment_missing_then_found() -> None:
    client = Client(missing_reads=1)
    assert isinstance(RUN, RunImminent)
    starter = RunStarter(client, "swf-run/panda-workers")  # type: ignore[arg-type]
    with pytest.raises(DeploymentMissing, match="is the runner serving it"):
        asyncio.run(starter.start(RUN, "ns", {}, datetime.now(UTC)))
    assert isinstance(asyncio.run(starter.start(RUN, "ns", {}, datetime.now(UTC))), uuid.UUID)
    assert client.reads == 2


def test_a_deleted_deployment_is_deployment_missing_and_looked_up_again() -> None:
    client = Client(create_status=404)
    assert isinstance(RUN, RunImminent)
    starter = RunStarter(client, "swf-run/panda-workers")  # type: ignore[arg-type]
    with pytest.raises(DeploymentMissing):
        asyncio.run(starter.start(RUN, "ns", {}, datetime.now(UTC)))
    client.create_status = None  # deployed again, under a new id
    asyncio.run(starter.start(RUN, "ns", {}, datetime.now(UTC)))
    assert client.reads == 2


def test_other_refusals_stay_what_they_are() -> None:
    with pytest.raises(httpx.HTTPStatusError):
        start(Client(create_status=422))


def refusal(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect/api/flow_runs/")
    return httpx.HTTPStatusError(
        "no", request=request, response=httpx.Response(status, request=request)
    )


def test_a_locked_database_is_retried_at_once_without_the_client_s_own_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SQLite's "database is locked" comes back as a 503: tried again within
    # tenths of a second, not after Prefect's client's 2, 4, 8... seconds.
    answers: list[int | None] = [503, 503, None]
    retries_seen: list[int] = []

    async def call() -> str:
        retries_seen.append(PREFECT_CLIENT_MAX_RETRIES.value())
        status = answers.pop(0)
        if status is not None:
            raise refusal(status)
        return "stored"

    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(prefect_runs.asyncio, "sleep", no_sleep)
    assert asyncio.run(quickly_retried(call)) == "stored"
    assert retries_seen == [0, 0, 0]
    assert waits == list(QUICK_RETRIES[:2])  # not the client's 2 s, then 4 s


@pytest.mark.parametrize("status", [500, 409, 422])
def test_other_failures_are_not_retried_here(status: int) -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        raise refusal(status)

    with pytest.raises(httpx.HTTPStatusError):
        asyncio.run(quickly_retried(call))
    assert calls == 1
