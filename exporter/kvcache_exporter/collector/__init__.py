"""Vectorized block-lifecycle state: hash table, histograms, sampling."""

from .lifecycle import BlockLifecycleCollector, CollectorConfig, CollectorSnapshot

__all__ = ["BlockLifecycleCollector", "CollectorConfig", "CollectorSnapshot"]
