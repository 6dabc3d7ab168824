"""The *KV cache overview* dashboard: is the prefix cache working, and what is it costing?

Rates are computed in the panel (``$__rate_interval`` follows the zoom); ratios and quantiles
come from the recording rules in ``deploy/prometheus/prometheus_rules.yaml`` (5-minute windows),
which must be loaded in the Prometheus the dashboard reads.

Block-level families carry the KV-cache ``group``. Raw queries of them take ``PLACE`` (the
``group`` variable included) and say ``{{group}}`` where they list series; the pool-level
recording rules (``engine_medium:``), the what-if and the adapter families have no ``group``
and take ``MEDIUM``, so the variable cannot filter them to nothing. The *KV-cache groups* row
shows what differs between groups; the per-group quantiles come from the
``engine_medium_group:`` rules.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard as model

from kvcache_exporter.thresholds import THRASH_CRITICAL_RATIO, THRASH_RATIO

from .panels import (
    BLOCKS,
    BLOCKS_PER_S,
    ENGINE,
    GREEN,
    GROUP,
    MEDIUM,
    ORANGE,
    PLACE,
    RATIO,
    RED,
    SECONDS,
    TAGS,
    TARGET,
    Query,
    alerts_annotation,
    bargauge_panel,
    dashboard_links,
    datasource_variable,
    engine_variable,
    group_variable,
    heatmap_panel,
    instance_variable,
    job_variable,
    medium_variable,
    number_panels,
    row,
    stat_panel,
    state_timeline_panel,
    table_panel,
    timeseries_panel,
)

UID = "kvcache-overview"
TITLE = "KV cache overview"

RESTORE_RATIO = "engine_medium:kvcache_block_restore_ratio:ratio_rate5m"
HIT_RATIO = "engine_medium:kvcache_block_hit_ratio:ratio_rate5m"
ELSEWHERE_RATIO = "pool_medium:kvcache_pool_stores_resident_elsewhere:ratio_rate5m"
POOL_MEDIUM = f'{TARGET}, medium=~"$medium"'
"""Matchers for the fleet pool's series (``pool`` and ``medium``, no engine)."""
PER_POOL = "{{pool}} {{medium}} {{instance}}"
PER_SERIES = "{{engine}} {{medium}} {{instance}}"
"""Legend of a pool-level series (per engine and medium)."""
PER_PLACE = "{{engine}} {{medium}} group {{group}} {{instance}}"
"""Legend of a raw block-level or per-group series."""
PER_ADAPTER = "{{adapter}} {{engine}} {{medium}}"
TOKENS = "count:tokens"

# Restore ratio levels of the KVCacheThrashing alert (warning, critical), which the rules
# (deploy/prometheus/generate.py) and the exporter's thrashing alert take from the same place.
THRASH = ((None, GREEN), (THRASH_RATIO, ORANGE), (THRASH_CRITICAL_RATIO, RED))
THRASH_LEVELS = f"{THRASH_RATIO:.0%}", f"{THRASH_CRITICAL_RATIO:.0%}"
"""The same levels as the panel descriptions state them, in percent."""


def quantile(histogram: str, q: str) -> str:
    """A recorded quantile of a lifecycle histogram for the selected pools (all groups)."""
    return f'engine_medium:{histogram}:histogram_quantile5m{{{MEDIUM}, quantile="{q}"}}'


def group_quantile(histogram: str, q: str) -> str:
    """A recorded quantile of a lifecycle histogram per KV-cache group, for the selected
    groups."""
    return f'engine_medium_group:{histogram}:histogram_quantile5m{{{PLACE}, quantile="{q}"}}'


def quantile_queries(histogram: str) -> list[Query]:
    return [
        Query(quantile(histogram, q), f"p{label} {PER_SERIES}")
        for q, label in (("0.5", "50"), ("0.9", "90"), ("0.99", "99"))
    ]


def group_quantile_queries(histogram: str) -> list[Query]:
    """Median and p90 per group (p99 is recorded too; two lines per group stay readable)."""
    return [
        Query(group_quantile(histogram, q), f"p{label} {PER_PLACE}")
        for q, label in (("0.5", "50"), ("0.9", "90"))
    ]


def bucket_heatmap(histogram: str) -> Query:
    """Observations per second in each bucket, summed over the selected series."""
    return Query(
        f"sum by (le) (rate({histogram}_bucket{{{PLACE}}}[$__rate_interval]))",
        "{{le}}",
        heatmap=True,
    )


def adapter_rate(metric: str) -> str:
    """Blocks per second of an adapter counter, per engine, medium and adapter."""
    return f"sum by (engine, medium, adapter) (rate({metric}{{{MEDIUM}}}[$__rate_interval]))"


LIFECYCLE: list[tuple[str, str, str, str]] = [
    (
        "Block lifetime",
        "kvcache_block_lifetime_seconds",
        "How long blocks stay in the cache, from store to removal, for blocks removed in the "
        "last 5 minutes (tracked blocks only; see the sample ratio on Exporter health).",
        "A lifetime shorter than the time between a user's turns (seconds to minutes for chat, "
        "often longer for agents) means follow-up requests find their prefix evicted. If it "
        "shrinks while traffic does not grow, the cache lost memory; if it shrinks with "
        "traffic, the working set outgrew the cache: give the engine more KV memory "
        "(gpu-memory-utilization, smaller max-model-len or max-num-seqs), add a CPU offload "
        "tier, or route sessions to the replica that holds their prefix.",
    ),
    (
        "Idle before evict",
        "kvcache_block_idle_before_evict_seconds",
        "Time between a block's last use (access, or its store) and its removal: how long the "
        "LRU kept it after anyone needed it.",
        "Near zero: blocks are evicted as soon as they stop being used, the cache has no slack "
        "and any reuse arriving a little later misses. Long idle times with a high restore "
        "ratio point at the eviction order (large one-off prompts pushing out hot prefixes) "
        "rather than at the size.",
    ),
    (
        "Reuse gap",
        "kvcache_block_reuse_gap_seconds",
        "Time between consecutive uses of a resident block (its store counts as the first "
        "use): how far apart the requests that share a prefix arrive. Needs an engine that "
        "reports hits (BlockAccessed, or re-announced stores).",
        "Compare with the lifetime: a p90 reuse gap close to or above the median lifetime means "
        "many reuses arrive just as their blocks are being evicted, so a modestly larger "
        "cache (or an offload tier) would turn them into hits.",
    ),
    (
        "Restore gap",
        "kvcache_block_restore_gap_seconds",
        "Time from a block's removal to its store again: how soon the cache needed what it "
        "evicted. Only blocks that came back are observed.",
        "Short restore gaps (seconds) are the costliest misses: the block was needed again "
        "almost at once. Keeping blocks that much longer takes the memory of (restore rate x "
        "restore gap) more blocks; an offload tier is the cheap way to get it.",
    ),
]


GROUP_LIFECYCLE: list[tuple[str, str, str, str]] = [
    (
        "Block lifetime per group",
        "kvcache_block_lifetime_seconds",
        SECONDS,
        "Median and p90 time from store to removal over 5 minutes, per engine, medium and "
        "KV-cache group (recording rules engine_medium_group:...). The pool-level quantiles "
        "follow the group that stores the most blocks (in a hybrid-attention model the "
        "full-attention group, several times the sliding-window group's stores), so a change "
        "of the other group shows only here; KVCacheResidencyCollapse judges each group "
        "against its own past. A fall in one group only points at that group's share of "
        "the pool.",
    ),
    (
        "Idle before evict per group",
        "kvcache_block_idle_before_evict_seconds",
        SECONDS,
        "Median and p90 time from a block's last use (access, or its store) to its removal, "
        "per KV-cache group. Without hit reports it equals the lifetime. Near zero in a "
        "group means the LRU keeps none of its blocks after their last use: reuses "
        "arriving a little later miss.",
    ),
    (
        "Reuse gap per group",
        "kvcache_block_reuse_gap_seconds",
        SECONDS,
        "Median and p90 time between consecutive uses of a resident block, per KV-cache group "
        "(needs hit reports). Compare each group's reuse gap with its own lifetime: reuses "
        "arriving after the lifetime are the misses a larger cache would serve.",
    ),
    (
        "Restore gap per group",
        "kvcache_block_restore_gap_seconds",
        SECONDS,
        "Median and p90 time from a block's removal to its store again, per KV-cache group. "
        "Short restore gaps are the costly misses: the block was needed again almost at once "
        "and had to be recomputed. In a hybrid model a prefix hit needs its blocks in every "
        "group, so a group with shorter restore gaps than the other limits the hits of both.",
    ),
    (
        "Accesses before evict per group",
        "kvcache_block_accesses_before_evict",
        "count:accesses",
        "Median and p90 hits a block got before its removal, per KV-cache group (needs hit "
        "reports). A group whose p90 stays at 0 caches blocks nobody reuses: in a hybrid "
        "model, compare the sliding-window group's (whose blocks serve only the window) with "
        "the full-attention group's.",
    ),
]


def groups_row(builder: dash.Dashboard) -> dash.Dashboard:
    """What differs between the KV-cache groups of a pool: what they are, their lifecycle
    quantiles (``engine_medium_group:`` rules), and their share of the pool."""
    builder = builder.with_row(row("KV-cache groups")).with_panel(
        table_panel(
            "Groups: kind and sliding window",
            "The KV-cache groups of each engine (kvcache_group_info): the attention kind of "
            "the layers in the group (full_attention, sliding_window, ...; unknown until a "
            "store says) and the sliding window in tokens. A model with one group shows group "
            "0 only; hybrid-attention models (gpt-oss, Gemma 3, Llama 4) show a sliding-window "
            "and a full-attention group sharing one pool, with the same hashes stored in both.",
            Query(
                f"max by (engine, group, kind, sliding_window) (kvcache_group_info{{{GROUP}}})",
                instant=True,
                table=True,
            ),
            [
                ("engine", "Engine"),
                ("group", "Group"),
                ("kind", "Kind"),
                ("sliding_window", "Sliding window (tokens)"),
            ],
            width=8,
            no_value="no KV-cache group seen",
        )
    )
    for title, histogram, unit, description in GROUP_LIFECYCLE[:2]:
        builder = builder.with_panel(
            timeseries_panel(title, description, unit, group_quantile_queries(histogram), width=8)
        )
    builder = builder.with_panel(
        timeseries_panel(
            "Resident blocks and hashes per group",
            "Physical blocks resident (kvcache_resident_blocks) against distinct block hashes "
            "resident (kvcache_resident_hashes), per engine, medium and KV-cache group, and "
            "their difference: extra copies. vLLM keeps a second copy of a hash when it "
            "recomputes a block whose old copy is still cached (the last block of a fully "
            "cached prompt; in hybrid models, blocks beyond the sliding window's hit limit). "
            "A few copies are normal; copies growing with the load are memory spent on "
            "duplicates.",
            BLOCKS,
            [
                Query(f"kvcache_resident_blocks{{{PLACE}}}", f"blocks {PER_PLACE}"),
                Query(f"kvcache_resident_hashes{{{PLACE}}}", f"hashes {PER_PLACE}"),
                Query(
                    f"kvcache_resident_blocks{{{PLACE}}} - kvcache_resident_hashes{{{PLACE}}}",
                    f"extra copies {PER_PLACE}",
                ),
            ],
        )
    ).with_panel(
        timeseries_panel(
            "Resident tokens per group",
            "Tokens held by the resident blocks (kvcache_resident_tokens: block size per "
            "block, fewer for a partial block), per engine, medium and KV-cache group: how "
            "much context each group keeps cached. A sliding-window group needs only the "
            "window's tokens per sequence, so it usually holds far fewer than the "
            "full-attention group of the same pool; the full-attention group's tokens are the "
            "prefix context the cache can serve.",
            TOKENS,
            [Query(f"kvcache_resident_tokens{{{PLACE}}}", PER_PLACE)],
        )
    )
    for title, histogram, unit, description in GROUP_LIFECYCLE[2:]:
        builder = builder.with_panel(
            timeseries_panel(title, description, unit, group_quantile_queries(histogram), width=8)
        )
    return builder


def adapters_row(builder: dash.Dashboard) -> dash.Dashboard:
    """The pool by LoRA adapter: who holds it, who stores and who recomputes."""
    stored = adapter_rate("kvcache_adapter_blocks_stored_total")
    restores = adapter_rate("kvcache_adapter_block_restores_total")
    return (
        builder.with_row(row("LoRA adapters"))
        .with_panel(
            timeseries_panel(
                "Resident blocks by adapter",
                "Blocks resident now by the LoRA adapter they were stored for, per engine and "
                "medium (all KV-cache groups; summed over the selected instances). 'base' is "
                "blocks stored without an adapter; 'other' collects adapters beyond "
                "--collector.max-adapters. One adapter holding most of the pool while others "
                "thrash means its traffic displaces theirs: route it to its own replicas.",
                BLOCKS,
                [
                    Query(
                        "sum by (engine, medium, adapter) "
                        f"(kvcache_adapter_resident_blocks{{{MEDIUM}}})",
                        PER_ADAPTER,
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Stores and restores by adapter",
                "Blocks stored, and restored (stored again after an eviction), per second by "
                "LoRA adapter, engine and medium. An adapter whose restores approach its "
                "stores recomputes what it had cached: its working set does not fit beside "
                "the others'. Each adapter's prefixes are its own (the adapter is part of the "
                "block hash), so adapters never share cached blocks.",
                BLOCKS_PER_S,
                [
                    Query(stored, f"stored {PER_ADAPTER}"),
                    Query(restores, f"restored {PER_ADAPTER}"),
                ],
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Restore ratio by adapter",
                "Restores / stores by LoRA adapter, engine and medium, over the panel's rate "
                "interval: which adapter thrashes the cache. Dashed lines: the "
                f"KVCacheThrashing levels ({THRASH_LEVELS[0]}, {THRASH_LEVELS[1]}), which the "
                "alert applies to the whole pool. A high ratio for one adapter only: give it "
                "more cache (its own replicas, or prefix-aware routing per adapter) rather than "
                "the whole engine.",
                RATIO,
                [Query(f"{restores}\n/\n({stored} > 0)", PER_ADAPTER)],
                thresholds=THRASH,
                maximum=1,
                width=8,
                no_value="no stores",
            )
        )
    )


def pools_row(builder: dash.Dashboard) -> dash.Dashboard:
    """The fleet view (docs/pools.md): several replicas of one model in one pool."""
    elsewhere = (
        "sum by (pool, engine, medium) "
        f"(rate(kvcache_pool_stores_resident_elsewhere_total{{{MEDIUM}}}[$__rate_interval]))"
    )
    return (
        builder.with_row(row("Pools: what a KV-aware router would save"))
        .with_panel(
            timeseries_panel(
                "Recomputation a KV-aware router could have avoided",
                "Share of the pool's stores (new resident keys, not copies) whose block another "
                "engine of the pool held at that moment, over 5 minutes, per pool and medium: "
                "what a router sending each request to the replica that holds its prefix "
                "(llm-d, Dynamo's KV router, SGLang's cache-aware router) could have saved. An "
                "upper bound: it ignores load balance and places blocks, not whole requests "
                "(docs/pools.md). Near 0 with round-robin replicas: the traffic shares little "
                "across requests, a router gains nothing. Tens of percent: prefix-aware routing "
                "pays for itself.",
                RATIO,
                [Query(f"{ELSEWHERE_RATIO}{{{POOL_MEDIUM}}}", PER_POOL)],
                maximum=1,
                width=8,
                no_value="no stores",
            )
        )
        .with_panel(
            timeseries_panel(
                "Stores resident elsewhere by engine",
                "Blocks per second each engine stored while another engine of its pool held "
                "them, per pool, engine and medium: which replicas recompute what their peers "
                "hold.",
                BLOCKS_PER_S,
                [Query(elsewhere, "{{pool}} {{engine}} {{medium}}")],
                width=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Duplicate and distinct resident blocks in the pool",
                "Keys resident on at least one engine of the pool (distinct) and on two or more "
                "(duplicate), per pool and medium, summed over the selected instances. "
                "Duplicate / distinct is the share of the pool's cached content held more than "
                "once: memory a prefix-aware router would free for other prefixes.",
                BLOCKS,
                [
                    Query(
                        "sum by (pool, medium) "
                        f"(kvcache_pool_distinct_resident_blocks{{{POOL_MEDIUM}}})",
                        "distinct {{pool}} {{medium}}",
                    ),
                    Query(
                        "sum by (pool, medium) "
                        f"(kvcache_pool_duplicate_resident_blocks{{{POOL_MEDIUM}}})",
                        "duplicate {{pool}} {{medium}}",
                    ),
                ],
                width=8,
            )
        )
    )


def overview() -> model.Dashboard:
    """The dashboard model."""
    builder = (
        dash.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Is the prefix cache of my LLM engines working, and what is it costing? "
            "Residency, churn, recomputation, hit rate and block lifecycles from "
            "kvcache-exporter. Needs the recording rules of deploy/prometheus."
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
        .with_variable(medium_variable())
        .with_variable(group_variable())
    )

    # --- the five-minute answer --------------------------------------------------------------
    builder = (
        builder.with_row(row("Is the prefix cache working?"))
        .with_panel(
            stat_panel(
                "Resident blocks",
                "Blocks resident in the KV cache now, summed over the selected engines and "
                "KV-cache groups, per medium (physical blocks: a hash held twice counts twice). "
                "Under load an LRU cache is full, so this sits at capacity. Well below "
                "capacity under load: the engine has less KV memory than configured (preemption, "
                "a restart with other settings); a drop to zero is a cache reset or an engine "
                "restart (see Exporter health).",
                BLOCKS,
                [Query(f"sum by (medium) (kvcache_resident_blocks{{{PLACE}}})", "{{medium}}")],
                graph=True,
            )
        )
        .with_panel(
            stat_panel(
                "Hit rate (lowest)",
                "Hits / (hits + stores) over 5 minutes, the lowest of the selected engines, per "
                "medium (all KV-cache groups of the medium together). On GPU it is the "
                "prefix-cache block hit rate. Only engines that report hits have one (native "
                "BlockAccessed events, or vLLM's re-announced stores with kv_cache_report_mode "
                "full); without them use the restore ratio. A low hit rate with a low restore "
                "ratio is a workload without shared prefixes, not a cache problem; with a high "
                "restore ratio the cache is too small.",
                RATIO,
                [Query(f"min by (medium) ({HIT_RATIO}{{{MEDIUM}}})", "{{medium}}")],
                thresholds=((None, ORANGE), (0.2, GREEN)),
                no_value="no hit reports",
            )
        )
        .with_panel(
            stat_panel(
                "Restore ratio (highest)",
                "Restores / stores over 5 minutes, the highest of the selected engines, per medium "
                "(all KV-cache groups together): the share of stored blocks that the cache had "
                "held and evicted before, i.e. prefill recomputed (or reloaded from an offload "
                f"tier). Orange at {THRASH_LEVELS[0]} and red at {THRASH_LEVELS[1]}, the "
                "KVCacheThrashing levels: see docs/runbooks.md#kvcachethrashing.",
                RATIO,
                [Query(f"max by (medium) ({RESTORE_RATIO}{{{MEDIUM}}})", "{{medium}}")],
                thresholds=THRASH,
                no_value="no stores",
            )
        )
        .with_panel(
            stat_panel(
                "Restores per second",
                "Blocks stored again after they had been evicted, per second, summed over the "
                "selected engines: the recomputation a larger cache would have saved, in "
                "blocks (multiply by the engine's block size for tokens). Zero is ideal; a "
                "steady rate is the cost the panels below help to explain.",
                BLOCKS_PER_S,
                [
                    Query(
                        "sum by (medium) "
                        f"(rate(kvcache_block_restores_total{{{PLACE}}}[$__rate_interval]))",
                        "{{medium}}",
                    )
                ],
            )
        )
        .with_panel(
            stat_panel(
                "Median block lifetime (shortest)",
                "Median time from store to removal over 5 minutes, the shortest of the "
                "selected engines, per medium and KV-cache group (the groups of a hybrid "
                "model can differ, and a pooled median follows the group that stores the "
                "most). Compare with how long your users take "
                "between turns: blocks that die sooner cannot be reused. A sudden fall is "
                "KVCacheResidencyCollapse, judged per group "
                "(docs/runbooks.md#kvcacheresidencycollapse).",
                SECONDS,
                [
                    Query(
                        "min by (medium, group) "
                        f"({group_quantile('kvcache_block_lifetime_seconds', '0.5')})",
                        "{{medium}} group {{group}}",
                    )
                ],
                no_value="no evictions",
            )
        )
        .with_panel(
            stat_panel(
                "Evicted without a hit",
                "Share of the blocks removed in the time range that were never used after "
                "their store (accesses before evict = 0). Needs hit reports. High values mean "
                "most cached blocks are dead weight: unique prompts, or a cache too small for "
                "reuse to arrive in time (check the reuse gap against the lifetime).",
                RATIO,
                [
                    Query(
                        "sum by (medium) (increase(kvcache_block_accesses_before_evict_bucket"
                        f'{{{PLACE}, le="0.0"}}[$__range]))\n/\nsum by (medium) (increase('
                        f"kvcache_block_accesses_before_evict_count{{{PLACE}}}[$__range]) > 0)",
                        "{{medium}}",
                        instant=True,
                    )
                ],
                thresholds=((None, GREEN), (0.5, ORANGE), (0.9, RED)),
                no_value="no evictions",
                graph=False,
            )
        )
    )

    # --- residency and churn ------------------------------------------------------------------
    builder = (
        builder.with_row(row("Residency and churn"))
        .with_panel(
            timeseries_panel(
                "Resident blocks by medium and engine",
                "Physical blocks resident now, per engine, medium and KV-cache group (exact, "
                "whatever the sample ratio; the groups of a medium share its pool, so its "
                "capacity is their sum). "
                "Flat at capacity under load is a full, healthy LRU cache. Steps down without a "
                "clear: KV memory was taken away (preemption, engine reconfigured). Drops to "
                "zero: AllBlocksCleared (reset_prefix_cache) or an engine restart. Growing "
                "without bound: removals are being lost (check Exporter health for gaps).",
                BLOCKS,
                [Query(f"kvcache_resident_blocks{{{PLACE}}}", PER_PLACE)],
            )
        )
        .with_panel(
            timeseries_panel(
                "Stores, removals and restores",
                "Blocks per second, per engine and medium, summed over the selected KV-cache "
                "groups: stored (newly computed, or loaded "
                "from an offload tier), removed by reason (evicted, offloaded, cleared, ...) and "
                "restored (stored again after an eviction). Stores roughly equal evictions in "
                "a full cache. Restores close to stores is thrashing; removals with reason "
                "'cleared' or 'engine_restart' are resets, not pressure.",
                BLOCKS_PER_S,
                [
                    Query(
                        "sum by (engine, medium) "
                        f"(rate(kvcache_blocks_stored_total{{{PLACE}}}[$__rate_interval]))",
                        "stored {{engine}} {{medium}}",
                    ),
                    Query(
                        "sum by (engine, medium, reason) "
                        f"(rate(kvcache_blocks_removed_total{{{PLACE}}}[$__rate_interval]))",
                        "removed ({{reason}}) {{engine}} {{medium}}",
                    ),
                    Query(
                        "sum by (engine, medium) "
                        f"(rate(kvcache_block_restores_total{{{PLACE}}}[$__rate_interval]))",
                        "restored {{engine}} {{medium}}",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Restore ratio (recomputation)",
                "Restores / stores over 5 minutes, per engine and medium (all KV-cache groups "
                "of the pool together): the share of stores "
                "that recomputed (or reloaded) blocks the cache had evicted. Dashed lines: the "
                f"KVCacheThrashing levels ({THRASH_LEVELS[0]} warning, {THRASH_LEVELS[1]} "
                "critical). Above them, the working set does not fit: give the engine more KV "
                "memory, add or grow a CPU offload tier, or route requests that share a prefix "
                "to the same replica. A spike right after a cache clear is the cache refilling, "
                "not thrashing.",
                RATIO,
                [Query(f"{RESTORE_RATIO}{{{MEDIUM}}}", PER_SERIES)],
                thresholds=THRASH,
                maximum=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Hit rate",
                "Hits / (hits + stores) over 5 minutes, per engine and medium (all KV-cache groups "
                "together), for engines that report hits. On GPU this is the block hit rate of the "
                "prefix cache; on an offload tier, how much of what it holds comes back. Falling "
                "hit rate with a rising restore ratio: the cache got too small for the traffic. "
                "Falling hit rate alone: the traffic shares fewer prefixes (new clients, prompts "
                "without a stable system prefix).",
                RATIO,
                [Query(f"{HIT_RATIO}{{{MEDIUM}}}", PER_SERIES)],
                maximum=1,
                no_value="no hit reports",
            )
        )
        .with_panel(
            timeseries_panel(
                "Recomputation saved vs cache size",
                "Share of stores that a cache this many times larger would not have had to "
                "recompute (what-if model on the eviction order, docs/whatif.md), per engine, "
                "medium and capacity factor. If 1.5x or 2x already saves a large share, more KV "
                "memory (or a CPU offload tier of (factor - 1) x the GPU cache, an upper bound "
                "for it) pays for itself; if even 8x saves little, the traffic does not reuse "
                "prefixes and memory will not help: look at routing instead. The model is of "
                "the whole pool, so it is compared with the stores of every KV-cache group.",
                RATIO,
                [
                    Query(
                        "sum by (engine, medium, capacity_factor) "
                        "(rate(kvcache_whatif_recomputes_avoided_total"
                        f"{{{MEDIUM}}}[$__rate_interval])) / ignoring(capacity_factor) "
                        # the pool's stores, all groups (the what-if has no group label)
                        "group_left sum by (engine, medium) "
                        f"(rate(kvcache_blocks_stored_total{{{MEDIUM}}}[$__rate_interval]))",
                        "{{engine}} {{medium}} x{{capacity_factor}}",
                    )
                ],
                maximum=1,
            )
        )
    )

    # --- lifecycle distributions --------------------------------------------------------------
    builder = builder.with_row(row("Block lifecycle"))
    for title, histogram, meaning, action in LIFECYCLE:
        builder = builder.with_panel(
            timeseries_panel(
                f"{title} p50 / p90 / p99",
                f"{meaning} Quantiles over 5 minutes per engine and medium, all KV-cache groups "
                "of the pool together (recording rules; per group: the KV-cache groups row). "
                f"{action}",
                SECONDS,
                quantile_queries(histogram),
            )
        ).with_panel(
            heatmap_panel(
                f"{title} distribution",
                f"{meaning} Observations per second in each bucket, summed over the selected "
                "engines, media and KV-cache groups (narrow them with the variables). Look for "
                "a second mode: two populations of blocks behave differently (in a hybrid "
                f"model, often its two groups: select one). {action}",
                SECONDS,
                BLOCKS_PER_S,
                bucket_heatmap(histogram),
            )
        )
    builder = builder.with_panel(
        timeseries_panel(
            "Accesses before evict p50 / p90 / p99",
            "Hits a block got between its store and its removal, quantiles over 5 minutes per "
            "engine and medium (all KV-cache groups). Needs hit reports. A p90 of 0 means nine in "
            "ten blocks were never reused: caching them only cost memory. High counts on few "
            "blocks are hot prefixes (system prompts) - they should never be evicted; if they are "
            "(see the restore gap), the cache is too small.",
            "count:accesses",
            quantile_queries("kvcache_block_accesses_before_evict"),
        )
    ).with_panel(
        bargauge_panel(
            "Accesses before evict over the time range",
            "Blocks removed in the time range, by how many hits they got first (bucket upper "
            "bounds), in the selected KV-cache groups. The 0 bar is blocks never reused; a "
            "healthy prefix cache has a long tail of blocks with many hits. Needs hit reports.",
            BLOCKS,
            [
                Query(
                    "sum by (le) (increase(kvcache_block_accesses_before_evict_bucket"
                    f"{{{PLACE}}}[$__range]))",
                    "{{le}}",
                    instant=True,
                    heatmap=True,
                )
            ],
        )
    )

    builder = groups_row(builder)
    builder = adapters_row(builder)
    builder = pools_row(builder)

    # --- alerts -------------------------------------------------------------------------------
    builder = (
        builder.with_row(row("Alerts"))
        .with_panel(
            state_timeline_panel(
                "Exporter anomaly alerts",
                "The exporter's own detectors, on the engine's clock (kvcache_alert_active): "
                "eviction_storm, thrashing, short_residency, cache_reset, event_loss, "
                "source_stalled. They react within seconds and hold with hysteresis; the "
                "Prometheus alerts (next panel) are the ones that page. See docs/metrics.md for "
                "their thresholds and docs/runbooks.md for what to do.",
                [
                    Query(
                        f"max by (engine, alert, severity) (kvcache_alert_active{{{ENGINE}}})",
                        "{{engine}} {{alert}} ({{severity}})",
                    )
                ],
                {"1": ("active", RED), "0": ("clear", GREEN)},
                no_value="no alert active",
            )
        )
        .with_panel(
            state_timeline_panel(
                "Prometheus alerts firing",
                "kvcache-exporter alerting rules (deploy/prometheus) firing in this Prometheus, "
                "all jobs and engines (an absent exporter has no labels to filter on). Each has "
                "a runbook: docs/runbooks.md.",
                [
                    Query(
                        "max by (alertname, severity, engine, medium, instance) "
                        '(ALERTS{alertname=~"KVCache.*", alertstate="firing"})',
                        "{{alertname}} ({{severity}}) {{engine}} {{medium}} {{instance}}",
                    )
                ],
                {"1": ("firing", RED)},
                no_value="nothing firing",
            )
        )
        .with_panel(
            bargauge_panel(
                "Exporter alerts raised in the time range",
                "How often each of the exporter's anomaly alerts was raised (or escalated) in "
                "the time range, per engine (kvcache_alerts_total). Frequent cache_reset means "
                "someone or something keeps clearing the cache; frequent thrashing or "
                "eviction_storm, a cache at its limit at peak times.",
                "count:alerts",
                [
                    Query(
                        "round(sum by (engine, alert, severity) "
                        f"(increase(kvcache_alerts_total{{{ENGINE}}}[$__range]))) > 0",
                        "{{engine}} {{alert}} ({{severity}})",
                        instant=True,
                    )
                ],
                width=24,
                height=6,
                no_value="no alert raised",
            )
        )
    )

    # --- trends -------------------------------------------------------------------------------
    builder = (
        builder.with_row(row("Trends"))
        .with_panel(
            state_timeline_panel(
                "Trend direction",
                "The exporter's least-squares trend over its 5-minute window, per engine and "
                "series (store_rate, eviction_rate, resident_blocks, median_lifetime_seconds, "
                "restore_ratio): rising, flat (change within 10% of the mean) or falling. "
                "Rising restore_ratio with falling median_lifetime_seconds is a cache losing the "
                "fight against its working set - act before KVCacheThrashing fires.",
                [Query(f"kvcache_trend_direction{{{ENGINE}}}", "{{engine}} {{series}}")],
                {"-1": ("falling", "blue"), "0": ("flat", GREEN), "1": ("rising", ORANGE)},
            )
        )
        .with_panel(
            timeseries_panel(
                "Trend slope",
                "The slope behind the direction, in each series' unit per second: blocks/s per "
                "second for store_rate and eviction_rate, blocks per second for "
                "resident_blocks, seconds per second for median_lifetime_seconds, ratio per "
                "second for restore_ratio. Multiply by 300 for the change over the window. "
                "Mixed units: read one series at a time (click its legend).",
                "short",
                [Query(f"kvcache_trend_slope{{{ENGINE}}}", "{{engine}} {{series}}")],
                minimum=None,
            )
        )
    )
    return number_panels(builder.build())
