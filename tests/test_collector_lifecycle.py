"""The vectorized collector against the plain reference, on scripted and random streams."""

from __future__ import annotations

from itertools import islice, pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.collector import BlockLifecycleCollector, CollectorConfig
from kvcache_exporter.collector.lifecycle import sample_hash
from kvcache_exporter.engine import PrefixCacheSimulator, bundled_trace_path, read_mooncake
from kvcache_exporter.offline import simulate_frames
from kvcache_exporter.pipeline import new_pipeline
from kvcache_exporter.protocol.batch import (
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    LabelTable,
    PrefixChain,
)

from .reference import ReferenceCollector

OP_NAMES = {
    OP_STORE: "BlockStored",
    OP_REMOVE: "BlockRemoved",
    OP_ACCESS: "BlockAccessed",
    OP_CLEAR: "AllBlocksCleared",
}
MEDIA = ("GPU", "CPU")


def make_batch(rows: list[tuple[int, int, float, int]], media: LabelTable) -> EventBatch:
    """rows of (op, hash, ts, medium index into MEDIA)."""
    return EventBatch(
        op=np.array([r[0] for r in rows], np.uint8),
        block_hash=np.array([r[1] for r in rows], np.uint64),
        ts=np.array([r[2] for r in rows], np.float64),
        medium=np.array([media.id_of(MEDIA[r[3]]) for r in rows], np.uint8),
        reason=np.zeros(len(rows), np.uint8),
    )


def feed_reference(ref: ReferenceCollector, rows: list[tuple[int, int, float, int]]) -> None:
    for op, h, ts, m in rows:
        event: dict[str, object] = {"type": OP_NAMES[op], "block_hashes": [h], "medium": MEDIA[m]}
        ref.feed(ts, [event])


def assert_same(col: BlockLifecycleCollector, ref: ReferenceCollector) -> None:
    snap = col.snapshot()
    for medium in MEDIA:
        i = snap.media.index(medium) if medium in snap.media else None
        if i is None:
            assert ref.stored[medium] == 0
            continue
        assert snap.stored[i] == ref.stored[medium], medium
        assert snap.accessed[i] == ref.accessed[medium], medium
        assert snap.restores[i] == ref.restores[medium], medium
        assert snap.resident[i] == ref.resident_count(medium), medium
        for r, reason in enumerate(snap.reasons):
            assert snap.removed[i, r] == ref.removed[(medium, reason)], (medium, reason)
        for name, hist in ref.hist.items():
            got = snap.histograms[name]
            want = hist.counts.get(medium, [0] * (len(hist.bounds) + 1))
            assert got.counts[i].tolist() == want, (name, medium)
            assert got.sums[i] == pytest.approx(hist.sums[medium], rel=1e-6, abs=1e-6), name
        abe = snap.histograms["accesses_before_evict"]
        want = ref.accesses_before_evict.counts.get(medium, [0] * abe.counts.shape[1])
        assert abe.counts[i].tolist() == want
    assert snap.unknown_removals == ref.unknown_removals
    assert snap.clears == ref.clears
    assert snap.tracked == sum(snap.resident.tolist())


def test_store_access_remove_restore_by_hand() -> None:
    col = BlockLifecycleCollector()
    gpu = 0
    rows = [
        (OP_STORE, 1, 10.0, gpu),
        (OP_STORE, 2, 10.0, gpu),
        (OP_ACCESS, 1, 12.0, gpu),
        (OP_STORE, 1, 13.0, gpu),  # re-announcement: an access
        (OP_REMOVE, 1, 20.0, gpu),
        (OP_STORE, 1, 25.0, gpu),  # restore after 5 s
        (OP_REMOVE, 9, 26.0, gpu),  # never stored: unknown removal
    ]
    col.apply(make_batch(rows, col.media))
    snap = col.snapshot()
    g = snap.media.index("GPU")
    assert snap.stored[g] == 3
    assert snap.accessed[g] == 2
    assert snap.restores[g] == 1
    assert snap.resident[g] == 2
    assert snap.unknown_removals == 1
    assert snap.removed[g, 0] == 2
    lifetime = snap.histograms["lifetime"]
    assert lifetime.sums[g] == pytest.approx(10.0)
    idle = snap.histograms["idle_before_evict"]
    assert idle.sums[g] == pytest.approx(7.0)
    reuse = snap.histograms["reuse_gap"]
    assert reuse.sums[g] == pytest.approx(3.0)
    assert snap.histograms["restore_gap"].sums[g] == pytest.approx(5.0)
    abe = snap.histograms["accesses_before_evict"]
    assert abe.sums[g] == pytest.approx(2.0)


def test_clear_removes_everything_as_cleared_and_restores_after() -> None:
    col = BlockLifecycleCollector()
    rows = [(OP_STORE, h, 1.0, h % 2) for h in range(10)]
    rows += [(OP_CLEAR, 0, 2.0, 0), (OP_STORE, 3, 4.0, 1)]
    col.apply(make_batch(rows, col.media))
    snap = col.snapshot()
    cleared = snap.reasons.index("cleared")
    assert int(snap.removed[:, cleared].sum()) == 10
    assert int(snap.resident.sum()) == 1
    assert int(snap.restores.sum()) == 1
    assert snap.clears == 1


def test_same_hash_on_two_media_is_two_residencies() -> None:
    col = BlockLifecycleCollector()
    col.apply(make_batch([(OP_STORE, 7, 1.0, 0), (OP_STORE, 7, 1.0, 1)], col.media))
    snap = col.snapshot()
    assert int(snap.resident.sum()) == 2
    assert int(snap.accessed.sum()) == 0


def test_removed_memory_bounds_restores() -> None:
    col = BlockLifecycleCollector(CollectorConfig(removed_memory=3))
    rows = [(OP_STORE, h, 1.0, 0) for h in range(6)]
    rows += [(OP_REMOVE, h, 2.0, 0) for h in range(6)]
    col.apply(make_batch(rows, col.media))
    col.apply(make_batch([(OP_STORE, h, 3.0, 0) for h in range(6)], col.media))
    # only the last three removed hashes are remembered
    assert int(col.snapshot().restores.sum()) == 3


def test_table_full_counts_untracked_stores_and_keeps_counters_exact() -> None:
    col = BlockLifecycleCollector(CollectorConfig(max_tracked_blocks=4))
    col.apply(make_batch([(OP_STORE, h, 1.0, 0) for h in range(10)], col.media))
    snap = col.snapshot()
    assert int(snap.stored.sum()) == 10
    assert int(snap.resident.sum()) == 4
    assert snap.untracked_stores == 6


def test_table_grows_and_rebuilds_without_losing_blocks() -> None:
    col = BlockLifecycleCollector()
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 50_000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    batch = EventBatch(
        op=np.zeros(hashes.size, np.uint8),
        block_hash=hashes,
        ts=np.ones(hashes.size),
        medium=np.zeros(hashes.size, np.uint8),
        reason=np.zeros(hashes.size, np.uint8),
    )
    col.apply(batch)
    removal = EventBatch(
        op=np.full(25_000, OP_REMOVE, np.uint8),
        block_hash=hashes[:25_000],
        ts=np.full(25_000, 2.0),
        medium=np.zeros(25_000, np.uint8),
        reason=np.zeros(25_000, np.uint8),
    )
    col.apply(removal)
    snap = col.snapshot()
    assert int(snap.resident.sum()) == 25_000
    assert snap.unknown_removals == 0
    assert snap.histograms["lifetime"].counts.sum() == 25_000


def test_sampling_tracks_a_stable_subset_and_keeps_counters_exact() -> None:
    ratio = 0.25
    col = BlockLifecycleCollector(CollectorConfig(sample_ratio=ratio))
    hashes = np.arange(1, 20_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    n = hashes.size
    col.apply(
        EventBatch(
            op=np.zeros(n, np.uint8),
            block_hash=hashes,
            ts=np.ones(n),
            medium=np.zeros(n, np.uint8),
            reason=np.zeros(n, np.uint8),
        )
    )
    col.apply(
        EventBatch(
            op=np.full(n, OP_REMOVE, np.uint8),
            block_hash=hashes,
            ts=np.full(n, 3.0),
            medium=np.zeros(n, np.uint8),
            reason=np.zeros(n, np.uint8),
        )
    )
    snap = col.snapshot()
    assert int(snap.stored.sum()) == n
    assert int(snap.removed.sum()) == n
    expected = int(np.count_nonzero(sample_hash(hashes) < np.uint64(int(ratio * 2**64))))
    assert int(snap.histograms["lifetime"].counts.sum()) == expected
    assert abs(expected / n - ratio) < 0.02


rows_strategy = st.lists(
    st.tuples(
        st.sampled_from([OP_STORE, OP_STORE, OP_REMOVE, OP_ACCESS, OP_CLEAR]),
        st.integers(0, 12),
        st.integers(0, 3),  # time step
        st.integers(0, 1),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(rows=rows_strategy, cuts=st.lists(st.integers(0, 120), max_size=6))
def test_random_streams_match_the_reference(
    rows: list[tuple[int, int, int, int]], cuts: list[int]
) -> None:
    ts = 0.0
    timed: list[tuple[int, int, float, int]] = []
    for op, h, step, m in rows:
        ts += step * 0.37
        timed.append((op, h * 0x9E3779B97F4A7C15 % 2**64, ts, m))
    col = BlockLifecycleCollector()
    ref = ReferenceCollector()
    bounds = sorted({0, len(timed), *(c for c in cuts if c <= len(timed))})
    for start, stop in pairwise(bounds):
        col.apply(make_batch(timed[start:stop], col.media))
    feed_reference(ref, timed)
    assert_same(col, ref)


def test_results_do_not_depend_on_how_the_stream_is_cut_into_batches() -> None:
    """The same engine stream (trace through the simulator, hits, CPU tier, chains) applied one
    message per batch, in bursts of 7 and as one batch gives identical numbers, prefix depth
    included."""
    frames = list(
        simulate_frames(
            islice(read_mooncake(bundled_trace_path()), 800),
            PrefixCacheSimulator(3000, 600, report_hits=True),
        )
    )

    def run(every: int) -> list[object]:
        pipeline = new_pipeline("x", CollectorConfig())
        collector, stream = pipeline.collector, pipeline.stream
        for i, (ts, message) in enumerate(frames):
            stream.handle(message, ts)
            if every and i % every == 0:
                stream.flush()
        stream.flush()
        snap = collector.snapshot()
        hists = [(h.counts.tolist(), h.sums.round(6).tolist()) for h in snap.histograms.values()]
        return [snap.stored.tolist(), snap.removed.tolist(), snap.accessed.tolist(), hists]

    one, bursts, whole = run(1), run(7), run(0)
    assert one == bursts == whole
    depth_counts = one[3][-1][0]
    assert sum(map(sum, depth_counts)) > 0  # chains were resolved


def test_prefix_depth_follows_parent_chains() -> None:
    """Depth = parent's depth + offset + 1, across events in one batch and across batches,
    and a CPU copy has its GPU original's depth."""
    col = BlockLifecycleCollector()
    gpu = col.media.id_of("GPU")
    cpu = col.media.id_of("CPU")

    def stores(rows: list[tuple[int, int, int | None, int]]) -> EventBatch:
        """rows of (hash, medium id, event parent or None, offset)."""
        n = len(rows)
        return EventBatch(
            op=np.zeros(n, np.uint8),
            block_hash=np.array([r[0] for r in rows], np.uint64),
            ts=np.ones(n),
            medium=np.array([r[1] for r in rows], np.uint8),
            reason=np.zeros(n, np.uint8),
            chain=PrefixChain(
                parent=np.array([r[2] or 0 for r in rows], np.uint64),
                has_parent=np.array([r[2] is not None for r in rows]),
                offset=np.array([r[3] for r in rows], np.uint32),
            ),
        )

    # Event A: 10, 11, 12 (no parent); event B: 13, 14 with parent 12, in the same batch.
    col.apply(stores([(10, gpu, None, 0), (11, gpu, None, 1), (12, gpu, None, 2),
                      (13, gpu, 12, 0), (14, gpu, 12, 1)]))  # fmt: skip
    # Next batch: 15 with parent 14 on GPU; a CPU copy of 14 (parent 13).
    col.apply(stores([(15, gpu, 14, 0), (14, cpu, 13, 0)]))
    # An orphan whose parent was never seen: depth unknown, not observed.
    col.apply(stores([(99, gpu, 12345, 0)]))
    depths = {
        (h, m): col.block(h, m).prefix_depth  # type: ignore[union-attr]
        for h, m in ((10, gpu), (12, gpu), (13, gpu), (14, gpu), (15, gpu), (14, cpu), (99, gpu))
    }
    assert depths == {
        (10, gpu): 1, (12, gpu): 3, (13, gpu): 4, (14, gpu): 5, (15, gpu): 6,
        (14, cpu): 5, (99, gpu): 0,
    }  # fmt: skip
    assert int(col.snapshot().histograms["prefix_depth"].counts.sum()) == 7


def test_totals_at_cuts_equal_totals_after_applying_the_pieces() -> None:
    """apply(batch, cuts) reports, for each cut row, exactly the totals a split apply would
    have left there: stores, evictions, restores, residency, clears, lifetime buckets."""
    frames = list(
        simulate_frames(
            islice(read_mooncake(bundled_trace_path()), 400),
            PrefixCacheSimulator(1500, 300, report_hits=True),
        )
    )
    whole = new_pipeline("whole", CollectorConfig())
    pieces = new_pipeline("pieces", CollectorConfig())
    for _, message in frames:
        whole.stream.decoder.feed(message[2])
        pieces.stream.decoder.feed(message[2])
    batch = whole.stream.decoder.flush()
    pieces.stream.decoder.flush()
    clear_row = len(batch) // 3
    batch = EventBatch(
        op=np.where(np.arange(len(batch)) == clear_row, OP_CLEAR, batch.op).astype(np.uint8),
        block_hash=batch.block_hash,
        ts=batch.ts,
        medium=batch.medium,
        reason=batch.reason,
        chain=batch.chain,
    )
    cuts = sorted({1, clear_row, clear_row + 1, len(batch) // 2, len(batch) - 1})
    reported = whole.collector.apply(batch, cuts)
    expected = []
    start = 0
    for cut in cuts:
        pieces.collector.apply(batch.take(slice(start, cut)))
        expected.append(pieces.collector.totals())
        start = cut
    for got, want in zip(reported, expected, strict=True):
        assert (got.stored, got.evicted, got.restores, got.resident, got.clears) == (
            want.stored,
            want.evicted,
            want.restores,
            want.resident,
            want.clears,
        )
        assert got.lifetime_counts.tolist() == want.lifetime_counts.tolist()
