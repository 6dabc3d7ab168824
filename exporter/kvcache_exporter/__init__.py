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

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The seed's public names are loaded on first use (PEP 562), so that importing any submodule
# (the protocol, a source, the CLI) does not load the library and all it needs.
if TYPE_CHECKING:
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

_LAZY = frozenset(
    {
        "AlertLevel",
        "BatchMetricsCollector",
        "BlockMetricsState",
        "CacheAlert",
        "CacheMetricsSummary",
        "KVCacheEvictionEvent",
        "KVCacheMetricsCollector",
        "MetricType",
        "MetricsConfig",
        "create_metrics_collector",
    }
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import library

        value = getattr(library, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


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
