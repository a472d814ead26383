"""The simulated payload's schedule (what each real transformer reads to know
how long a slice takes and whether it fails)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from swf_testbed.peers.peers_venv_scripts.payload_schedule import (
    PayloadSchedule,
    SliceOutcome,
    SliceRule,
)

X = "100123"


def test_a_slow_stretch_of_one_run_and_the_rest_at_the_default() -> None:
    schedule = PayloadSchedule(0.5, (SliceRule(run_id=X, first=10, last=20, seconds=2.0),))
    assert schedule.for_slice(X, 9) == SliceOutcome(0.5)
    assert schedule.for_slice(X, 10) == SliceOutcome(2.0)
    assert schedule.for_slice(X, 20) == SliceOutcome(2.0)
    assert schedule.for_slice(X, 21) == SliceOutcome(0.5)
    assert schedule.for_slice("100124", 15) == SliceOutcome(0.5)  # another run


def test_the_first_matching_rule_decides() -> None:
    schedule = PayloadSchedule(
        0.5,
        (
            SliceRule(run_id=X, first=7, last=7, fail="bad input"),
            SliceRule(run_id=X, first=0, last=20, seconds=2.0),
            SliceRule(first=0, seconds=1.0),  # every other run, every slice
        ),
    )
    assert schedule.for_slice(X, 7) == SliceOutcome(0.5, "bad input")  # default time, fails
    assert schedule.for_slice(X, 8) == SliceOutcome(2.0)
    assert schedule.for_slice(X, 21) == SliceOutcome(1.0)
    assert schedule.for_slice("other", 3) == SliceOutcome(1.0)


def test_run_ids_compare_as_text_and_odd_slice_ids_match_only_catch_alls() -> None:
    schedule = PayloadSchedule(
        0.1, (SliceRule(run_id=X, first=0, last=5, seconds=3.0), SliceRule(run_id=X, seconds=4.0))
    )
    assert schedule.for_slice(int(X), 2) == SliceOutcome(3.0)  # an integer run id
    assert schedule.for_slice(X, None) == SliceOutcome(4.0)  # no slice_id: the catch-all
    assert schedule.for_slice(X, "2") == SliceOutcome(4.0)  # not an integer slice id
    assert schedule.for_slice(X, True) == SliceOutcome(4.0)  # nor is a boolean
    assert schedule.for_slice(None, 2) == SliceOutcome(0.1)  # a slice naming no run


def test_it_travels_as_json(tmp_path: Path) -> None:
    schedule = PayloadSchedule(
        0.25, (SliceRule(run_id=X, first=3, last=4, seconds=1.5), SliceRule(first=9, fail="boom"))
    )
    path = schedule.write(tmp_path / "schedule.json")
    assert PayloadSchedule.read(path) == schedule
    assert PayloadSchedule.from_json("{}") == PayloadSchedule()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: SliceRule(first=5, last=4), "empty"),
        (lambda: SliceRule(seconds=-1), "seconds"),
        (lambda: SliceRule(seconds=float("nan")), "seconds"),
        (lambda: PayloadSchedule(-0.5), "default_seconds"),
        (lambda: PayloadSchedule.from_json('{"default": 1}'), "unknown key"),
        (lambda: PayloadSchedule.from_json("[]"), "JSON object"),
    ],
)
def test_nonsense_is_refused(make: Callable[[], object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make()


def test_an_unknown_rule_field_is_refused() -> None:
    with pytest.raises(TypeError, match="slow"):
        PayloadSchedule.from_json('{"rules": [{"slow": 2}]}')
