"""Trend detection: direction and least-squares slope of derived series over a sliding window.

Each engine-clock step (two consecutive :class:`~.series.EnginePoint`) yields one sample of
each derived series:

==========================  ==========================================  ===================
series                      per step                                    slope unit
==========================  ==========================================  ===================
``store_rate``              Δstored / Δt (blocks/s)                     blocks/s²
``eviction_rate``           Δevicted / Δt (blocks/s)                    blocks/s²
``resident_blocks``         resident at the point (blocks)              blocks/s
``median_lifetime_seconds`` bucket-interpolated median of the lifetime  s/s
                            count deltas; steps with none are skipped
``restore_ratio``           Δrestores / Δstored; steps without stores   1/s
                            are skipped
==========================  ==========================================  ===================

Per-step samples are placed at the middle of their step, where an average over the step is
exact for a linearly changing rate, so irregular spacing does not bend the slope; resident
blocks, a gauge, sit at the point's own time.

The direction compares the fitted change over the window (slope * span of the samples) with
the mean absolute value of the series: within ``flat_tolerance`` of it is flat (0), above is
up (+1), below is down (-1). A series with fewer than ``min_points`` samples in the window is
left out of :meth:`TrendDetector.trends`: unknown, not flat.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..collector.histogram import histogram_quantile, histogram_quantiles
from .series import EnginePoint, EnginePoints, went_backwards

STORE_RATE: Final = "store_rate"
EVICTION_RATE: Final = "eviction_rate"
RESIDENT_BLOCKS: Final = "resident_blocks"
MEDIAN_LIFETIME: Final = "median_lifetime_seconds"
RESTORE_RATIO: Final = "restore_ratio"

#: The series a :class:`TrendDetector` follows, in display order.
SERIES: Final = (STORE_RATE, EVICTION_RATE, RESIDENT_BLOCKS, MEDIAN_LIFETIME, RESTORE_RATIO)

_DIRECTION_NAMES: Final = {-1: "down", 0: "flat", 1: "up"}


@dataclass(frozen=True, slots=True)
class TrendConfig:
    """Window and sensitivity of :class:`TrendDetector`."""

    window_seconds: float = 300.0
    """Engine-clock window the slope is fitted over."""
    min_points: int = 10
    """Samples a series needs in the window before it has a trend."""
    flat_tolerance: float = 0.1
    """Fitted change over the window, relative to the series' mean absolute value, within
    which the series is flat."""
    max_points: int = 4096
    """Hard cap on samples kept per series (the newest win), whatever the point rate."""

    def __post_init__(self) -> None:
        if not 0.0 < self.window_seconds < float("inf"):
            raise ValueError(f"trend config: window_seconds must be > 0, got {self.window_seconds}")
        if isinstance(self.min_points, bool) or not isinstance(self.min_points, int):
            raise ValueError(
                f"trend config: min_points must be an integer, got {self.min_points!r}"
            )
        if self.min_points < 2:
            raise ValueError(f"trend config: min_points must be >= 2, got {self.min_points}")
        if not 0.0 <= self.flat_tolerance < float("inf"):
            raise ValueError(
                f"trend config: flat_tolerance must be >= 0, got {self.flat_tolerance}"
            )
        if isinstance(self.max_points, bool) or not isinstance(self.max_points, int):
            raise ValueError(
                f"trend config: max_points must be an integer, got {self.max_points!r}"
            )
        if self.max_points < self.min_points:
            raise ValueError(
                f"trend config: max_points ({self.max_points}) must be >= min_points "
                f"({self.min_points})"
            )


@dataclass(frozen=True, slots=True)
class Trend:
    """The trend of one series over the window."""

    series: str
    direction: int
    """-1 down, 0 flat, +1 up."""
    slope: float
    """Least-squares slope, in units of the series per second."""
    value: float
    """The latest sample."""
    points: int
    """Samples in the window."""
    span_seconds: float
    """Time between the first and the last sample."""
    relative_change: float
    """slope * span / mean absolute value: what ``flat_tolerance`` is compared with."""

    @property
    def direction_name(self) -> str:
        """``down``, ``flat`` or ``up``."""
        return _DIRECTION_NAMES[self.direction]

    def to_dict(self) -> dict[str, Any]:
        """For the JSON summary."""
        return {
            "series": self.series,
            "direction": self.direction,
            "direction_name": self.direction_name,
            "slope": self.slope,
            "value": self.value,
            "points": self.points,
            "span_seconds": self.span_seconds,
            "relative_change": self.relative_change,
        }


def fit_trend(
    series: str, times: Sequence[float], values: Sequence[float], flat_tolerance: float
) -> Trend:
    """A :class:`Trend` of samples ``values`` at ``times`` (at least two distinct times give a
    slope; fewer give 0)."""
    t = np.asarray(times, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    # Centre the times: engine clocks can be Unix seconds, and t² in float64 would lose the
    # sub-second differences the fit is made of.
    tc = t - t.mean()
    denom = float(np.dot(tc, tc))
    slope = float(np.dot(tc, y - y.mean()) / denom) if denom > 0.0 else 0.0
    span = float(t[-1] - t[0]) if t.size else 0.0
    scale = float(np.abs(y).mean()) if y.size else 0.0
    relative = slope * span / scale if scale > 0.0 else 0.0
    if relative > flat_tolerance:
        direction = 1
    elif relative < -flat_tolerance:
        direction = -1
    else:
        direction = 0
    return Trend(
        series=series,
        direction=direction,
        slope=slope,
        value=float(y[-1]) if y.size else 0.0,
        points=int(y.size),
        span_seconds=span,
        relative_change=relative,
    )


class TrendDetector:
    """Trends of one engine's derived series over a sliding engine-clock window.

    Memory is bounded: samples older than the window before the newest point are dropped, and
    no series keeps more than ``max_points``. A point with the same ``ts`` as the previous one
    replaces it; counters going backwards, changed histogram bounds or a clock going backwards
    start the series over.
    """

    def __init__(self, config: TrendConfig | None = None) -> None:
        self.config = config or TrendConfig()
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._prev: EnginePoint | None = None  # the point before _last, to redo a replaced step
        self._last: EnginePoint | None = None
        self._added: list[str] = []  # series the last point appended to
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._samples = {name: deque(maxlen=self.config.max_points) for name in SERIES}
        self._prev = None
        self._last = None
        self._added = []

    def observe(self, point: EnginePoint) -> None:
        """Take the next point."""
        last = self._last
        if last is not None and point.ts == last.ts and not went_backwards(last, point):
            # Same step again: undo what the replaced point added and redo it from _prev.
            for name in self._added:
                self._samples[name].pop()
            self._last = point
            self._added = self._add_step(self._prev, point)
        elif last is not None and (point.ts < last.ts or went_backwards(last, point)):
            self.reset()
            self._last = point
            self._added = self._add_step(None, point)
        else:
            self._prev, self._last = last, point
            self._added = self._add_step(last, point)
        self._trim(float(point.ts))

    def _trim(self, now: float) -> None:
        horizon = now - self.config.window_seconds
        for samples in self._samples.values():
            while samples and samples[0][0] < horizon:
                samples.popleft()

    def observe_many(self, points: EnginePoints) -> None:
        """:meth:`observe` of each point in turn, in one pass (points that restart the series or
        replace one another take :meth:`observe` one by one)."""
        k = len(points)
        last = self._last
        if not k:
            return
        if last is None or not points.follows(last):
            for i in range(k):
                self.observe(points.point(i))
            return
        ts = points.ts.astype(np.float64)
        prev_ts = np.concatenate(([float(last.ts)], ts[:-1]))
        dt = ts - prev_ts
        mid = (ts + prev_ts) / 2.0
        stored = np.diff(points.stored, prepend=last.stored)
        evicted = np.diff(points.evicted, prepend=last.evicted)
        restores = np.diff(points.restores, prepend=last.restores)
        counts = np.vstack((last.lifetime_counts[None, :], points.lifetime_counts))
        lifetimes = counts[1:].astype(np.int64) - counts[:-1].astype(np.int64)
        median, has_median = histogram_quantiles(points.lifetime_bounds, lifetimes, 0.5)
        stores = stored > 0
        samples = self._samples
        samples[RESIDENT_BLOCKS].extend(
            zip(ts.tolist(), points.resident.astype(float).tolist(), strict=True)
        )
        mids = mid.tolist()
        samples[STORE_RATE].extend(zip(mids, (stored / dt).tolist(), strict=True))
        samples[EVICTION_RATE].extend(zip(mids, (evicted / dt).tolist(), strict=True))
        samples[MEDIAN_LIFETIME].extend(
            zip(mid[has_median].tolist(), median[has_median].tolist(), strict=True)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = restores / stored
        samples[RESTORE_RATIO].extend(
            zip(mid[stores].tolist(), ratio[stores].tolist(), strict=True)
        )
        self._prev = points.point(k - 2) if k >= 2 else last
        self._last = points.point(k - 1)
        self._added = [RESIDENT_BLOCKS, STORE_RATE, EVICTION_RATE]
        if has_median[-1]:
            self._added.append(MEDIAN_LIFETIME)
        if stores[-1]:
            self._added.append(RESTORE_RATIO)
        self._trim(float(ts[-1]))

    def trends(self) -> dict[str, Trend]:
        """The trend of every series with at least ``min_points`` samples in the window, in
        :data:`SERIES` order."""
        out: dict[str, Trend] = {}
        for name, samples in self._samples.items():
            if len(samples) < self.config.min_points:
                continue
            times, values = zip(*samples, strict=True)
            out[name] = fit_trend(name, times, values, self.config.flat_tolerance)
        return out

    def _add_step(self, prev: EnginePoint | None, point: EnginePoint) -> list[str]:
        added = [RESIDENT_BLOCKS]
        self._samples[RESIDENT_BLOCKS].append((float(point.ts), float(point.resident)))
        if prev is None:
            return added
        dt = float(point.ts) - float(prev.ts)
        if dt <= 0.0:
            return added
        mid = (float(point.ts) + float(prev.ts)) / 2.0
        stored = point.stored - prev.stored
        self._samples[STORE_RATE].append((mid, stored / dt))
        self._samples[EVICTION_RATE].append((mid, (point.evicted - prev.evicted) / dt))
        added += [STORE_RATE, EVICTION_RATE]
        counts = point.lifetime_counts.astype(np.int64) - prev.lifetime_counts.astype(np.int64)
        median = histogram_quantile(point.lifetime_bounds, counts, 0.5)
        if median is not None:
            self._samples[MEDIAN_LIFETIME].append((mid, median))
            added.append(MEDIAN_LIFETIME)
        if stored > 0:
            self._samples[RESTORE_RATIO].append((mid, (point.restores - prev.restores) / stored))
            added.append(RESTORE_RATIO)
        return added
