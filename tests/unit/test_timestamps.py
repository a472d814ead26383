"""parse_timestamp accepts every shape the peers send; to_iso writes ISO 8601 UTC."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect.events import Event

from swf_panda_workers.core.timestamps import parse_timestamp, plain_utc, to_iso

NOON = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
NOON_EPOCH = 1768910400  # 2026-01-20T12:00:00Z


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # naive ISO, UTC implied (testbed, transformer)
        ("2026-01-20T12:00:00", NOON),
        # ISO with Z and milliseconds (iDDS replies)
        ("2026-01-20T12:00:00.123Z", NOON.replace(microsecond=123000)),
        # ISO with an offset (reference transceiver)
        ("2026-01-20T12:00:00+00:00", NOON),
        ("2026-01-20T14:30:00+02:30", NOON),
        ("2026-01-20T07:00:00-05:00", NOON),
        # iDDS json encoder, whole seconds
        ("Fri, 02 Jan 2026 03:04:05 UTC", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("Fri, 02 Jan 2026 03:04:05 GMT", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("Tue, 20 Jan 2026 13:00:00 +0100", NOON),
        # surrounding blanks are ignored
        ("  2026-01-20T12:00:00Z\n", NOON),
        # epoch seconds (heartbeats)
        (NOON_EPOCH, NOON),
        (NOON_EPOCH + 0.25, NOON.replace(microsecond=250000)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        # datetimes pass through, made aware UTC
        (datetime(2026, 1, 20, 12, 0, 0), NOON),
        (datetime(2026, 1, 20, 13, 0, 0, tzinfo=timezone(timedelta(hours=1))), NOON),
    ],
)
def test_parse_timestamp_shapes(raw: object, expected: datetime) -> None:
    parsed = parse_timestamp(raw)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "not a time",
        "2026-13-01T00:00:00",
        "2026-01-20T25:00:00",
        "Fri, 02 Jan 2026 25:04:05 UTC",
        "Fri, 02 Jan 99999 03:04:05 UTC",
        None,
        True,
        False,
        [],
        {},
        b"2026-01-20T12:00:00",
        1e20,  # beyond the platform's time_t
        10**30,
        -1e12,
        math.inf,
        math.nan,
    ],
)
def test_parse_timestamp_rejects_with_value_error(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(raw)


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (NOON, "2026-01-20T12:00:00+00:00"),
        (datetime(2026, 1, 20, 12, 0, 0), "2026-01-20T12:00:00+00:00"),
        (NOON.replace(microsecond=123000), "2026-01-20T12:00:00.123000+00:00"),
        (
            datetime(2026, 1, 20, 9, 0, 0, tzinfo=timezone(timedelta(hours=-3))),
            "2026-01-20T12:00:00+00:00",
        ),
    ],
)
def test_to_iso_writes_utc_iso8601(moment: datetime, expected: str) -> None:
    assert to_iso(moment) == expected


OFFSETS = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
)
SINCE, UNTIL = datetime(1971, 1, 1), datetime(9000, 1, 1)


@given(  # aware at an offset, or naive (taken as UTC)
    st.datetimes(min_value=SINCE, max_value=UNTIL, timezones=OFFSETS)
    | st.datetimes(min_value=SINCE, max_value=UNTIL)
)
def test_to_iso_round_trips_through_parse(moment: datetime) -> None:
    text = to_iso(moment)
    assert text.endswith("+00:00")
    expected = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    assert parse_timestamp(text) == expected


def test_a_prefect_event_time_becomes_a_plain_utc_datetime() -> None:
    occurred = Event(event="x", resource={"prefect.resource.id": "r"}).occurred
    plain = plain_utc(occurred)
    assert type(plain) is datetime and plain.tzinfo is UTC
    assert plain == occurred
