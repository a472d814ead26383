"""Pictures of a run for operators: its workers, processing time and backlog
over time, one trace per policy (the live run, or each policy of a replay),
as a PNG, and that PNG as a markdown image for a Prefect artifact.

matplotlib is imported inside the functions: importing this module stays
cheap for the listener and the flows that never draw.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from swf_panda_workers.core.timeline import TimelinePoint, Trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# 900 x 600 px: wide enough for an hours-long run, small enough to embed.
WIDTH_IN, HEIGHT_IN, DPI = 9.0, 6.0, 100


def timeline_png(title: str, traces: Sequence[Trace]) -> bytes:
    """Three panels over minutes since the earliest point: workers requested
    (solid steps) and seen (dotted), processing time, backlog."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    # A Figure with its own Agg canvas, not pyplot: no global state, no
    # display, safe in a flow run's worker thread.
    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    workers, took, backlog = figure.subplots(3, 1, sharex=True)
    figure.suptitle(title)
    workers.set_ylabel("workers")
    took.set_ylabel("processing (s)")
    backlog.set_ylabel("backlog (slices)")  # the policy's estimate: rate x queue wait
    backlog.set_xlabel("minutes since start")

    drawn = [trace for trace in traces if trace.points]
    if not drawn:
        for axes in (workers, took, backlog):
            _note(axes, "no points to draw")
        return _png(figure)

    origin = min(point.at for trace in drawn for point in trace.points)
    colours = [f"C{i % 10}" for i in range(len(drawn))]
    for trace, colour in zip(drawn, colours, strict=True):
        minutes = [_minutes(point.at, origin) for point in trace.points]
        workers.step(
            minutes, [p.requested for p in trace.points], where="post", color=colour, linewidth=1.8
        )
        workers.step(
            minutes,
            [p.workers_seen for p in trace.points],
            where="post",
            color=colour,
            linewidth=1.2,
            linestyle=":",
        )
        if trace.adjustments:
            workers.plot(
                [_minutes(at, origin) for at in trace.adjustments],
                [_size_after(trace.points, at) for at in trace.adjustments],
                linestyle="none",
                marker="o",
                markersize=4,
                color=colour,
            )
        timed = [
            (m, p.processing_seconds)
            for m, p in zip(minutes, trace.points, strict=True)
            if p.processing_seconds is not None
        ]
        took.plot([m for m, _ in timed], [s for _, s in timed], color=colour, linewidth=1.2)
        backlog.plot(minutes, [p.backlog for p in trace.points], color=colour, linewidth=1.2)

    for axes in (workers, took, backlog):
        axes.set_ylim(bottom=0)
    # One entry per trace (its colour) and one per line style, below the
    # panels: a legend inside would hide the run's busiest minutes.
    handles = [
        Line2D([], [], color=colour, linewidth=1.8, label=trace.label)
        for trace, colour in zip(drawn, colours, strict=True)
    ]
    handles += [
        Line2D([], [], color="black", linewidth=1.8, label="requested"),
        Line2D([], [], color="black", linewidth=1.2, linestyle=":", label="seen"),
        Line2D(
            [], [], color="black", linestyle="none", marker="o", markersize=4, label="adjustment"
        ),
    ]
    figure.legend(
        handles=handles,
        loc="outside lower center",
        fontsize="small",
        ncols=min(len(handles), 4),
        frameon=False,
    )
    for axes in (workers, took, backlog):
        axes.grid(True, alpha=0.3)
    if len(drawn) < len(traces):
        missing = ", ".join(trace.label for trace in traces if not trace.points)
        _note(workers, f"no points: {missing}", corner=True)
    return _png(figure)


def markdown_image(png: bytes, alt: str) -> str:
    """The PNG inline, as Prefect's markdown artifacts render data URIs."""
    # Brackets or a newline in the alt text would end the image syntax early.
    text = " ".join(alt.split()).replace("[", "(").replace("]", ")")
    return f"![{text}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _minutes(at: datetime, origin: datetime) -> float:
    return (at - origin).total_seconds() / 60.0


def _size_after(points: Sequence[TimelinePoint], at: datetime) -> int:
    # A look records the size before its decision: the new size shows from
    # the next point on, which is where the marker belongs.
    for point in points:
        if point.at > at:
            return point.requested
    return points[-1].requested


def _note(axes: Axes, text: str, corner: bool = False) -> None:
    if corner:
        axes.text(
            0.99,
            0.97,
            text,
            transform=axes.transAxes,
            ha="right",
            va="top",
            fontsize="small",
            color="dimgray",
        )
    else:
        axes.text(
            0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="dimgray"
        )


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
