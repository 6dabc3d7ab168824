"""The in-process collectors: :class:`BatchMetricsCollector` (whole arrays of block ids) and
:class:`KVCacheMetricsCollector` (the seed design's per-call hooks) over one pipeline, and
:func:`create_metrics_collector`.

Calls are buffered in call order and applied as one numpy batch per flush; every read flushes
first, then reads the pipeline's collector and monitor as ``/metrics`` would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..analysis.patterns import access_patterns
from ..analysis.series import CacheAlert
from ..collector import sample_hash
from ..collector.histogram import validate_buckets
from ..pipeline import Pipeline, new_pipeline
from ..protocol.batch import OP_ACCESS, OP_CLEAR, OP_REMOVE, OP_STORE, EventBatch
from ..sinks.export import ExportRequest, render_export
from ..sinks.summary import quantile
from .config import MetricsConfig
from .records import BlockMetricsState, CacheMetricsSummary, KVCacheEvictionEvent, MetricType

U64_MASK: Final = (1 << 64) - 1
EXPORT_FORMATS: Final = ("json", "csv", "prometheus")


IdArray = npt.NDArray[np.uint64] | Sequence[int]
_U8 = npt.NDArray[np.uint8]
TimeArg = float | npt.NDArray[np.float64] | Sequence[float] | None


class BatchMetricsCollector:
    """Whole arrays of block ids in, one numpy batch per flush: the high-rate path.

    Operations are applied in call order: ``batch_allocate``, ``batch_access`` and
    ``batch_evict`` append to one ordered buffer, so the ``flush_*`` methods all flush it whole
    (flushing one kind alone would reorder a block's allocation and eviction).
    """

    def __init__(
        self,
        config: MetricsConfig | None = None,
        *,
        engine: str = "engine",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or MetricsConfig()
        self.engine = engine
        self._clock = clock
        self._lock = threading.RLock()
        self._new()

    def _new(self) -> None:
        self._pipeline: Pipeline = new_pipeline(
            self.engine, self.config.collector_config(), self.config.monitor_config()
        )
        collector = self._pipeline.collector
        self._medium = collector.media.id_of(self.config.medium)
        self._medium_name = collector.media.names[self._medium]  # as the label table keeps it
        # (ops, ids, times, reasons) per buffered call, in call order
        self._chunks: list[tuple[_U8, npt.NDArray[np.uint64], npt.NDArray[np.float64], _U8]] = []
        self._calls: list[tuple[int, int, float, int]] = []  # single-block calls, in order
        self._pending = 0

    # --- writing ---------------------------------------------------------------------------
    def _times(self, now: TimeArg, count: int) -> npt.NDArray[np.float64]:
        if now is None:
            return np.full(count, self._clock())
        times = np.array(now, dtype=np.float64)  # a copy: the caller may reuse its buffer
        if times.ndim == 0:
            return np.full(count, float(times))
        if times.shape != (count,):
            raise ValueError(f"now has {times.shape[0]} times for {count} blocks")
        return times

    def _add(self, op: int, block_ids: IdArray, now: TimeArg, reason: str | None) -> None:
        ids = _as_ids(block_ids)
        with self._lock:
            self._chunk_calls()
            reason_id = 0 if reason is None else self._pipeline.collector.reasons.id_of(reason)
            count = ids.shape[0]
            self._chunks.append(
                (
                    np.full(count, op, np.uint8),
                    ids,
                    self._times(now, count),
                    np.full(count, reason_id, np.uint8),
                )
            )
            self._pending += ids.shape[0]
            if self._pending >= self.config.batch_size:
                self.flush_all()

    def batch_allocate(self, block_ids: IdArray, now: TimeArg = None) -> None:
        """Blocks allocated (stored); an id already resident counts as an access."""
        self._add(OP_STORE, block_ids, now, None)

    def batch_access(self, block_ids: IdArray, now: TimeArg = None) -> None:
        """Cache hits on resident blocks."""
        self._add(OP_ACCESS, block_ids, now, None)

    def batch_evict(self, block_ids: IdArray, reason: str = "evicted", now: TimeArg = None) -> None:
        """Blocks removed, for ``reason`` (``evicted``, ``freed``, ``preempted``, …)."""
        self._add(OP_REMOVE, block_ids, now, reason)

    def cache_reset(self, now: float | None = None) -> None:
        """The whole cache was emptied (vLLM's ``reset_prefix_cache``)."""
        self._add(OP_CLEAR, np.zeros(1, np.uint64), now, None)

    def _call(self, op: int, block_id: int, now: float | None, reason: str | None) -> None:
        """One block: a tuple appended, no numpy until the buffer is applied."""
        with self._lock:
            reason_id = 0 if reason is None else self._pipeline.collector.reasons.id_of(reason)
            self._calls.append(
                (op, int(block_id) & U64_MASK, self._clock() if now is None else now, reason_id)
            )
            self._pending += 1
            if self._pending >= self.config.batch_size:
                self.flush_all()

    def _chunk_calls(self) -> None:
        """Turn buffered single-block calls into one chunk, keeping call order."""
        if not self._calls:
            return
        ops, ids, times, reasons = zip(*self._calls, strict=True)
        self._calls = []
        self._chunks.append(
            (
                np.array(ops, np.uint8),
                np.array(ids, np.uint64),
                np.array(times, np.float64),
                np.array(reasons, np.uint8),
            )
        )

    def flush_all(self) -> None:
        """Apply everything buffered, in call order."""
        with self._lock:
            self._chunk_calls()
            if not self._chunks:
                return
            chunks, self._chunks, self._pending = self._chunks, [], 0
            ops = np.concatenate([c[0] for c in chunks])
            batch = EventBatch(
                op=ops,
                block_hash=np.concatenate([c[1] for c in chunks]),
                ts=np.concatenate([c[2] for c in chunks]),
                medium=np.full(ops.shape[0], self._medium, np.uint8),
                reason=np.concatenate([c[3] for c in chunks]),
            )
            self._pipeline.apply(batch)

    flush_allocations = flush_all
    flush_accesses = flush_all
    flush_evictions = flush_all

    # --- reading ---------------------------------------------------------------------------
    def get_summary(self) -> CacheMetricsSummary:
        with self._lock:
            self.flush_all()
            view = self._pipeline.view()
        snap = view.collector
        distributions = {}
        for kind in MetricType:
            hist = snap.histograms[kind.value]
            count = int(hist.counts.sum())
            total = float(hist.sums.sum())
            merged = type(hist)(hist.bounds, hist.counts.sum(axis=0, keepdims=True), hist.sums[:1])
            distributions[kind.value] = {
                "count": count,
                "mean": total / count if count else None,
                "p50": quantile(merged, 0, 0.5),
                "p90": quantile(merged, 0, 0.9),
                "p99": quantile(merged, 0, 0.99),
            }
        # Every block is on the configured medium (in group "0"): its row of each counter.
        m = self._medium
        removed = snap.per_medium(snap.removed)[m]
        return CacheMetricsSummary(
            sample_rate=self.config.sample_rate,
            blocks_allocated=int(snap.per_medium(snap.stored)[m]),
            blocks_evicted={r: int(removed[i]) for i, r in enumerate(snap.reasons) if removed[i]},
            blocks_accessed=int(snap.per_medium(snap.accessed)[m]),
            restores=int(snap.per_medium(snap.restores)[m]),
            resident_blocks=int(snap.per_medium(snap.resident)[m]),
            tracked_blocks=snap.tracked,
            cache_resets=snap.clears,
            unknown_evictions=snap.unknown_removals,
            distributions=distributions,
            alerts=view.alerts_active,
            trends={series: trend.to_dict() for series, trend in view.trends.items()},
        )

    def get_lifetime_distribution(self, buckets: Sequence[float] | None = None) -> dict[float, int]:
        """Tracked blocks' lifetimes per bucket (upper bound → count; ``inf`` last).

        With the configured buckets this is the full histogram; other buckets are counted
        over the recent evictions kept (``eviction_log_size``).
        """
        with self._lock:
            self.flush_all()
            if buckets is None:
                hist = self._pipeline.collector.snapshot().histograms["lifetime"]
                bounds, counts = hist.bounds, hist.counts.sum(axis=0)
            else:
                bounds = validate_buckets(buckets)
                rec = self._pipeline.collector.eviction_records()
                lifetimes = rec.removed_at - rec.stored_at
                index = np.searchsorted(np.asarray(bounds), lifetimes, side="left")
                counts = np.bincount(index, minlength=len(bounds) + 1)
        return {b: int(c) for b, c in zip([*bounds, float("inf")], counts.tolist(), strict=True)}

    def get_access_pattern_analysis(self) -> dict[str, Any]:
        with self._lock:
            self.flush_all()
            collector = self._pipeline.collector
            return access_patterns(
                collector.resident_profile(),
                collector.snapshot(),
                self.config.hot_access_threshold,
            )

    def detect_trends(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            self.flush_all()
            return {s: t.to_dict() for s, t in self._pipeline.monitor.trends().items()}

    def get_alerts(self, include_cleared: bool = False) -> list[CacheAlert]:
        """Alerts holding now; with ``include_cleared``, the recent transitions instead."""
        with self._lock:
            self.flush_all()
            if include_cleared:
                return self._pipeline.monitor.recent_transitions()
            return self._pipeline.monitor.active()

    def get_eviction_events(self, limit: int | None = None) -> list[KVCacheEvictionEvent]:
        """The most recent evictions of tracked blocks, oldest first."""
        with self._lock:
            self.flush_all()
            collector = self._pipeline.collector
            rec = collector.eviction_records()
            snap = collector.snapshot()  # a record's medium column holds its place id
        start = 0 if limit is None else max(0, len(rec) - limit)
        return [
            KVCacheEvictionEvent(
                block_id=int(rec.block_hash[i]),
                reason=snap.reasons[int(rec.reason[i])],
                medium=snap.place_labels(int(rec.medium[i]))[0],
                allocated_at=float(rec.stored_at[i]),
                last_access_at=float(rec.last_access_at[i]),
                evicted_at=float(rec.removed_at[i]),
                access_count=int(rec.accesses[i]),
                prefix_depth=int(rec.prefix_depth[i]) or None,
            )
            for i in range(start, len(rec))
        ]

    def get_block_state(self, block_id: int) -> BlockMetricsState | None:
        """A resident block's state: allocation, last access and access count (the
        collector keeps no per-access history, so ``get_reuse_gaps_seconds`` is empty)."""
        with self._lock:
            self.flush_all()
            collector = self._pipeline.collector
            place = collector.snapshot().place(self._medium_name)
            record = None if place is None else collector.block(int(block_id) & U64_MASK, place)
        if record is None:
            return None
        state = BlockMetricsState(block_id, record.stored_at, record.last_access_at)
        # The collector keeps the count and the last access, not every access time, so the
        # history stays empty rather than inventing gaps.
        state.access_count = record.accesses
        return state

    def should_sample_block(self, block_id: int) -> bool:
        """Whether this block's lifecycle feeds the histograms (stable for the id)."""
        if self.config.sample_rate >= 1.0:
            return True
        value = sample_hash(np.array([int(block_id) & U64_MASK], np.uint64))[0]
        return bool(value < np.uint64(min(int(self.config.sample_rate * 2.0**64), U64_MASK)))

    def export(self, format: str = "json") -> str:
        """``json`` (summary and recent evictions), ``csv`` (recent evictions) or
        ``prometheus`` (the exposition text)."""
        if format not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
        # Imported here: the exposition needs prometheus_client, which recording blocks does
        # not, so `import kvcache_exporter.library` stays small.
        from ..offline import format_views

        with self._lock:
            self.flush_all()
            view = self._pipeline.view(
                with_patterns=format == "json", hot_threshold=self.config.hot_access_threshold
            )
            if format == "prometheus":
                return format_views([view], "prometheus")
            summary = format_views([view], "json")
            body, _ = render_export(ExportRequest(format=format), [self._pipeline.records()], [])
        if format == "csv":
            return body.decode()
        document = json.loads(body)
        document["engines"] = json.loads(summary)["engines"]
        return json.dumps(document, indent=2)

    def reset(self) -> None:
        """Forget everything: counters, blocks, alerts, trends."""
        with self._lock:
            self._new()


class KVCacheMetricsCollector(BatchMetricsCollector):
    """The per-call API of the seed design (and of vLLM's in-engine collector hooks).

    Each call is a list append; calls are applied in batches of ``batch_size`` and before any
    read, so per-call cost stays near a microsecond.
    """

    def on_block_allocated(self, block_id: int, now: float | None = None) -> None:
        """A block was allocated (its KV stored); an id already resident is an access."""
        self._call(OP_STORE, block_id, now, None)

    def on_block_accessed(self, block_id: int, now: float | None = None) -> None:
        """A prefix-cache hit on a resident block."""
        self._call(OP_ACCESS, block_id, now, None)

    def on_block_evicted(
        self, block_id: int, reason: str = "evicted", now: float | None = None
    ) -> None:
        """A block left the cache, for ``reason``."""
        self._call(OP_REMOVE, block_id, now, reason)


def _as_ids(block_ids: IdArray) -> npt.NDArray[np.uint64]:
    if isinstance(block_ids, np.ndarray):
        if block_ids.dtype == np.uint64:
            return block_ids.astype(np.uint64, copy=True)
        if block_ids.dtype.kind == "i":
            return block_ids.astype(np.int64).view(np.uint64).copy()
        if block_ids.dtype.kind == "u":
            return block_ids.astype(np.uint64)
        raise TypeError(f"block ids must be integers, not {block_ids.dtype}")
    return np.fromiter((int(b) & U64_MASK for b in block_ids), np.uint64, count=len(block_ids))


_CONFIG_FIELDS: Final = frozenset(f.name for f in fields(MetricsConfig))


def create_metrics_collector(
    sample_rate: float = 0.01, batch_mode: bool = False, **kwargs: Any
) -> KVCacheMetricsCollector | BatchMetricsCollector:
    """A collector: per-call (default) or batch (``batch_mode=True``). ``kwargs`` are
    :class:`MetricsConfig` fields, plus ``engine`` and ``clock``."""
    options = {k: kwargs.pop(k) for k in ("engine", "clock") if k in kwargs}
    unknown = sorted(set(kwargs) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"create_metrics_collector: unknown option {unknown[0]!r}")
    config = MetricsConfig(sample_rate=sample_rate, **kwargs)
    cls = BatchMetricsCollector if batch_mode else KVCacheMetricsCollector
    return cls(config, **options)
