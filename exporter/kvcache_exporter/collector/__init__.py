"""Vectorized block-lifecycle state: hash table, histograms, sampling."""

from .config import DEFAULT_REASONS, REASON_CLEARED, REASON_RESTART, CollectorConfig, sample_hash
from .lifecycle import BlockLifecycleCollector
from .snapshot import BlockRecord, CollectorSnapshot, CollectorTotals, CutTotals, ResidentProfile

__all__ = [
    "DEFAULT_REASONS",
    "REASON_CLEARED",
    "REASON_RESTART",
    "BlockLifecycleCollector",
    "BlockRecord",
    "CollectorConfig",
    "CollectorSnapshot",
    "CollectorTotals",
    "CutTotals",
    "ResidentProfile",
    "sample_hash",
]
