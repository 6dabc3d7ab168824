"""Samples one engine's collector on the engine clock and runs the detectors over it.

The monitor takes an :class:`EnginePoint` on a fixed engine-clock grid (every
``point_interval`` seconds): the collector reports its totals as they stood at each grid time
inside a batch (a cumulative sum over the batch's rows, not an apply per piece). The points
feed the anomaly and trend detectors, and each alert transition is logged once.
``source_stalled`` needs the wall clock instead (a silent engine makes no points): the ingest
loop calls :meth:`tick`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from ..collector import CutTotals
from .anomaly import AnomalyConfig, AnomalyDetector
from .series import AlertLevel, CacheAlert, EnginePoints
from .trends import Trend, TrendConfig, TrendDetector

log = logging.getLogger("kvcache_exporter.alerts")

RECENT_TRANSITIONS: Final = 50


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """How often an engine is sampled and how its detectors are tuned."""

    point_interval: float = 1.0
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)

    def __post_init__(self) -> None:
        if not self.point_interval > 0:
            raise ValueError(f"point interval must be positive, got {self.point_interval}")


def points_of(totals: CutTotals, ts: npt.NDArray[np.float64], lost_batches: int) -> EnginePoints:
    """An engine's cumulative figures, all media together, at each entry of ``totals``, as
    points at the times ``ts``."""
    return EnginePoints(
        ts=ts,
        stored=totals.stored,
        evicted=totals.evicted,
        restores=totals.restores,
        resident=totals.resident,
        clears=totals.clears,
        lost_batches=np.full(ts.size, lost_batches, np.int64),
        lifetime_bounds=totals.lifetime_bounds,
        lifetime_counts=totals.lifetime_counts,
    )


class EngineMonitor:
    """Alerts and trends of one engine; safe to read from other threads."""

    def __init__(
        self,
        engine: str,
        lost_batches: Callable[[], int],
        config: MonitorConfig | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or MonitorConfig()
        self._lost_batches = lost_batches
        self._anomaly = AnomalyDetector(engine, self.config.anomaly)
        self._trends = TrendDetector(self.config.trend)
        self._next_point: float | None = None
        self._lock = threading.Lock()
        self._recent: list[CacheAlert] = []

    def cuts(self, ts: npt.NDArray[np.float64]) -> list[tuple[int, float]]:
        """Where a batch with these row times crosses the sampling grid: ``(row, grid time)``
        pairs, meaning "apply the rows before ``row``, then sample at grid time" (the totals
        at every cut of a batch go to :meth:`sample_many` together).

        Points sit on a fixed engine-clock grid (multiples of ``point_interval``) and see
        exactly the rows before them, so alerts and trends do not depend on how the stream
        was cut into batches. Empty stretches of the grid are skipped, not filled.
        """
        interval = self.config.point_interval
        result: list[tuple[int, float]] = []
        if not ts.size:
            return result
        if self._next_point is None:
            self._next_point = _grid_after(float(ts[0]), interval)
        if bool((ts[1:] >= ts[:-1]).all()) and math.isfinite(ts[0]) and math.isfinite(ts[-1]):
            return self._cuts_in_order(ts)
        start = 0
        while True:
            later = np.flatnonzero(ts[start:] >= self._next_point)
            if not later.size:
                return result
            row = start + int(later[0])
            result.append((row, self._next_point))
            self._next_point = _grid_after(float(ts[row]), interval)
            start = row

    def _cuts_in_order(self, ts: npt.NDArray[np.float64]) -> list[tuple[int, float]]:
        """:meth:`cuts` of times that never go back: each cut row is found by bisection, so
        the cost is per grid point, not per row."""
        assert self._next_point is not None
        interval = self.config.point_interval
        result: list[tuple[int, float]] = []
        row = int(np.searchsorted(ts, self._next_point, "left"))
        while row < ts.size:
            result.append((row, self._next_point))
            self._next_point = _grid_after(float(ts[row]), interval)
            row = int(np.searchsorted(ts, self._next_point, "left"))
        return result

    def sample_many(self, grid_ts: npt.NDArray[np.float64], totals: CutTotals) -> None:
        """Feed the detectors the collector's totals as they stood at each grid time (as
        columns: one pass of the detectors over them all)."""
        points = points_of(totals, grid_ts, self._lost_batches())
        with self._lock:
            transitions = self._anomaly.observe_many(points)
            self._trends.observe_many(points)
            self._record(transitions)

    def tick(self, now_wall: float, last_arrival_wall: float | None) -> None:
        """Wall-clock checks (a source gone silent); called about once a second."""
        with self._lock:
            self._record(self._anomaly.check_stalled(now_wall, last_arrival_wall))

    def _record(self, transitions: list[CacheAlert]) -> None:
        for alert in transitions:
            extra = {
                "engine": alert.engine,
                "alert": alert.alert,
                "severity": alert.level.value,
                "value": round(alert.value, 6),
                "threshold": alert.threshold,
            }
            transition = str(
                alert.details.get("transition", "raised" if alert.active else "cleared")
            )
            if transition in ("raised", "escalated"):
                log.warning(f"alert {transition}: {alert.message}", extra=extra)
            else:
                log.info(f"alert {transition}: {alert.message}", extra=extra)
        self._recent = (self._recent + transitions)[-RECENT_TRANSITIONS:]

    def active(self) -> list[CacheAlert]:
        with self._lock:
            return self._anomaly.active()

    def raised_total(self) -> dict[tuple[str, AlertLevel], int]:
        with self._lock:
            return dict(self._anomaly.raised_total())

    def recent_transitions(self) -> list[CacheAlert]:
        with self._lock:
            return list(self._recent)

    def trends(self) -> dict[str, Trend]:
        with self._lock:
            return dict(self._trends.trends())

    def reset(self) -> None:
        with self._lock:
            self._record(self._anomaly.reset())
            self._trends = TrendDetector(self.config.trend)
            self._next_point = None
            self._recent = []


def _grid_after(ts: float, interval: float) -> float:
    """The first grid time strictly after ``ts``. At magnitudes where adding an interval is
    lost to rounding (a garbage timestamp of 1e20), the next float up, so sampling always
    moves forward."""
    candidate = (math.floor(ts / interval) + 1) * interval
    return candidate if candidate > ts else math.nextafter(ts, math.inf)
