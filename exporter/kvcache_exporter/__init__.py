"""kvcache-exporter: KV-cache block lifecycle metrics for LLM inference engines.

The sidecar is the ``kvcache-exporter`` command; this package is also a library an engine
calls in-process (see docs/library.md)::

    from kvcache_exporter import create_metrics_collector

    metrics = create_metrics_collector(sample_rate=0.1)
    metrics.on_block_allocated(block_id)
    metrics.on_block_accessed(block_id)
    metrics.on_block_evicted(block_id, reason="evicted")
    print(metrics.get_summary().to_dict())
"""

__version__ = "0.1.0"

# The version comes first: submodules import it.
from .library import (
    AlertLevel,
    BatchMetricsCollector,
    BlockMetricsState,
    CacheAlert,
    CacheMetricsSummary,
    KVCacheEvictionEvent,
    KVCacheMetricsCollector,
    MetricsConfig,
    MetricType,
    create_metrics_collector,
)

__all__ = [
    "AlertLevel",
    "BatchMetricsCollector",
    "BlockMetricsState",
    "CacheAlert",
    "CacheMetricsSummary",
    "KVCacheEvictionEvent",
    "KVCacheMetricsCollector",
    "MetricType",
    "MetricsConfig",
    "__version__",
    "create_metrics_collector",
]
