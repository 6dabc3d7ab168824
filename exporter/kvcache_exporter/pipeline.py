"""One engine's stages, wired: stream (framing, sequence, decoding) → collector → monitor, and
the what-if model beside the monitor (fed each batch the collector applied).

The live exporter, ``analyze`` and the in-process library all build engines here, so the
same frames give the same numbers whichever way they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .analysis.history import History
from .analysis.monitor import EngineMonitor, MonitorConfig
from .analysis.patterns import access_patterns
from .analysis.pool import PoolIndex, PoolMember, PoolSnapshot
from .analysis.series import AlertLevel, CacheAlert
from .analysis.trends import Trend
from .analysis.whatif import WhatIfConfig, WhatIfModel, WhatIfSnapshot
from .collector import (
    DEFAULT_REASONS,
    REASON_RESTART,
    BlockLifecycleCollector,
    CollectorConfig,
    CollectorSnapshot,
)
from .collector.eviction_log import EvictionRecords
from .protocol.batch import EventBatch, GroupSpec, LabelTable, new_adapter_table, new_group_table
from .sources.stream import EventStream, SourceStats


@dataclass(frozen=True, slots=True)
class EngineView:
    """Everything the sinks need about one engine, copied at scrape (or export) time."""

    name: str
    collector: CollectorSnapshot
    source: SourceStats
    events: dict[str, int]
    decode_errors: dict[str, int]
    unknown_fields: int
    tokens_stored: int
    sample_ratio: float
    groups: dict[str, GroupSpec] = field(default_factory=dict)  # by group label
    alerts_active: list[CacheAlert] = field(default_factory=list)
    alerts_raised: dict[tuple[str, AlertLevel], int] = field(default_factory=dict)
    trends: dict[str, Trend] = field(default_factory=dict)
    access_patterns: dict[str, Any] | None = None  # only when asked for (not per scrape)
    whatif: WhatIfSnapshot | None = None  # None: the what-if model is off
    pool: PoolSnapshot | None = None  # the engine's pool (all its engines), if it is in one


@dataclass(frozen=True, slots=True)
class EngineRecords:
    """An engine's recent removals; ``places`` names each record's place id as (medium,
    group), ``reasons`` each reason id."""

    engine: str
    places: tuple[tuple[str, str], ...]
    reasons: tuple[str, ...]
    records: EvictionRecords


@dataclass(slots=True)
class Pipeline:
    """A collector, the stream that feeds it, and the monitor that watches it."""

    name: str
    collector: BlockLifecycleCollector
    stream: EventStream
    monitor: EngineMonitor
    apply: Callable[[EventBatch], None]
    """Apply a decoded batch: collector, then monitor samples on the engine-clock grid, then
    the what-if model, then the pool index."""
    whatif: WhatIfModel | None = None  # None: --whatif.sample-ratio 0
    pool: PoolMember | None = None  # None: not followed by a pool index
    history: History = field(default_factory=History)
    """The last minutes of per-place counters, for the status page (see :meth:`tick`)."""

    def tick(self, now_wall: float) -> None:
        """Once a second on the ingest thread, between batches: sample the history."""
        self.history.record(now_wall, self.collector.place_counts())

    def view(self, with_patterns: bool = False, hot_threshold: int = 4) -> EngineView:
        """What the sinks read: collector snapshot, stream counters, alerts and trends (and,
        when asked, the access-pattern analysis, which reads every resident block)."""
        decoded = self.stream.decoder.stats
        snapshot = self.collector.snapshot()
        patterns = (
            access_patterns(self.collector.resident_profile(), snapshot, hot_threshold)
            if with_patterns
            else None
        )
        return EngineView(
            name=self.name,
            collector=snapshot,
            source=self.stream.stats,
            events=dict(decoded.events),
            decode_errors=self.stream.decode_errors(),
            unknown_fields=decoded.unknown_fields,
            tokens_stored=decoded.tokens_stored,
            groups={self.collector.groups.names[g]: spec for g, spec in decoded.groups.items()},
            sample_ratio=self.collector.config.sample_ratio,
            alerts_active=self.monitor.active(),
            alerts_raised=self.monitor.raised_total(),
            trends=self.monitor.trends(),
            access_patterns=patterns,
            whatif=self.whatif.snapshot() if self.whatif is not None else None,
            pool=self.pool.pool.snapshot() if self.pool is not None else None,
        )

    def records(self) -> EngineRecords:
        """The recent removals of tracked blocks, for ``/api/v1/export``."""
        return EngineRecords(
            engine=self.name,
            places=self.collector.place_labels(),
            reasons=tuple(self.collector.reasons.names),
            records=self.collector.eviction_records(),
        )


def new_pipeline(
    name: str,
    config: CollectorConfig,
    monitor_config: MonitorConfig | None = None,
    whatif_config: WhatIfConfig | None = None,
    pool: PoolIndex | None = None,
) -> Pipeline:
    """An engine's collector, stream, monitor and what-if model, sharing label tables; with
    ``pool``, the engine joins that pool index."""
    media = LabelTable("unknown")
    reasons = LabelTable("evicted", seed=DEFAULT_REASONS)
    groups = new_group_table()
    adapters = new_adapter_table(config.max_adapters)
    collector = BlockLifecycleCollector(config, media, reasons, groups, adapters)
    # The monitor reads the stream's loss counter; the lambda runs only after `stream` exists.
    monitor = EngineMonitor(name, lambda: stream.stats.batches_lost, monitor_config)
    whatif_config = whatif_config or WhatIfConfig()
    whatif = WhatIfModel(whatif_config, media) if whatif_config.enabled else None
    member = pool.join(name, collector) if pool is not None else None

    def apply(batch: EventBatch) -> None:
        following = member is not None and member.admit(batch)
        cuts = monitor.cuts(batch.ts)
        totals = collector.apply(batch, [row for row, _ in cuts])
        if totals is not None:
            monitor.sample_many(np.array([grid_ts for _, grid_ts in cuts]), totals)
        if whatif is not None:
            # Same thread as the collector's writes: its resident counts are this batch's.
            copies = collector.copy_rows
            keyed = batch.take(np.flatnonzero(~copies)) if copies.any() else batch
            whatif.apply(keyed, collector.resident_keys_by_medium())
        if member is not None and following:
            # Same thread again: the transitions are this batch's.
            member.follow(collector.residency_changes)

    def restart(ts: float) -> None:
        collector.clear(ts, REASON_RESTART)
        if whatif is not None:
            whatif.clear()
        if member is not None:
            member.follow(collector.residency_changes)

    stream = EventStream(
        name,
        on_batch=apply,
        on_restart=restart,
        media=media,
        reasons=reasons,
        groups=groups,
        adapters=adapters,
    )
    return Pipeline(name, collector, stream, monitor, apply, whatif, member)
