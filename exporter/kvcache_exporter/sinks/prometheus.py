"""Prometheus text exposition (format 0.0.4), written straight from collector snapshots.

No ``prometheus_client`` objects sit on the ingest path: a scrape takes one snapshot per
engine and formats numpy arrays into text, family by family, so every family's samples are
contiguous as the format requires.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from .. import __version__
from ..analysis.series import AlertLevel, CacheAlert
from ..analysis.trends import Trend
from ..analysis.whatif import MediumWhatIf, WhatIfSnapshot, factor_label
from ..collector import CollectorSnapshot
from ..collector.histogram import HistogramSnapshot
from ..protocol.batch import GroupSpec
from ..sources.stream import SourceStats

HISTOGRAM_FAMILIES: Final = (
    ("lifetime", "kvcache_block_lifetime_seconds", "Block lifetime, stored to removed."),
    (
        "idle_before_evict",
        "kvcache_block_idle_before_evict_seconds",
        "Time from a block's last access (or store) to its removal.",
    ),
    (
        "reuse_gap",
        "kvcache_block_reuse_gap_seconds",
        "Time between consecutive accesses of a resident block.",
    ),
    (
        "restore_gap",
        "kvcache_block_restore_gap_seconds",
        "Time from a block's removal to its being stored again.",
    ),
    (
        "accesses_before_evict",
        "kvcache_block_accesses_before_evict",
        "Accesses a block got after its store and before its removal.",
    ),
    (
        "prefix_depth",
        "kvcache_block_prefix_depth",
        "Position of a stored block in its prefix chain (1 = first block of a prompt).",
    ),
)

REUSE_DISTANCE_HELP: Final = (
    "Ghost rank of restored blocks: how many more blocks the cache would have needed to keep "
    "them (sampled, scaled)."
)
WHATIF_CAPACITY_HELP: Final = (
    "Cache capacity the what-if model compares against: configured, or the most blocks seen "
    "resident around evictions."
)
WHATIF_AVOIDED_HELP: Final = (
    "Restores (recomputation) a cache capacity_factor times as large would have avoided "
    "(sampled, scaled)."
)
WHATIF_HITS_HELP: Final = (
    "References a cache capacity_factor times as large would have served as hits (sampled, "
    "scaled; where hits are reported)."
)


@dataclass(frozen=True, slots=True)
class EngineView:
    """Everything the exposition needs about one engine, copied at scrape time."""

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


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def fmt(value: float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Exposition:
    """Builds the text of one scrape."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Sequence[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {fmt(value)}")

    def histogram(
        self, name: str, labels: Sequence[tuple[str, str]], hist: HistogramSnapshot, row: int
    ) -> None:
        cumulative = np.cumsum(hist.counts[row]).tolist()
        for bound, count in zip(hist.bounds, cumulative, strict=False):
            self.sample(f"{name}_bucket", [*labels, ("le", fmt(float(bound)))], count)
        self.sample(f"{name}_bucket", [*labels, ("le", "+Inf")], cumulative[-1])
        self.sample(f"{name}_sum", labels, float(hist.sums[row]))
        self.sample(f"{name}_count", labels, cumulative[-1])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def active_places(snap: CollectorSnapshot) -> list[int]:
    """Places to label: every (medium, group) seen on the wire, the ``unknown`` medium only
    once it has data (a clear row alone names no medium)."""
    active = []
    for p, (medium_id, _) in enumerate(snap.places):
        used = bool(snap.stored[p] or snap.removed[p].any() or snap.accessed[p] or snap.resident[p])
        if medium_id > 0 or used:
            active.append(p)
    return active


def place_labels(engine: str, snap: CollectorSnapshot, place_id: int) -> list[tuple[str, str]]:
    medium, group = snap.place_labels(place_id)
    return [("engine", engine), ("medium", medium), ("group", group)]


def group_specs(view: EngineView, places: list[int]) -> list[tuple[str, GroupSpec]]:
    """Each KV-cache group of the labelled places (and any a store described), with what
    the stores say it is, by group label."""
    seen = {view.collector.place_labels(p)[1] for p in places} | set(view.groups)
    return [(group, view.groups.get(group, GroupSpec())) for group in sorted(seen)]


def active_media(snap: CollectorSnapshot, places: list[int]) -> list[int]:
    """Medium ids of the labelled places, in order."""
    return sorted({snap.places[p][0] for p in places})


def collector_bytes(view: EngineView) -> int:
    """The engine's block state in memory: the collector's, plus the what-if model's."""
    return view.collector.table_bytes + (view.whatif.nbytes if view.whatif is not None else 0)


def _render_whatif(
    out: Exposition, views: Sequence[EngineView], media: dict[str, list[int]]
) -> None:
    """The capacity what-if families (docs/whatif.md): reuse distances of restores, what a
    larger cache would have avoided and, where hits are reported, hit at each capacity."""
    seen = list(whatif_media(views, media))
    name = "kvcache_block_reuse_distance_blocks"
    out.family(name, "histogram", REUSE_DISTANCE_HELP)
    for _, _, labels, medium in seen:
        if medium.distance is not None:
            out.histogram(name, labels, medium.distance, 0)
    name = "kvcache_whatif_capacity_blocks"
    out.family(name, "gauge", WHATIF_CAPACITY_HELP)
    for _, _, labels, medium in seen:
        if medium.capacity:
            out.sample(name, labels, medium.capacity)
    name = "kvcache_whatif_recomputes_avoided_total"
    out.family(name, "counter", WHATIF_AVOIDED_HELP)
    for _, whatif, labels, medium in seen:
        for factor, count in zip(whatif.avoided_factors, medium.avoided, strict=True):
            out.sample(name, [*labels, ("capacity_factor", factor_label(factor))], count)
    name = "kvcache_whatif_hits_total"
    out.family(name, "counter", WHATIF_HITS_HELP)
    for hits_reported, whatif, labels, medium in seen:
        if hits_reported:  # else the curve would only repeat the avoided counter
            for factor, count in zip(whatif.factors, medium.hits, strict=True):
                out.sample(name, [*labels, ("capacity_factor", factor_label(factor))], count)


def whatif_media(
    views: Sequence[EngineView], media: dict[str, list[int]]
) -> Iterator[tuple[bool, WhatIfSnapshot, list[tuple[str, str]], MediumWhatIf]]:
    """Each labelled medium the what-if model has seen: whether hits are reported on it, the
    engine's what-if snapshot, the series labels and the medium's figures."""
    for v in views:
        if v.whatif is None:
            continue
        accessed = v.collector.per_medium(v.collector.accessed)
        for i in media[v.name]:
            medium = v.whatif.media.get(i)
            if medium is not None:
                labels = [("engine", v.name), ("medium", v.collector.media[i])]
                yield bool(accessed[i]), v.whatif, labels, medium


def render(views: Sequence[EngineView], otlp_exports: Mapping[str, int] | None = None) -> str:
    """The whole ``/metrics`` page for these engines; ``otlp_exports`` (exports by result)
    only while OTLP export is on."""
    out = Exposition()
    places = {v.name: active_places(v.collector) for v in views}
    media = {v.name: active_media(v.collector, places[v.name]) for v in views}

    def per_place(name: str, kind: str, help_text: str, attr: str) -> None:
        out.family(name, kind, help_text)
        for v in views:
            values = getattr(v.collector, attr)
            for p in places[v.name]:
                out.sample(name, place_labels(v.name, v.collector, p), int(values[p]))

    def per_adapter(name: str, kind: str, help_text: str, attr: str) -> None:
        out.family(name, kind, help_text)
        for v in views:
            snap = v.collector
            values = getattr(snap, attr)
            for i in media[v.name]:
                for a, adapter in enumerate(snap.adapters):
                    if snap.adapter_stored[i, a] or snap.adapter_resident[i, a]:
                        labels = [
                            ("engine", v.name),
                            ("medium", snap.media[i]),
                            ("adapter", adapter),
                        ]
                        out.sample(name, labels, int(values[i, a]))

    def per_engine(name: str, kind: str, help_text: str, values: dict[str, float | None]) -> None:
        out.family(name, kind, help_text)
        for engine, value in values.items():
            if value is not None:
                out.sample(name, [("engine", engine)], value)

    def per_engine_by(
        name: str, kind: str, help_text: str, label: str, values: dict[str, Mapping[str, int]]
    ) -> None:
        """One sample per engine and ``label`` value (sorted)."""
        out.family(name, kind, help_text)
        for engine, counts in values.items():
            for key, count in sorted(counts.items()):
                out.sample(name, [("engine", engine), (label, key)], count)

    per_engine_by(
        "kvcache_events_total",
        "counter",
        "Events decoded, by event type.",
        "type",
        {v.name: v.events for v in views},
    )

    per_place(
        "kvcache_blocks_stored_total",
        "counter",
        "Blocks stored (physical: a second copy of a resident hash counts; with "
        "report-mode=full a store of a resident block is an access).",
        "stored",
    )
    out.family(
        "kvcache_blocks_removed_total",
        "counter",
        "Block hashes removed, by reason (cleared for AllBlocksCleared).",
    )
    for v in views:
        snap = v.collector
        for p in places[v.name]:
            for r, reason in enumerate(snap.reasons):
                if snap.removed[p, r] or r == 0:
                    out.sample(
                        "kvcache_blocks_removed_total",
                        [*place_labels(v.name, snap, p), ("reason", reason)],
                        int(snap.removed[p, r]),
                    )
    per_place(
        "kvcache_blocks_accessed_total",
        "counter",
        "Hits on resident blocks, where the engine reports them.",
        "accessed",
    )
    per_place(
        "kvcache_block_restores_total",
        "counter",
        "Blocks stored again after they had been removed (recomputation).",
        "restores",
    )
    per_engine(
        "kvcache_cache_clears_total",
        "counter",
        "AllBlocksCleared events.",
        {v.name: v.collector.clears for v in views},
    )
    per_place(
        "kvcache_resident_blocks",
        "gauge",
        "Blocks resident now (physical: two copies of one hash are two blocks).",
        "resident",
    )
    per_place(
        "kvcache_resident_hashes",
        "gauge",
        "Distinct block hashes resident now (a hash with two physical copies counts once).",
        "resident_hashes",
    )
    per_place(
        "kvcache_resident_tokens",
        "gauge",
        "Tokens held by resident blocks (a partial block holds fewer than block_size).",
        "resident_tokens",
    )
    per_place(
        "kvcache_tracked_blocks",
        "gauge",
        "Resident hashes whose lifecycle is tracked (sampled).",
        "tracked_per_place",
    )
    out.family(
        "kvcache_group_info",
        "gauge",
        "1 per KV-cache group seen; kind and sliding window as the engine's stores say "
        "(unknown until one does).",
    )
    for v in views:
        for group, spec in group_specs(v, places[v.name]):
            labels = [("engine", v.name), ("group", group), ("kind", spec.kind)]
            out.sample("kvcache_group_info", [*labels, ("sliding_window", spec.sliding_window)], 1)
    per_engine(
        "kvcache_stored_tokens_total",
        "counter",
        "Tokens held by stored blocks: block_size per block, fewer for a partial last block.",
        {v.name: v.tokens_stored for v in views},
    )
    per_adapter(
        "kvcache_adapter_resident_blocks",
        "gauge",
        "Resident blocks by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
        "adapter_resident",
    )
    per_adapter(
        "kvcache_adapter_blocks_stored_total",
        "counter",
        "Blocks stored by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
        "adapter_stored",
    )
    per_adapter(
        "kvcache_adapter_block_restores_total",
        "counter",
        "Restores by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
        "adapter_restores",
    )

    for key, name, help_text in HISTOGRAM_FAMILIES:
        out.family(name, "histogram", help_text)
        for v in views:
            hist = v.collector.histograms[key]
            for p in places[v.name]:
                out.histogram(name, place_labels(v.name, v.collector, p), hist, p)

    _render_whatif(out, views, media)

    out.family("kvcache_alerts_total", "counter", "Anomaly alerts raised, by alert and severity.")
    for v in views:
        for (alert, level), count in sorted(v.alerts_raised.items(), key=lambda kv: kv[0][0]):
            out.sample(
                "kvcache_alerts_total",
                [("engine", v.name), ("alert", alert), ("severity", level.value)],
                count,
            )
    out.family("kvcache_alert_active", "gauge", "1 while an alert holds (only active alerts).")
    for v in views:
        for active in sorted(v.alerts_active, key=lambda a: a.alert):
            out.sample(
                "kvcache_alert_active",
                [("engine", v.name), ("alert", active.alert), ("severity", active.level.value)],
                1,
            )
    out.family(
        "kvcache_trend_slope",
        "gauge",
        "Least-squares slope of a series over the trend window, in its units per second.",
    )
    for v in views:
        for series, trend in sorted(v.trends.items()):
            out.sample("kvcache_trend_slope", [("engine", v.name), ("series", series)], trend.slope)
    out.family("kvcache_trend_direction", "gauge", "Trend of a series: -1 down, 0 flat, 1 up.")
    for v in views:
        for series, trend in sorted(v.trends.items()):
            out.sample(
                "kvcache_trend_direction",
                [("engine", v.name), ("series", series)],
                trend.direction,
            )

    out.family("kvcache_exporter_build_info", "gauge", "Always 1; the version is a label.")
    out.sample("kvcache_exporter_build_info", [("version", __version__)], 1)
    per_engine(
        "kvcache_exporter_messages_total",
        "counter",
        "ZeroMQ messages received.",
        {v.name: v.source.messages for v in views},
    )
    per_engine_by(
        "kvcache_exporter_decode_errors_total",
        "counter",
        "Messages or events that could not be read, by reason.",
        "reason",
        {v.name: v.decode_errors for v in views},
    )
    per_engine_by(
        "kvcache_exporter_handshake_failures_total",
        "counter",
        "ZeroMQ handshakes with a publisher that failed (a wrong or refused CURVE key, CURVE "
        "on one side only, a peer that hung up), by reason; such a publisher is not heard.",
        "reason",
        {v.name: dict(v.source.handshake_failures) for v in views},
    )
    per_engine(
        "kvcache_exporter_unknown_fields_total",
        "counter",
        "Event fields this exporter does not know, skipped.",
        {v.name: v.unknown_fields for v in views},
    )
    per_engine(
        "kvcache_exporter_sequence_gaps_total",
        "counter",
        "Gaps seen in the sequence numbers.",
        {v.name: v.source.sequence_gaps for v in views},
    )
    per_engine(
        "kvcache_exporter_batches_lost_total",
        "counter",
        "Batches missing after replay was tried (or with no replay configured).",
        {v.name: v.source.batches_lost for v in views},
    )
    per_engine(
        "kvcache_exporter_batches_replayed_total",
        "counter",
        "Batches recovered by replay.",
        {v.name: v.source.batches_replayed for v in views},
    )
    per_engine(
        "kvcache_exporter_duplicate_batches_total",
        "counter",
        "Batches whose sequence number was already seen, ignored.",
        {v.name: v.source.duplicates for v in views},
    )
    per_engine(
        "kvcache_exporter_engine_restarts_total",
        "counter",
        "Publisher restarts (sequence back to 0); the engine's residency is reset.",
        {v.name: v.source.engine_restarts for v in views},
    )
    per_engine(
        "kvcache_exporter_last_event_timestamp_seconds",
        "gauge",
        "Engine timestamp of the newest batch.",
        {v.name: v.source.last_event_ts for v in views},
    )
    per_engine(
        "kvcache_exporter_event_lag_seconds",
        "gauge",
        "Arrival time minus engine timestamp of the newest batch.",
        {
            v.name: (v.source.last_arrival - v.source.last_event_ts)
            if v.source.last_arrival is not None and v.source.last_event_ts is not None
            else None
            for v in views
        },
    )
    per_engine(
        "kvcache_exporter_source_up",
        "gauge",
        "1 while the source's socket has a live connection to an engine.",
        {v.name: int(v.source.up) for v in views},
    )
    per_engine(
        "kvcache_exporter_sample_ratio",
        "gauge",
        "Fraction of block hashes tracked.",
        {v.name: v.sample_ratio for v in views},
    )
    per_engine(
        "kvcache_exporter_unknown_removals_total",
        "counter",
        "Removals of hashes not known to be resident.",
        {v.name: v.collector.unknown_removals for v in views},
    )
    per_engine(
        "kvcache_exporter_unknown_accesses_total",
        "counter",
        "Accesses reported for hashes not known to be resident.",
        {v.name: v.collector.unknown_accesses for v in views},
    )
    per_engine(
        "kvcache_exporter_untracked_stores_total",
        "counter",
        "Stores not tracked because the block table was full (--collector.max-tracked-blocks).",
        {v.name: v.collector.untracked_stores for v in views},
    )
    per_engine(
        "kvcache_exporter_collector_bytes",
        "gauge",
        "Memory held by the engine's block state (the what-if model's included).",
        {v.name: collector_bytes(v) for v in views},
    )
    if otlp_exports is not None:
        out.family(
            "kvcache_exporter_otlp_exports_total",
            "counter",
            "OTLP exports, by result (present only while OTLP export is on).",
        )
        for result in ("success", "failure"):
            out.sample(
                "kvcache_exporter_otlp_exports_total",
                [("result", result)],
                otlp_exports.get(result, 0),
            )
    return out.text()
