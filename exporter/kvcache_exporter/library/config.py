"""The in-process collectors' settings: :class:`MetricsConfig`, checked on creation and
translated into the core's collector and monitor settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analysis.anomaly import AnomalyConfig
from ..analysis.monitor import MonitorConfig
from ..analysis.trends import TrendConfig
from ..collector import CollectorConfig
from ..collector.histogram import (
    ACCESS_COUNT_BUCKETS,
    PREFIX_DEPTH_BUCKETS,
    RESIDENCY_BUCKETS,
    validate_buckets,
)


@dataclass(frozen=True)
class MetricsConfig:
    """Settings of an in-process collector, checked on creation (``ValueError`` says which)."""

    sample_rate: float = 0.01
    """Fraction of block ids whose lifecycle histograms are kept, in (0, 1]; counters stay
    exact. A block is sampled iff a hash of its id falls under the rate, for its whole life."""
    lifetime_buckets: tuple[float, ...] = RESIDENCY_BUCKETS
    """Bucket bounds (seconds) of every duration histogram."""
    access_buckets: tuple[float, ...] = ACCESS_COUNT_BUCKETS
    depth_buckets: tuple[float, ...] = PREFIX_DEPTH_BUCKETS
    max_tracked_blocks: int = 4_000_000
    removed_memory: int = 1_000_000
    """Removed block ids remembered, so that a re-allocation is known as a restore."""
    eviction_log_size: int = 10_000
    """Recent evictions kept as records, for ``export`` and custom distributions."""
    batch_size: int = 4096
    """Calls buffered before they are applied (reads always apply first)."""
    hot_access_threshold: int = 4
    """Accesses since allocation from which a resident block counts as hot."""
    point_interval_seconds: float = 1.0
    trend_window_seconds: float = 300.0
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    medium: str = "GPU"
    """The medium label the per-call methods report blocks under."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        validate_buckets(self.lifetime_buckets, "lifetime_buckets")
        if self.lifetime_buckets[0] <= 0:
            raise ValueError("lifetime_buckets must be positive")
        validate_buckets(self.access_buckets, "access_buckets")
        validate_buckets(self.depth_buckets, "depth_buckets")
        for name in ("max_tracked_blocks", "batch_size", "hot_access_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("removed_memory", "eviction_log_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}")
        for name in ("point_interval_seconds", "trend_window_seconds"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value}")

    def collector_config(self) -> CollectorConfig:
        return CollectorConfig(
            sample_ratio=self.sample_rate,
            max_tracked_blocks=self.max_tracked_blocks,
            removed_memory=self.removed_memory,
            duration_buckets=self.lifetime_buckets,
            access_buckets=self.access_buckets,
            depth_buckets=self.depth_buckets,
            eviction_log_size=self.eviction_log_size,
            # The library's calls say "allocated", not "one more copy": an id already
            # resident is an access (the sidecar's hit-report mode), never a second copy.
            hit_reports=True,
        )

    def monitor_config(self) -> MonitorConfig:
        return MonitorConfig(
            point_interval=self.point_interval_seconds,
            anomaly=self.anomaly,
            trend=TrendConfig(window_seconds=self.trend_window_seconds),
        )
