"""When the listener sends a batch of stream messages: after its window, at
once when full, and never with more runs than an event may relate to."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from listeners.stream_batch import StreamBatch
from swf_panda_workers.adapters.prefect_events.schema import StreamMessage
from swf_panda_workers.adapters.stomp_bus import Delivery

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def message(run_id: str, number: int = 0) -> tuple[StreamMessage, Delivery]:
    key = f"ID:{run_id}-{number}"
    return (
        StreamMessage("slice_result", run_id, key, {"run_id": run_id}, T0),
        Delivery({"message-id": key}, b"{}", "sub", 1),
    )


def test_a_batch_is_due_a_window_after_its_first_message() -> None:
    batch = StreamBatch(window=0.05)
    assert batch.due_in(100.0) is None  # empty: nothing to wait for
    batch.add(*message("1"), now=100.0)
    batch.add(*message("1", 1), now=100.04)
    assert batch.due_in(100.01) == pytest.approx(0.04)
    assert batch.due_in(100.06) == 0.0


def test_a_full_batch_is_due_at_once() -> None:
    batch = StreamBatch(window=10.0, max_messages=3)
    for number in range(3):
        batch.add(*message("1", number), now=100.0)
    assert batch.full and batch.due_in(100.0) == 0.0
    assert not batch.takes("1")


def test_a_batch_takes_more_of_its_runs_but_no_run_past_its_limit() -> None:
    batch = StreamBatch(max_runs=2)
    batch.add(*message("1"), now=0.0)
    batch.add(*message("2"), now=0.0)
    assert batch.takes("1") and batch.takes("2") and not batch.takes("3")
    with pytest.raises(ValueError, match="run 3"):
        batch.add(*message("3"), now=0.0)


def test_taking_a_batch_empties_it_in_the_order_messages_came() -> None:
    batch = StreamBatch(max_runs=1)
    added = [message("1", n) for n in range(3)]
    for item in added:
        batch.add(*item, now=5.0)
    messages, deliveries = batch.take()
    assert (
        [m.delivery_key for m in messages]
        == [d.message_id for d in deliveries]
        == ["ID:1-0", "ID:1-1", "ID:1-2"]
    )
    assert len(batch) == 0 and batch.due_in(6.0) is None and batch.takes("2")
