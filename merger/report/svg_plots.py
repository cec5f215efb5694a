"""The plots of report.html as inline SVG, and the Pareto front they highlight.

`line_plot` draws a metric against a swept variable (one line per combination of the other
variables when there are a few), `pareto_plot` one objective (or metric) against another with the
non-dominated points joined; `sweep_plots` makes all of them from a sweep report's jobs (capped at
MAX_PLOTS plots of MAX_PLOT_JOBS jobs). Every text and attribute value goes through `escape`/`quoteattr`:
overrides, job names and metric names are user text. Nothing here reads files or imports numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

MAXIMIZE, MINIMIZE = "maximize", "minimize"
#: the direction of a metric that no objective names one for (the part of the column after the output)
METRIC_DIRECTIONS = {"psnr": MAXIMIZE, "psnr_rgb": MAXIMIZE, "ssim": MAXIMIZE, "sharpness": MAXIMIZE}
METRIC_DIRECTIONS |= {"perplexity": MINIMIZE}

WIDTH, HEIGHT = 420, 260
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 26, 42
LEGEND_LINE = 15
MAX_LEGEND = 8
#: a sweep's plots: at most this many of a metric against a variable, of this many jobs (and the front)
MAX_PLOTS = 60
MAX_PLOT_JOBS = 2000
#: one line per combination of the other swept variables when there are at most this many
MAX_SERIES = 8
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def escape(data: str) -> str:
    """`&`, `<` and `>` as entities: xml.sax.saxutils.escape (whose module imports urllib, http and
    ssl: not worth its start-up on a run's report)."""
    return data.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


def quoteattr(data: str) -> str:
    """An attribute value escaped and quoted, as xml.sax.saxutils.quoteattr quotes it."""
    data = escape(data).replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    if '"' not in data:
        return f'"{data}"'
    if "'" not in data:
        return f"'{data}'"
    return '"{}"'.format(data.replace('"', "&quot;"))


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    job: str
    note: str  # the tooltip: what the point is


@dataclass(frozen=True)
class Series:
    name: str  # "" for the only series
    points: tuple[Point, ...]


def metric_direction(metric: str) -> str | None:
    """'maximize' for psnr, 'minimize' for perplexity, ...; None for a metric merger does not know."""
    return METRIC_DIRECTIONS.get(metric)


def pareto_front(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[int]:
    """The indices (ascending) of the points no other point dominates, each coordinate maximised or
    minimised as `directions` says. A point with a None or non-finite coordinate (or the wrong number)
    is left out; equal points do not dominate each other, so all of them stay on the front."""
    signs = []
    for direction in directions:
        if direction not in (MAXIMIZE, MINIMIZE):
            raise ValueError(f"a direction is {MAXIMIZE!r} or {MINIMIZE!r}, not {direction!r}")
        signs.append(1.0 if direction == MAXIMIZE else -1.0)
    valid = []
    for index, point in enumerate(points):
        coordinates = [float(v) for v in point if finite(v)]
        if len(coordinates) == len(point) == len(signs):
            valid.append((index, tuple(sign * v for sign, v in zip(signs, coordinates, strict=True))))
    if not valid:
        return []
    # a point's dominators are all greater in lexicographic order: they come before it
    valid.sort(key=lambda item: item[1], reverse=True)
    front = _front_2d(valid) if len(signs) == 2 else _front_any(valid)
    return sorted(front)


def _front_2d(ordered: list[tuple[int, tuple[float, ...]]]) -> list[int]:
    """Sorted by x then y, descending: a point is dominated when an earlier, different point has a
    y at least as large (O(n log n) with the sort)."""
    front: list[int] = []
    best_y = -math.inf  # the largest y of the points before the current group of equal points
    group: tuple[float, ...] | None = None
    group_best = -math.inf
    for index, point in ordered:
        if point != group:
            best_y, group, group_best = max(best_y, group_best), point, point[1]
        if point[1] > best_y:
            front.append(index)
    return front


def _front_any(ordered: list[tuple[int, tuple[float, ...]]]) -> list[int]:
    """Each point is compared with the front found so far (its dominators' own dominators are there)."""
    front: list[tuple[int, tuple[float, ...]]] = []
    for index, point in ordered:
        if not any(_dominates(kept, point) for _, kept in front):
            front.append((index, point))
    return [index for index, _ in front]


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and a != b


def _tag(name: str, attributes: Mapping[str, object], *children: str, text: str | None = None) -> str:
    """One element; attribute values quoted with quoteattr, text escaped, children already built."""
    attrs = "".join(f" {key}={quoteattr(_attr(value))}" for key, value in attributes.items())
    inner = (escape(text) if text is not None else "") + "".join(children)
    return f"<{name}{attrs}>{inner}</{name}>"


def _attr(value: object) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def number(value: float) -> str:
    """A short form of a figure for labels: 32.24, 0.9123, 1.235e+04."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 1e3 else f"{value:.1f}"


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values from `low` to `high` (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / (max(1, count) + 2)  # count to count + 2 of them
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


class _Frame:
    """The axes of one plot: data coordinates to SVG pixels, ticks, labels."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        self.x0, self.x1 = _span(xs)
        self.y0, self.y1 = _span(ys)

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str) -> list[str]:
        parts = [
            _tag("text", {"x": WIDTH / 2, "y": 16, "class": "plot-title", "text-anchor": "middle"}, text=title),
            _tag("rect", {"x": LEFT, "y": TOP, "width": WIDTH - LEFT - RIGHT, "height": HEIGHT - TOP - BOTTOM,
                          "class": "plot-area"}),
        ]  # fmt: skip
        for x in ticks(self.x0, self.x1):
            px = self.px(x)
            parts.append(_tag("line", {"x1": px, "x2": px, "y1": HEIGHT - BOTTOM, "y2": TOP, "class": "grid"}))
            parts.append(_tag("text", {"x": px, "y": HEIGHT - BOTTOM + 14, "text-anchor": "middle"}, text=number(x)))
        for y in ticks(self.y0, self.y1):
            py = self.py(y)
            parts.append(_tag("line", {"x1": LEFT, "x2": WIDTH - RIGHT, "y1": py, "y2": py, "class": "grid"}))
            parts.append(_tag("text", {"x": LEFT - 5, "y": py + 4, "text-anchor": "end"}, text=number(y)))
        parts.append(_tag("text", {"x": (LEFT + WIDTH - RIGHT) / 2, "y": HEIGHT - 8, "text-anchor": "middle",
                                   "class": "axis-label"}, text=x_label))  # fmt: skip
        middle = (TOP + HEIGHT - BOTTOM) / 2
        parts.append(_tag("text", {"x": 14, "y": middle, "text-anchor": "middle", "class": "axis-label",
                                   "transform": f"rotate(-90 14 {middle:.1f})"}, text=y_label))  # fmt: skip
        return parts

    def dot(self, point: Point, colour: str, *, radius: float = 3.2, css: str = "dot") -> str:
        title = _tag("title", {}, text=point.note)
        attributes = {"cx": self.px(point.x), "cy": self.py(point.y), "r": radius, "fill": colour}
        return _tag("circle", {**attributes, "class": css, "data-job": point.job}, title)

    def line(self, points: Sequence[Point], colour: str, css: str = "series") -> str:
        coordinates = " ".join(f"{self.px(p.x):.1f},{self.py(p.y):.1f}" for p in points)
        return _tag("polyline", {"points": coordinates, "stroke": colour, "fill": "none", "class": css})


def _svg(parts: list[str], height: int, label: str) -> str:
    attributes = {"viewBox": f"0 0 {WIDTH} {height}", "width": WIDTH, "height": height, "class": "plot"}
    return _tag("svg", {**attributes, "role": "img", "aria-label": label}, *parts)


def line_plot(title: str, x_label: str, y_label: str, series: Sequence[Series]) -> str:
    """Each series' points joined in order of x (a legend under the plot when there are several)."""
    points = [p for s in series for p in s.points]
    if not points:
        return ""
    frame = _Frame([p.x for p in points], [p.y for p in points])
    parts = frame.axes(title, x_label, y_label)
    named = [s for s in series if s.name][:MAX_LEGEND]
    for i, one in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        ordered = sorted(one.points, key=lambda p: p.x)
        if len(ordered) > 1:
            parts.append(frame.line(ordered, colour))
        parts.extend(frame.dot(p, colour) for p in ordered)
    for i, one in enumerate(named):
        y = HEIGHT + 4 + i * LEGEND_LINE
        parts.append(_tag("rect", {"x": LEFT, "y": y, "width": 10, "height": 10, "fill": COLOURS[i % len(COLOURS)]}))
        parts.append(_tag("text", {"x": LEFT + 16, "y": y + 9, "class": "legend"}, text=one.name))
    if len(series) > len(named) and named:
        y = HEIGHT + 4 + len(named) * LEGEND_LINE
        parts.append(_tag("text", {"x": LEFT, "y": y + 9, "class": "legend"}, text=f"… {len(series)} lines in all"))
    legend = (len(named) + (len(series) > len(named))) * LEGEND_LINE if named else 0
    return _svg(parts, HEIGHT + legend + (6 if legend else 0), title)


def pareto_plot(
    title: str, x_label: str, y_label: str, points: Sequence[Point], front: Sequence[int], best: str | None = None
) -> str:
    """The points, those at the indices `front` larger and joined in order of x; the best job ringed."""
    if not points:
        return ""
    frame = _Frame([p.x for p in points], [p.y for p in points])
    parts = frame.axes(title, x_label, y_label)
    on_front = set(front)
    parts.extend(frame.dot(p, "#9a9a9a", css="dot dominated") for i, p in enumerate(points) if i not in on_front)
    kept = sorted((points[i] for i in on_front), key=lambda p: (p.x, p.y))
    if len(kept) > 1:
        parts.append(frame.line(kept, COLOURS[1], css="front"))
    parts.extend(frame.dot(p, COLOURS[1], radius=4.5, css="dot on-front") for p in kept)
    for p in points:
        if best is not None and p.job == best:
            ring = {"cx": frame.px(p.x), "cy": frame.py(p.y), "r": 8.0, "fill": "none", "class": "best-ring"}
            parts.append(_tag("circle", ring, _tag("title", {}, text=f"best: {p.note}")))
    y = HEIGHT + 4
    parts.append(_tag("circle", {"cx": LEFT + 5, "cy": y + 5, "r": 4.5, "fill": COLOURS[1]}))
    parts.append(_tag("text", {"x": LEFT + 16, "y": y + 9, "class": "legend"}, text="Pareto front (not dominated)"))
    return _svg(parts, HEIGHT + LEGEND_LINE + 6, title)


# The plots of a sweep report's jobs


def finite(value: Any) -> TypeGuard[float]:
    """A number (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: Any) -> str:
    """A figure as `number` writes it, None as '—', anything else as its text."""
    if finite(value):
        return number(float(value))
    return "—" if value is None else str(value)


def metric_value(job: Mapping[str, Any], output: str, metric: str) -> float | None:
    """The job's finite figure of output.metric, or None (failed, skipped, not measured)."""
    metrics = (job.get("metrics") or {}).get(output)
    value = metrics.get(metric) if isinstance(metrics, Mapping) else None
    return float(value) if finite(value) else None


def objective_name(objective: Mapping[str, Any]) -> str:
    return f"{objective.get('output', '')}.{objective.get('metric', '')}".strip(".")


def objective_values(job: Mapping[str, Any], count: int) -> list[float | None]:
    """The job's `count` objective values (None where one is missing or failed)."""
    value = job.get("objective")
    values = value if isinstance(value, list) else [value]
    return [float(v) if finite(v) else None for v in values[:count]] + [None] * (count - len(values[:count]))


def sweep_plots(
    jobs: Sequence[Mapping[str, Any]],
    swept: Mapping[str, Any],
    columns: Sequence[tuple[str, str]],
    objectives: Sequence[Mapping[str, Any]],
    best: str | None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """(title, SVG) of each metric against each numeric swept variable, then of the trade-off; and
    notes on what is left out (past MAX_PLOTS plots, past MAX_PLOT_JOBS jobs)."""
    notes = []
    numeric = [str(v) for v, values in swept.items() if _numeric(values)]
    pairs = [(variable, column) for variable in numeric for column in columns]
    if len(pairs) > MAX_PLOTS:
        notes.append(f"{MAX_PLOTS} of {len(pairs)} plots of a metric against a variable are drawn.")
    drawn = range(min(len(jobs), MAX_PLOT_JOBS))
    if len(drawn) < len(jobs):
        notes.append(f"The plots draw the first {MAX_PLOT_JOBS} of {len(jobs)} jobs (and the Pareto front).")
    plots = []
    for variable, (output, metric) in pairs[:MAX_PLOTS]:
        y_label = f"{output}.{metric}"
        series = _series(jobs, drawn, variable, [v for v in numeric if v != variable], output, metric)
        svg = line_plot(f"{y_label} against {variable}", variable, y_label, series)
        if svg:
            plots.append((f"{y_label} against {variable}", svg))
    trade = _trade_off(jobs, drawn, columns, objectives, best)
    return [*plots, *([trade] if trade else [])], notes


def _numeric(values: Any) -> bool:
    """Numbers, at least two of them different (None aside)."""
    present = [v for v in values if v is not None] if isinstance(values, list) else []
    return len(set(present)) > 1 and all(finite(v) for v in present)


def _series(
    jobs: Sequence[Mapping[str, Any]],
    drawn: Iterable[int],
    variable: str,
    others: Sequence[str],
    output: str,
    metric: str,
) -> list[Series]:
    """One line per combination of the other numeric variables when there are 2 to MAX_SERIES of them
    and some has several points; else one line through every point."""
    groups: dict[str, list[Point]] = {}
    for i in drawn:
        job = jobs[i]
        values = job.get("values") or {}
        x, y = values.get(variable), metric_value(job, output, metric)
        if not finite(x) or y is None:
            continue
        group = ", ".join(f"{o}={shown(values.get(o))}" for o in others)
        note = f"job {job.get('job')}: {variable}={shown(x)}, {output}.{metric}={shown(y)}"
        groups.setdefault(group, []).append(Point(float(x), y, str(job.get("job")), note))
    if 2 <= len(groups) <= MAX_SERIES and any(len(points) > 1 for points in groups.values()):
        return [Series(name, tuple(points)) for name, points in groups.items()]
    return [Series("", tuple(p for points in groups.values() for p in points))] if groups else []


def _trade_off(
    jobs: Sequence[Mapping[str, Any]],
    drawn: Iterable[int],
    columns: Sequence[tuple[str, str]],
    objectives: Sequence[Mapping[str, Any]],
    best: str | None,
) -> tuple[str, str] | None:
    """The two objectives against each other (or the two metrics, when there is no objective), the
    Pareto front over every job highlighted (when both directions are known); None when not two."""
    if len(objectives) == 2:
        names = [objective_name(o) for o in objectives]
        directions = [str(o.get("direction", "")) for o in objectives]
        values = [objective_values(job, 2) for job in jobs]
    elif not objectives and len(columns) == 2:
        names = [f"{o}.{m}" for o, m in columns]
        directions = [METRIC_DIRECTIONS.get(m, "") for _, m in columns]
        values = [[metric_value(job, o, m) for o, m in columns] for job in jobs]
    else:
        return None
    known = all(d in (MAXIMIZE, MINIMIZE) for d in directions)
    front = set(pareto_front(values, directions)) if known else set()
    points: list[Point] = []
    front_at: list[int] = []
    for i in sorted(set(drawn) | front):
        x, y = values[i]
        if x is None or y is None:
            continue
        if i in front:
            front_at.append(len(points))
        note = f"job {jobs[i].get('job')}: {names[0]}={shown(x)}, {names[1]}={shown(y)}"
        points.append(Point(x, y, str(jobs[i].get("job")), note))
    title = f"{names[1]} against {names[0]}" + (f" ({directions[0]} x, {directions[1]} y)" if known else "")
    svg = pareto_plot(title, names[0], names[1], points, front_at, best)
    return (title, svg) if svg else None
