"""iDDS's own code, run for the tests and the demo: build iDDS's database, run
its agents, or read back what it wrote.

Run by the real peers' interpreter (.venv-peers/bin/python), by path; it
imports only the standard library and the peers' packages (idds, sqlalchemy):

    python idds_transceiver.py build            # idds.orm.base.utils.build_database()
    python idds_transceiver.py run              # idds/agents/main.py, as run-idds runs it
    python idds_transceiver.py records [RUN_ID] # its transforms and processings, as JSON

All read IDDS_CONFIG, as iDDS does; build reads ALEMBIC_CONFIG too; run reads
IDDS_AGENTS. On SQLite the ``md5()`` function iDDS's schema needs is
registered (``sqlite_md5``) before any of iDDS's code runs.
"""

from __future__ import annotations

import enum
import json
import runpy
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_md5  # noqa: F401  (registers md5() on SQLite before iDDS's code runs)


def build(_args: list[str]) -> int:
    from idds.orm.base.utils import build_database

    build_database(echo=False)
    return 0


def run(_args: list[str]) -> int:
    import idds.agents

    main = Path(idds.agents.__file__).with_name("main.py")
    sys.argv = [str(main)]
    runpy.run_path(str(main), run_name="__main__")
    return 0


# What a test needs of each row, as iDDS's core API returns it.
TRANSFORM_FIELDS = (
    "transform_id",
    "request_id",
    "workload_id",
    "run_id",
    "name",
    "status",
    "substatus",
    "created_at",
    "updated_at",
    "transform_metadata",
)
PROCESSING_FIELDS = (
    "processing_id",
    "transform_id",
    "request_id",
    "workload_id",
    "run_id",
    "status",
    "substatus",
    "submitter",
    "site",
    "created_at",
    "updated_at",
)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name  # ProcessingStatus.ToCancel -> "ToCancel"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def records(args: list[str]) -> int:
    """Print {"transforms": [...], "processings": [...]} of one run (or all)."""
    from idds.core import processings as core_processings
    from idds.core import transforms as core_transforms

    run_id = args[0] if args else None
    transforms = core_transforms.get_transforms(run_id=run_id) or []
    processings = core_processings.get_processings(run_id=run_id) or []
    report = {
        "transforms": [{k: _plain(t.get(k)) for k in TRANSFORM_FIELDS} for t in transforms],
        "processings": [{k: _plain(p.get(k)) for k in PROCESSING_FIELDS} for p in processings],
    }
    print(json.dumps(report, default=str))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"build": build, "run": run, "records": records}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} [args]")
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
