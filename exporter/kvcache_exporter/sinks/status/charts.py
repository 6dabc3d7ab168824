"""Chart layouts: every chart of the status page as a list of drawing primitives.

All geometry (scales, ticks, legends, markers) is computed here, once. A layout is plain
JSON-able data, so two dumb renderers draw the same picture: :mod:`.svg` on the server (the
page as first served, and all of it with JavaScript off) and ``static/status.js`` in the
browser (each refresh). A primitive is one of

- ``{"t": "path", "d": "M…", "c": classes}``
- ``{"t": "text", "x", "y", "s": text, "c": classes, "a": "start" | "middle" | "end"}``,
  with ``"r": -90`` for a vertical label (rotated about its anchor)
- ``{"t": "rect", "x", "y", "w", "h", "c": classes, "s": tooltip}``

Colours and dashes live in ``static/status.css`` under the style classes ``s0`` … ``s5``:
the Okabe-Ito palette, each style also with its own dash pattern and marker shape, so no
two series differ by colour alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

WIDTH: Final = 440
HEIGHT: Final = 250
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 44, 46  # margins around the plot area
STYLES: Final = 6
MARKERS_PER_LINE: Final = 8

Chart = dict[str, Any]
Primitive = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Line:
    """A series: ``ys[i]`` at ``xs[i]``; None breaks the line."""

    name: str
    style: int
    xs: Sequence[float]
    ys: Sequence[float | None]


@dataclass(frozen=True, slots=True)
class Rule:
    """A reference line across the plot: horizontal at a y value or vertical at an x value."""

    vertical: bool
    at: float
    label: str
    style: int


def nice_step(span: float, count: int = 4) -> float:
    """A 1, 2 or 5 times 10^k step that cuts ``span`` into about ``count`` intervals."""
    raw = span / count if span > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if raw <= m * power * (1 + 1e-12))


def ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Multiples of a nice step between ``lo`` and ``hi`` (both included when on the grid)."""
    step = nice_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9)
    out = []
    k = first
    while k * step <= hi + step * 1e-9:
        out.append(round(k * step, 12))
        k += 1
    return out


def compact(value: float) -> str:
    """A tick label: 1.5k, 20M, 0.25, 3."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    """A duration bucket's label: 1ms, 250ms, 5s, 2m, 30m."""
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    return f"{seconds / 60:.3g}m"


def _num(value: float) -> float:
    """A coordinate to a tenth of a unit, whole numbers as ints: JSON then carries it in the
    form both renderers print alike (``62``, ``101.5``)."""
    rounded = round(float(value), 1)
    return int(rounded) if rounded.is_integer() else rounded


def _marker(style: int, x: float, y: float) -> str:
    """A marker's path, its shape fixed by the style (circle, square, triangle, …)."""
    x, y, r = _num(x), _num(y), 3.5
    shape = style % STYLES
    if shape == 0:
        return f"M{x - r} {y}a{r} {r} 0 1 0 {2 * r} 0a{r} {r} 0 1 0 {-2 * r} 0Z"
    if shape == 1:
        return f"M{x - r} {y - r}h{2 * r}v{2 * r}h{-2 * r}Z"
    if shape == 2:
        return f"M{x} {y - r - 1}L{x + r + 1} {y + r}L{x - r - 1} {y + r}Z"
    if shape == 3:
        return f"M{x} {y - r - 1}L{x + r + 1} {y}L{x} {y + r + 1}L{x - r - 1} {y}Z"
    if shape == 4:
        return f"M{x} {y + r + 1}L{x + r + 1} {y - r}L{x - r - 1} {y - r}Z"
    return f"M{x - r} {y - r}L{x + r} {y + r}M{x + r} {y - r}L{x - r} {y + r}"


class _Frame:
    """The plot area and its scales; collects the primitives of one chart."""

    def __init__(
        self,
        x_domain: tuple[float, float],
        y_domain: tuple[float, float],
        log_x: bool = False,
    ) -> None:
        self.x0, self.x1 = LEFT, WIDTH - RIGHT
        self.y0, self.y1 = TOP, HEIGHT - BOTTOM
        self.log_x = log_x
        lo, hi = (math.log(v) for v in x_domain) if log_x else x_domain
        self.xd = (lo, hi if hi > lo else lo + 1)
        self.yd = (y_domain[0], y_domain[1] if y_domain[1] > y_domain[0] else y_domain[0] + 1)
        self.items: list[Primitive] = []

    def x(self, value: float) -> float:
        v = math.log(value) if self.log_x else value
        lo, hi = self.xd
        return self.x0 + (v - lo) / (hi - lo) * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        lo, hi = self.yd
        return self.y1 - (value - lo) / (hi - lo) * (self.y1 - self.y0)

    def text(self, x: float, y: float, s: str, c: str, a: str = "start", r: int = 0) -> None:
        item: Primitive = {"t": "text", "x": _num(x), "y": _num(y), "s": s, "c": c, "a": a}
        if r:
            item["r"] = r
        self.items.append(item)

    def path(self, d: str, c: str) -> None:
        self.items.append({"t": "path", "d": d, "c": c})

    def axes(
        self,
        x_label: str,
        y_label: str,
        x_ticks: Sequence[tuple[float, str]],
        y_ticks: Sequence[float],
        y_format: Any = compact,
    ) -> None:
        """Grid lines, tick labels and both axis titles (with their units)."""
        grid = []
        for value in y_ticks:
            py = _num(self.y(value))
            grid.append(f"M{self.x0} {py}H{self.x1}")
            self.text(self.x0 - 6, py + 4, y_format(value), "tick", "end")
        for value, label in x_ticks:
            px = _num(self.x(value))
            grid.append(f"M{px} {self.y1}v4")
            self.text(px, self.y1 + 16, label, "tick", "middle")
        self.path("".join(grid), "grid")
        self.path(f"M{self.x0} {self.y0}V{self.y1}H{self.x1}", "axis")
        self.text((self.x0 + self.x1) / 2, HEIGHT - 8, x_label, "label", "middle")
        self.text(14, (self.y0 + self.y1) / 2, y_label, "label", "middle", -90)

    def legend(self, entries: Sequence[tuple[str, int, bool]]) -> None:
        """Entries of (name, style, with marker) in a row under the title."""
        x = float(self.x0)
        for name, style, marked in entries:
            self.path(f"M{_num(x)} 32h18", f"ln s{style}")
            if marked:
                self.path(_marker(style, x + 9, 32), f"mk s{style}")
            self.text(x + 22, 36, name, "legend")
            x += 30 + 6.5 * len(name)


def _chart(chart_id: str, title: str, desc: str, frame: _Frame | None, points: int) -> Chart:
    items = [] if frame is None else frame.items
    items = [{"t": "text", "x": 4, "y": 16, "s": title, "c": "title", "a": "start"}, *items]
    if points == 0:
        items.append(
            {
                "t": "text",
                "x": WIDTH // 2,
                "y": HEIGHT // 2,
                "s": "no data yet",
                "c": "empty",
                "a": "middle",
            }
        )
    return {
        "id": chart_id,
        "title": title,
        "desc": desc,
        "width": WIDTH,
        "height": HEIGHT,
        "points": points,
        "items": items,
    }


def line_chart(
    chart_id: str,
    title: str,
    desc: str,
    x_label: str,
    y_label: str,
    lines: Sequence[Line],
    rules: Sequence[Rule] = (),
    x_domain: tuple[float, float] | None = None,
    y_floor: float = 0.0,
    log_x: bool = False,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    y_format: Any = compact,
) -> Chart:
    """Lines against a shared x axis, with reference lines (thresholds, the current size)."""
    xs = [x for line in lines for x, y in zip(line.xs, line.ys, strict=True) if y is not None]
    ys = [y for line in lines for y in line.ys if y is not None]
    points = len(ys)
    if not points:
        return _chart(chart_id, title, desc, None, 0)
    y_top = max([*ys, *(r.at for r in rules if not r.vertical)])
    y_ticks = ticks(y_floor, y_top * 1.08 if y_top > y_floor else y_floor + 1)
    domain = x_domain or (min(xs), max(xs))
    frame = _Frame(domain, (y_floor, max(y_ticks[-1], y_top)), log_x)
    if x_ticks is None:
        x_ticks = [(t, compact(t)) for t in ticks(*domain)]
    frame.axes(x_label, y_label, x_ticks, y_ticks, y_format)
    for rule in rules:
        if rule.vertical:
            px = _num(frame.x(rule.at))
            frame.path(f"M{px} {frame.y0}V{frame.y1}", f"rule s{rule.style}")
            frame.text(px + 4, frame.y0 + 12, rule.label, f"rule-label s{rule.style}")
        else:
            py = _num(frame.y(rule.at))
            frame.path(f"M{frame.x0} {py}H{frame.x1}", f"rule s{rule.style}")
            frame.text(frame.x1 - 4, py - 4, rule.label, f"rule-label s{rule.style}", "end")
    for line in lines:
        d: list[str] = []
        marks: list[str] = []
        pen_down, seen = False, 0
        valid = sum(1 for y in line.ys if y is not None)
        every = max(1, valid // MARKERS_PER_LINE)  # markers show the style, not every point
        for x, y in zip(line.xs, line.ys, strict=True):
            if y is None:
                pen_down = False
                continue
            px, py = _num(frame.x(x)), _num(frame.y(y))
            d.append(f"{'L' if pen_down else 'M'}{px} {py}")
            pen_down = True
            seen += 1
            if seen % every == 0 or seen == valid:
                marks.append(_marker(line.style, px, py))
        frame.path("".join(d), f"ln s{line.style}")
        frame.path("".join(marks), f"mk s{line.style}")
    frame.legend([(line.name, line.style, True) for line in lines])
    return _chart(chart_id, title, desc, frame, points)


def bar_chart(
    chart_id: str,
    title: str,
    desc: str,
    x_label: str,
    y_label: str,
    labels: Sequence[str],
    counts: Sequence[int],
) -> Chart:
    """One bar per bucket (``labels`` name them), every other bucket labelled."""
    total = sum(counts)
    if not total:
        return _chart(chart_id, title, desc, None, 0)
    n = len(counts)
    y_ticks = ticks(0, max(counts) * 1.08)
    frame = _Frame((0, n), (0, max(y_ticks[-1], max(counts))))
    step = max(1, math.ceil(n / 7))
    frame.axes(
        x_label,
        y_label,
        [(i + 0.5, labels[i]) for i in range(0, n, step)],
        y_ticks,
    )
    width = (frame.x1 - frame.x0) / n
    for i, count in enumerate(counts):
        if count:
            top = frame.y(count)
            frame.items.append(
                {
                    "t": "rect",
                    "x": _num(frame.x(i) + 1),
                    "y": _num(top),
                    "w": _num(max(width - 2, 1)),
                    "h": _num(frame.y1 - top),
                    "c": "bar s0",
                    "s": f"{labels[i]}: {count:,}",
                }
            )
    return _chart(chart_id, title, desc, frame, sum(1 for c in counts if c))
