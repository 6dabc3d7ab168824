"""The cache-size what-if model: against a plain per-row reference, and against exact simulation.

The exact comparisons run the embedded engine (an LRU prefix cache, vLLM's semantics) on the
bundled Mooncake trace at capacity C and at k·C: the exporter, fed only the C-run's events,
must say how many of the C-run's stores a k·C cache would not have made.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import io
import json
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.analysis.whatif import WhatIfConfig, WhatIfModel, whatif_hash
from kvcache_exporter.analysis.whatif import model as whatif_model
from kvcache_exporter.analysis.whatif.orders import earlier_greater
from kvcache_exporter.collector import BlockLifecycleCollector, CollectorConfig, sample_hash
from kvcache_exporter.commands import analyze
from kvcache_exporter.commands.common import UsageError
from kvcache_exporter.config import ConfigError, load
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
)
from kvcache_exporter.offline import OfflinePipeline, PlotError, format_views, plot_whatif
from kvcache_exporter.pipeline import EngineView, new_pipeline
from kvcache_exporter.protocol.batch import (
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    LabelTable,
)
from kvcache_exporter.protocol.encode import (
    Accessed,
    Event,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    frames,
)
from kvcache_exporter.sinks.prometheus import render
from kvcache_exporter.sinks.summary import summarize
from kvcache_exporter.sources.spec import SourceSpec, SourceSpecError

C = 4000
AVOIDED_FACTORS = (1.25, 1.5, 2.0, 4.0, 8.0)
ALL_FACTORS = (0.25, 0.5, 0.75, 1.0, *AVOIDED_FACTORS)


# --- a plain reference: one Python step per row, lists for the orders -------------------------
@dataclass
class RefTier:
    config: WhatIfConfig
    capacity: int
    configured: bool
    next_capacity: int = 0
    ghosts: list[int] = field(default_factory=list)  # eviction order, oldest first
    recency: list[int] | None = None  # reference order, oldest first, a key once
    pending: int = 0
    threshold: int | None = None  # sampling hashes below it are sampled; None: all
    until_boundary: int = 0  # sampled rows until the next boundary
    avoided: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    bounds: list[float] | None = None
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    stores: int = 0
    restores: int = 0
    sampled_hits: int = 0

    def __post_init__(self) -> None:
        self.next_capacity = self.capacity
        ratio = self.config.sample_ratio
        self.threshold = None if ratio >= 1 else min(int(ratio * 2.0**64), 2**64 - 1)
        self.avoided = [0] * len(self.config.avoided_factors)
        self.hits = [0] * len(self.config.capacity_factors)
        self.counts = [0] * (len(self.config.distance_buckets) + 1)


class ReferenceWhatIf:
    """The model's definition, row by row: ghost rank = live ghosts evicted at or after the
    block; stack distance = distinct blocks referenced since its previous reference + 1; the
    step's unmatched removals corrected; every sampled reference weighted by the references
    since the previous one; the oldest ghosts forgotten after each medium's rows of a batch."""

    def __init__(self, config: WhatIfConfig, media: LabelTable, chunk_rows: int) -> None:
        self.config = config
        self.media = media
        self.chunk = max(1, min(chunk_rows, config.max_sampled_blocks // 8))
        self.tiers: dict[int, RefTier] = {}
        self.state: dict[tuple[int, int], str] = {}  # "R" resident, "G" ghost
        self.resident: dict[int, int] = {}
        self.observed: dict[int, int] = {}

    def tier(self, medium: int) -> RefTier:
        if medium not in self.tiers:
            configured = self.config.capacity_of(self.media.names[medium])
            tier = RefTier(self.config, configured or 0, configured is not None)
            tier.until_boundary = self.chunk
            self.tiers[medium] = tier
        return self.tiers[medium]

    @staticmethod
    def hash_of(key: int) -> int:
        return int(whatif_hash(np.array([key], np.uint64))[0])

    def sampled(self, key: int, tier: RefTier) -> bool:
        return tier.threshold is None or self.hash_of(key) < tier.threshold

    @staticmethod
    def ratio(tier: RefTier) -> float:
        return 1.0 if tier.threshold is None else tier.threshold / 2.0**64

    def boundary(self, medium: int, tier: RefTier) -> None:
        """Every ``chunk`` sampled rows: forget the oldest ghosts, then, with more than
        ``budget - chunk`` keys, the threshold falls to the hash that keeps
        ``budget - chunk - budget // 8`` of them (fixed-size sampling)."""
        while len(tier.ghosts) > self.ghost_limit(tier):
            self.drop(medium, tier, tier.ghosts[0])
        budget = self.config.max_sampled_blocks
        mine = [k for (k, m) in self.state if m == medium]
        if len(mine) > budget - self.chunk:
            hashes = sorted(self.hash_of(k) for k in mine)
            tier.threshold = hashes[budget - self.chunk - budget // 8]
            for key in mine:
                if self.hash_of(key) >= tier.threshold:
                    self.drop(medium, tier, key)
        tier.until_boundary = self.chunk

    def drop(self, medium: int, tier: RefTier, key: int) -> None:
        del self.state[(key, medium)]
        if key in tier.ghosts:
            tier.ghosts.remove(key)
        if tier.recency is not None and key in tier.recency:
            tier.recency.remove(key)

    def apply(self, batch: EventBatch, resident: np.ndarray[Any, Any]) -> None:
        rows = list(
            zip(batch.op.tolist(), batch.block_hash.tolist(), batch.ts.tolist(),
                batch.medium.tolist(), strict=True)
        )  # fmt: skip
        for medium in sorted({m for op, _, _, m in rows if op == OP_REMOVE}):
            seen = max(self.observed.get(medium, 0), self.resident.get(medium, 0))
            self.observed[medium] = max(seen, int(resident[medium]))
            tier = self.tier(medium)
            if not tier.configured:
                tier.next_capacity = self.observed[medium]
        self.resident = {m: int(r) for m, r in enumerate(resident)}
        segment: list[tuple[int, int, float, int]] = []
        for row in rows:
            if row[0] == OP_CLEAR:
                self.segment(segment)
                segment = []
                self.state = {}
                for tier in self.tiers.values():
                    tier.ghosts = []
                    tier.recency = [] if tier.recency is not None else None
            else:
                segment.append(row)
        self.segment(segment)

    def segment(self, rows: list[tuple[int, int, float, int]]) -> None:
        for medium in sorted({m for *_, m in rows}):
            self.medium(medium, [r for r in rows if r[3] == medium])

    def medium(self, medium: int, rows: list[tuple[int, int, float, int]]) -> None:
        tier = self.tier(medium)
        unmatched, step = 0, None
        for op, key, ts, _ in rows:
            if ts != step:
                unmatched, step = 0, ts
            correction = max(unmatched, 0)
            unmatched += 1 if op == OP_REMOVE else -1 if op == OP_STORE else 0
            if op == OP_REMOVE and tier.next_capacity != tier.capacity:
                tier.capacity = tier.next_capacity
            if op != OP_REMOVE:
                tier.pending += 1
            if not self.sampled(key, tier):
                continue
            weight = 0
            if op != OP_REMOVE:
                weight, tier.pending = tier.pending, 0
            self.sampled_row(medium, tier, op, key, correction, weight)
            tier.until_boundary -= 1
            if not tier.until_boundary:
                self.boundary(medium, tier)

    def sampled_row(
        self, medium: int, tier: RefTier, op: int, key: int, correction: int, weight: int
    ) -> None:
        before = self.state.get((key, medium))
        rank = 0
        if before == "G":
            rank = len(tier.ghosts) - tier.ghosts.index(key)
            tier.ghosts.remove(key)
        if op == OP_REMOVE:
            tier.ghosts.append(key)
            self.state[(key, medium)] = "G"
            return
        hit = before == "R"
        if op == OP_STORE and before == "G" and rank <= self.ghost_limit(tier):
            extra = max((rank - 1) / self.ratio(tier) + 1 - correction, 1.0)
            self.count_restore(tier, extra, weight)
            tier.restores += 1
        if op == OP_STORE and not hit:
            tier.stores += 1
        if hit:
            if tier.recency is None:
                tier.recency = []
            tier.sampled_hits += 1
            self.count_hit(tier, key, weight)
        if tier.recency is not None:
            if key in tier.recency:
                tier.recency.remove(key)
            tier.recency.append(key)
        self.state[(key, medium)] = "R"

    def ghost_limit(self, tier: RefTier) -> int:
        """Ghosts remembered: max_ghosts, and no deeper than the ghost horizon at the rate in
        force; a restore from deeper counts as a first store, forgotten yet or not."""
        if not tier.capacity:
            return self.config.max_ghosts
        reach = math.ceil(self.config.ghost_horizon * tier.capacity * self.ratio(tier)) + 1
        return min(self.config.max_ghosts, reach)

    def count_restore(self, tier: RefTier, extra: float, weight: int) -> None:
        for j, factor in enumerate(self.config.avoided_factors):
            tier.avoided[j] += weight if extra <= (factor - 1) * tier.capacity else 0
        for j, factor in enumerate(self.config.capacity_factors):
            if factor >= 1 and extra <= (factor - 1) * tier.capacity:
                tier.hits[j] += weight
        if tier.bounds is None and tier.capacity:
            tier.bounds = [b * tier.capacity for b in self.config.distance_buckets]
        if tier.bounds is not None:
            tier.counts[bisect.bisect_left(tier.bounds, extra)] += weight
            tier.total += extra * weight

    def count_hit(self, tier: RefTier, key: int, weight: int) -> None:
        distance = None
        if tier.recency is not None and key in tier.recency:
            others = len(tier.recency) - 1 - tier.recency.index(key)
            distance = others / self.ratio(tier) + 1
        for j, factor in enumerate(self.config.capacity_factors):
            if factor >= 1 or (distance is not None and distance <= factor * tier.capacity):
                tier.hits[j] += weight


def random_batches(
    rng: np.random.Generator, batches: int, rows: int, keys: int, clears: bool
) -> Iterator[EventBatch]:
    for _ in range(batches):
        op = rng.choice([OP_STORE, OP_REMOVE, OP_ACCESS], size=rows, p=[0.45, 0.4, 0.15])
        op = op.astype(np.uint8)
        if clears and rng.random() < 0.2:
            op[rng.integers(rows)] = OP_CLEAR
        yield EventBatch(
            op=op,
            block_hash=rng.integers(0, keys, rows).astype(np.uint64)
            * np.uint64(0x9E3779B97F4A7C15),
            ts=np.sort(rng.integers(0, 5, rows)).astype(np.float64),
            medium=rng.integers(1, 3, rows).astype(np.uint8),
            reason=np.zeros(rows, np.uint8),
        )


def run_both(
    config: WhatIfConfig,
    batches: Iterable[EventBatch],
    chunk_rows: int | None,
    read_every: int = 0,
) -> tuple[WhatIfModel, ReferenceWhatIf]:
    """Both models over the batches; ``read_every`` > 0 reads the model's snapshot after every
    that many batches, as scrapes do (a read applies whatever is buffered)."""
    media = LabelTable("unknown")
    for name in ("GPU", "CPU"):
        media.id_of(name)
    collector = BlockLifecycleCollector(CollectorConfig(), media)
    model = WhatIfModel(config, media)
    if chunk_rows is not None:
        model.chunk_rows = chunk_rows
    reference = ReferenceWhatIf(config, media, model.chunk_rows)
    for i, batch in enumerate(batches):
        collector.apply(batch)
        model.apply(batch, collector.resident)
        reference.apply(batch, collector.resident)
        if read_every and i % read_every == 0:
            model.snapshot()
    return model, reference


def assert_same(model: WhatIfModel, reference: ReferenceWhatIf) -> None:
    snapshot = model.snapshot()
    assert snapshot.media.keys() == reference.tiers.keys()
    for medium, tier in reference.tiers.items():
        got = snapshot.media[medium]
        assert (got.capacity, got.avoided, got.hits) == (
            tier.capacity, tuple(tier.avoided), tuple(tier.hits)
        )  # fmt: skip
        assert (got.sampled_stores, got.sampled_restores, got.sampled_hits, got.ghosts) == (
            tier.stores, tier.restores, tier.sampled_hits, len(tier.ghosts)
        )  # fmt: skip
        if tier.bounds is None:
            assert got.distance is None
        else:
            assert got.distance is not None
            assert got.distance.bounds == tuple(tier.bounds)
            assert got.distance.counts[0].tolist() == tier.counts
            assert got.distance.sums[0] == pytest.approx(tier.total)


@pytest.mark.parametrize("seed", range(12))
def test_vectorized_model_equals_the_per_row_reference(seed: int) -> None:
    """Random streams on two media with clears, accesses of unknown blocks, removals of
    ghosts, forgetting (max_ghosts) and order compactions; applied row-chunk by batch."""
    rng = np.random.default_rng(seed)
    ratio = (1.0, 0.5, 0.3)[seed % 3]
    config = WhatIfConfig(sample_ratio=ratio, max_ghosts=(5, 40, 100_000)[seed % 3])
    rows, keys = int(rng.integers(1, 400)), int(rng.integers(3, 300))
    batches = list(random_batches(rng, 25, rows, keys, clears=True))
    assert_same(*run_both(config, batches, chunk_rows=(1, 7, 4096)[seed % 3]))


@pytest.mark.parametrize("seed", range(12))
def test_fixed_size_sampling_equals_the_per_row_reference(seed: int) -> None:
    """A budget far below the keys: the rate falls again and again, dropping keys that
    are resident, ghosts or referenced; never more sampled keys than the budget."""
    rng = np.random.default_rng(200 + seed)
    config = WhatIfConfig(
        sample_ratio=(1.0, 0.6)[seed % 2],
        max_sampled_blocks=int(rng.integers(64, 160)),
        max_ghosts=(20, 100_000)[seed % 2],
    )
    rows, keys = int(rng.integers(20, 400)), int(rng.integers(200, 2000))
    batches = list(random_batches(rng, 25, rows, keys, clears=seed % 3 == 0))
    model, reference = run_both(config, batches, chunk_rows=(1, 5, 4096)[seed % 3])
    assert_same(model, reference)
    snapshot = model.snapshot()
    for medium, tier in reference.tiers.items():
        got = snapshot.media[medium]
        assert got.sample_ratio == reference.ratio(tier) < config.sample_ratio
        assert got.sampled_blocks == sum(1 for _, m in reference.state if m == medium)
        assert got.sampled_blocks <= config.max_sampled_blocks


def recut(batches: Iterable[EventBatch]) -> Iterator[EventBatch]:
    """The same rows in other batches: each one split in two where a step (timestamp) ends."""
    for batch in batches:
        ends = np.flatnonzero(batch.ts[1:] != batch.ts[:-1]) + 1
        if not ends.size:
            yield batch
            continue
        cut = int(ends[ends.size // 2])
        yield batch.take(slice(0, cut))
        yield batch.take(slice(cut, len(batch)))


def figures(model: WhatIfModel) -> dict[int, Any]:
    return {
        medium: (m.avoided, m.hits, m.sampled_stores, m.sampled_restores, m.sampled_hits,
                 m.ghosts, m.sample_ratio, m.sampled_blocks,
                 None if m.distance is None else m.distance.counts.tolist(),
                 None if m.distance is None else m.distance.sums.tolist())
        for medium, m in model.snapshot().media.items()
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_where_the_rate_falls_does_not_depend_on_batches_or_buffering(seed: int) -> None:
    """Boundaries sit at fixed counts of sampled rows, so the same stream cut into other
    batches, or buffered in other chunks, gives the same numbers while the rate keeps
    falling (the capacity is configured: an observed one is read per batch)."""
    rng = np.random.default_rng(300 + seed)
    config = WhatIfConfig(max_sampled_blocks=100 + 40 * seed, capacity=(("", 10_000),))
    batches = list(random_batches(rng, 30, int(rng.integers(10, 700)), 1500, clears=seed < 2))
    whole, _ = run_both(config, batches, chunk_rows=None)
    cut, _ = run_both(config, list(recut(batches)), chunk_rows=None)
    assert figures(whole) == figures(cut)
    assert all(f[6] < 1.0 for f in figures(whole).values())


@pytest.mark.parametrize("seed", range(4))
def test_reads_between_batches_do_not_change_any_figure(seed: int) -> None:
    """A scrape applies the buffered rows in a chunk of its own: every figure, the distance
    histogram's sum included, is that of a run read only at the end (a live exporter and an
    analysis of its recording must publish the same numbers)."""
    rng = np.random.default_rng(400 + seed)
    config = WhatIfConfig(max_sampled_blocks=100 + 40 * seed, capacity=(("", 300),))
    batches = list(random_batches(rng, 30, int(rng.integers(50, 700)), 1500, clears=seed < 1))
    quiet, _ = run_both(config, batches, chunk_rows=None)
    read, _ = run_both(config, batches, chunk_rows=None, read_every=1 + seed % 3)
    assert figures(quiet) == figures(read)
    assert any(f[-1] and f[-1][0] > 0 for f in figures(quiet).values())


@pytest.mark.skipif(not whatif_model.COMPILED, reason="compiled what-if chunk disabled")
@pytest.mark.parametrize("seed", range(8))
def test_the_compiled_chunk_equals_the_numpy_passes(seed: int) -> None:
    """The same stream through the compiled loop and through the numpy passes (falling rates,
    forgotten ghosts, clears, reads between batches, tiny and large chunks): every figure, the
    distance sum included, and the sampled keys' state."""
    rng = np.random.default_rng(500 + seed)
    config = WhatIfConfig(
        sample_ratio=(1.0, 0.5)[seed % 2],
        max_sampled_blocks=int(rng.integers(64, 400)),
        max_ghosts=(20, 100_000)[seed % 2],
        capacity=((("CPU", 40),), ())[seed % 2],
    )
    batches = list(random_batches(rng, 30, int(rng.integers(10, 600)), 1500, clears=seed < 3))
    chunk = (None, 1, 7)[seed % 3]
    fast, _ = run_both(config, batches, chunk_rows=chunk, read_every=seed % 3)
    with mock.patch.object(whatif_model, "_KERNEL", None):
        slow, _ = run_both(config, batches, chunk_rows=chunk, read_every=seed % 3)
        assert not slow._compiled
        want, (b, meta_b) = figures(slow), slow.state()
    assert fast._compiled
    assert figures(fast) == want
    a, meta_a = fast.state()
    assert meta_a["media"].keys() == meta_b["media"].keys()
    key = lambda arrays: np.lexsort((arrays["table.key"], arrays["table.medium"]))  # noqa: E731
    for name in ("table.key", "table.medium", "table.state"):
        np.testing.assert_array_equal(a[name][key(a)], b[name][key(b)], err_msg=name)


@pytest.mark.parametrize("seed", range(4))
def test_buffering_sampled_rows_does_not_change_the_numbers(seed: int) -> None:
    """Sampled rows wait for a chunk of 4,096 (or a read): with nothing forgotten in between,
    the figures are those of applying every batch at once."""
    rng = np.random.default_rng(100 + seed)
    config = WhatIfConfig(sample_ratio=(1.0, 0.4)[seed % 2], capacity=(("CPU", 40),))
    batches = list(random_batches(rng, 30, int(rng.integers(10, 700)), 400, clears=True))
    assert_same(*run_both(config, batches, chunk_rows=None))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 40), max_size=300))
def test_earlier_greater_counts_earlier_greater_elements(values: list[int]) -> None:
    array = np.array(values, np.int64)
    want = [sum(1 for v in values[:i] if v > x) for i, x in enumerate(values)]
    assert earlier_greater(array).tolist() == want


def test_sampling_hash_is_independent_of_the_collectors() -> None:
    """The model's sample and the collector's overlap as independent samples do (R² of the
    hashes), not nested or disjoint."""
    keys = np.arange(200_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ours = whatif_hash(keys) < np.uint64(2**64 // 10)
    theirs = sample_hash(keys) < np.uint64(2**64 // 10)
    assert ours.mean() == pytest.approx(0.1, abs=0.005)
    assert (ours & theirs).mean() == pytest.approx(0.01, abs=0.002)


# --- against exact simulation ---------------------------------------------------------------
@functools.cache
def trace() -> tuple[Request, ...]:
    return tuple(read_mooncake(bundled_trace_path()))


@functools.cache
def exact(capacity: int) -> tuple[int, int]:
    """(GPU blocks stored, GPU blocks hit) when the trace runs on a cache of ``capacity``."""
    simulator = PrefixCacheSimulator(capacity, report_hits=True)
    stored = accessed = 0
    for request in trace():
        for event in simulator.step(request):
            if isinstance(event, Stored):
                stored += len(event.block_hashes)
            elif isinstance(event, Accessed):
                accessed += len(event.block_hashes)
    return stored, accessed


def interleaved(events: list[Event]) -> list[Event]:
    """A request's events with each eviction right before the store it made room for (one
    block per event), instead of all evictions first as the simulator and vLLM send them."""
    removals = [e for e in events if isinstance(e, Removed)]
    out: list[Event] = [e for e in events if isinstance(e, Accessed)]
    for stored in (e for e in events if isinstance(e, Stored)):
        for block in stored.block_hashes:
            if removals:
                out.append(removals.pop(0))
            out.append(Stored([block], medium=stored.medium))
    return out + removals


def fixed(ratio: float) -> WhatIfConfig:
    """A fixed sampling rate: no budget lowers it."""
    return WhatIfConfig(sample_ratio=ratio, max_sampled_blocks=2**62)


def whatif_of(
    config: WhatIfConfig,
    report_hits: bool = False,
    interleave: bool = False,
    requests: Iterable[Request] | None = None,
    capacity: int = C,
) -> dict[str, Any]:
    """The summary's what-if block for GPU after the capacity run's events went through a
    pipeline (framing, decoding, collector, model) as an engine publishes them: 4 requests a
    batch. Checks as it goes that the model never follows more hashes than its budget."""
    pipeline = OfflinePipeline(whatif=config)
    simulator = PrefixCacheSimulator(capacity, report_hits=report_hits)
    pending: list[Event] = []
    for n, request in enumerate(trace() if requests is None else requests, start=1):
        events = simulator.step(request)
        pending += interleaved(events) if interleave else events
        if n % 4 == 0:
            payload = encode_batch(request.timestamp_s, pending, WireForm.VLLM)
            pipeline.feed("sim", frames("", n // 4, payload), request.timestamp_s)
            pending = []
        if n % 1000 == 0:
            (view,) = pipeline.views()
            assert view.whatif is not None
            for medium in view.whatif.media.values():
                assert medium.sampled_blocks <= config.max_sampled_blocks
    (view,) = pipeline.views()
    whatif: dict[str, Any] = summarize(view)["media"]["GPU"]["whatif"]
    return whatif


@pytest.mark.parametrize(
    ("ratio", "interleave", "tolerance"),
    [(1.0, False, 0.005), (1.0, True, 0.005), (0.1, False, 0.01)],
    ids=["R=1-grouped", "R=1-interleaved", "R=0.1-grouped"],
)
def test_avoided_recomputation_matches_exact_simulation(
    ratio: float, interleave: bool, tolerance: float
) -> None:
    """Fed only the C-run, the exporter says within 0.005 (R = 1) or 0.01 (R = 0.1) what share
    of its stores a k·C cache would not have made: 1 - stores(k·C) / stores(C)."""
    whatif = whatif_of(fixed(ratio), interleave=interleave)
    assert whatif["capacity_blocks"] == C and whatif["capacity_source"] == "observed"
    stored = exact(C)[0]
    for factor in AVOIDED_FACTORS:
        want = 1 - exact(round(factor * C))[0] / stored
        got = whatif["factors"][f"{factor:g}"]["recompute_saved_ratio"]
        assert got == pytest.approx(want, abs=tolerance), factor
    assert whatif["factors"]["8"]["recompute_saved_ratio"] > 0.4  # not vacuous


@functools.cache
def exact_at(capacity: int, loops: int = 1) -> tuple[int, ...]:
    """GPU blocks stored at each avoided factor's k·capacity, and at the capacity itself,
    over the trace played ``loops`` times with fresh hashes each time."""
    out = []
    for blocks in (capacity, *(round(f * capacity) for f in AVOIDED_FACTORS)):
        simulator = PrefixCacheSimulator(blocks)
        stored = 0
        for request in repeat_requests(trace, loops, fresh_hashes=True):
            for event in simulator.step(request):
                if isinstance(event, Stored):
                    stored += len(event.block_hashes)
        out.append(stored)
    return tuple(out)


def test_loops_of_fresh_hashes_store_as_many_blocks_each() -> None:
    """A loop with fresh hashes hits nothing the previous one left, and LRU evicts all of that
    first: every loop stores what the first did. So exact figures for 30 loops are those of
    one (checked here on two), and the 30-loop test below needs no 30-loop simulations."""
    assert exact_at(1000, loops=2) == tuple(2 * s for s in exact_at(1000))


@pytest.mark.parametrize(
    ("loops", "capacity"),
    [(1, 4000), (1, 1000), (30, 4000)],
    ids=["trace-C=4000", "trace-C=1000", "30-loops-C=4000"],
)
def test_defaults_match_exact_lru_at_every_size(loops: int, capacity: int) -> None:
    """At the default settings, recomputation avoided at every factor within 0.005 of exact
    LRU: the trace (43,924 distinct hashes, more than the budget), and the trace looped 30
    times with fresh hashes (1.3 million, the rate falls well below 1); the model never
    follows more hashes than the budget (checked as it runs)."""
    requests = repeat_requests(trace, loops, fresh_hashes=True)
    whatif = whatif_of(WhatIfConfig(), requests=requests, capacity=capacity)
    assert whatif["sample_ratio"] < 1.0  # the budget was reached: this is fixed-size sampling
    stored, *at_factor = exact_at(capacity)
    for factor, blocks in zip(AVOIDED_FACTORS, at_factor, strict=True):
        want = 1 - blocks / stored  # the same for any number of loops (test above)
        got = whatif["factors"][f"{factor:g}"]["recompute_saved_ratio"]
        assert got == pytest.approx(want, abs=0.005), factor


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_hit_ratio_curve_matches_exact_simulation(ratio: float) -> None:
    """With hits reported, the hit ratio a k·C cache would have had, at every factor (below 1
    too), within 0.01 of running the engine at k·C."""
    whatif = whatif_of(fixed(ratio), report_hits=True)
    for factor in ALL_FACTORS:
        stored, accessed = exact(round(factor * C))
        got = whatif["factors"][f"{factor:g}"]["hit_ratio"]
        assert got == pytest.approx(accessed / (accessed + stored), abs=0.01), factor


def test_configured_capacity_is_used_and_reported() -> None:
    pipeline = OfflinePipeline(whatif=WhatIfConfig(sample_ratio=1.0, capacity=(("", 2 * C),)))
    simulator = PrefixCacheSimulator(C)
    for n, request in enumerate(trace()[:600]):
        payload = encode_batch(request.timestamp_s, simulator.step(request), WireForm.VLLM)
        pipeline.feed("sim", frames("", n, payload), request.timestamp_s)
    (view,) = pipeline.views()
    whatif = summarize(view)["media"]["GPU"]["whatif"]
    assert (whatif["capacity_blocks"], whatif["capacity_source"]) == (2 * C, "configured")
    assert whatif["factors"]["2"]["capacity_blocks"] == 4 * C
    assert view.whatif is not None
    distance = view.whatif.media[view.collector.media.index("GPU")].distance
    assert distance is not None and distance.bounds[4] == 2 * C  # the bound at 1 C


# --- the pipeline, the exposition, the summary ------------------------------------------------
def fed_view(report_hits: bool, requests: int = 1500, restart: bool = False) -> EngineView:
    pipeline = new_pipeline("sim", CollectorConfig(), whatif_config=WhatIfConfig(sample_ratio=1))
    simulator = PrefixCacheSimulator(1000, 500, report_hits=report_hits)
    for n, request in enumerate(trace()[:requests]):
        payload = encode_batch(request.timestamp_s, simulator.step(request), WireForm.VLLM)
        pipeline.stream.handle(frames("", n, payload), request.timestamp_s)
    pipeline.stream.flush()
    if restart:  # the publisher's sequence back to 0: the engine lost its cache
        payload = encode_batch(0.0, [], WireForm.VLLM)
        pipeline.stream.handle(frames("", 0, payload), 0.0)
        pipeline.stream.flush()
    return pipeline.view()


def test_exposition_has_the_whatif_families_on_both_media() -> None:
    text = render([fed_view(report_hits=True)])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    avoided = families["kvcache_whatif_recomputes_avoided"].samples
    assert {s.labels["medium"] for s in avoided} == {"GPU", "CPU"}
    assert {s.labels["capacity_factor"] for s in avoided} == {"1.25", "1.5", "2", "4", "8"}
    by_factor = {
        s.labels["capacity_factor"]: s.value for s in avoided if s.labels["medium"] == "GPU"
    }
    assert 0 < by_factor["1.25"] <= by_factor["2"] <= by_factor["8"]  # a larger cache saves more
    hits = families["kvcache_whatif_hits"].samples
    assert {s.labels["capacity_factor"] for s in hits} >= {"0.25", "1", "8"}
    capacity = {
        s.labels["medium"]: s.value for s in families["kvcache_whatif_capacity_blocks"].samples
    }
    assert capacity == {"GPU": 1000, "CPU": 500}
    distance = families["kvcache_block_reuse_distance_blocks"].samples
    assert any(s.name.endswith("_bucket") and s.labels["le"] == "1000.0" for s in distance)


def test_without_reported_hits_there_is_no_hit_curve() -> None:
    view = fed_view(report_hits=False, requests=400)
    text = render([view])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["kvcache_whatif_hits"].samples == []
    assert families["kvcache_whatif_recomputes_avoided"].samples
    factors = summarize(view)["media"]["GPU"]["whatif"]["factors"]
    assert "0.5" not in factors and "hit_ratio" not in factors["2"]


def test_a_publisher_restart_forgets_every_block_but_keeps_the_counts() -> None:
    before = fed_view(report_hits=False, requests=400)
    after = fed_view(report_hits=False, requests=400, restart=True)
    assert before.whatif is not None and after.whatif is not None
    gpu = before.collector.media.index("GPU")
    assert before.whatif.media[gpu].ghosts > 0
    assert after.whatif.media[gpu].ghosts == 0
    assert after.whatif.media[gpu].avoided == before.whatif.media[gpu].avoided


def test_memory_is_bounded_by_max_ghosts() -> None:
    media = LabelTable("unknown")
    gpu = media.id_of("GPU")
    model = WhatIfModel(WhatIfConfig(sample_ratio=1.0, max_ghosts=1000), media)
    keys = np.arange(200_000, dtype=np.uint64)
    for start in range(0, keys.size, 10_000):
        chunk = keys[start : start + 10_000]
        op = np.repeat(np.array([OP_STORE, OP_REMOVE], np.uint8), chunk.size)
        batch = EventBatch(
            op=op,
            block_hash=np.concatenate([chunk, chunk]),
            ts=np.full(op.size, float(start)),
            medium=np.full(op.size, gpu, np.uint8),
            reason=np.zeros(op.size, np.uint8),
        )
        model.apply(batch, np.zeros(media.capacity, np.int64))
        # forgotten at each boundary: between two, at most a chunk more
        assert model.snapshot().media[gpu].ghosts <= 1000 + model.chunk
    assert model.snapshot().nbytes < 2_000_000


def test_a_sample_ratio_of_zero_turns_the_model_off() -> None:
    pipeline = new_pipeline("x", CollectorConfig(), whatif_config=WhatIfConfig(sample_ratio=0))
    assert pipeline.whatif is None and pipeline.view().whatif is None
    assert "kvcache_whatif_recomputes_avoided_total{" not in render([pipeline.view()])


# --- configuration ----------------------------------------------------------------------------
def test_flags_and_source_capacity() -> None:
    config = load(
        [
            "--source", "a=tcp://127.0.0.1:5557,capacity=8000,capacity.CPU=64000",
            "--whatif.sample-ratio", "0.05", "--whatif.max-ghosts", "5000",
            "--whatif.capacity-factors", "0.5,2,3", "--whatif.distance-buckets", "0.5,1,2",
            "--whatif.max-sampled-blocks", "4096",
        ],
        environ={},
    )  # fmt: skip
    assert config.whatif == WhatIfConfig(
        sample_ratio=0.05,
        max_sampled_blocks=4096,
        max_ghosts=5000,
        capacity_factors=(0.5, 2.0, 3.0),
        distance_buckets=(0.5, 1.0, 2.0),
    )
    (spec,) = config.sources
    assert spec.capacity == (("", 8000), ("CPU", 64000))
    per_source = WhatIfConfig(capacity=spec.capacity)
    assert (per_source.capacity_of("GPU"), per_source.capacity_of("CPU")) == (8000, 64000)
    assert load([], environ={}).whatif == WhatIfConfig()


def test_yaml_sources_take_capacities(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(
        "source:\n"
        "  - {name: a, endpoint: 'tcp://127.0.0.1:5557', capacity: 100}\n"
        "  - {name: b, endpoint: 'tcp://127.0.0.1:5558', capacity: {GPU: 10, CPU: 20}}\n"
    )
    a, b = load(["--config.file", str(file)], environ={}).sources
    assert a.capacity == (("", 100),)
    assert b.capacity == (("GPU", 10), ("CPU", 20))


@pytest.mark.parametrize(
    "argv",
    [
        ["--whatif.sample-ratio", "1.5"],
        ["--whatif.max-ghosts", "0"],
        ["--whatif.max-sampled-blocks", "63"],
        ["--whatif.capacity-factors", "2,1"],
        ["--whatif.capacity-factors", "0,1"],
        ["--whatif.distance-buckets", "0,1"],
    ],
)
def test_bad_whatif_flags_are_one_line_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=argv[0].removeprefix("--")):
        load(argv, environ={})


@pytest.mark.parametrize(
    "text", ["a=tcp://h:1,capacity=0", "a=tcp://h:1,capacity=x", "a=tcp://h:1,capacity.=5"]
)
def test_bad_source_capacities_are_refused(text: str) -> None:
    with pytest.raises(SourceSpecError, match="capacity"):
        SourceSpec.parse(text)


# --- analyze --------------------------------------------------------------------------------
def run_analyze(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert analyze.run(argv) == 0
    return out.getvalue()


# The trace has 43,924 distinct hashes: a budget above that follows every one.
TRACE_ARGS = [str(bundled_trace_path()), "--trace-file", "--whatif-max-sampled-blocks", "65536"]


def test_analyze_prints_the_curve_as_text_and_json() -> None:
    text = run_analyze([*TRACE_ARGS, "--gpu-blocks", str(C)])
    assert f"what-if trace/GPU: capacity {C} blocks (observed), sample ratio 1 (" in text
    assert "    1.5x        6000                10.1%" in text  # 1 - stores(1.5 C) / stores(C)
    document = json.loads(run_analyze([*TRACE_ARGS, "--format", "json", "--capacity", "GPU=8000"]))
    whatif = document["engines"][0]["media"]["GPU"]["whatif"]
    assert (whatif["capacity_blocks"], whatif["capacity_source"]) == (8000, "configured")
    csv = run_analyze([*TRACE_ARGS, "--format", "csv"])
    assert "trace,GPU,whatif.factors.2.recompute_saved_ratio," in csv


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
def test_analyze_plots_a_png(tmp_path: Path) -> None:
    chart = tmp_path / "curve.png"
    run_analyze([*TRACE_ARGS, "--report-hits", "--plot", str(chart)])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_one_line_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(analyze.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"--plot needs matplotlib: pip install"):
        analyze.run([*TRACE_ARGS, "--plot", str(tmp_path / "x.png")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import now fails
    with pytest.raises(PlotError, match="kvcache-exporter\\[plot\\]"):
        plot_whatif([], tmp_path / "x.png")


@pytest.mark.parametrize(
    "argv",
    [
        ["--capacity", "GPU=zero"],
        ["--capacity-factors", "3,2"],
        ["--whatif-sample-ratio", "2"],
        ["--whatif-max-sampled-blocks", "10"],
    ],
)
def test_bad_analyze_whatif_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError, match=argv[0]):
        analyze.run([*TRACE_ARGS, *argv])


def test_text_output_lists_the_curve_once() -> None:
    pipeline = OfflinePipeline(whatif=WhatIfConfig(sample_ratio=1.0))
    simulator = PrefixCacheSimulator(C)
    for n, request in enumerate(trace()[:300]):
        payload = encode_batch(request.timestamp_s, simulator.step(request), WireForm.VLLM)
        pipeline.feed("sim", frames("", n, payload), request.timestamp_s)
    text = format_views(pipeline.views(), "text")
    assert "whatif." not in text and "what-if sim/GPU" in text
