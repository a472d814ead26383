"""The real transformer (idds-prompt's ``run_prompt``) with only its payload
simulated, as a PanDA pilot would run it: same arguments, same exit code.

Run by the real peers' interpreter, by path:

    .venv-peers/bin/python run_prompt_payload.py --run_id 100123 --idle_timeout 60

It replaces ``idds.prompt.transformer.process_payload`` (the name the
Transformer calls for each slice) with one that takes the time the schedule
in ``$SWF_PAYLOAD_SCHEDULE`` gives the slice (none: no delay), raises where
the schedule says the slice fails, and otherwise returns what the real
``process_payload`` returns; then it runs the ``run_prompt`` script installed
beside this interpreter as ``__main__``, which parses the arguments and exits
with the Transformer's code. Standard library and idds only.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import idds.prompt.transformer as transformer_module
from payload_schedule import ENV, PayloadSchedule

_real_process_payload = transformer_module.process_payload


class SimulatedPayloadFailure(RuntimeError):
    """The reconstruction failing, as the scenario asked."""


def scheduled(schedule: PayloadSchedule) -> Callable[[dict[str, Any]], Any]:
    """process_payload as the schedule has it."""

    def process_payload(payload: dict[str, Any]) -> Any:
        outcome = schedule.for_slice(payload.get("run_id"), payload.get("slice_id"))
        time.sleep(outcome.seconds)  # the payload's work, simulated
        if outcome.fail is not None:
            raise SimulatedPayloadFailure(outcome.fail)
        return _real_process_payload(payload)

    return process_payload


def main() -> None:
    named = os.environ.get(ENV)
    # Read before the transformer starts: a bad schedule fails the start, not a slice.
    schedule = PayloadSchedule.read(Path(named)) if named else PayloadSchedule()
    transformer_module.process_payload = scheduled(schedule)
    # run_prompt is a script (no importable entry point): the one installed
    # with idds-prompt, next to this interpreter.
    run_prompt = Path(sys.executable).parent / "run_prompt"
    sys.argv = [str(run_prompt), *sys.argv[1:]]
    runpy.run_path(str(run_prompt), run_name="__main__")


if __name__ == "__main__":
    main()
