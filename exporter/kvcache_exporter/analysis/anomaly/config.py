"""What the anomaly detector can raise, and the thresholds and windows it raises them at.

The alert names (the ``alert`` label), the levels each can reach, and :class:`AnomalyConfig`
with its validation: settings only, what flags, YAML and the library build, with nothing of the
detector. What each alert measures is in :mod:`.detector`; how levels step up and down, in
:mod:`.hysteresis`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Final

from ...thresholds import (
    LIFETIME_COLLAPSE_RATIO,
    STORM_FACTOR,
    STORM_MIN_RATE,
    THRASH_CRITICAL_RATIO,
    THRASH_RATIO,
)
from ..series import AlertLevel

EVICTION_STORM: Final = "eviction_storm"
THRASHING: Final = "thrashing"
SHORT_RESIDENCY: Final = "short_residency"
CACHE_RESET: Final = "cache_reset"
EVENT_LOSS: Final = "event_loss"
SOURCE_STALLED: Final = "source_stalled"

#: Every alert and the levels it can be raised at, in display order; the label sets of
#: ``kvcache_alerts_total{alert,severity}`` (pre-create them so the counters exist at zero).
ALERT_LEVELS: Final[dict[str, tuple[AlertLevel, ...]]] = {
    EVICTION_STORM: (AlertLevel.WARNING, AlertLevel.CRITICAL),
    THRASHING: (AlertLevel.WARNING, AlertLevel.CRITICAL),
    SHORT_RESIDENCY: (AlertLevel.WARNING, AlertLevel.CRITICAL),
    CACHE_RESET: (AlertLevel.INFO,),
    EVENT_LOSS: (AlertLevel.WARNING, AlertLevel.CRITICAL),
    SOURCE_STALLED: (AlertLevel.WARNING,),
}


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    """Thresholds and windows of :class:`~.detector.AnomalyDetector`; every time is in seconds.

    Engine-clock windows unless noted. :mod:`.detector` and :mod:`.hysteresis` give the exact
    semantics.
    """

    # -- hysteresis, shared by every alert except cache_reset
    clear_ratio: float = 0.7
    """An alert steps down only past ``threshold * clear_ratio`` (``/`` where lower is worse);
    in (0, 1], 1 meaning no dead band."""
    min_hold_seconds: float = 30.0
    """A level is held at least this long (engine time) before it may step down."""

    # -- eviction_storm
    storm_window_seconds: float = 10.0
    """Short window whose eviction rate is compared with the baseline."""
    storm_baseline_seconds: float = 300.0
    """Baseline window, ending where the short window starts."""
    storm_min_baseline_seconds: float = 60.0
    """Baseline time (counted from the first eviction) needed before a storm can be raised."""
    storm_factor: float = STORM_FACTOR
    """WARNING when the short-window rate is at least this multiple of the baseline rate."""
    storm_critical_factor: float = 10.0
    """CRITICAL multiple."""
    storm_min_rate: float = STORM_MIN_RATE
    """Blocks/s the short-window rate must also reach: a 10x jump from 1/s is not a storm."""
    storm_baseline_floor: float = 1.0
    """Blocks/s; a lower baseline rate counts as this, so a zero baseline gives a finite factor."""

    # -- thrashing
    thrash_window_seconds: float = 60.0
    """Window over which restores / stores is taken."""
    thrash_ratio: float = THRASH_RATIO
    """WARNING ratio of restores to stores."""
    thrash_critical_ratio: float = THRASH_CRITICAL_RATIO
    """CRITICAL ratio."""
    thrash_min_stores: int = 100
    """Stores the window needs before the ratio means anything."""

    # -- short_residency
    residency_window_seconds: float = 60.0
    """Short window of the median lifetime."""
    residency_baseline_seconds: float = 600.0
    """Baseline window of the median lifetime, ending where the short window starts."""
    residency_ratio: float = LIFETIME_COLLAPSE_RATIO
    """WARNING when short median / baseline median is at most this."""
    residency_critical_ratio: float = 0.1
    """CRITICAL ratio."""
    residency_min_observations: int = 50
    """Lifetimes (evicted blocks) the short window needs."""
    residency_min_baseline_observations: int = 200
    """Lifetimes the baseline window needs."""

    # -- cache_reset
    reset_hold_seconds: float = 60.0
    """The alert stays active this long after the latest clear or restart."""

    # -- event_loss
    loss_window_seconds: float = 300.0
    """Window in which lost batches count."""
    loss_batches: int = 1
    """WARNING at this many lost batches in the window."""
    loss_critical_batches: int = 10
    """CRITICAL at this many."""

    # -- source_stalled (wall clock)
    stall_seconds: float = 60.0
    """Silence after which a source that has received messages is stalled."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"anomaly config: {f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"anomaly config: {f.name} must be finite, got {value}")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"anomaly config: {f.name} must be an integer, got {value!r}")

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"anomaly config: {message}")

        need(
            0.0 < self.clear_ratio <= 1.0, f"clear_ratio must be in (0, 1], got {self.clear_ratio}"
        )
        need(self.min_hold_seconds >= 0.0, "min_hold_seconds must be >= 0")
        for name in (
            "storm_window_seconds",
            "storm_baseline_seconds",
            "thrash_window_seconds",
            "residency_window_seconds",
            "residency_baseline_seconds",
            "reset_hold_seconds",
            "loss_window_seconds",
            "stall_seconds",
        ):
            need(getattr(self, name) > 0.0, f"{name} must be > 0, got {getattr(self, name)}")
        need(
            0.0 <= self.storm_min_baseline_seconds <= self.storm_baseline_seconds,
            "storm_min_baseline_seconds must be in [0, storm_baseline_seconds], "
            f"got {self.storm_min_baseline_seconds}",
        )
        need(self.storm_factor > 1.0, f"storm_factor must be > 1, got {self.storm_factor}")
        need(
            self.storm_critical_factor >= self.storm_factor,
            f"storm_critical_factor ({self.storm_critical_factor}) must be >= storm_factor "
            f"({self.storm_factor})",
        )
        need(self.storm_min_rate >= 0.0, f"storm_min_rate must be >= 0, got {self.storm_min_rate}")
        need(
            self.storm_baseline_floor > 0.0,
            f"storm_baseline_floor must be > 0, got {self.storm_baseline_floor}",
        )
        need(self.thrash_ratio > 0.0, f"thrash_ratio must be > 0, got {self.thrash_ratio}")
        need(
            self.thrash_critical_ratio >= self.thrash_ratio,
            f"thrash_critical_ratio ({self.thrash_critical_ratio}) must be >= thrash_ratio "
            f"({self.thrash_ratio})",
        )
        need(self.thrash_min_stores >= 1, "thrash_min_stores must be >= 1")
        need(
            0.0 < self.residency_ratio < 1.0,
            f"residency_ratio must be in (0, 1), got {self.residency_ratio}",
        )
        need(
            0.0 < self.residency_critical_ratio <= self.residency_ratio,
            f"residency_critical_ratio must be in (0, residency_ratio], "
            f"got {self.residency_critical_ratio}",
        )
        need(self.residency_min_observations >= 1, "residency_min_observations must be >= 1")
        need(
            self.residency_min_baseline_observations >= 1,
            "residency_min_baseline_observations must be >= 1",
        )
        need(self.loss_batches >= 1, f"loss_batches must be >= 1, got {self.loss_batches}")
        need(
            self.loss_critical_batches >= self.loss_batches,
            f"loss_critical_batches ({self.loss_critical_batches}) must be >= loss_batches "
            f"({self.loss_batches})",
        )

    @property
    def history_seconds(self) -> float:
        """How far back the detector keeps points: its longest window."""
        return max(
            self.storm_window_seconds + self.storm_baseline_seconds,
            self.thrash_window_seconds,
            self.residency_window_seconds + self.residency_baseline_seconds,
            self.loss_window_seconds,
        )
