"""Anomaly detection on one engine's point stream, one concern a module: :mod:`.config` (the
alerts and their thresholds), :mod:`.detector` (the signals over sliding windows of points)
and :mod:`.hysteresis` (how an alert's level steps up and down)."""

from .config import (
    ALERT_LEVELS,
    CACHE_RESET,
    EVENT_LOSS,
    EVICTION_STORM,
    SHORT_RESIDENCY,
    SOURCE_STALLED,
    THRASHING,
    AnomalyConfig,
)
from .detector import AnomalyDetector

__all__ = [
    "ALERT_LEVELS",
    "CACHE_RESET",
    "EVENT_LOSS",
    "EVICTION_STORM",
    "SHORT_RESIDENCY",
    "SOURCE_STALLED",
    "THRASHING",
    "AnomalyConfig",
    "AnomalyDetector",
]
