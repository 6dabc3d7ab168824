"""The in-process library (``kvcache_exporter.library``): the seed design's API over the core.

The per-call collector and the batch collector are fed the same random streams as the plain
reference of SPEC section 3 (tests/reference.py) and must agree with it on every statistic they
report. The rest covers configuration, the small value classes, exports, alerts, trends and the
access-pattern analysis. The last section holds tests for bugs found while writing these: they
fail until the bug is fixed.
"""

from __future__ import annotations

import bisect
import json
import math
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import kvcache_exporter
from kvcache_exporter import (
    AlertLevel,
    BatchMetricsCollector,
    BlockMetricsState,
    CacheAlert,
    CacheMetricsSummary,
    KVCacheEvictionEvent,
    KVCacheMetricsCollector,
    MetricsConfig,
    MetricType,
    create_metrics_collector,
)
from kvcache_exporter.analysis.anomaly import AnomalyConfig

from .reference import Block, Hist, Key, ReferenceCollector

ALLOCATE, ACCESS, EVICT, RESET = "allocate", "access", "evict", "reset"
REASONS = ("evicted", "freed", "preempted")
GPU = "GPU"
INF = float("inf")
U64 = 1 << 64
DURATIONS = ("lifetime", "idle_before_evict", "reuse_gap", "restore_gap")
CUSTOM_BUCKETS = (0.5, 2.0, 10.0)


def block_id(n: int) -> int:
    """Small index -> an id spread over all 64 bits (about half have the top bit set)."""
    return (n + 1) * 0x9E3779B97F4A7C15 % U64


def signed(value: int) -> int:
    """The same 64 bits as a signed integer (how an int64 array holds them)."""
    return value - U64 if value >= 1 << 63 else value


# --- the stream and the reference -----------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One engine call: ``block`` is an unsigned 64-bit id (0 for a cache reset)."""

    kind: str
    block: int
    ts: float
    reason: str = "evicted"


@dataclass(frozen=True)
class Removal:
    """One removal of a resident block, as the reference saw it (KVCacheEvictionEvent's fields)."""

    block_id: int
    reason: str
    allocated_at: float
    last_access_at: float
    evicted_at: float
    access_count: int


class LoggingReference(ReferenceCollector):
    """The reference, also logging each removal of a resident block in stream order. The
    library's semantics: allocating an id already resident is an access (``hit_reports``)."""

    def __init__(self) -> None:
        super().__init__(hit_reports=True)
        self.log: list[Removal] = []

    def ended(self, key: Key, reason: str, block: Block, ts: float) -> None:
        self.log.append(Removal(key[0], reason, block.stored, block.last, ts, block.accesses))


def reference_of(
    ops: Sequence[Op], keep: Callable[[int], bool] = lambda _: True
) -> LoggingReference:
    """The reference fed ``ops`` as vLLM-form event dicts; block ops whose id ``keep`` refuses
    are left out (cache resets never are)."""
    ref = LoggingReference()
    for op in ops:
        if op.kind == RESET:
            ref.feed(op.ts, [{"type": "AllBlocksCleared"}])
            continue
        if not keep(op.block):
            continue
        event: dict[str, object] = {"block_hashes": [op.block], "medium": GPU}
        if op.kind == ALLOCATE:
            event["type"] = "BlockStored"
        elif op.kind == ACCESS:
            event["type"] = "BlockAccessed"
        else:
            event["type"] = "BlockRemoved"
            event["reason"] = op.reason
        ref.feed(op.ts, [event])
    return ref


# Mostly allocations, accesses and evictions of a few ids (so blocks are re-used, evicted and
# restored), now and then a cache reset.
op_kinds = st.sampled_from([ALLOCATE] * 4 + [ACCESS] * 4 + [EVICT] * 3 + [RESET])
raw_ops = st.lists(
    st.tuples(
        op_kinds,
        st.integers(0, 4),  # block index
        st.integers(0, 4),  # time step, in units of 0.37 s (so points fall inside batches)
        st.sampled_from(REASONS),
    ),
    min_size=12,
    max_size=100,
)


def timed(raw: Sequence[tuple[str, int, int, str]]) -> list[Op]:
    """Drawn tuples -> ops on non-decreasing engine times."""
    ts = 1000.0
    ops = []
    for kind, n, step, reason in raw:
        ts += step * 0.37
        ops.append(Op(kind, 0 if kind == RESET else block_id(n), ts, reason))
    return ops


# --- feeding the two collectors -------------------------------------------------------------


def feed_per_call(col: KVCacheMetricsCollector, ops: Sequence[Op], reads: set[int]) -> None:
    """One call per op; every other op passes its id as a negative (signed) int; a read after
    each op in ``reads`` (reads flush)."""
    for i, op in enumerate(ops):
        bid = signed(op.block) if i % 2 else op.block
        if op.kind == ALLOCATE:
            col.on_block_allocated(bid, now=op.ts)
        elif op.kind == ACCESS:
            col.on_block_accessed(bid, now=op.ts)
        elif op.kind == EVICT:
            col.on_block_evicted(bid, reason=op.reason, now=op.ts)
        else:
            col.cache_reset(now=op.ts)
        if i in reads:
            col.get_summary()


def batch_groups(ops: Sequence[Op], cuts: set[int]) -> list[list[Op]]:
    """Consecutive ops of one kind (and reason) as one call, split again at ``cuts``."""
    groups: list[list[Op]] = []
    for i, op in enumerate(ops):
        last = groups[-1][-1] if groups else None
        same = (
            last is not None
            and op.kind != RESET
            and (last.kind, last.reason) == (op.kind, op.reason)
            and i not in cuts
        )
        if same:
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def id_array(values: list[int], form: int) -> Any:
    """The ids as a list, a list of signed ints, an int64 array or a uint64 array."""
    if form == 0:
        return list(values)
    if form == 1:
        return [signed(v) for v in values]
    if form == 2:
        return np.array([signed(v) for v in values], np.int64)
    return np.array(values, np.uint64)


def time_arg(times: list[float], form: int) -> Any:
    """The times as a scalar (when all equal and the form allows), a list or an array."""
    if form % 2 == 0 and len(set(times)) == 1:
        return times[0]
    return list(times) if form % 3 == 0 else np.array(times, np.float64)


def feed_batch(
    col: BatchMetricsCollector, ops: Sequence[Op], cuts: set[int], forms: list[int]
) -> None:
    """Runs of one op as batch calls; ``forms`` (cycled) picks each call's id and time form."""
    for g, group in enumerate(batch_groups(ops, cuts)):
        form = forms[g % len(forms)] if forms else 0
        head = group[0]
        if head.kind == RESET:
            col.cache_reset(now=head.ts)
            continue
        ids = id_array([op.block for op in group], form % 4)
        now = time_arg([op.ts for op in group], form)
        if head.kind == ALLOCATE:
            col.batch_allocate(ids, now=now)
        elif head.kind == ACCESS:
            col.batch_access(ids, now=now)
        else:
            col.batch_evict(ids, reason=head.reason, now=now)


# --- comparing ------------------------------------------------------------------------------


def assert_distribution(got: dict[str, Any], want: Hist) -> None:
    count = want.count(GPU)
    assert got["count"] == count
    if count:
        assert got["mean"] == pytest.approx(want.sums[GPU] / count, rel=1e-9, abs=1e-9)
    else:
        assert got["mean"] is None


def assert_matches(
    col: BatchMetricsCollector, ref: LoggingReference, sampled: LoggingReference | None = None
) -> None:
    """Every statistic of ``col`` equals the reference's: counters from ``ref`` (all blocks),
    distributions, tracked blocks and eviction records from ``sampled`` (the sampled blocks)."""
    sampled = ref if sampled is None else sampled
    summary = col.get_summary()
    assert summary.blocks_allocated == ref.stored[GPU]
    assert summary.blocks_accessed == ref.accessed[GPU]
    assert summary.restores == ref.restores[GPU]
    assert summary.resident_blocks == ref.resident_count(GPU)
    assert summary.cache_resets == ref.clears
    assert summary.unknown_evictions == ref.unknown_removals
    assert summary.blocks_evicted == {
        reason: n for (medium, reason), n in ref.removed.items() if medium == GPU and n
    }
    assert summary.tracked_blocks == sampled.resident_count(GPU)
    for name in DURATIONS:
        assert_distribution(summary.distributions[name], sampled.hist[name])
    assert_distribution(
        summary.distributions["accesses_before_evict"], sampled.accesses_before_evict
    )
    assert summary.distributions["prefix_depth"]["count"] == 0  # the library has no chains

    lifetime = sampled.hist["lifetime"]
    counts = lifetime.counts.get(GPU, [0] * (len(lifetime.bounds) + 1))
    assert col.get_lifetime_distribution() == dict(
        zip([*lifetime.bounds, INF], counts, strict=True)
    )
    custom = [0] * (len(CUSTOM_BUCKETS) + 1)
    for removal in sampled.log:
        lifetime_s = removal.evicted_at - removal.allocated_at
        custom[bisect.bisect_left(CUSTOM_BUCKETS, lifetime_s)] += 1
    assert col.get_lifetime_distribution(CUSTOM_BUCKETS) == dict(
        zip([*CUSTOM_BUCKETS, INF], custom, strict=True)
    )

    events = col.get_eviction_events()
    assert {event.medium for event in events} <= {GPU}
    # Compared as multisets: the order within one flush is wrong today, see
    # test_eviction_events_are_oldest_first_within_one_flush below.
    got = sorted(
        (e.block_id, e.reason, e.allocated_at, e.last_access_at, e.evicted_at, e.access_count)
        for e in events
    )
    assert got == sorted(astuple(removal) for removal in sampled.log)


def quantiles(summary: CacheMetricsSummary) -> dict[str, tuple[Any, ...]]:
    return {
        name: (d["count"], d["p50"], d["p90"], d["p99"])
        for name, d in summary.distributions.items()
    }


# --- the property tests ---------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(
    raw=raw_ops,
    batch_size=st.sampled_from([1, 3, 7, 4096]),
    reads=st.sets(st.integers(0, 100), max_size=4),
    cuts=st.sets(st.integers(0, 100), max_size=6),
    forms=st.lists(st.integers(0, 11), max_size=8),
)
def test_per_call_and_batch_collectors_match_the_reference(
    raw: list[tuple[str, int, int, str]],
    batch_size: int,
    reads: set[int],
    cuts: set[int],
    forms: list[int],
) -> None:
    """On random allocate/access/evict/reset streams, the per-call collector (with intermediate
    flushes from a small batch_size and from reads) and the batch collector (fed random-sized
    chunks as lists or int64/uint64 arrays) both report exactly what the reference computes:
    counters, distributions, lifetime buckets (configured and custom) and eviction records."""
    ops = timed(raw)
    ref = reference_of(ops)
    config = MetricsConfig(sample_rate=1.0, batch_size=batch_size, eviction_log_size=1000)

    per_call = KVCacheMetricsCollector(config)
    feed_per_call(per_call, ops, reads)
    assert_matches(per_call, ref)

    batch = BatchMetricsCollector(config)
    feed_batch(batch, ops, cuts, forms)
    assert_matches(batch, ref)
    assert quantiles(per_call.get_summary()) == quantiles(batch.get_summary())


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            op_kinds,
            st.integers(0, 11),
            st.integers(0, 4),
            st.sampled_from(REASONS),
        ),
        min_size=12,
        max_size=100,
    ),
    rate=st.sampled_from([0.25, 0.5, 0.75]),
    batch_size=st.sampled_from([1, 5, 4096]),
    cuts=st.sets(st.integers(0, 100), max_size=6),
    forms=st.lists(st.integers(0, 11), max_size=8),
)
def test_sampling_keeps_counters_exact_and_distributions_over_sampled_blocks(
    raw: list[tuple[str, int, int, str]],
    rate: float,
    batch_size: int,
    cuts: set[int],
    forms: list[int],
) -> None:
    """With sample_rate < 1 the counters still equal the reference over every block, while the
    distributions, tracked blocks and eviction records equal a reference fed only the blocks
    ``should_sample_block`` accepts."""
    ops = timed(raw)
    config = MetricsConfig(sample_rate=rate, batch_size=batch_size, eviction_log_size=1000)
    per_call = KVCacheMetricsCollector(config)
    batch = BatchMetricsCollector(config)
    ref = reference_of(ops)
    sampled = reference_of(ops, keep=per_call.should_sample_block)

    feed_per_call(per_call, ops, set())
    assert_matches(per_call, ref, sampled)
    feed_batch(batch, ops, cuts, forms)
    assert_matches(batch, ref, sampled)


def test_sampling_is_a_stable_share_of_block_ids() -> None:
    """should_sample_block keeps about ``sample_rate`` of ids, the same ids in every collector,
    and every id at rate 1."""
    ids = [block_id(n) for n in range(20_000)]
    one = create_metrics_collector(sample_rate=0.1)
    two = create_metrics_collector(sample_rate=0.1, batch_mode=True)
    picked = [one.should_sample_block(i) for i in ids]
    assert picked == [two.should_sample_block(i) for i in ids]
    assert sum(picked) / len(ids) == pytest.approx(0.1, abs=0.01)
    assert all(create_metrics_collector(sample_rate=1.0).should_sample_block(i) for i in ids[:100])
    # an id and its signed form are the same block
    assert [one.should_sample_block(signed(i)) for i in ids[:500]] == picked[:500]


# --- configuration and construction ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0.0),
        ("sample_rate", -0.5),
        ("sample_rate", 1.5),
        ("sample_rate", math.nan),
        ("lifetime_buckets", ()),
        ("lifetime_buckets", (2.0, 1.0)),
        ("lifetime_buckets", (1.0, 1.0)),
        ("lifetime_buckets", (0.0, 1.0)),
        ("lifetime_buckets", (-1.0, 1.0)),
        ("lifetime_buckets", (1.0, INF)),
        ("access_buckets", (3.0, 2.0)),
        ("depth_buckets", ()),
        ("max_tracked_blocks", 0),
        ("batch_size", 0),
        ("hot_access_threshold", 0),
        ("removed_memory", -1),
        ("eviction_log_size", -1),
        ("point_interval_seconds", 0.0),
        ("point_interval_seconds", -1.0),
        ("point_interval_seconds", math.nan),
        ("trend_window_seconds", 0.0),
        ("trend_window_seconds", math.nan),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    """Each bad MetricsConfig value raises ValueError at construction, naming the field."""
    with pytest.raises(ValueError, match=field):
        MetricsConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("thrash_ratio", 0.0), ("thrash_window_seconds", -1.0), ("storm_factor", 1.0)],
)
def test_anomaly_thresholds_are_checked_too(field: str, value: float) -> None:
    """The alert thresholds a MetricsConfig carries are validated, naming the field."""
    with pytest.raises(ValueError, match=field):
        MetricsConfig(anomaly=AnomalyConfig(**{field: value}))  # type: ignore[arg-type]


def test_config_defaults_are_valid_and_frozen() -> None:
    """The defaults build a collector; a config cannot be changed after the checks ran."""
    config = MetricsConfig()
    assert KVCacheMetricsCollector(config).config is config
    with pytest.raises(AttributeError):
        config.sample_rate = 2.0  # type: ignore[misc]


def test_create_metrics_collector_options() -> None:
    """batch_mode picks the class, config fields pass through, engine and clock are used, and
    an unknown option is a TypeError naming it."""
    per_call = create_metrics_collector(sample_rate=0.5, eviction_log_size=5)
    assert type(per_call) is KVCacheMetricsCollector
    assert per_call.config.sample_rate == 0.5
    assert per_call.config.eviction_log_size == 5
    batch = create_metrics_collector(batch_mode=True)
    assert type(batch) is BatchMetricsCollector
    assert not isinstance(batch, KVCacheMetricsCollector)
    assert batch.config.sample_rate == 0.01

    clocked = create_metrics_collector(1.0, engine="mine", clock=lambda: 42.0)
    assert isinstance(clocked, KVCacheMetricsCollector)
    clocked.on_block_allocated(1)
    state = clocked.get_block_state(1)
    assert state is not None and state.allocated_at == 42.0
    assert 'engine="mine"' in clocked.export("prometheus")

    with pytest.raises(TypeError, match="bogus"):
        create_metrics_collector(bogus=1)
    with pytest.raises(ValueError, match="sample_rate"):
        create_metrics_collector(sample_rate=0.0)


def test_every_name_of_the_issue_is_importable_from_the_package() -> None:
    """The seed design's names are exported by ``kvcache_exporter``."""
    names = [
        "MetricType",
        "AlertLevel",
        "MetricsConfig",
        "BlockMetricsState",
        "KVCacheEvictionEvent",
        "CacheAlert",
        "CacheMetricsSummary",
        "KVCacheMetricsCollector",
        "BatchMetricsCollector",
        "create_metrics_collector",
    ]
    for name in names:
        assert name in kvcache_exporter.__all__
        assert getattr(kvcache_exporter, name) is not None
    methods = {
        KVCacheMetricsCollector: [
            "should_sample_block",
            "on_block_allocated",
            "on_block_accessed",
            "on_block_evicted",
            "get_summary",
            "get_lifetime_distribution",
            "get_access_pattern_analysis",
            "detect_trends",
            "get_alerts",
            "reset",
            "export",
        ],
        BatchMetricsCollector: [
            "batch_allocate",
            "batch_access",
            "batch_evict",
            "flush_allocations",
            "flush_accesses",
            "flush_evictions",
            "flush_all",
            "get_summary",
        ],
    }
    for cls, wanted in methods.items():
        for method in wanted:
            assert callable(getattr(cls, method)), (cls, method)
    assert {m.value for m in MetricType} == {
        *DURATIONS,
        "accesses_before_evict",
        "prefix_depth",
    }
    assert [level.value for level in AlertLevel] == ["info", "warning", "critical"]


# --- the value classes ----------------------------------------------------------------------


def test_block_metrics_state_with_explicit_times() -> None:
    """Lifetime, idle time, reuse gaps (allocation counted) and access frequency, all on the
    caller's clock; a zero lifetime has frequency 0, not a division error."""
    state = BlockMetricsState(7, allocated_at=10.0, last_access_at=10.0)
    assert state.get_reuse_gaps_seconds() == []
    state.record_access(now=12.0)
    state.record_access(now=15.0)
    assert state.access_count == 2
    assert state.last_access_at == 15.0
    assert state.get_lifetime_seconds(now=20.0) == 10.0
    assert state.get_idle_time_seconds(now=20.0) == 5.0
    assert state.get_reuse_gaps_seconds() == [2.0, 3.0]
    assert state.get_access_frequency(now=20.0) == pytest.approx(0.2)
    assert BlockMetricsState(1, 5.0, 5.0).get_access_frequency(now=5.0) == 0.0


def test_block_metrics_state_history_is_bounded() -> None:
    """Once the history is full the allocation drops out of the reuse gaps."""
    state = BlockMetricsState(1, allocated_at=0.0, last_access_at=0.0)
    for t in range(1, 11):
        state.record_access(now=float(t))
    assert state.access_count == 10
    assert len(state.access_history) == state.access_history.maxlen == 8
    assert state.get_reuse_gaps_seconds() == [1.0] * 7


def test_get_block_state_of_a_resident_block() -> None:
    """A resident block's store time, last access (a re-allocation is an access) and access
    count; None once it is evicted or when it never was allocated."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    col.on_block_allocated(5, now=1.0)
    col.on_block_accessed(5, now=2.0)
    col.on_block_allocated(5, now=3.5)
    state = col.get_block_state(5)
    assert state is not None
    assert (state.block_id, state.allocated_at, state.last_access_at) == (5, 1.0, 3.5)
    assert state.access_count == 2
    assert state.get_lifetime_seconds(now=4.0) == 3.0
    assert state.get_idle_time_seconds(now=4.0) == 0.5
    assert col.get_block_state(6) is None
    col.on_block_evicted(5, now=5.0)
    assert col.get_block_state(5) is None


def test_eviction_event_to_dict_is_json_with_the_documented_keys() -> None:
    """KVCacheEvictionEvent.to_dict has its fields plus lifetime and idle seconds, and dumps."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    col.on_block_allocated(2**64 - 1, now=10.0)
    col.on_block_accessed(-1, now=12.0)  # the same block, as a signed id
    col.on_block_evicted(2**64 - 1, reason="preempted", now=15.0)
    (event,) = col.get_eviction_events()
    assert isinstance(event, KVCacheEvictionEvent)
    record = json.loads(json.dumps(event.to_dict()))
    assert record == {
        "block_id": 2**64 - 1,
        "reason": "preempted",
        "medium": "GPU",
        "allocated_at": 10.0,
        "last_access_at": 12.0,
        "evicted_at": 15.0,
        "lifetime_seconds": 5.0,
        "idle_seconds": 3.0,
        "access_count": 1,
        "prefix_depth": None,
    }
    assert col.get_eviction_events(limit=0) == []


SUMMARY_KEYS = {
    "sample_rate",
    "blocks_allocated",
    "blocks_evicted",
    "blocks_accessed",
    "restores",
    "restore_ratio",
    "resident_blocks",
    "tracked_blocks",
    "cache_resets",
    "unknown_evictions",
    "distributions",
    "alerts",
    "trends",
}


def test_summary_to_dict_is_json_with_the_documented_keys() -> None:
    """CacheMetricsSummary.to_dict has the documented keys and dumps, alerts and trends
    included; the restore ratio is restores over allocations."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    empty = col.get_summary().to_dict()
    assert set(empty) == SUMMARY_KEYS
    assert empty["restore_ratio"] is None
    assert set(empty["distributions"]) == {m.value for m in MetricType}
    assert set(empty["distributions"]["lifetime"]) == {"count", "mean", "p50", "p90", "p99"}

    thrash(col)
    summary = col.get_summary()
    document = json.loads(json.dumps(summary.to_dict()))
    assert set(document) == SUMMARY_KEYS
    assert document["alerts"] and document["trends"]
    assert document["restore_ratio"] == pytest.approx(summary.restores / summary.blocks_allocated)
    assert all(isinstance(alert, CacheAlert) for alert in summary.alerts)


# --- export ---------------------------------------------------------------------------------


def small_history() -> KVCacheMetricsCollector:
    col = KVCacheMetricsCollector(MetricsConfig(sample_rate=1.0), engine="eng")
    for b in range(4):
        col.on_block_allocated(b, now=1.0 + b)
    col.on_block_accessed(1, now=6.0)
    col.on_block_evicted(0, reason="evicted", now=7.0)
    col.on_block_evicted(1, reason="freed", now=8.0)
    col.cache_reset(now=9.0)
    col.on_block_allocated(3, now=10.0)
    return col


def test_export_json_and_csv() -> None:
    """json holds the engine summary and the eviction records; csv one row per record."""
    col = small_history()
    document = json.loads(col.export("json"))
    (engine,) = document["engines"]
    assert engine["engine"] == "eng"
    assert engine["media"]["GPU"]["stored_total"] == 5
    assert engine["media"]["GPU"]["restores_total"] == 1
    assert [e["reason"] for e in document["evictions"]] == [
        "evicted",
        "freed",
        "cleared",
        "cleared",
    ]
    lines = col.export("csv").strip().splitlines()
    assert lines[0].split(",")[:3] == ["engine", "block_hash", "medium"]
    assert len(lines) == 1 + 4


def test_export_prometheus_text() -> None:
    """The exposition carries the library's counters and histograms (every block of the
    library is in KV-cache group "0")."""
    text = small_history().export("prometheus")
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    place = (("engine", "eng"), ("group", "0"), ("medium", "GPU"))
    assert got[("kvcache_blocks_stored_total", place)] == 5
    assert got[("kvcache_cache_clears_total", (("engine", "eng"),))] == 1
    assert got[("kvcache_block_lifetime_seconds_count", place)] == 4


def test_export_prometheus_passes_promtool(promtool: str) -> None:
    """``promtool check metrics`` accepts the exposition."""
    text = small_history().export("prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("bad", ["xml", "JSON", ""])
def test_export_rejects_unknown_formats(bad: str) -> None:
    """Formats other than json, csv and prometheus are a ValueError naming the choices."""
    with pytest.raises(ValueError, match="format"):
        small_history().export(bad)


# --- alerts, trends, reset ------------------------------------------------------------------


def thrash(col: BatchMetricsCollector) -> None:
    """200 blocks, then for 120 s of engine time 50 a second evicted and allocated again: every
    store after the first second is a restore. Per-call methods where the collector has them."""

    def allocate(ids: list[int], ts: float) -> None:
        if isinstance(col, KVCacheMetricsCollector):
            for b in ids:
                col.on_block_allocated(b, now=ts)
        else:
            col.batch_allocate(ids, now=ts)

    def evict(ids: list[int], ts: float) -> None:
        if isinstance(col, KVCacheMetricsCollector):
            for b in ids:
                col.on_block_evicted(b, now=ts)
        else:
            col.batch_evict(np.array(ids, np.int64), now=ts)

    allocate(list(range(200)), 0.0)
    for second in range(1, 121):
        batch = [(second * 50 + k) % 200 for k in range(50)]
        evict(batch, float(second))
        allocate(batch, second + 0.5)


@pytest.mark.parametrize("batch_mode", [False, True])
def test_thrashing_is_critical(batch_mode: bool) -> None:
    """Restores over stores near 1 for two minutes raises ``thrashing`` at CRITICAL, in
    get_alerts() and among the recent transitions."""
    col = create_metrics_collector(sample_rate=1.0, batch_mode=batch_mode)
    thrash(col)
    summary = col.get_summary()
    assert summary.restores / summary.blocks_allocated > 0.6
    alerts = {alert.alert: alert for alert in col.get_alerts()}
    assert "thrashing" in alerts
    assert alerts["thrashing"].level is AlertLevel.CRITICAL
    assert alerts["thrashing"].active
    assert alerts["thrashing"].value > 0.6
    assert any(a.alert == "thrashing" for a in col.get_alerts(include_cleared=True))


def test_growing_residency_trends_up() -> None:
    """Ten new blocks a second for 330 s: resident blocks trend up, the store rate is flat."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    for second in range(330):
        for k in range(10):
            col.on_block_allocated(second * 10 + k, now=float(second))
    trends = col.detect_trends()
    assert trends["resident_blocks"]["direction"] == 1
    assert trends["resident_blocks"]["direction_name"] == "up"
    assert trends["store_rate"]["direction"] == 0
    assert col.get_summary().trends == trends


def test_reset_forgets_everything() -> None:
    """After reset() counters, blocks, records, alerts and trends are gone, and an id evicted
    before is no longer a restore."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    thrash(col)
    assert col.get_alerts() and col.detect_trends() and col.get_eviction_events()
    col.on_block_allocated(99_999, now=500.0)  # still buffered: reset drops it too
    col.reset()
    summary = col.get_summary()
    assert (summary.blocks_allocated, summary.resident_blocks, summary.restores) == (0, 0, 0)
    assert summary.blocks_evicted == {}
    assert all(d["count"] == 0 for d in summary.distributions.values())
    assert col.get_alerts() == [] and col.get_alerts(include_cleared=True) == []
    assert col.detect_trends() == {}
    assert col.get_eviction_events() == []
    assert col.get_block_state(7) is None
    col.on_block_allocated(7, now=600.0)
    assert col.get_summary().restores == 0


def test_flush_methods_keep_call_order() -> None:
    """flush_allocations/accesses/evictions all flush the one ordered buffer: an allocation and
    the eviction after it are applied in that order whichever flush is called."""
    col = create_metrics_collector(sample_rate=1.0, batch_mode=True, batch_size=1000)
    assert isinstance(col, BatchMetricsCollector)
    col.batch_allocate(np.array([1, 2, 3], np.uint64), now=1.0)
    col.batch_evict([1, 2], now=2.0)
    col.flush_evictions()
    col.batch_access([3], now=2.5)
    col.flush_allocations()
    col.flush_accesses()
    col.flush_all()
    summary = col.get_summary()
    assert (summary.resident_blocks, summary.unknown_evictions) == (1, 0)
    assert summary.blocks_accessed == 1
    with pytest.raises(ValueError, match="2 blocks"):
        col.batch_access([1, 2], now=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="integers"):
        col.batch_access(np.array([1.0, 2.0]))


# --- access patterns ------------------------------------------------------------------------


def test_access_pattern_analysis_by_hand() -> None:
    """Four resident blocks with 0, 1, 3 and 5 accesses and threshold 3: one cold, one warm,
    two hot; the evicted block is not counted."""
    col = create_metrics_collector(sample_rate=1.0, hot_access_threshold=3)
    assert isinstance(col, KVCacheMetricsCollector)
    for b in range(5):
        col.on_block_allocated(b, now=1.0)
    col.on_block_accessed(1, now=1.5)
    for t in (2.0, 3.0, 4.0):
        col.on_block_accessed(2, now=t)
    for t in (2.0, 2.5, 3.0, 3.5):
        col.on_block_accessed(3, now=t)
    col.on_block_allocated(3, now=4.0)  # a re-allocation of a resident block is an access
    for t in (2.0, 3.0, 4.0, 5.0):
        col.on_block_accessed(4, now=t)
    col.on_block_evicted(4, now=6.0)
    patterns = col.get_access_pattern_analysis()
    assert patterns["resident_tracked_blocks"] == 4
    assert patterns["hot_threshold_accesses"] == 3
    assert patterns["hot_share"] == 0.5
    assert patterns["warm_share"] == 0.25
    assert patterns["cold_share"] == 0.25
    assert patterns["mean_accesses"] == pytest.approx(9 / 4)
    assert patterns["access_frequency"] == {
        "0": 1,
        "1": 1,
        "2": 0,
        "3-4": 1,
        "5-9": 1,
        "10-19": 0,
        "20+": 0,
    }
    # reuse gaps: 0.5, 1,1,1, 1,0.5,0.5,0.5,0.5, 1,1,1,1 -> all within 1 s
    assert patterns["reuse_locality"]["within_1s"] == 1.0


def test_access_pattern_analysis_of_an_empty_cache() -> None:
    """No resident blocks: shares are None, not a division error."""
    patterns = create_metrics_collector(sample_rate=1.0).get_access_pattern_analysis()
    assert patterns["resident_tracked_blocks"] == 0
    assert patterns["hot_share"] is None and patterns["mean_accesses"] is None


# --- known bugs: these fail until fixed -----------------------------------------------------


def test_eviction_events_are_oldest_first_within_one_flush() -> None:
    """get_eviction_events() promises the most recent evictions oldest first. Within one flush
    the core applies a batch in rounds (the n-th occurrence of every id together), so block 1,
    evicted at its third occurrence, is logged after block 2, evicted later at its second; with
    eviction_log_size=1 the ring then keeps the older eviction."""
    col = create_metrics_collector(sample_rate=1.0, eviction_log_size=100)
    assert isinstance(col, KVCacheMetricsCollector)
    col.on_block_allocated(1, now=1.1)
    col.on_block_accessed(1, now=1.2)
    col.on_block_evicted(1, now=1.3)
    col.on_block_allocated(2, now=1.4)
    col.on_block_evicted(2, now=1.5)
    assert [(e.block_id, e.evicted_at) for e in col.get_eviction_events()] == [(1, 1.3), (2, 1.5)]


def test_removed_memory_keeps_the_most_recent_removals() -> None:
    """SPEC: the exporter remembers at least the last ``removed_memory`` removed hashes. With
    removed_memory=1 and the same stream as above in one flush, the core forgets block 2 (the
    latest removal) and keeps block 1, so allocating 2 again is not counted as a restore."""
    col = create_metrics_collector(sample_rate=1.0, removed_memory=1)
    assert isinstance(col, KVCacheMetricsCollector)
    col.on_block_allocated(1, now=1.1)
    col.on_block_accessed(1, now=1.2)
    col.on_block_evicted(1, now=1.3)
    col.on_block_allocated(2, now=1.4)
    col.on_block_evicted(2, now=1.5)
    col.get_summary()
    col.on_block_allocated(2, now=3.0)
    assert col.get_summary().restores == 1


def test_per_call_methods_accept_numpy_integer_ids() -> None:
    """Ids taken from a numpy array (np.int64 scalars) must work like ints; today
    ``block_id & U64_MASK`` raises OverflowError for signed numpy scalars."""
    col = create_metrics_collector(sample_rate=1.0)
    assert isinstance(col, KVCacheMetricsCollector)
    for b in np.array([1, -2], np.int64):
        col.on_block_allocated(b, now=1.0)
    assert col.get_summary().blocks_allocated == 2
    assert col.get_block_state(np.int64(-2)) is not None  # type: ignore[arg-type]
    assert col.should_sample_block(np.int32(5))  # type: ignore[arg-type]


def test_batch_methods_accept_unsigned_arrays_of_any_width() -> None:
    """uint32 (and uint8/uint16) id arrays are integers too; today _as_ids rejects every
    unsigned dtype but uint64 with "block ids must be integers"."""
    col = create_metrics_collector(sample_rate=1.0, batch_mode=True)
    col.batch_allocate(np.array([1, 2], np.uint32), now=1.0)
    assert col.get_summary().blocks_allocated == 2


def test_batch_calls_do_not_alias_the_callers_time_array() -> None:
    """Ids are copied when buffered, times are not: an engine that reuses its times buffer
    before the next flush changes the recorded times (here lifetimes read 1.0 s, not 0.5 s)."""
    col = create_metrics_collector(sample_rate=1.0, batch_mode=True)
    ids = np.array([1, 2], np.uint64)
    times = np.array([1.0, 1.0])
    col.batch_allocate(ids, now=times)
    times[:] = 0.5  # the engine reuses its buffer
    col.batch_evict(ids, now=1.5)
    assert col.get_summary().distributions["lifetime"]["mean"] == pytest.approx(0.5)


def test_export_json_uses_the_configured_hot_threshold() -> None:
    """export("json") embeds the access-pattern analysis, computed with the default hot
    threshold (4) instead of the configured one, so it disagrees with
    get_access_pattern_analysis()."""
    col = create_metrics_collector(sample_rate=1.0, hot_access_threshold=1)
    assert isinstance(col, KVCacheMetricsCollector)
    col.on_block_allocated(1, now=1.0)
    col.on_block_accessed(1, now=1.5)
    exported = json.loads(col.export("json"))["engines"][0]["access_patterns"]
    assert exported["hot_share"] == col.get_access_pattern_analysis()["hot_share"] == 1.0


def test_config_rejects_windows_the_detectors_reject() -> None:
    """MetricsConfig(trend_window_seconds=inf) passes __post_init__, and building a collector
    then fails in TrendConfig with a message that does not name the field."""
    with pytest.raises(ValueError, match="trend_window_seconds"):
        MetricsConfig(trend_window_seconds=INF)
