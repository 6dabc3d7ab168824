"""Every metric family the exporter serves, declared once.

Each :class:`Family` names what ``/metrics`` shows (Prometheus name, type, help, labels) and
what OTLP carries (OpenTelemetry name, instrument, unit, attribute keys); histograms name their
bucket set. The Prometheus and OTLP sinks, ``docs/metrics.md``, the Grafana dashboards and the
Prometheus rules take names and help from here, and tests hold each of them to it. This module
imports nothing of the package, so anything may import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Type(enum.Enum):
    """The Prometheus type of a family."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    INFO = "info"  # a gauge of 1 whose labels are the information (``*_info``)


class Instrument(enum.Enum):
    """The OpenTelemetry instrument a family is exported as."""

    COUNTER = "Counter"  # monotonic Sum; delta on request
    UPDOWN = "UpDownCounter"  # non-monotonic Sum; always cumulative (as the SDK does)
    GAUGE = "Gauge"
    HISTOGRAM = "Histogram"  # explicit buckets = the Prometheus buckets


class Buckets(enum.Enum):
    """A histogram's bucket set, and the flag that sets it."""

    DURATION = "--collector.duration-buckets"
    ACCESS_COUNT = "--collector.access-buckets"
    PREFIX_DEPTH = "prefix depth: 1, 2, 4, … 1024"
    REUSE_DISTANCE = "--whatif.distance-buckets (multiples of the capacity)"


# Label → OTLP attribute key, for every family with the label unless it says otherwise.
ATTRIBUTES: Final = {
    "engine": "kvcache.engine",
    "medium": "kvcache.medium",
    "group": "kvcache.group",
    "kind": "kvcache.group.kind",
    "sliding_window": "kvcache.group.sliding_window",
    "adapter": "kvcache.adapter",
    "type": "kvcache.event.type",
    "reason": "kvcache.removal.reason",
    "alert": "kvcache.alert.name",
    "severity": "kvcache.alert.severity",
    "series": "kvcache.trend.series",
    "capacity_factor": "kvcache.whatif.capacity_factor",
    "result": "kvcache.export.result",
    "pool": "kvcache.pool",
}
ERROR_TYPE: Final = "error.type"  # the semantic conventions' attribute for error classes

# Label values known in advance: their series are served at 0 from the start, so a panel or
# an alert on them has data before the first occurrence.
DECODE_ERROR_REASONS: Final = (
    "frames",  # not [topic, seq, payload]
    "seq",  # the sequence frame is not 8 bytes
    "msgpack",  # the payload is not msgpack
    "truncated",
    "schema",  # msgpack of the wrong shape
    "too_large",  # over the payload, events-per-batch or hashes-per-event bounds
    "event_schema",  # one event unreadable; the rest of its batch is used
    "event_msgpack",
)
HANDSHAKE_FAILURE_REASONS: Final = ("auth", "protocol", "closed")
OTLP_EXPORT_RESULTS: Final = ("success", "failure")
HTTP_REFUSED_REASONS: Final = (
    "max_connections",  # over --web.max-connections: closed at once
    "max_requests",  # over --web.max-requests: 503
    "header_timeout",  # request (TLS handshake included) not read in --web.read-header-timeout
    "tls_handshake",  # the TLS handshake failed (plain HTTP, no trusted client certificate)
    "uri_too_long",  # request line over --web.max-header-bytes: 414
    "headers_too_large",  # header lines over --web.max-header-bytes, or over 100: 431
    "write_timeout",  # an answer the client did not read within --web.idle-timeout
    "bad_request",  # a request line http.server refuses (400, 505), a method other than GET/HEAD
    "unauthorized",  # basic auth: 401
)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its ``/metrics`` form and its OTLP form."""

    name: str  # the Prometheus name, ``_total`` included for counters
    type: Type
    help: str
    labels: tuple[str, ...]
    otel_name: str | None  # None: not an OTLP metric (build info is a resource attribute)
    instrument: Instrument | None
    unit: str  # UCUM or a ``{annotation}``; "" for none
    buckets: Buckets | None = None
    # Labels whose attribute is not the one in ATTRIBUTES (label, attribute key).
    attribute_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def attributes(self) -> tuple[tuple[str, str], ...]:
        """(label, OTLP attribute key) for every label, in label order."""
        overrides = dict(self.attribute_overrides)
        return tuple((label, overrides.get(label, ATTRIBUTES[label])) for label in self.labels)

    @property
    def base_name(self) -> str:
        """The name without the suffix its type adds to sample names (``_total``, ``_info``)."""
        if self.type is Type.COUNTER:
            return self.name.removesuffix("_total")
        if self.type is Type.INFO:
            return self.name.removesuffix("_info")
        return self.name


E: Final = ("engine",)
PLACE: Final = ("engine", "medium", "group")
ADAPTER: Final = ("engine", "medium", "adapter")
WHATIF: Final = ("engine", "medium")
POOL_ENGINE: Final = ("pool", "engine", "medium")
POOL_MEDIUM: Final = ("pool", "medium")
C, G, H = Type.COUNTER, Type.GAUGE, Type.HISTOGRAM
IC, IU, IG, IH = Instrument.COUNTER, Instrument.UPDOWN, Instrument.GAUGE, Instrument.HISTOGRAM
_ADAPTER_NOTE: Final = "(base: none; other: beyond --collector.max-adapters)"
_ERROR: Final = (("reason", ERROR_TYPE),)


def _lifecycle(name: str, otel: str, unit: str, help_text: str, buckets: Buckets) -> Family:
    return Family(name, H, help_text, PLACE, otel, IH, unit, buckets)


FAMILIES: Final[tuple[Family, ...]] = (
    # --- the KV cache ---
    Family("kvcache_events_total", C, "Events decoded, by event type.",
           ("engine", "type"), "kvcache.events", IC, "{event}"),
    Family("kvcache_blocks_stored_total", C,
           "Blocks stored (physical: a second copy of a resident hash counts; with "
           "report-mode=full a store of a resident block is an access).",
           PLACE, "kvcache.blocks.stored", IC, "{block}"),
    Family("kvcache_blocks_removed_total", C,
           "Blocks removed, one per physical copy, by reason (cleared for AllBlocksCleared).",
           (*PLACE, "reason"), "kvcache.blocks.removed", IC, "{block}"),
    Family("kvcache_blocks_accessed_total", C,
           "Hits on resident blocks, where the engine reports them.",
           PLACE, "kvcache.blocks.accessed", IC, "{access}"),
    Family("kvcache_block_restores_total", C,
           "Blocks stored again after they had been removed (recomputation).",
           PLACE, "kvcache.block.restores", IC, "{block}"),
    Family("kvcache_cache_clears_total", C, "AllBlocksCleared events.",
           E, "kvcache.cache.clears", IC, "{clear}"),
    Family("kvcache_resident_blocks", G,
           "Blocks resident now (physical: two copies of one hash are two blocks).",
           PLACE, "kvcache.resident_blocks", IU, "{block}"),
    Family("kvcache_resident_hashes", G,
           "Distinct block hashes resident now (a hash with two physical copies counts once).",
           PLACE, "kvcache.resident_hashes", IU, "{hash}"),
    Family("kvcache_resident_tokens", G,
           "Tokens held by resident blocks (a partial block holds fewer than block_size).",
           PLACE, "kvcache.resident_tokens", IU, "{token}"),
    Family("kvcache_tracked_blocks", G, "Resident hashes whose lifecycle is tracked (sampled).",
           PLACE, "kvcache.tracked_blocks", IU, "{block}"),
    Family("kvcache_group_info", G,
           "1 per KV-cache group seen; kind and sliding window as the engine's stores say "
           "(unknown until one does).",
           ("engine", "group", "kind", "sliding_window"), "kvcache.group.info", IG, ""),
    Family("kvcache_stored_tokens_total", C,
           "Tokens held by stored blocks: block_size per block, fewer for a partial last block.",
           E, "kvcache.stored_tokens", IC, "{token}"),
    Family("kvcache_adapter_resident_blocks", G,
           f"Resident blocks by LoRA adapter {_ADAPTER_NOTE}.",
           ADAPTER, "kvcache.adapter.resident_blocks", IU, "{block}"),
    Family("kvcache_adapter_blocks_stored_total", C,
           f"Blocks stored by LoRA adapter {_ADAPTER_NOTE}.",
           ADAPTER, "kvcache.adapter.blocks.stored", IC, "{block}"),
    Family("kvcache_adapter_block_restores_total", C,
           f"Restores by LoRA adapter {_ADAPTER_NOTE}.",
           ADAPTER, "kvcache.adapter.block.restores", IC, "{block}"),
    _lifecycle("kvcache_block_lifetime_seconds", "kvcache.block.lifetime", "s",
               "Block lifetime, stored to removed.", Buckets.DURATION),
    _lifecycle("kvcache_block_idle_before_evict_seconds", "kvcache.block.idle_before_evict",
               "s", "Time from a block's last access (or store) to its removal.",
               Buckets.DURATION),
    _lifecycle("kvcache_block_reuse_gap_seconds", "kvcache.block.reuse_gap", "s",
               "Time between consecutive accesses of a resident block.", Buckets.DURATION),
    _lifecycle("kvcache_block_restore_gap_seconds", "kvcache.block.restore_gap", "s",
               "Time from a block's removal to its being stored again.", Buckets.DURATION),
    _lifecycle("kvcache_block_accesses_before_evict", "kvcache.block.accesses_before_evict",
               "{access}", "Accesses a block got after its store and before its removal.",
               Buckets.ACCESS_COUNT),
    _lifecycle("kvcache_block_prefix_depth", "kvcache.block.prefix_depth", "{block}",
               "Position of a stored block in its prefix chain (1 = first block of a prompt).",
               Buckets.PREFIX_DEPTH),
    # --- cache sizing (what-if) ---
    Family("kvcache_block_reuse_distance_blocks", H,
           "Ghost rank of restored blocks: how many more blocks the cache would have needed "
           "to keep them (sampled, scaled).",
           WHATIF, "kvcache.block.reuse_distance_blocks", IH, "{block}",
           Buckets.REUSE_DISTANCE),
    Family("kvcache_whatif_capacity_blocks", G,
           "Cache capacity the what-if model compares against: configured, or the most "
           "blocks seen resident around evictions.",
           WHATIF, "kvcache.whatif.capacity_blocks", IG, "{block}"),
    Family("kvcache_whatif_sample_ratio", G,
           "Fraction of block hashes the what-if model follows on this medium: the configured "
           "rate until the sampled blocks reach their budget, lower from then on.",
           WHATIF, "kvcache.whatif.sample_ratio", IG, "1"),
    Family("kvcache_whatif_sampled_blocks", G,
           "Block hashes the what-if model follows on this medium, resident and remembered "
           "(at most --whatif.max-sampled-blocks).",
           WHATIF, "kvcache.whatif.sampled_blocks", IG, "{block}"),
    Family("kvcache_whatif_recomputes_avoided_total", C,
           "Restores (recomputation) a cache capacity_factor times as large would have "
           "avoided (sampled, scaled).",
           (*WHATIF, "capacity_factor"), "kvcache.whatif.recomputes_avoided", IC, "{block}"),
    Family("kvcache_whatif_hits_total", C,
           "References a cache capacity_factor times as large would have served as hits "
           "(sampled, scaled; where hits are reported).",
           (*WHATIF, "capacity_factor"), "kvcache.whatif.hits", IC, "{block}"),
    # --- the pool: several engines one router chooses between ---
    Family("kvcache_pool_stores_total", C,
           "Blocks an engine of the pool stored as new resident keys (not copies, not hit "
           "reports): the base of the resident-elsewhere ratio.",
           POOL_ENGINE, "kvcache.pool.stores", IC, "{block}"),
    Family("kvcache_pool_stores_resident_elsewhere_total", C,
           "Blocks an engine stored while another engine of its pool held the same key "
           "(medium, group, hash): recomputation a KV-aware router could have avoided.",
           POOL_ENGINE, "kvcache.pool.stores.resident_elsewhere", IC, "{block}"),
    Family("kvcache_pool_duplicate_resident_blocks", G,
           "Keys resident on two or more engines of the pool now.",
           POOL_MEDIUM, "kvcache.pool.duplicate_resident_blocks", IU, "{block}"),
    Family("kvcache_pool_distinct_resident_blocks", G,
           "Distinct keys resident on at least one engine of the pool now.",
           POOL_MEDIUM, "kvcache.pool.distinct_resident_blocks", IU, "{block}"),
    # --- alerts and trends ---
    Family("kvcache_alerts_total", C, "Anomaly alerts raised, by alert and severity.",
           ("engine", "alert", "severity"), "kvcache.alerts", IC, "{alert}"),
    Family("kvcache_alert_active", G, "1 while an alert holds (only active alerts).",
           ("engine", "alert", "severity"), "kvcache.alert.active", IG, "{alert}"),
    Family("kvcache_trend_slope", G,
           "Least-squares slope of a series over the trend window, in its units per second.",
           ("engine", "series"), "kvcache.trend.slope", IG, ""),
    Family("kvcache_trend_direction", G, "Trend of a series: -1 down, 0 flat, 1 up.",
           ("engine", "series"), "kvcache.trend.direction", IG, ""),
    # --- the exporter itself ---
    Family("kvcache_exporter_build_info", Type.INFO,
           "Always 1; the version, and whether the compiled decoder and block table are in use, "
           "are labels.",
           ("version", "compiled"), None, None, ""),
    Family("kvcache_exporter_messages_total", C, "ZeroMQ messages received.",
           E, "kvcache.exporter.messages", IC, "{message}"),
    Family("kvcache_exporter_decode_errors_total", C,
           "Messages or events that could not be read, by reason.",
           ("engine", "reason"), "kvcache.exporter.decode_errors", IC, "{error}",
           attribute_overrides=_ERROR),
    Family("kvcache_exporter_handshake_failures_total", C,
           "ZeroMQ handshakes with a publisher that failed (a wrong or refused CURVE key, "
           "CURVE on one side only, a peer that hung up), by reason; such a publisher is not "
           "heard.",
           ("engine", "reason"), "kvcache.exporter.handshake_failures", IC, "{handshake}",
           attribute_overrides=_ERROR),
    Family("kvcache_exporter_unknown_fields_total", C,
           "Event fields this exporter does not know, skipped.",
           E, "kvcache.exporter.unknown_fields", IC, "{field}"),
    Family("kvcache_exporter_sequence_gaps_total", C, "Gaps seen in the sequence numbers.",
           E, "kvcache.exporter.sequence_gaps", IC, "{gap}"),
    Family("kvcache_exporter_batches_lost_total", C,
           "Batches missing after replay was tried (or with no replay configured).",
           E, "kvcache.exporter.batches_lost", IC, "{batch}"),
    Family("kvcache_exporter_batches_replayed_total", C, "Batches recovered by replay.",
           E, "kvcache.exporter.batches_replayed", IC, "{batch}"),
    Family("kvcache_exporter_duplicate_batches_total", C,
           "Batches whose sequence number was already seen, ignored.",
           E, "kvcache.exporter.duplicate_batches", IC, "{batch}"),
    Family("kvcache_exporter_engine_restarts_total", C,
           "Publisher restarts (sequence back to 0); the engine's residency is reset.",
           E, "kvcache.exporter.engine_restarts", IC, "{restart}"),
    Family("kvcache_exporter_last_event_timestamp_seconds", G,
           "Engine timestamp of the newest batch.",
           E, "kvcache.exporter.last_event_timestamp", IG, "s"),
    Family("kvcache_exporter_event_lag_seconds", G,
           "Arrival time minus engine timestamp of the newest batch.",
           E, "kvcache.exporter.event_lag", IG, "s"),
    Family("kvcache_exporter_source_up", G,
           "1 while the source's socket has a live connection to an engine.",
           E, "kvcache.exporter.source_up", IG, "{source}"),
    Family("kvcache_exporter_sample_ratio", G, "Fraction of block hashes tracked.",
           E, "kvcache.exporter.sample_ratio", IG, "1"),
    Family("kvcache_exporter_unknown_removals_total", C,
           "Removals of hashes not known to be resident.",
           E, "kvcache.exporter.unknown_removals", IC, "{block}"),
    Family("kvcache_exporter_unknown_accesses_total", C,
           "Accesses reported for hashes not known to be resident.",
           E, "kvcache.exporter.unknown_accesses", IC, "{access}"),
    Family("kvcache_exporter_untracked_stores_total", C,
           "Stores not tracked because the block table was full "
           "(--collector.max-tracked-blocks).",
           E, "kvcache.exporter.untracked_stores", IC, "{block}"),
    Family("kvcache_exporter_collector_bytes", G,
           "Memory held by the engine's block state (the what-if model's included).",
           E, "kvcache.exporter.collector.memory", IU, "By"),
    Family("kvcache_exporter_pool_mismatches_total", C,
           "Batches of an engine kept out of its pool's index because its block size differs "
           "from the pool's.",
           ("pool", "engine"), "kvcache.exporter.pool.mismatches", IC, "{batch}"),
    Family("kvcache_exporter_pool_index_bytes", G,
           "Memory held by the pool's index of resident keys.",
           ("pool",), "kvcache.exporter.pool.index", IU, "By"),
    Family("kvcache_exporter_http_refused_total", C,
           "Connections and requests the HTTP server refused, by reason (present only while "
           "it serves).",
           ("reason",), "kvcache.exporter.http.refused", IC, "{refusal}",
           attribute_overrides=_ERROR),
    Family("kvcache_exporter_otlp_exports_total", C,
           "OTLP exports, by result (present only while OTLP export is on).",
           ("result",), "kvcache.exporter.otlp.exports", IC, "{export}"),
)  # fmt: skip
BY_NAME: Final = {family.name: family for family in FAMILIES}
OTLP_EXPORTS: Final = "kvcache_exporter_otlp_exports_total"
HTTP_REFUSED: Final = "kvcache_exporter_http_refused_total"
