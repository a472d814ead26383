"""How long the simulated payload takes per slice, and which slices fail: the
scenario of a run, written as JSON by the tests or the demo and read by each
transformer process (``run_prompt_payload.py``) from the file named by
``$SWF_PAYLOAD_SCHEDULE``.

Standard library only: imported by the project and, as a sibling module, by
the script inside the real peers' interpreter.

A schedule is a default time and rules; the first rule matching a slice (its
run and ``slice_id``, as the slice's content gives them) decides: the time
(the rule's, else the default) and, when the rule says ``fail``, the payload
raises after that time, as a failing reconstruction would. "Slices 10-20 of
run X take 2 s, the rest 0.5 s, slice 7 fails":

    PayloadSchedule(0.5, (SliceRule(run_id="X", first=10, last=20, seconds=2.0),
                          SliceRule(run_id="X", first=7, last=7, fail="bad input")))
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "SWF_PAYLOAD_SCHEDULE"  # names the schedule's JSON file


@dataclass(frozen=True)
class SliceRule:
    """Slices ``first``..``last`` (inclusive; ``last`` None: no end) of run
    ``run_id`` (None: of any run). ``seconds`` None: the schedule's default.
    ``fail``: the error text the payload raises with."""

    run_id: str | None = None
    first: int = 0
    last: int | None = None
    seconds: float | None = None
    fail: str | None = None

    def __post_init__(self) -> None:
        if self.last is not None and self.last < self.first:
            raise ValueError(f"slice range {self.first}-{self.last} is empty")
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, not {self.seconds}")

    def matches(self, run_id: str | None, slice_id: int | None) -> bool:
        if self.run_id is not None and self.run_id != run_id:
            return False
        if slice_id is None:
            return self.first == 0 and self.last is None  # only an all-slices rule
        return self.first <= slice_id and (self.last is None or slice_id <= self.last)


@dataclass(frozen=True)
class SliceOutcome:
    """What the payload does with one slice."""

    seconds: float
    fail: str | None = None


@dataclass(frozen=True)
class PayloadSchedule:
    default_seconds: float = 0.0
    rules: tuple[SliceRule, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.default_seconds) and self.default_seconds >= 0):
            raise ValueError(
                f"default_seconds must be a finite number >= 0, not {self.default_seconds}"
            )

    def for_slice(self, run_id: Any, slice_id: Any) -> SliceOutcome:
        """The outcome for a slice whose content names ``run_id`` and
        ``slice_id`` (either may be missing or of another type: compared as
        the testbed sends them, a string run id and an integer slice id)."""
        run = None if run_id is None else str(run_id)
        number = slice_id if isinstance(slice_id, int) and not isinstance(slice_id, bool) else None
        for rule in self.rules:
            if rule.matches(run, number):
                seconds = self.default_seconds if rule.seconds is None else rule.seconds
                return SliceOutcome(seconds, rule.fail)
        return SliceOutcome(self.default_seconds)

    def to_json(self) -> str:
        return json.dumps(
            {
                "default_seconds": self.default_seconds,
                "rules": [asdict(rule) for rule in self.rules],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PayloadSchedule:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a payload schedule is a JSON object")
        unknown = set(data) - {"default_seconds", "rules"}
        if unknown:
            raise ValueError(f"unknown key(s) in a payload schedule: {', '.join(sorted(unknown))}")
        rules = tuple(SliceRule(**rule) for rule in data.get("rules", []))
        return cls(float(data.get("default_seconds", 0.0)), rules)

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> PayloadSchedule:
        return cls.from_json(path.read_text())
