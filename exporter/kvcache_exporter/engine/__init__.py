"""A simulated inference engine: request traces, a synthetic workload and an LRU prefix cache.

It drives ``kvcache-exporter demo`` and ``replay`` and the end-to-end tests: requests go
through :class:`PrefixCacheSimulator`, which emits the KV events a vLLM-like engine would, and
:class:`SimulatedEngine` publishes them with :class:`~kvcache_exporter.publisher.KVEventPublisher`.
"""

from .simulator import (
    EngineRunStats,
    EventSink,
    PrefixCacheSimulator,
    SimulatedEngine,
    SimulatorStats,
)
from .trace import (
    Request,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
    spread_hash,
    unspread_hash,
)
from .workload import WorkloadConfig, synthetic_workload

__all__ = [
    "EngineRunStats",
    "EventSink",
    "PrefixCacheSimulator",
    "Request",
    "SimulatedEngine",
    "SimulatorStats",
    "WorkloadConfig",
    "bundled_trace_path",
    "read_mooncake",
    "repeat_requests",
    "spread_hash",
    "synthetic_workload",
    "unspread_hash",
]
