"""One engine's stages, wired: stream (framing, sequence, decoding) → collector → monitor.

The live exporter, ``analyze`` and the in-process library all build engines here, so the
same frames give the same numbers whichever way they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from .analysis.monitor import EngineMonitor, MonitorConfig
from .analysis.patterns import access_patterns
from .collector import BlockLifecycleCollector, CollectorConfig
from .collector.lifecycle import DEFAULT_REASONS, REASON_RESTART
from .protocol.batch import EventBatch, LabelTable
from .sinks.export import EngineRecords
from .sinks.prometheus import EngineView
from .sources.stream import EventStream


@dataclass(slots=True)
class Pipeline:
    """A collector, the stream that feeds it, and the monitor that watches it."""

    name: str
    collector: BlockLifecycleCollector
    stream: EventStream
    monitor: EngineMonitor
    apply: Callable[[EventBatch], None]
    """Apply a decoded batch: collector, then monitor samples on the engine-clock grid."""

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
            sample_ratio=self.collector.config.sample_ratio,
            alerts_active=self.monitor.active(),
            alerts_raised=self.monitor.raised_total(),
            trends=self.monitor.trends(),
            access_patterns=patterns,
        )

    def records(self) -> EngineRecords:
        """The recent removals of tracked blocks, for ``/api/v1/export``."""
        return EngineRecords(
            engine=self.name,
            media=tuple(self.collector.media.names),
            reasons=tuple(self.collector.reasons.names),
            records=self.collector.eviction_records(),
        )


def new_pipeline(
    name: str, config: CollectorConfig, monitor_config: MonitorConfig | None = None
) -> Pipeline:
    """An engine's collector, stream and monitor, sharing label tables."""
    media = LabelTable("unknown")
    reasons = LabelTable("evicted", seed=DEFAULT_REASONS)
    collector = BlockLifecycleCollector(config, media, reasons)
    # The monitor reads the stream's loss counter; the lambda runs only after `stream` exists.
    monitor = EngineMonitor(name, lambda: stream.stats.batches_lost, monitor_config)

    def apply(batch: EventBatch) -> None:
        cuts = monitor.cuts(batch.ts)
        totals = collector.apply(batch, [row for row, _ in cuts])
        for (_, grid_ts), at_cut in zip(cuts, totals, strict=True):
            monitor.sample(grid_ts, at_cut)

    stream = EventStream(
        name,
        on_batch=apply,
        on_restart=partial(collector.clear, reason=REASON_RESTART),
        media=media,
        reasons=reasons,
    )
    return Pipeline(name, collector, stream, monitor, apply)
