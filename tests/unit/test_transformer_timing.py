"""The transformer farm's timing without a broker: slices arriving over time,
idle transformers outliving gaps between arrivals, and ``set_target`` lowering
and raising a run's transformers. The farm's bus is replaced by one that only
records what is sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from swf_panda_workers.config.schema import Brokers
from swf_testbed.peers.transformers import TransformerFarm

WAIT = 10.0
RUN = "100123"


def slice_of(content: dict[str, Any]) -> int:
    """The slice a result is for: in the payload's result, as swf-transform sends it."""
    slice_id: int = content["result"]["result"]["slice_id"]
    return slice_id


class RecordingBus:
    """What the farm needs of PeerBus: sends are recorded, nothing connects."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def resync(self, timeout: float) -> bool:
        return True

    def send(self, destination: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with self._lock:
            self.sent.append(body)

    def contents(self) -> list[dict[str, Any]]:
        """The results' contents, by slice."""
        with self._lock:
            return sorted((b["content"] for b in self.sent), key=slice_of)


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


def farm_with(bus: RecordingBus, idle_timeout: float) -> TransformerFarm:
    farm = TransformerFarm(
        Brokers(host="127.0.0.1", port=1), heartbeat_every=60.0, idle_timeout=idle_timeout
    )
    farm._bus = bus  # type: ignore[assignment]
    return farm


@pytest.fixture
def farm(bus: RecordingBus) -> Iterator[TransformerFarm]:
    with farm_with(bus, idle_timeout=0.3) as running:
        yield running


def moment(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_without_arrival_all_slices_are_queued_at_once(
    farm: TransformerFarm, bus: RecordingBus
) -> None:
    run = farm.start_run(RUN, workers=2, slices=6, processing_time=lambda _: 0.01)
    assert run.queued == 6
    assert farm.wait_idle(WAIT, RUN)
    assert len({c["requested_at"] for c in bus.contents()}) == 1
    assert run.slices_sent == 6


def test_slices_arrive_when_due_and_wait_no_longer_than_idle_workers_take(
    farm: TransformerFarm, bus: RecordingBus
) -> None:
    # The last gap (1.0 s) is longer than the idle timeout (0.3 s).
    offsets = [0.0, 0.2, 0.4, 1.4]
    run = farm.start_run(
        RUN, workers=2, slices=4, processing_time=lambda _: 0.02, arrival=lambda i: offsets[i]
    )
    assert farm.wait_for(lambda: run.slices_sent == 3, WAIT)
    time.sleep(0.6)  # the workers have been idle for longer than idle_timeout
    assert (run.queued, run.unprocessed, run.live) == (3, [], 2)

    assert farm.wait_for(lambda: run.slices_sent == 4, WAIT)
    assert farm.wait_idle(WAIT, RUN)  # and once all arrived, idleness ends them
    assert run.started == 2
    contents = bus.contents()
    first = moment(contents[0]["requested_at"])
    for content, offset in zip(contents, offsets, strict=True):
        requested = moment(content["requested_at"])
        assert abs((requested - first).total_seconds() - offset) < 0.1
        wait = (moment(content["processing_start_at"]) - requested).total_seconds()
        assert 0 <= wait < 0.1, "an idle worker takes an arrived slice at once"


def test_arrival_order_follows_the_arrival_times(farm: TransformerFarm, bus: RecordingBus) -> None:
    run = farm.start_run(
        RUN, workers=1, slices=3, processing_time=lambda _: 0.0, arrival=lambda i: 0.2 * (2 - i)
    )
    assert farm.wait_for(lambda: run.slices_sent == 3, WAIT)
    by_slice = {slice_of(c): moment(c["requested_at"]) for c in bus.contents()}
    assert by_slice[2] < by_slice[1] < by_slice[0]


def test_a_stop_ends_the_arrivals(farm: TransformerFarm) -> None:
    run = farm.start_run(
        RUN,
        workers=2,
        slices=5,
        processing_time=lambda _: 0.0,
        arrival=lambda i: 0.0 if i < 2 else 60.0,
    )
    assert farm.wait_for(lambda: run.slices_sent == 2, WAIT)
    assert run.live == 2  # more to come: not idle
    with farm._state.lock:  # what a stop_transformer naming the run does
        run.stopped = True
        farm._state.notify()
    assert farm.wait_idle(WAIT, RUN)
    assert farm.wait_for(lambda: not run.feeding, WAIT)
    time.sleep(0.1)
    assert (run.queued, run.unprocessed) == (2, [])


def test_the_farm_shutdown_ends_the_arrivals(bus: RecordingBus) -> None:
    farm = farm_with(bus, idle_timeout=0.3).start()
    run = farm.start_run(
        RUN, workers=2, slices=3, processing_time=lambda _: 0.0, arrival=lambda i: 60.0 * i
    )
    assert farm.wait_for(lambda: run.slices_sent == 1, WAIT)
    began = time.monotonic()
    farm.stop()
    assert time.monotonic() - began < 2.0
    assert (run.live, run.feeding, run.queued) == (0, False, 1)


def test_a_failing_arrival_function_does_not_keep_workers_forever(
    farm: TransformerFarm,
) -> None:
    def broken(_: int) -> float:
        raise ValueError("no arrival")

    run = farm.start_run(RUN, workers=2, slices=3, processing_time=lambda _: 0.0, arrival=broken)
    assert farm.wait_idle(WAIT, RUN)
    assert run.queued == 0


def test_lowering_the_target_lets_the_surplus_finish_their_slice(
    farm: TransformerFarm, bus: RecordingBus
) -> None:
    slices = 40
    run = farm.start_run(RUN, workers=8, slices=slices, processing_time=lambda _: 0.1)
    assert farm.wait_for(lambda: run.slices_sent >= 8, WAIT)
    farm.set_target(RUN, 3)
    assert farm.wait_for(lambda: run.live == 3, WAIT)
    time.sleep(0.3)
    assert run.live == 3, "exactly the surplus leave, never one more"
    assert run.started == 8

    farm.set_target(RUN, 5)
    assert (run.started, run.live) == (10, 5)
    assert farm.wait_idle(WAIT, RUN)
    assert [slice_of(c) for c in bus.contents()] == list(range(slices))
    assert run.unprocessed == []


def test_idle_surplus_workers_leave_at_once(bus: RecordingBus) -> None:
    with farm_with(bus, idle_timeout=30.0) as farm:
        run = farm.start_run(RUN, workers=4, slices=0, processing_time=lambda _: 0.0)
        farm.set_target(RUN, 1)
        assert farm.wait_for(lambda: run.live == 1, 2.0)


def test_add_workers_raises_a_set_target(farm: TransformerFarm) -> None:
    run = farm.start_run(
        RUN, workers=1, slices=0, processing_time=lambda _: 0.0, arrival=lambda _: 60.0
    )
    farm.set_target(RUN, 1)
    farm.add_workers(RUN, 2)
    time.sleep(0.2)
    assert (run.target, run.live) == (3, 3)


def test_a_stopped_run_gets_no_new_workers(farm: TransformerFarm) -> None:
    run = farm.start_run(RUN, workers=1, slices=0, processing_time=lambda _: 0.0)
    with farm._state.lock:
        run.stopped = True
        farm._state.notify()
    assert farm.wait_idle(WAIT, RUN)
    farm.set_target(RUN, 4)
    assert (run.started, run.live) == (1, 0)
