"""The *KV cache exporter health* dashboard: is the exporter seeing every event, in time?"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard as model

from .panels import (
    BLOCKS,
    ENGINE,
    GREEN,
    ORANGE,
    RATIO,
    RED,
    SECONDS,
    TAGS,
    TARGET,
    Query,
    alerts_annotation,
    dashboard_links,
    datasource_variable,
    engine_variable,
    instance_variable,
    job_variable,
    number_panels,
    row,
    stat_panel,
    timeseries_panel,
)

UID = "kvcache-exporter-health"
TITLE = "KV cache exporter health"

PER_ENGINE = "{{engine}} {{instance}}"
UP_DOWN = {"0": ("down", RED), "1": ("up", GREEN)}


def rate(metric: str, matchers: str = ENGINE) -> str:
    return f"rate({metric}{{{matchers}}}[$__rate_interval])"


def health() -> model.Dashboard:
    """The dashboard model."""
    builder = (
        dash.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Is kvcache-exporter connected to its engines, reading every event, on time and "
            "cheaply? Sources, throughput, stream integrity, lag, scrape cost and OTLP export."
        )
        .tags(TAGS)
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .link(dashboard_links())
        .annotation(alerts_annotation())
        .with_variable(datasource_variable())
        .with_variable(job_variable())
        .with_variable(instance_variable())
        .with_variable(engine_variable())
    )

    builder = (
        builder.with_row(row("Sources"))
        .with_panel(
            stat_panel(
                "Exporters up",
                "Whether Prometheus can scrape each exporter instance (up). Down: the pod or "
                "process is gone, or the scrape fails (wrong port, network policy, TLS). See "
                "docs/runbooks.md#kvcacheexporterdown.",
                "none",
                [Query(f"up{{{TARGET}}}", "{{instance}}")],
                thresholds=((None, RED), (1, GREEN)),
                mappings=UP_DOWN,
                graph=False,
                width=6,
            )
        )
        .with_panel(
            stat_panel(
                "Sources up",
                "Whether each engine source has a live ZeroMQ connection "
                "(kvcache_exporter_source_up). Down: the engine is not running, binds another "
                "port, or both sides bind or both connect (see the bind/connect rule in the "
                "README). See docs/runbooks.md#kvcachesourcedown.",
                "none",
                [Query(f"kvcache_exporter_source_up{{{ENGINE}}}", PER_ENGINE)],
                thresholds=((None, RED), (1, GREEN)),
                mappings=UP_DOWN,
                graph=False,
                width=6,
            )
        )
        .with_panel(
            stat_panel(
                "Sample ratio",
                "Fraction of block hashes whose lifecycle (histograms) is tracked "
                "(--collector.sample-ratio). Counters and residency are exact at any ratio; "
                "lower ratios only make the lifecycle quantiles noisier.",
                RATIO,
                [Query(f"kvcache_exporter_sample_ratio{{{ENGINE}}}", PER_ENGINE)],
                graph=False,
                width=6,
            )
        )
        .with_panel(
            stat_panel(
                "Exporter versions",
                "Exporter instances per version (kvcache_exporter_build_info). More than one "
                "version during a rollout is expected; afterwards it is a stuck rollout.",
                "count:instances",
                [
                    Query(
                        f"count by (version) (kvcache_exporter_build_info{{{TARGET}}})",
                        "{{version}}",
                    )
                ],
                graph=False,
                width=6,
            )
        )
    )

    builder = (
        builder.with_row(row("Throughput"))
        .with_panel(
            timeseries_panel(
                "Messages per second",
                "ZeroMQ messages (event batches) received per engine. It follows the engine's "
                "traffic: vLLM publishes a batch per scheduler step that changed the cache. "
                "Zero while the engine serves requests: the stream is stalled (topic filter, "
                "wrong endpoint) - docs/runbooks.md#kvcacheeventstreamstalled.",
                "mps",
                [Query(rate("kvcache_exporter_messages_total"), PER_ENGINE)],
            )
        )
        .with_panel(
            timeseries_panel(
                "Events per second by type",
                "Decoded events per engine and type (BlockStored, BlockRemoved, BlockAccessed, "
                "AllBlocksCleared; 'unknown' for types this exporter skips). A large 'unknown' "
                "share means the engine speaks a newer protocol than this exporter: upgrade it.",
                "eps",
                [
                    Query(
                        f"sum by (instance, engine, type) ({rate('kvcache_events_total')})",
                        "{{type}} {{engine}} {{instance}}",
                    )
                ],
            )
        )
    )

    builder = (
        builder.with_row(row("Stream integrity"))
        .with_panel(
            timeseries_panel(
                "Decode errors by reason",
                "Messages or events that could not be read, per second, by reason (frames, "
                "seq, msgpack, truncated, schema, too_large, event_schema, event_msgpack; see "
                "docs/metrics.md). Any sustained rate loses data: usually an engine version "
                "whose schema this exporter does not know, or a non-KV-event publisher on the "
                "same endpoint. See docs/runbooks.md#kvcachedecodeerrors.",
                "count:errors/s",
                [
                    Query(
                        "sum by (instance, engine, reason) "
                        f"({rate('kvcache_exporter_decode_errors_total')})",
                        "{{reason}} {{engine}} {{instance}}",
                    )
                ],
                no_value="no decode errors",
            )
        )
        .with_panel(
            timeseries_panel(
                "Sequence gaps",
                "Gaps per second in the publisher's sequence numbers: batches the exporter "
                "never received (dropped at a ZeroMQ high-water mark, or sent before the "
                "subscription was up). Replay recovers them when the engine has a replay "
                "endpoint; otherwise they count as lost (next panel).",
                "count:gaps/s",
                [Query(rate("kvcache_exporter_sequence_gaps_total"), PER_ENGINE)],
            )
        )
        .with_panel(
            timeseries_panel(
                "Batches replayed and lost",
                "Batches per second recovered by replay, and lost for good. Lost batches make "
                "counters undercount and residency drift (removals of blocks never seen "
                "stored). Raise --source.receive-hwm, give the exporter more CPU, or configure "
                "replay. See docs/runbooks.md#kvcacheeventslost.",
                "count:batches/s",
                [
                    Query(
                        rate("kvcache_exporter_batches_replayed_total"),
                        "replayed {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_batches_lost_total"),
                        "lost {{engine}} {{instance}}",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Other stream anomalies",
                "Per second: duplicate batches (ignored), publisher restarts (residency reset), "
                "removals and accesses of blocks not known resident (the exporter started late, "
                "or events were lost), stores not tracked because the block table is full "
                "(--collector.max-tracked-blocks) and unknown event fields (skipped). Brief "
                "unknown removals after a start are normal; a steady rate is not.",
                "cps",
                [
                    Query(
                        rate("kvcache_exporter_duplicate_batches_total"),
                        "duplicate batches {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_engine_restarts_total"),
                        "engine restarts {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_unknown_removals_total"),
                        "unknown removals {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_unknown_accesses_total"),
                        "unknown accesses {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_untracked_stores_total"),
                        "untracked stores {{engine}} {{instance}}",
                    ),
                    Query(
                        rate("kvcache_exporter_unknown_fields_total"),
                        "unknown fields {{engine}} {{instance}}",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Refused publishers",
                "ZeroMQ handshakes per second that failed, by reason: auth (a CURVE key not in "
                "curve.allow), protocol (CURVE on one side only), closed (the peer hung up "
                "mid-handshake: a CURVE engine given the wrong curve.engine-key, or a "
                "non-ZeroMQ client). Nothing a refused publisher sends is read. See "
                "docs/runbooks.md#kvcachehandshakefailures.",
                "count:handshakes/s",
                [
                    Query(
                        "sum by (instance, engine, reason) "
                        f"({rate('kvcache_exporter_handshake_failures_total')})",
                        "{{reason}} {{engine}} {{instance}}",
                    )
                ],
                width=24,
                no_value="no refused publishers",
            )
        )
    )

    builder = (
        builder.with_row(row("Timeliness and cost"))
        .with_panel(
            timeseries_panel(
                "Event lag",
                "Age: now minus the engine timestamp of the newest batch - it grows while the "
                "engine is idle or the stream stalled, and includes clock skew between engine "
                "and Prometheus. Arrival lag: when the newest batch arrived minus its engine "
                "timestamp - steadily growing means the exporter cannot keep up "
                "(docs/runbooks.md#kvcacheexporterlagging).",
                SECONDS,
                [
                    Query(
                        f"time() - (kvcache_exporter_last_event_timestamp_seconds{{{ENGINE}}} > 0)",
                        "age {{engine}} {{instance}}",
                    ),
                    Query(
                        f"kvcache_exporter_event_lag_seconds{{{ENGINE}}}",
                        "arrival lag {{engine}} {{instance}}",
                    ),
                ],
                thresholds=((None, GREEN), (30, ORANGE)),
            )
        )
        .with_panel(
            timeseries_panel(
                "Scrape duration",
                "How long Prometheus takes to scrape each exporter (scrape_duration_seconds). "
                "It grows with engines x media x buckets, not with traffic; close to the scrape "
                "timeout, scrapes fail. Fewer histogram buckets or fewer sources per exporter "
                "bring it down.",
                SECONDS,
                [Query(f"scrape_duration_seconds{{{TARGET}}}", "{{instance}}")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Collector memory",
                "Memory held by each engine's block state (hash table, remembered removals, "
                "histograms). It follows the resident blocks tracked and "
                "--collector.removed-memory; lower --collector.sample-ratio or "
                "--collector.max-tracked-blocks if it does not fit the pod's memory limit.",
                "bytes",
                [Query(f"kvcache_exporter_collector_bytes{{{ENGINE}}}", PER_ENGINE)],
            )
        )
        .with_panel(
            timeseries_panel(
                "Tracked blocks",
                "Resident block hashes whose lifecycle is tracked (sampled), per engine: every "
                "medium and KV-cache group together, as --collector.max-tracked-blocks counts "
                "them. At sample ratio 1 it equals the resident hashes "
                "(kvcache_resident_hashes, summed); stuck at --collector.max-tracked-blocks "
                "means new stores go untracked (see Other stream anomalies).",
                BLOCKS,
                [
                    Query(
                        f"sum by (job, instance, engine) (kvcache_tracked_blocks{{{ENGINE}}})",
                        PER_ENGINE,
                    )
                ],
            )
        )
    )

    builder = (
        builder.with_row(row("OTLP export"))
        .with_panel(
            timeseries_panel(
                "OTLP exports by result",
                "Pushes to the OpenTelemetry collector per second, by result. Present only "
                "when OTLP export is on (--otlp.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT). "
                "Failures: the collector is unreachable, refuses the protocol (grpc vs "
                "http/protobuf) or the TLS settings; the exporter logs the reason once a "
                "minute.",
                "count:exports/s",
                [
                    Query(
                        "sum by (instance, result) "
                        f"({rate('kvcache_exporter_otlp_exports_total', TARGET)})",
                        "{{result}} {{instance}}",
                    )
                ],
                no_value="OTLP export off",
            )
        )
        .with_panel(
            stat_panel(
                "OTLP export failures in the time range",
                "Failed OTLP pushes in the time range, per instance. Anything above zero means "
                "gaps in the OTLP backend's data (cumulative temporality catches up at the next "
                "success; delta carries the increments over).",
                "count:exports",
                [
                    Query(
                        "sum by (instance) (increase(kvcache_exporter_otlp_exports_total"
                        f'{{{TARGET}, result="failure"}}[$__range]))',
                        "{{instance}}",
                        instant=True,
                    )
                ],
                thresholds=((None, GREEN), (1, RED)),
                no_value="OTLP export off",
                graph=False,
                width=12,
                height=8,
            )
        )
    )
    return number_panels(builder.build())
