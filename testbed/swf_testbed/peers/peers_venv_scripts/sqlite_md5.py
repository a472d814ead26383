"""An ``md5()`` SQL function on every SQLite connection of every SQLAlchemy
engine, registered on import: an index of iDDS's schema is an expression on
md5(), which SQLite lacks. Imported, before any of iDDS's code runs, by each
script here that opens iDDS's database (its agents, its REST app, the build).
Standard library and SQLAlchemy only."""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine


def _md5(text: Any) -> str | None:
    if text is None:
        return None
    data = text if isinstance(text, bytes) else str(text).encode()
    return hashlib.md5(data).hexdigest()


@event.listens_for(Engine, "connect")
def _sqlite_md5(dbapi_connection: Any, _record: Any) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        # deterministic: SQLite refuses other functions in an index expression.
        dbapi_connection.create_function("md5", 1, _md5, deterministic=True)
