"""The in-process library: the seed design's collector API over the exporter's own core.

An engine calls these from its block manager, with no sockets. Every facade here feeds the
same vectorized :class:`~kvcache_exporter.collector.BlockLifecycleCollector` and the same
alert and trend detectors as the sidecar, so the numbers agree with what ``/metrics`` would
show for the same events. Calls are buffered and applied as numpy batches (per-call work is a
list append); every read flushes first.

Times are the engine's clock in seconds: pass ``now=`` to use your own, or leave it out for
the collector's ``clock`` (``time.time`` by default).

The collectors are in :mod:`.collectors`, their settings in :mod:`.config`, the values they
return in :mod:`.records`. These names are the library's API, documented in docs/library.md and
loaded from here by ``kvcache_exporter`` on first use.
"""

from ..analysis.series import AlertLevel, CacheAlert
from .collectors import BatchMetricsCollector, KVCacheMetricsCollector, create_metrics_collector
from .config import MetricsConfig
from .records import BlockMetricsState, CacheMetricsSummary, KVCacheEvictionEvent, MetricType

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
    "create_metrics_collector",
]
