"""One benchmark run over time, as one PNG: throughput, the listener's
hand-off lag, each latency, and the RSS and CPU of each process.

Drawn from what the benchmark recorded: when each slice result was sent, the
listener's count of acked messages sampled every second (acked means stored
by Prefect), each effect's delay at the time of its cause, and each process
tree's RSS and CPU samples."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Series = list[tuple[float, float]]  # (unix time, value)


class Timeline(BaseModel):
    title: str
    sent_at: list[float]  # one entry per slice result sent
    acked: Series  # the listener's acked-messages counter
    latencies: dict[str, Series]  # name -> (cause time, seconds)
    rss_mb: dict[str, Series]  # process -> RSS
    cpu_seconds: dict[str, Series]  # process -> CPU used so far


def per_second(times: Sequence[float], origin: float) -> tuple[list[float], list[int]]:
    """Counts per whole second since ``origin``."""
    counts = Counter(int(t - origin) for t in times)
    if not counts:
        return [], []
    seconds = list(range(min(counts), max(counts) + 1))
    return [float(s) for s in seconds], [counts.get(s, 0) for s in seconds]


def rates(series: Series, origin: float) -> tuple[list[float], list[float]]:
    """The per-second rate of a growing counter, between two samples."""
    xs, ys = [], []
    for (t0, v0), (t1, v1) in itertools.pairwise(series):
        if t1 > t0:
            xs.append(t1 - origin)
            ys.append((v1 - v0) / (t1 - t0))
    return xs, ys


def lag(sent_at: Sequence[float], acked: Series, origin: float) -> tuple[list[float], list[int]]:
    """Results sent but not yet acked, at each sample of the acked counter;
    the counter counts every acked message, so its value when the load began
    is taken off."""
    ordered = sorted(sent_at)
    if not ordered or not acked:
        return [], []
    before = max((v for t, v in acked if t <= ordered[0]), default=acked[0][1])
    xs, ys, i = [], [], 0
    for t, value in acked:
        if t < ordered[0]:
            continue  # before the load: the counter counts other messages then
        while i < len(ordered) and ordered[i] <= t:
            i += 1
        xs.append(t - origin)
        ys.append(max(0, i - int(value - before)))
    return xs, ys


def timeline_png(timeline: Timeline) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 13), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    load, backlog, latency, memory, cpu = figure.subplots(5, 1, sharex=True)
    figure.suptitle(timeline.title)
    starts = timeline.sent_at[:1] + [s[0][0] for s in timeline.rss_mb.values() if s]
    origin = min(starts) if starts else 0.0

    xs, ys = per_second(timeline.sent_at, origin)
    load.plot(xs, ys, label="slice results sent", linewidth=1)
    xs_acked, ys_acked = rates(timeline.acked, origin)
    load.plot(xs_acked, ys_acked, label="messages stored and acked", linewidth=1)
    load.set_ylabel("per second")
    load.legend(loc="upper right", fontsize="small")

    xs, lagging = lag(timeline.sent_at, timeline.acked, origin)
    backlog.plot(xs, lagging, linewidth=1)
    backlog.set_ylabel("sent, not yet stored")

    for name, points in timeline.latencies.items():
        if points:
            latency.scatter(
                [t - origin for t, _ in points], [d * 1000 for _, d in points], s=8, label=name
            )
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    if any(timeline.latencies.values()):
        latency.legend(loc="upper right", fontsize="small")

    _per_process(memory, timeline.rss_mb, origin)
    memory.set_ylabel("RSS (MB)")
    cpu_rates = {name: rates(points, origin) for name, points in timeline.cpu_seconds.items()}
    for name, (at, per_second_used) in cpu_rates.items():
        cpu.plot(at, [y * 100 for y in per_second_used], label=name, linewidth=1)
    cpu.set_ylabel("CPU (% of a core)")
    cpu.set_xlabel("seconds since the benchmark began")
    cpu.legend(loc="upper right", fontsize="small")

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _per_process(axes: Axes, series: Mapping[str, Series], origin: float) -> None:
    for name, points in series.items():
        axes.plot([t - origin for t, _ in points], [v for _, v in points], label=name, linewidth=1)
    axes.legend(loc="upper right", fontsize="small")
