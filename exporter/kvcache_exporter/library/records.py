"""The values the in-process collectors return, as the seed design names them: the
distributions a summary holds, the summary, one eviction and one block's state."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ..analysis.series import CacheAlert


class MetricType(enum.Enum):
    """The lifecycle distributions the collector keeps (``value`` is the summary key)."""

    LIFETIME = "lifetime"
    IDLE_BEFORE_EVICT = "idle_before_evict"
    REUSE_GAP = "reuse_gap"
    RESTORE_GAP = "restore_gap"
    ACCESSES_BEFORE_EVICT = "accesses_before_evict"
    PREFIX_DEPTH = "prefix_depth"


@dataclass
class BlockMetricsState:
    """One block's lifecycle, as the seed design keeps it per block (engine-clock seconds)."""

    block_id: int
    allocated_at: float
    last_access_at: float
    access_count: int = 0
    access_history: deque[float] = field(default_factory=lambda: deque(maxlen=8))

    def record_access(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.access_history.append(now)
        self.last_access_at = now
        self.access_count += 1

    def get_lifetime_seconds(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.allocated_at

    def get_idle_time_seconds(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.last_access_at

    def get_reuse_gaps_seconds(self) -> list[float]:
        """Gaps between consecutive accesses in the kept history (allocation included)."""
        times = [self.allocated_at, *self.access_history]
        if len(self.access_history) == self.access_history.maxlen:
            times = times[1:]  # the history no longer reaches back to the allocation
        return [b - a for a, b in pairwise(times)]

    def get_access_frequency(self, now: float | None = None) -> float:
        """Accesses per second over the block's life so far."""
        lifetime = self.get_lifetime_seconds(now)
        return self.access_count / lifetime if lifetime > 0 else 0.0


@dataclass(frozen=True)
class KVCacheEvictionEvent:
    """One tracked block's removal."""

    block_id: int
    reason: str
    medium: str
    allocated_at: float
    last_access_at: float
    evicted_at: float
    access_count: int
    prefix_depth: int | None = None

    @property
    def lifetime_seconds(self) -> float:
        return self.evicted_at - self.allocated_at

    @property
    def idle_seconds(self) -> float:
        return self.evicted_at - self.last_access_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_id": self.block_id,
            "reason": self.reason,
            "medium": self.medium,
            "allocated_at": self.allocated_at,
            "last_access_at": self.last_access_at,
            "evicted_at": self.evicted_at,
            "lifetime_seconds": self.lifetime_seconds,
            "idle_seconds": self.idle_seconds,
            "access_count": self.access_count,
            "prefix_depth": self.prefix_depth,
        }


@dataclass(frozen=True)
class CacheMetricsSummary:
    """Everything the collector knows, at one moment."""

    sample_rate: float
    blocks_allocated: int
    blocks_evicted: dict[str, int]
    blocks_accessed: int
    restores: int
    resident_blocks: int
    tracked_blocks: int
    cache_resets: int
    unknown_evictions: int
    distributions: dict[str, dict[str, float | int | None]]
    alerts: list[CacheAlert]
    trends: dict[str, dict[str, Any]]

    @property
    def restore_ratio(self) -> float | None:
        return self.restores / self.blocks_allocated if self.blocks_allocated else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "blocks_allocated": self.blocks_allocated,
            "blocks_evicted": dict(self.blocks_evicted),
            "blocks_accessed": self.blocks_accessed,
            "restores": self.restores,
            "restore_ratio": self.restore_ratio,
            "resident_blocks": self.resident_blocks,
            "tracked_blocks": self.tracked_blocks,
            "cache_resets": self.cache_resets,
            "unknown_evictions": self.unknown_evictions,
            "distributions": self.distributions,
            "alerts": [alert.to_dict() for alert in self.alerts],
            "trends": self.trends,
        }
