"""Timestamps as the testbed peers write them, and as we write them back.

The peers send at least four shapes (PROTOCOL.md): naive ISO (UTC implied),
ISO with ``Z``, ISO with an offset, and the iDDS encoder's RFC-1123-like
``Fri, 02 Jan 2026 03:04:05 UTC``; heartbeats carry epoch seconds. All of them
become aware UTC datetimes; we always emit ISO 8601 with ``+00:00``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer


def parse_timestamp(value: object) -> datetime:
    """Return an aware UTC datetime for any timestamp shape the peers send."""
    if isinstance(value, datetime):
        return _as_utc(value)
    if isinstance(value, bool):  # bool is an int subclass: never a time
        raise ValueError("a timestamp cannot be a boolean")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC)
        except (OverflowError, OSError):  # e.g. 1e20 or inf: not a time either
            raise ValueError(f"epoch timestamp out of range: {value!r}") from None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"not a timestamp: {value!r}")
    text = value.strip()
    try:
        return _as_utc(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        return _as_utc(parsedate_to_datetime(text))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not a timestamp in any known shape: {text!r}") from None


def to_iso(moment: datetime) -> str:
    """ISO 8601 in UTC, the shape every peer reads."""
    return _as_utc(moment).isoformat()


def utc_now() -> datetime:
    return datetime.now(UTC)


def plain_utc(moment: datetime) -> datetime:
    """``moment`` as a plain ``datetime`` in UTC. Prefect stamps events with
    pendulum's subclass, whose arithmetic was a tenth of a busy run flow's
    time (the slice window subtracts times at every result)."""
    utc = _as_utc(moment)
    return datetime(
        utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=UTC
    )


def _as_utc(moment: datetime) -> datetime:
    # Naive times from the testbed and the transformer are UTC by convention.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


Timestamp = Annotated[
    datetime,
    BeforeValidator(parse_timestamp),
    PlainSerializer(to_iso, return_type=str, when_used="json"),
]
