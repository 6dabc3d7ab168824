"""What the analysis stage reads: points of one engine's cumulative counters over time.

The collector is sampled into an :class:`EnginePoint` at most once per engine-clock step;
anomaly and trend detectors work on the sequence of points, never on single events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class AlertLevel(enum.Enum):
    """How bad an alert is; the value is the Prometheus ``severity`` label."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class EnginePoint:
    """One engine's cumulative figures at engine time ``ts`` (all media together)."""

    ts: float
    stored: int
    evicted: int  # removals other than clears and restarts
    restores: int
    resident: int
    clears: int
    lost_batches: int
    lifetime_bounds: tuple[float, ...]
    lifetime_counts: npt.NDArray[np.uint64]  # per bucket, len(bounds) + 1, cumulative in time


@dataclass(frozen=True, slots=True)
class EnginePoints:
    """Consecutive :class:`EnginePoint` of one engine as columns (one entry each, oldest
    first): what one batch's grid points give the detectors at once."""

    ts: npt.NDArray[np.float64]
    stored: npt.NDArray[np.int64]
    evicted: npt.NDArray[np.int64]
    restores: npt.NDArray[np.int64]
    resident: npt.NDArray[np.int64]
    clears: npt.NDArray[np.int64]
    lost_batches: npt.NDArray[np.int64]
    lifetime_bounds: tuple[float, ...]
    lifetime_counts: npt.NDArray[np.uint64]  # one row of buckets per point

    def __len__(self) -> int:
        return int(self.ts.size)

    def point(self, i: int) -> EnginePoint:
        """The ``i``-th point."""
        return EnginePoint(
            ts=float(self.ts[i]),
            stored=int(self.stored[i]),
            evicted=int(self.evicted[i]),
            restores=int(self.restores[i]),
            resident=int(self.resident[i]),
            clears=int(self.clears[i]),
            lost_batches=int(self.lost_batches[i]),
            lifetime_bounds=self.lifetime_bounds,
            lifetime_counts=self.lifetime_counts[i],
        )

    def follows(self, last: EnginePoint) -> bool:
        """Whether these points can follow ``last`` one by one in a series of cumulative
        counters, each strictly later: no point goes backwards (:func:`went_backwards`) and
        none replaces another (the same time)."""
        if self.lifetime_bounds != last.lifetime_bounds:
            return False
        if self.lifetime_counts.shape[1:] != last.lifetime_counts.shape:
            return False

        def rising(column: npt.NDArray[Any], first: Any, strict: bool = False) -> bool:
            if strict:
                return bool(column[0] > first and (column[1:] > column[:-1]).all())
            return bool((column[0] >= first).all() and (column[1:] >= column[:-1]).all())

        return (
            rising(self.ts, last.ts, strict=True)
            and rising(self.stored, last.stored)
            and rising(self.evicted, last.evicted)
            and rising(self.restores, last.restores)
            and rising(self.clears, last.clears)
            and rising(self.lost_batches, last.lost_batches)
            and rising(self.lifetime_counts, last.lifetime_counts)
        )


@dataclass(frozen=True, slots=True)
class CacheAlert:
    """An alert as raised, held or cleared; ``since`` is the engine time it was raised."""

    alert: str
    level: AlertLevel
    engine: str
    message: str
    since: float
    value: float
    threshold: float
    active: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "severity": self.level.value,
            "engine": self.engine,
            "message": self.message,
            "since": self.since,
            "value": self.value,
            "threshold": self.threshold,
            "active": self.active,
            **({"details": self.details} if self.details else {}),
        }


def went_backwards(last: EnginePoint, point: EnginePoint) -> bool:
    """Whether ``point`` cannot follow ``last`` in one series of cumulative counters."""
    if (
        point.stored < last.stored
        or point.evicted < last.evicted
        or point.restores < last.restores
        or point.clears < last.clears
        or point.lost_batches < last.lost_batches
        or point.lifetime_bounds != last.lifetime_bounds
        or point.lifetime_counts.shape != last.lifetime_counts.shape
    ):
        return True
    return bool(np.any(point.lifetime_counts < last.lifetime_counts))
