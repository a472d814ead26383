"""The timeline picture: a PNG of the expected size whatever the traces hold,
and its markdown image."""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime, timedelta

import pytest

from swf_panda_workers.adapters.plots import markdown_image, timeline_png
from swf_panda_workers.core.timeline import TimelinePoint, Trace

T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def size_of(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    assert png[12:16] == b"IHDR"  # the first chunk: width and height follow
    return struct.unpack(">II", png[16:24])


def points(requested: list[int], start: float = 0.0) -> list[TimelinePoint]:
    return [
        TimelinePoint(
            at=T0 + timedelta(seconds=start + 5 * i),
            requested=n,
            workers_seen=max(0, n - 1),
            processing_seconds=None if i == 0 else 2.0,
            backlog=float(i % 7),
            rate=1.5,
        )
        for i, n in enumerate(requested)
    ]


def test_timeline_png_is_a_900_by_600_png() -> None:
    traces = [
        Trace("reference", points([3] * 100)),
        Trace(
            "proportional",
            points([3] * 40 + [6] * 40 + [4] * 20, start=2.5),
            adjustments=[T0 + timedelta(seconds=197.5), T0 + timedelta(seconds=397.5)],
        ),
    ]

    png = timeline_png("run 100123: replay", traces)

    assert size_of(png) == (900, 600)
    assert len(png) > 10_000  # lines drawn, not a blank canvas


@pytest.mark.parametrize(
    "traces",
    [
        pytest.param([], id="no traces"),
        pytest.param([Trace("proportional", [])], id="a trace without points"),
        pytest.param(
            [Trace("reference", points([2])), Trace("proportional", [])],
            id="one point and an empty trace",
        ),
    ],
)
def test_timeline_png_draws_empty_traces(traces: list[Trace]) -> None:
    assert size_of(timeline_png("run 7", traces)) == (900, 600)


def test_markdown_image_round_trips_the_png() -> None:
    png = timeline_png("run 7", [Trace("reference", points([1, 2, 3]))])

    text = markdown_image(png, "workers of run 7")

    prefix = "![workers of run 7](data:image/png;base64,"
    assert text.startswith(prefix) and text.endswith(")")
    assert base64.b64decode(text[len(prefix) : -1], validate=True) == png


def test_markdown_image_keeps_the_alt_text_inside_its_brackets() -> None:
    text = markdown_image(b"png", "run [7]\nreplay")

    assert text.startswith("![run (7) replay](data:image/png;base64,")
