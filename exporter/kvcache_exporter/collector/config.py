"""What a collector tracks: its settings, the sampling hash that picks the tracked blocks,
and the removal reasons every collector knows.

Settings only (what flags, YAML and the library build and check): nothing here depends on the
state or the batch machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ..protocol.batch import DEFAULT_MAX_ADAPTERS, MAX_ADAPTERS
from .histogram import (
    ACCESS_COUNT_BUCKETS,
    PREFIX_DEPTH_BUCKETS,
    RESIDENCY_BUCKETS,
    validate_buckets,
)

_SAMPLE_MUL1: Final = np.uint64(0xBF58476D1CE4E5B9)
_SAMPLE_MUL2: Final = np.uint64(0x94D049BB133111EB)
_U64 = npt.NDArray[np.uint64]

REASON_CLEARED: Final = "cleared"
REASON_RESTART: Final = "engine_restart"
DEFAULT_REASONS: Final = ("evicted", REASON_CLEARED, REASON_RESTART)


def sample_hash(keys: _U64) -> _U64:
    """splitmix64's finalizer: a second hash, independent of the table's slot hash."""
    z = keys ^ (keys >> np.uint64(30))
    z = z * _SAMPLE_MUL1
    z = z ^ (z >> np.uint64(27))
    z = z * _SAMPLE_MUL2
    result: _U64 = z ^ (z >> np.uint64(31))
    return result


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """How much the collector tracks and how it buckets what it measures."""

    sample_ratio: float = 1.0
    max_tracked_blocks: int = 4_000_000
    removed_memory: int = 1_000_000
    duration_buckets: tuple[float, ...] = RESIDENCY_BUCKETS
    access_buckets: tuple[float, ...] = ACCESS_COUNT_BUCKETS
    depth_buckets: tuple[float, ...] = PREFIX_DEPTH_BUCKETS
    eviction_log_size: int = 10_000
    hit_reports: bool = False  # stores of resident keys are hits (vLLM's report mode "full")
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # LoRA adapters labelled by name; the rest "other"

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample ratio must be in (0, 1], got {self.sample_ratio}")
        if self.max_tracked_blocks < 1:
            raise ValueError("max tracked blocks must be at least 1")
        if self.removed_memory < 0:
            raise ValueError("removed-block memory cannot be negative")
        if self.eviction_log_size < 0:
            raise ValueError("eviction log size cannot be negative")
        if not 1 <= self.max_adapters <= MAX_ADAPTERS:
            raise ValueError(f"max adapters must be in 1..{MAX_ADAPTERS}")
        validate_buckets(self.duration_buckets, "duration buckets")
        validate_buckets(self.access_buckets, "access-count buckets")
        validate_buckets(self.depth_buckets, "prefix-depth buckets")
