"""OTLP export (SPEC §4): the numbers ``/metrics`` shows, pushed to an OpenTelemetry collector.

One source of truth: every export reads the same :class:`EngineView` snapshots the Prometheus
exposition renders, turns them into ``MetricsData`` of the OpenTelemetry SDK and hands that to
the SDK's OTLP exporter (gRPC or HTTP/protobuf). No SDK instruments record anything, so
nothing is counted twice and an OTLP counter equals its ``/metrics`` counter at the same
moment.

Exports run on their own thread at a fixed interval; each is bounded by the exporter's timeout
(retries included), so a slow or dead collector delays only the next export, never ingestion.
Failures are counted (``kvcache_exporter_otlp_exports_total{result}``) and logged at most once
a minute. :meth:`OTLPSink.stop` sends a final export.

Delta temporality is computed here: each counter and histogram point is the difference from
the last *successful* export (whose time is the point's start), so a failed export loses
nothing: its increments go out with the next one that succeeds.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, cast

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.version import __version__ as sdk_version

from .. import __version__
from ..analysis.whatif import factor_label
from ..collector.histogram import HistogramSnapshot
from ..config import OTLPConfig
from .prometheus import (
    HISTOGRAM_FAMILIES,
    REUSE_DISTANCE_HELP,
    WHATIF_AVOIDED_HELP,
    WHATIF_CAPACITY_HELP,
    WHATIF_HITS_HELP,
    EngineView,
    active_media,
    active_places,
    collector_bytes,
    group_specs,
    place_labels,
    whatif_media,
)

log = logging.getLogger("kvcache_exporter.otlp")

SCOPE: Final = InstrumentationScope("kvcache_exporter", __version__)
DEFAULT_TIMEOUT: Final = 10.0  # the SDK exporters' default, seconds
FAILURE_LOG_INTERVAL: Final = 60.0  # seconds between two "export failed" log lines
# How long stop() waits for the final export: a shutdown should not hang on a slow collector
# (Kubernetes' grace period is 30 s, and the sockets still have to close), and when exports
# were failing anyway one quick attempt is all that is worth waiting for.
FINAL_EXPORT_WAIT: Final = 5.0
FINAL_EXPORT_WAIT_FAILING: Final = 1.0
EXPORTS_FAMILY: Final = "kvcache_exporter_otlp_exports_total"
RESULTS: Final = ("success", "failure")
# OpenTelemetry's namespace for name-based service.instance.id values (semantic conventions).
_INSTANCE_NAMESPACE: Final = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")
# Prometheus histograms have no min/max; None leaves the optional OTLP fields unset (the SDK's
# dataclass types them as float, its encoder accepts None).
_UNSET: Final = cast(float, None)


class Kind(enum.Enum):
    """The OpenTelemetry instrument an exported family behaves like."""

    COUNTER = "Counter"  # monotonic Sum; delta on request
    UPDOWN = "UpDownCounter"  # non-monotonic Sum; always cumulative (as the SDK does)
    GAUGE = "Gauge"
    HISTOGRAM = "Histogram"  # explicit buckets = the Prometheus buckets


@dataclass(frozen=True, slots=True)
class Instrument:
    """One ``/metrics`` family and its OTLP metric: name, kind, unit and attribute names."""

    prometheus: str
    name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[tuple[str, str], ...]  # (Prometheus label, OTLP attribute key)


# Label → attribute, the same for every family that has the label (``reason`` differs by
# family, so it is spelled out there).
_ENGINE: Final = ("engine", "kvcache.engine")
_MEDIUM: Final = ("medium", "kvcache.medium")
_GROUP: Final = ("group", "kvcache.group")
_ADAPTER: Final = ("adapter", "kvcache.adapter")
_ALERT: Final = (("alert", "kvcache.alert.name"), ("severity", "kvcache.alert.severity"))
_TREND: Final = ("series", "kvcache.trend.series")
_FACTOR: Final = ("capacity_factor", "kvcache.whatif.capacity_factor")


def _i(
    prometheus: str,
    name: str,
    kind: Kind,
    unit: str,
    description: str,
    *attributes: tuple[str, str],
) -> Instrument:
    return Instrument(prometheus, name, kind, unit, description, (_ENGINE, *attributes))


_C, _U, _G, _H = Kind.COUNTER, Kind.UPDOWN, Kind.GAUGE, Kind.HISTOGRAM

# The whole catalog of /metrics, in its order. Names follow OpenTelemetry conventions (dotted
# namespaces, units in `unit`, no `_total`) and are chosen so that the Collector's standard
# Prometheus translation (dots → underscores, unit suffix, `_total` on monotonic sums) gives
# back the /metrics name wherever that is idiomatic. `kvcache_exporter_build_info` is not a
# metric here: its version is the resource's `service.version`.
CATALOG: Final[tuple[Instrument, ...]] = (
    _i("kvcache_events_total", "kvcache.events", _C, "{event}",
       "Events decoded, by event type.", ("type", "kvcache.event.type")),
    _i("kvcache_blocks_stored_total", "kvcache.blocks.stored", _C, "{block}",
       "Blocks stored (physical: a second copy of a resident hash counts; with "
       "report-mode=full a store of a resident block is an access).", _MEDIUM, _GROUP),
    _i("kvcache_blocks_removed_total", "kvcache.blocks.removed", _C, "{block}",
       "Block hashes removed, by reason (cleared for AllBlocksCleared).",
       _MEDIUM, _GROUP, ("reason", "kvcache.removal.reason")),
    _i("kvcache_blocks_accessed_total", "kvcache.blocks.accessed", _C, "{access}",
       "Hits on resident blocks, where the engine reports them.", _MEDIUM, _GROUP),
    _i("kvcache_block_restores_total", "kvcache.block.restores", _C, "{block}",
       "Blocks stored again after they had been removed (recomputation).", _MEDIUM, _GROUP),
    _i("kvcache_cache_clears_total", "kvcache.cache.clears", _C, "{clear}",
       "AllBlocksCleared events."),
    _i("kvcache_resident_blocks", "kvcache.resident_blocks", _U, "{block}",
       "Blocks resident now (physical: two copies of one hash are two blocks).", _MEDIUM,
       _GROUP),
    _i("kvcache_resident_hashes", "kvcache.resident_hashes", _U, "{hash}",
       "Distinct block hashes resident now (a hash with two physical copies counts once).",
       _MEDIUM, _GROUP),
    _i("kvcache_resident_tokens", "kvcache.resident_tokens", _U, "{token}",
       "Tokens held by resident blocks (a partial block holds fewer than block_size).",
       _MEDIUM, _GROUP),
    _i("kvcache_tracked_blocks", "kvcache.tracked_blocks", _U, "{block}",
       "Resident hashes whose lifecycle is tracked (sampled).", _MEDIUM, _GROUP),
    _i("kvcache_group_info", "kvcache.group.info", _G, "",
       "1 per KV-cache group seen; kind and sliding window as the engine's stores say "
       "(unknown until one does).", _GROUP, ("kind", "kvcache.group.kind"),
       ("sliding_window", "kvcache.group.sliding_window")),
    _i("kvcache_stored_tokens_total", "kvcache.stored_tokens", _C, "{token}",
       "Tokens held by stored blocks: block_size per block, fewer for a partial last block."),
    _i("kvcache_adapter_resident_blocks", "kvcache.adapter.resident_blocks", _U, "{block}",
       "Resident blocks by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
       _MEDIUM, _ADAPTER),
    _i("kvcache_adapter_blocks_stored_total", "kvcache.adapter.blocks.stored", _C, "{block}",
       "Blocks stored by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
       _MEDIUM, _ADAPTER),
    _i("kvcache_adapter_block_restores_total", "kvcache.adapter.block.restores", _C, "{block}",
       "Restores by LoRA adapter (base: none; other: beyond --collector.max-adapters).",
       _MEDIUM, _ADAPTER),
    _i("kvcache_block_lifetime_seconds", "kvcache.block.lifetime", _H, "s",
       "Block lifetime, stored to removed.", _MEDIUM, _GROUP),
    _i("kvcache_block_idle_before_evict_seconds", "kvcache.block.idle_before_evict", _H, "s",
       "Time from a block's last access (or store) to its removal.", _MEDIUM, _GROUP),
    _i("kvcache_block_reuse_gap_seconds", "kvcache.block.reuse_gap", _H, "s",
       "Time between consecutive accesses of a resident block.", _MEDIUM, _GROUP),
    _i("kvcache_block_restore_gap_seconds", "kvcache.block.restore_gap", _H, "s",
       "Time from a block's removal to its being stored again.", _MEDIUM, _GROUP),
    _i("kvcache_block_accesses_before_evict", "kvcache.block.accesses_before_evict", _H,
       "{access}", "Accesses a block got after its store and before its removal.", _MEDIUM, _GROUP),
    _i("kvcache_block_prefix_depth", "kvcache.block.prefix_depth", _H, "{block}",
       "Position of a stored block in its prefix chain (1 = first block of a prompt).",
       _MEDIUM, _GROUP),
    _i("kvcache_block_reuse_distance_blocks", "kvcache.block.reuse_distance_blocks", _H,
       "{block}", REUSE_DISTANCE_HELP, _MEDIUM),
    _i("kvcache_whatif_capacity_blocks", "kvcache.whatif.capacity_blocks", _G, "{block}",
       WHATIF_CAPACITY_HELP, _MEDIUM),
    _i("kvcache_whatif_recomputes_avoided_total", "kvcache.whatif.recomputes_avoided", _C,
       "{block}", WHATIF_AVOIDED_HELP, _MEDIUM, _FACTOR),
    _i("kvcache_whatif_hits_total", "kvcache.whatif.hits", _C, "{block}", WHATIF_HITS_HELP,
       _MEDIUM, _FACTOR),
    _i("kvcache_alerts_total", "kvcache.alerts", _C, "{alert}",
       "Anomaly alerts raised, by alert and severity.", *_ALERT),
    _i("kvcache_alert_active", "kvcache.alert.active", _G, "{alert}",
       "1 while an alert holds (only active alerts).", *_ALERT),
    _i("kvcache_trend_slope", "kvcache.trend.slope", _G, "",
       "Least-squares slope of a series over the trend window, in its units per second.",
       _TREND),
    _i("kvcache_trend_direction", "kvcache.trend.direction", _G, "",
       "Trend of a series: -1 down, 0 flat, 1 up.", _TREND),
    _i("kvcache_exporter_messages_total", "kvcache.exporter.messages", _C, "{message}",
       "ZeroMQ messages received."),
    _i("kvcache_exporter_decode_errors_total", "kvcache.exporter.decode_errors", _C, "{error}",
       "Messages or events that could not be read, by reason.", ("reason", "error.type")),
    _i("kvcache_exporter_handshake_failures_total", "kvcache.exporter.handshake_failures", _C,
       "{handshake}", "ZeroMQ handshakes with a publisher that failed, by reason; such a "
       "publisher is not heard.", ("reason", "error.type")),
    _i("kvcache_exporter_unknown_fields_total", "kvcache.exporter.unknown_fields", _C,
       "{field}", "Event fields this exporter does not know, skipped."),
    _i("kvcache_exporter_sequence_gaps_total", "kvcache.exporter.sequence_gaps", _C, "{gap}",
       "Gaps seen in the sequence numbers."),
    _i("kvcache_exporter_batches_lost_total", "kvcache.exporter.batches_lost", _C, "{batch}",
       "Batches missing after replay was tried (or with no replay configured)."),
    _i("kvcache_exporter_batches_replayed_total", "kvcache.exporter.batches_replayed", _C,
       "{batch}", "Batches recovered by replay."),
    _i("kvcache_exporter_duplicate_batches_total", "kvcache.exporter.duplicate_batches", _C,
       "{batch}", "Batches whose sequence number was already seen, ignored."),
    _i("kvcache_exporter_engine_restarts_total", "kvcache.exporter.engine_restarts", _C,
       "{restart}", "Publisher restarts (sequence back to 0); the engine's residency is reset."),
    _i("kvcache_exporter_last_event_timestamp_seconds", "kvcache.exporter.last_event_timestamp",
       _G, "s", "Engine timestamp of the newest batch."),
    _i("kvcache_exporter_event_lag_seconds", "kvcache.exporter.event_lag", _G, "s",
       "Arrival time minus engine timestamp of the newest batch."),
    _i("kvcache_exporter_source_up", "kvcache.exporter.source_up", _G, "{source}",
       "1 while the source's socket has a live connection to an engine."),
    _i("kvcache_exporter_sample_ratio", "kvcache.exporter.sample_ratio", _G, "1",
       "Fraction of block hashes tracked."),
    _i("kvcache_exporter_unknown_removals_total", "kvcache.exporter.unknown_removals", _C,
       "{block}", "Removals of hashes not known to be resident."),
    _i("kvcache_exporter_unknown_accesses_total", "kvcache.exporter.unknown_accesses", _C,
       "{access}", "Accesses reported for hashes not known to be resident."),
    _i("kvcache_exporter_untracked_stores_total", "kvcache.exporter.untracked_stores", _C,
       "{block}", "Stores not tracked because the block table was full."),
    _i("kvcache_exporter_collector_bytes", "kvcache.exporter.collector.memory", _U, "By",
       "Memory held by the engine's block state."),
    Instrument(EXPORTS_FAMILY, "kvcache.exporter.otlp.exports", _C, "{export}",
               "OTLP exports, by result.", (("result", "kvcache.export.result"),)),
)  # fmt: skip
BY_PROMETHEUS: Final = {inst.prometheus: inst for inst in CATALOG}


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
Series = dict[str, dict[Labels, Value]]  # Prometheus family → labels → value


def _histogram(hist: HistogramSnapshot, row: int) -> HistogramValue:
    return HistogramValue(
        hist.bounds, tuple(int(c) for c in hist.counts[row]), float(hist.sums[row])
    )


def series(views: Sequence[EngineView], otlp_exports: Mapping[str, int] | None = None) -> Series:
    """Every series ``render(views)`` writes, by family, with the same labels and values.

    This mirrors :func:`..prometheus.render` family by family (the same media, the same
    reasons, the same skipped ``None`` values); a unit test holds the two to each other.
    """
    out: Series = {inst.prometheus: {} for inst in CATALOG}

    def put(family: str, labels: Labels, value: Value) -> None:
        out[family][labels] = value

    places = {v.name: active_places(v.collector) for v in views}
    media = {v.name: active_media(v.collector, places[v.name]) for v in views}
    for hits_reported, whatif, medium_labels, medium in whatif_media(views, media):
        w: Labels = tuple(medium_labels)
        if medium.distance is not None:
            put("kvcache_block_reuse_distance_blocks", w, _histogram(medium.distance, 0))
        if medium.capacity:
            put("kvcache_whatif_capacity_blocks", w, int(medium.capacity))
        for factor, count in zip(whatif.avoided_factors, medium.avoided, strict=True):
            put("kvcache_whatif_recomputes_avoided_total",
                (*w, ("capacity_factor", factor_label(factor))), int(count))  # fmt: skip
        if hits_reported:
            for factor, count in zip(whatif.factors, medium.hits, strict=True):
                put("kvcache_whatif_hits_total",
                    (*w, ("capacity_factor", factor_label(factor))), int(count))  # fmt: skip
    for v in views:
        snap, src = v.collector, v.source
        e: Labels = (("engine", v.name),)
        for kind, count in v.events.items():
            put("kvcache_events_total", (*e, ("type", kind)), int(count))
        for p in places[v.name]:
            m: Labels = tuple(place_labels(v.name, snap, p))
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
            for key, family, _ in HISTOGRAM_FAMILIES:
                put(family, m, _histogram(snap.histograms[key], p))
        for group, spec in group_specs(v, places[v.name]):
            labels = (*e, ("group", group), ("kind", spec.kind))
            put("kvcache_group_info", (*labels, ("sliding_window", spec.sliding_window)), 1)
        for i in media[v.name]:
            for a, adapter in enumerate(snap.adapters):
                if snap.adapter_stored[i, a] or snap.adapter_resident[i, a]:
                    labels = (*e, ("medium", snap.media[i]), ("adapter", adapter))
                    put("kvcache_adapter_resident_blocks", labels, int(snap.adapter_resident[i, a]))
                    put("kvcache_adapter_blocks_stored_total", labels,
                        int(snap.adapter_stored[i, a]))  # fmt: skip
                    put("kvcache_adapter_block_restores_total", labels,
                        int(snap.adapter_restores[i, a]))  # fmt: skip
        put("kvcache_cache_clears_total", e, int(snap.clears))
        put("kvcache_stored_tokens_total", e, int(v.tokens_stored))
        for (alert, level), count in v.alerts_raised.items():
            put("kvcache_alerts_total", (*e, ("alert", alert), ("severity", level.value)),
                int(count))  # fmt: skip
        for active in v.alerts_active:
            labels = (*e, ("alert", active.alert), ("severity", active.level.value))
            put("kvcache_alert_active", labels, 1)
        for name, trend in v.trends.items():
            put("kvcache_trend_slope", (*e, ("series", name)), float(trend.slope))
            put("kvcache_trend_direction", (*e, ("series", name)), int(trend.direction))
        put("kvcache_exporter_messages_total", e, int(src.messages))
        for reason, count in v.decode_errors.items():
            put("kvcache_exporter_decode_errors_total", (*e, ("reason", reason)), int(count))
        for reason, count in dict(src.handshake_failures).items():
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
    if otlp_exports is not None:
        for result in RESULTS:
            put(EXPORTS_FAMILY, (("result", result),), int(otlp_exports.get(result, 0)))
    return out


# --- resource -----------------------------------------------------------------------------------
# (attribute, the OTel-operator style variable, the common Downward-API name used in a pod)
_K8S_ENV: Final = (
    ("k8s.namespace.name", "K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
    ("k8s.pod.name", "K8S_POD_NAME", "POD_NAME"),
    ("k8s.pod.uid", "K8S_POD_UID", "POD_UID"),
    ("k8s.node.name", "K8S_NODE_NAME", "NODE_NAME"),
    ("k8s.container.name", "K8S_CONTAINER_NAME", "CONTAINER_NAME"),
)
_SA_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubernetes_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """``k8s.*`` resource attributes from Downward-API variables (see docs/metrics.md).

    ``K8S_POD_NAME`` and friends count anywhere. The generic names (``POD_NAME``, ``NODE_NAME``,
    …) and the fallbacks (pod name = ``HOSTNAME``, namespace = the service account's) count only
    inside a pod (``KUBERNETES_SERVICE_HOST`` set): elsewhere they often mean something else.
    """
    in_pod = bool(env.get("KUBERNETES_SERVICE_HOST"))
    attrs: dict[str, str] = {}
    for key, specific, generic in _K8S_ENV:
        value = env.get(specific) or (env.get(generic) if in_pod else None)
        if value:
            attrs[key] = value
    if in_pod:
        if "k8s.pod.name" not in attrs and env.get("HOSTNAME"):
            attrs["k8s.pod.name"] = env["HOSTNAME"]
        if "k8s.namespace.name" not in attrs:
            with contextlib.suppress(OSError):  # no service account mounted
                attrs["k8s.namespace.name"] = _SA_NAMESPACE.read_text().strip()
    return attrs


def build_resource(env: Mapping[str, str] | None = None) -> Resource:
    """The exporter's resource: defaults, then ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` over them (the SDK's own detector reads those two)."""
    env = os.environ if env is None else env
    k8s = kubernetes_attributes(env)
    if "k8s.namespace.name" in k8s and "k8s.pod.name" in k8s:
        # The semantic conventions' recipe: stable across restarts of the same container.
        key = ".".join((k8s["k8s.namespace.name"], k8s["k8s.pod.name"],
                        k8s.get("k8s.container.name", "")))  # fmt: skip
        instance = str(uuid.uuid5(_INSTANCE_NAMESPACE, key))
    else:
        instance = str(uuid.uuid4())
    defaults: dict[str, str] = {
        "service.name": "kvcache-exporter",
        "service.version": __version__,
        "service.instance.id": instance,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        **k8s,
    }
    return Resource(defaults).merge(OTELResourceDetector().detect())


# --- the SDK's exporter -------------------------------------------------------------------------
def http_metrics_url(endpoint: str) -> str:
    """``--otlp.endpoint`` is a base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is: for
    http/protobuf the signal path ``/v1/metrics`` is appended unless it is already there."""
    url = urllib.parse.urlsplit(endpoint)
    path = url.path.rstrip("/")
    if not path.endswith("/v1/metrics"):
        path += "/v1/metrics"
    return urllib.parse.urlunsplit(url._replace(path=path))


def make_exporter(config: OTLPConfig) -> MetricExporter:
    """The SDK's OTLP metric exporter for ``config``; what the config leaves unset (None) the
    exporter reads from the standard OTEL_EXPORTER_OTLP_* variables itself."""
    headers = dict(config.headers) if config.headers is not None else None
    if config.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        grpc_compression = {
            "none": grpc.Compression.NoCompression,
            "gzip": grpc.Compression.Gzip,
            "deflate": grpc.Compression.Deflate,
        }
        return GrpcExporter(
            endpoint=config.endpoint,
            headers=headers,
            timeout=config.timeout,
            compression=grpc_compression[config.compression] if config.compression else None,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(
        endpoint=http_metrics_url(config.endpoint) if config.endpoint else None,
        headers=headers,
        timeout=config.timeout,
        compression=Compression(config.compression) if config.compression else None,
    )


class _SDKLogs(logging.Handler):
    """Takes the OpenTelemetry SDK's log records off the root logger.

    The SDK exporters log every failed attempt (a dead collector means a warning per retry,
    unformatted, on stderr). Here the exporter's records go to ``kvcache_exporter.otlp.sdk`` at
    debug level and the last problem is kept for the sink's own rate-limited failure line;
    other SDK records (a malformed OTEL_RESOURCE_ATTRIBUTES, say) keep their level.
    """

    _installed: ClassVar[_SDKLogs | None] = None  # one per process: loggers are global

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last_problem: str | None = None
        self._target = logging.getLogger("kvcache_exporter.otlp.sdk")

    @classmethod
    def install(cls) -> _SDKLogs:
        if cls._installed is None:
            handler = cls()
            sdk = logging.getLogger("opentelemetry")
            sdk.addHandler(handler)
            sdk.propagate = False  # else Python's last-resort handler prints them raw
            cls._installed = handler
        return cls._installed

    def take_problem(self) -> str | None:
        problem, self.last_problem = self.last_problem, None
        return problem

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in a third-party log call
            message = str(record.msg)
        level = record.levelno
        if record.name.startswith("opentelemetry.exporter"):
            if level >= logging.WARNING:
                self.last_problem = message
            level = logging.DEBUG
        self._target.log(level, message, extra={"sdk_logger": record.name})


# --- the sink -----------------------------------------------------------------------------------
class OTLPSink:
    """Exports ``views()`` every ``config.interval`` seconds on its own thread."""

    def __init__(
        self,
        config: OTLPConfig,
        views: Callable[[], Sequence[EngineView]],
        *,
        exporter: MetricExporter | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.config = config
        self._views = views
        self._sdk_logs = _SDKLogs.install()
        self._exporter = exporter if exporter is not None else make_exporter(config)
        self.resource = resource if resource is not None else build_resource()
        self._delta = config.temporality == "delta"
        self._start_ns = time.time_ns()
        self._lock = threading.Lock()
        self._exports = dict.fromkeys(RESULTS, 0)
        self._export_lock = threading.Lock()  # one export at a time, whoever calls
        self._last_sent: Series = {}
        self._last_sent_ns = self._start_ns
        self._failures_unlogged = 0
        self._last_failure_log = -FAILURE_LOG_INTERVAL
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        where = config.endpoint or os.environ.get(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        self.endpoint = where or "(SDK default)"
        aggregation = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION")
        if (aggregation or "").strip() == "base2_exponential_bucket_histogram":
            log.warning(
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION ignored: histograms "
                "are exported with their explicit (Prometheus) buckets"
            )

    @property
    def timeout(self) -> float:
        """Seconds one export may take (the SDK exporter's own bound, retries included)."""
        return self.config.timeout if self.config.timeout is not None else DEFAULT_TIMEOUT

    def exports(self) -> dict[str, int]:
        """Exports so far by result (``success``, ``failure``), for ``/metrics``."""
        with self._lock:
            return dict(self._exports)

    # --- building MetricsData ---------------------------------------------------------------
    def metrics_data(self, current: Series, now_ns: int) -> MetricsData:
        """``current`` as OTLP data at ``now_ns``: cumulative since the sink started, or (for
        counters and histograms, in delta mode) since the last successful export."""
        metrics = []
        for inst in CATALOG:
            points = current.get(inst.prometheus)
            if points:
                data = self._data(inst, points, now_ns)
                metrics.append(Metric(inst.name, inst.description, inst.unit, data))
        scope = ScopeMetrics(SCOPE, metrics, "")
        return MetricsData([ResourceMetrics(self.resource, [scope], "")])

    def _data(
        self, inst: Instrument, points: dict[Labels, Value], now_ns: int
    ) -> Sum | Gauge | Histogram:
        keys = dict(inst.attributes)
        delta = self._delta and inst.kind in (Kind.COUNTER, Kind.HISTOGRAM)
        before = self._last_sent.get(inst.prometheus, {}) if delta else {}
        start = self._last_sent_ns if delta else self._start_ns
        temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
        if inst.kind is Kind.HISTOGRAM:
            hist_points = []
            for labels, value in points.items():
                assert isinstance(value, HistogramValue)
                earlier = before.get(labels)
                if isinstance(earlier, HistogramValue) and earlier.count <= value.count:
                    value = value.minus(earlier)
                hist_points.append(
                    HistogramDataPoint(
                        attributes={keys[k]: v for k, v in labels},
                        start_time_unix_nano=start,
                        time_unix_nano=now_ns,
                        count=value.count,
                        sum=value.sum,
                        bucket_counts=list(value.counts),
                        explicit_bounds=list(value.bounds),
                        min=_UNSET,
                        max=_UNSET,
                    )
                )
            return Histogram(hist_points, temporality)
        number_points = []
        for labels, value in points.items():
            assert not isinstance(value, HistogramValue)
            earlier = before.get(labels)
            if earlier is not None and not isinstance(earlier, HistogramValue) and earlier <= value:
                value = value - earlier  # a counter that went down restarted: send it whole
            number_points.append(
                NumberDataPoint(
                    attributes={keys[k]: v for k, v in labels},
                    start_time_unix_nano=0 if inst.kind is Kind.GAUGE else start,
                    time_unix_nano=now_ns,
                    value=value,
                )
            )
        if inst.kind is Kind.GAUGE:
            return Gauge(number_points)
        return Sum(number_points, temporality, is_monotonic=inst.kind is Kind.COUNTER)

    # --- exporting --------------------------------------------------------------------------
    def export_once(self) -> bool:
        """Read the views, export them once; True on success. Never raises."""
        with self._export_lock:
            now_ns = time.time_ns()
            current: Series | None = None
            error: str | None = None
            try:
                current = series(self._views(), self.exports())
                result = self._exporter.export(
                    self.metrics_data(current, now_ns), timeout_millis=self.timeout * 1000
                )
                ok = result is MetricExportResult.SUCCESS
            except Exception as exc:  # the export thread must survive anything
                ok, error = False, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._exports["success" if ok else "failure"] += 1
            if ok:
                assert current is not None
                self._last_sent, self._last_sent_ns = current, now_ns
                self._sdk_logs.take_problem()
                if self._failing:
                    log.info("OTLP export succeeded again", extra={"endpoint": self.endpoint})
                self._failing = False
                self._failures_unlogged = 0
            else:
                self._failed(error or self._sdk_logs.take_problem() or "export failed")
            return ok

    def _failed(self, error: str) -> None:
        """Log a failure at most once per FAILURE_LOG_INTERVAL (the counter has them all)."""
        self._failing = True
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            log.warning(
                "OTLP export failed",
                extra={
                    "endpoint": self.endpoint,
                    "failures": self._failures_unlogged,
                    "error": error,
                },
            )
            self._last_failure_log = now
            self._failures_unlogged = 0

    def start(self) -> None:
        """Start exporting every ``config.interval`` seconds."""
        self._thread = threading.Thread(target=self._run, name="otlp", daemon=True)
        self._thread.start()
        log.info(
            "OTLP export on",
            extra={
                "endpoint": self.endpoint,
                "protocol": self.config.protocol,
                "interval": self.config.interval,
                "temporality": self.config.temporality,
            },
        )

    def _run(self) -> None:
        interval = self.config.interval
        next_at = time.monotonic() + interval
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):
            self.export_once()
            next_at += interval
            if next_at < time.monotonic():  # an export overran: skip the missed ticks
                next_at = time.monotonic() + interval
        self.export_once()  # the final export, with everything ingested before stop()

    def stop(self, timeout: float | None = None) -> None:
        """Send a final export and shut the exporter down, within ``timeout`` seconds (default:
        the export timeout, at most FINAL_EXPORT_WAIT, or FINAL_EXPORT_WAIT_FAILING while
        exports fail); an export still running then is abandoned."""
        if timeout is not None:
            bound = timeout
        elif self._failing or self._sdk_logs.last_problem is not None:
            # Failing, or the export in flight has already hit an error and is retrying.
            bound = FINAL_EXPORT_WAIT_FAILING
        else:
            bound = min(self.timeout, FINAL_EXPORT_WAIT) + 0.5
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(bound)
            if self._thread.is_alive():
                log.warning(
                    "OTLP final export did not finish in time; abandoned",
                    extra={"endpoint": self.endpoint, "waited": bound},
                )
        # Also interrupts the retry wait of an export still in flight.
        self._exporter.shutdown(timeout_millis=1000)
