"""Engine views to series: every family of the catalog, with its labels and values.

The one walk over the snapshots that both sinks export: ``/metrics`` (through
``prometheus_client``) and OTLP render exactly these series, so at the same moment they carry
the same labels and numbers. Labels are in the family's catalog order; a ``None`` value (no
batch yet, say) leaves its series out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .. import __version__
from ..analysis.pool import PoolSnapshot
from ..analysis.whatif import MediumWhatIf, WhatIfSnapshot, factor_label
from ..analysis.whatif.model import COMPILED as WHATIF_COMPILED
from ..catalog import (
    DECODE_ERROR_REASONS,
    FAMILIES,
    HTTP_REFUSED,
    HTTP_REFUSED_REASONS,
    OTLP_EXPORT_RESULTS,
    OTLP_EXPORTS,
)
from ..collector import CollectorSnapshot
from ..collector.apply import COMPILED as APPLY_COMPILED
from ..collector.histogram import HistogramSnapshot
from ..collector.table import COMPILED as TABLE_COMPILED
from ..pipeline import EngineView
from ..protocol.batch import GroupSpec
from ..protocol.compiled import COMPILED as DECODER_COMPILED


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """One histogram series: counts per bucket (not cumulative; the last is +Inf) and sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def minus(self, earlier: HistogramValue) -> HistogramValue:
        return HistogramValue(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
            self.sum - earlier.sum,
        )


Labels = tuple[tuple[str, str], ...]
Value = int | float | HistogramValue
Series = dict[str, dict[Labels, Value]]  # family name → labels → value


def active_places(snap: CollectorSnapshot) -> list[int]:
    """Places to label: every (medium, group) seen on the wire, the ``unknown`` medium only
    once it has data (a clear row alone names no medium)."""
    active = []
    for p, (medium_id, _) in enumerate(snap.places):
        used = bool(snap.stored[p] or snap.removed[p].any() or snap.accessed[p] or snap.resident[p])
        if medium_id > 0 or used:
            active.append(p)
    return active


def active_media(snap: CollectorSnapshot, places: list[int]) -> list[int]:
    """Medium ids of the labelled places, in order."""
    return sorted({snap.places[p][0] for p in places})


def group_specs(view: EngineView, places: list[int]) -> list[tuple[str, GroupSpec]]:
    """Each KV-cache group of the labelled places (and any a store described), with what
    the stores say it is, by group label."""
    seen = {view.collector.place_labels(p)[1] for p in places} | set(view.groups)
    return [(group, view.groups.get(group, GroupSpec())) for group in sorted(seen)]


def collector_bytes(view: EngineView) -> int:
    """The engine's block state in memory: the collector's, plus the what-if model's."""
    return view.collector.table_bytes + (view.whatif.nbytes if view.whatif is not None else 0)


def whatif_media(
    views: Sequence[EngineView], media: dict[str, list[int]]
) -> Iterator[tuple[bool, WhatIfSnapshot, Labels, MediumWhatIf]]:
    """Each labelled medium the what-if model has seen: whether hits are reported on it, the
    engine's what-if snapshot, the series labels and the medium's figures."""
    for v in views:
        if v.whatif is None:
            continue
        accessed = v.collector.per_medium(v.collector.accessed)
        for i in media[v.name]:
            medium = v.whatif.media.get(i)
            if medium is not None:
                labels = (("engine", v.name), ("medium", v.collector.media[i]))
                yield bool(accessed[i]), v.whatif, labels, medium


def pools(views: Sequence[EngineView]) -> list[PoolSnapshot]:
    """The engines' pools, each once, in the order of their first engine."""
    seen: dict[str, PoolSnapshot] = {}
    for v in views:
        if v.pool is not None and v.pool.name not in seen:
            seen[v.pool.name] = v.pool
    return list(seen.values())


def _histogram(hist: HistogramSnapshot, row: int) -> HistogramValue:
    return HistogramValue(
        hist.bounds, tuple(int(c) for c in hist.counts[row]), float(hist.sums[row])
    )


LIFECYCLE_FAMILIES: tuple[tuple[str, str], ...] = (
    ("lifetime", "kvcache_block_lifetime_seconds"),
    ("idle_before_evict", "kvcache_block_idle_before_evict_seconds"),
    ("reuse_gap", "kvcache_block_reuse_gap_seconds"),
    ("restore_gap", "kvcache_block_restore_gap_seconds"),
    ("accesses_before_evict", "kvcache_block_accesses_before_evict"),
    ("prefix_depth", "kvcache_block_prefix_depth"),
)
"""The collector's histogram keys and the families they are exported as."""


def series(
    views: Sequence[EngineView],
    otlp_exports: Mapping[str, int] | None = None,
    http_refused: Mapping[str, int] | None = None,
) -> Series:
    """Every series of every family, for these engines; ``otlp_exports`` (exports by
    result) only while OTLP export is on, ``http_refused`` (refusals by reason) only while the
    HTTP server runs. Families come in catalog order."""
    out: Series = {family.name: {} for family in FAMILIES}

    def put(family: str, labels: Labels, value: Value | None) -> None:
        if value is not None:
            out[family][labels] = value

    places = {v.name: active_places(v.collector) for v in views}
    media = {v.name: active_media(v.collector, places[v.name]) for v in views}
    for v in views:
        snap, src = v.collector, v.source
        e: Labels = (("engine", v.name),)
        for kind, count in sorted(v.events.items()):
            put("kvcache_events_total", (*e, ("type", kind)), int(count))
        for p in places[v.name]:
            medium, group = snap.place_labels(p)
            m: Labels = (*e, ("medium", medium), ("group", group))
            put("kvcache_blocks_stored_total", m, int(snap.stored[p]))
            for r, reason in enumerate(snap.reasons):
                if snap.removed[p, r] or r == 0:
                    put("kvcache_blocks_removed_total", (*m, ("reason", reason)),
                        int(snap.removed[p, r]))  # fmt: skip
            put("kvcache_blocks_accessed_total", m, int(snap.accessed[p]))
            put("kvcache_block_restores_total", m, int(snap.restores[p]))
            put("kvcache_resident_blocks", m, int(snap.resident[p]))
            put("kvcache_resident_hashes", m, int(snap.resident_hashes[p]))
            put("kvcache_resident_tokens", m, int(snap.resident_tokens[p]))
            put("kvcache_tracked_blocks", m, int(snap.tracked_per_place[p]))
            for key, family in LIFECYCLE_FAMILIES:
                put(family, m, _histogram(snap.histograms[key], p))
        put("kvcache_cache_clears_total", e, int(snap.clears))
        for group, spec in group_specs(v, places[v.name]):
            labels = (*e, ("group", group), ("kind", spec.kind))
            put("kvcache_group_info", (*labels, ("sliding_window", spec.sliding_window)), 1)
        put("kvcache_stored_tokens_total", e, int(v.tokens_stored))
        for i in media[v.name]:
            for a, adapter in enumerate(snap.adapters):
                if snap.adapter_stored[i, a] or snap.adapter_resident[i, a]:
                    labels = (*e, ("medium", snap.media[i]), ("adapter", adapter))
                    put("kvcache_adapter_resident_blocks", labels, int(snap.adapter_resident[i, a]))
                    put("kvcache_adapter_blocks_stored_total", labels,
                        int(snap.adapter_stored[i, a]))  # fmt: skip
                    put("kvcache_adapter_block_restores_total", labels,
                        int(snap.adapter_restores[i, a]))  # fmt: skip
        for (alert, level), count in sorted(v.alerts_raised.items(), key=lambda kv: kv[0][0]):
            put("kvcache_alerts_total", (*e, ("alert", alert), ("severity", level.value)),
                int(count))  # fmt: skip
        for active in sorted(v.alerts_active, key=lambda a: a.alert):
            labels = (*e, ("alert", active.alert), ("severity", active.level.value))
            put("kvcache_alert_active", labels, 1)
        for name, trend in sorted(v.trends.items()):
            put("kvcache_trend_slope", (*e, ("series", name)), float(trend.slope))
            put("kvcache_trend_direction", (*e, ("series", name)), int(trend.direction))
        put("kvcache_exporter_messages_total", e, int(src.messages))
        errors = {reason: 0 for reason in DECODE_ERROR_REASONS} | v.decode_errors
        for reason, count in sorted(errors.items()):
            put("kvcache_exporter_decode_errors_total", (*e, ("reason", reason)), int(count))
        for reason, count in sorted(dict(src.handshake_failures).items()):
            put("kvcache_exporter_handshake_failures_total", (*e, ("reason", reason)),
                int(count))  # fmt: skip
        put("kvcache_exporter_unknown_fields_total", e, int(v.unknown_fields))
        put("kvcache_exporter_sequence_gaps_total", e, int(src.sequence_gaps))
        put("kvcache_exporter_batches_lost_total", e, int(src.batches_lost))
        put("kvcache_exporter_batches_replayed_total", e, int(src.batches_replayed))
        put("kvcache_exporter_duplicate_batches_total", e, int(src.duplicates))
        put("kvcache_exporter_engine_restarts_total", e, int(src.engine_restarts))
        # Read once: the ingest thread updates these fields of the live stats object.
        last_ts, last_arrival = src.last_event_ts, src.last_arrival
        if last_ts is not None:
            put("kvcache_exporter_last_event_timestamp_seconds", e, float(last_ts))
            if last_arrival is not None:
                put("kvcache_exporter_event_lag_seconds", e, float(last_arrival - last_ts))
        put("kvcache_exporter_source_up", e, int(src.up))
        put("kvcache_exporter_sample_ratio", e, float(v.sample_ratio))
        put("kvcache_exporter_unknown_removals_total", e, int(snap.unknown_removals))
        put("kvcache_exporter_unknown_accesses_total", e, int(snap.unknown_accesses))
        put("kvcache_exporter_untracked_stores_total", e, int(snap.untracked_stores))
        put("kvcache_exporter_collector_bytes", e, collector_bytes(v))
    for hits_reported, whatif, w, figures in whatif_media(views, media):
        if figures.distance is not None:
            put("kvcache_block_reuse_distance_blocks", w, _histogram(figures.distance, 0))
        if figures.capacity:
            put("kvcache_whatif_capacity_blocks", w, int(figures.capacity))
        put("kvcache_whatif_sample_ratio", w, float(figures.sample_ratio))
        put("kvcache_whatif_sampled_blocks", w, int(figures.sampled_blocks))
        for factor, count in zip(whatif.avoided_factors, figures.avoided, strict=True):
            put("kvcache_whatif_recomputes_avoided_total",
                (*w, ("capacity_factor", factor_label(factor))), int(count))  # fmt: skip
        if hits_reported:  # else the curve would only repeat the avoided counter
            for factor, count in zip(whatif.factors, figures.hits, strict=True):
                put("kvcache_whatif_hits_total",
                    (*w, ("capacity_factor", factor_label(factor))), int(count))  # fmt: skip
    for pool in pools(views):
        pl: Labels = (("pool", pool.name),)
        seen = [i for i in range(len(pool.media)) if pool.seen[i]]
        for i in seen:
            pm: Labels = (*pl, ("medium", pool.media[i]))
            put("kvcache_pool_distinct_resident_blocks", pm, int(pool.distinct[i]))
            put("kvcache_pool_duplicate_resident_blocks", pm, int(pool.duplicate[i]))
        for engine in pool.engines:
            pe: Labels = (*pl, ("engine", engine.name))
            put("kvcache_exporter_pool_mismatches_total", pe, int(engine.mismatches))
            for i in seen:
                labels = (*pe, ("medium", pool.media[i]))
                put("kvcache_pool_stores_total", labels, int(engine.stored[i]))
                put("kvcache_pool_stores_resident_elsewhere_total", labels,
                    int(engine.elsewhere[i]))  # fmt: skip
        put("kvcache_exporter_pool_index_bytes", pl, int(pool.nbytes))
    # Every compiled stage in use: an install built with a compiler, and not disabled.
    every = DECODER_COMPILED and TABLE_COMPILED and APPLY_COMPILED and WHATIF_COMPILED
    compiled = ("compiled", "true" if every else "false")
    put("kvcache_exporter_build_info", (("version", __version__), compiled), 1)
    if http_refused is not None:
        for reason in HTTP_REFUSED_REASONS:
            put(HTTP_REFUSED, (("reason", reason),), int(http_refused.get(reason, 0)))
    if otlp_exports is not None:
        for result in OTLP_EXPORT_RESULTS:
            put(OTLP_EXPORTS, (("result", result),), int(otlp_exports.get(result, 0)))
    return out
