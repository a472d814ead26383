"""Fixtures the simulated iDDS server's tests share: the server itself, and
what its callbacks (the harness's hooks) were called with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from swf_testbed.peers.idds_rest.server import SimulatedIDDSRest

WAIT = 10.0


class Seen:
    """What the server's callbacks were called with, to wait on."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self._changed = threading.Condition()

    def add(self, run_id: str, what: Any) -> None:
        with self._changed:
            self.items.append((run_id, what))
            self._changed.notify_all()

    def wait_len(self, n: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.items) >= n, WAIT)


@pytest.fixture
def created() -> Seen:
    return Seen()


@pytest.fixture
def adjusted() -> Seen:
    return Seen()


@pytest.fixture
def server(
    request: pytest.FixtureRequest, created: Seen, adjusted: Seen
) -> Iterator[SimulatedIDDSRest]:
    """The server, requiring the credentials the test module names (TOKEN, VO).
    Its creates answer the ids, as a fixed iDDS would: these tests are about
    the server's machinery; iDDS 2.6.21's failing answer has its own tests."""
    with SimulatedIDDSRest(
        token=request.module.TOKEN,
        vo=request.module.VO,
        on_task_created=created.add,
        on_adjust=adjusted.add,
        create_fails_after=False,
    ) as sim:
        yield sim
