"""The vectorized collector against the plain reference, on scripted and random streams."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice, pairwise
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.collector import (
    BlockLifecycleCollector,
    CollectorConfig,
    CollectorSnapshot,
    sample_hash,
)
from kvcache_exporter.engine import PrefixCacheSimulator, bundled_trace_path, read_mooncake
from kvcache_exporter.offline import simulate_frames
from kvcache_exporter.pipeline import new_pipeline
from kvcache_exporter.protocol.batch import (
    NO_COPY_COUNT,
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    PrefixChain,
)

from .reference import HISTOGRAMS, Block, Key, ReferenceCollector

OP_NAMES = {
    OP_STORE: "BlockStored",
    OP_REMOVE: "BlockRemoved",
    OP_ACCESS: "BlockAccessed",
    OP_CLEAR: "AllBlocksCleared",
}
MEDIA = ("GPU", "CPU")
REASONS = ("evicted", "freed")
# LoRA adapters as a store names them: none (the base model), by lora_name, by lora_id only.
ADAPTERS: tuple[str | int | None, ...] = (None, "sql", 7)


class Row(NamedTuple):
    """One block operation; ``medium``, ``reason`` and ``adapter`` index MEDIA, REASONS and
    ADAPTERS, ``group`` is the KV-cache group index, ``copies_left`` a removal's remaining copy
    count as the engine sends it (None: not sent), ``tokens`` what a stored block holds."""

    op: int
    h: int
    ts: float
    medium: int = 0
    group: int = 0
    copies_left: int | None = None
    adapter: int = 0
    tokens: int = 0
    reason: int = 0


def make_batch(rows: Sequence[tuple[Any, ...]], col: BlockLifecycleCollector) -> EventBatch:
    """The rows as the decoder would hand them to ``col`` (its label tables give the ids)."""
    rs = [Row(*r) for r in rows]
    return EventBatch(
        op=np.array([r.op for r in rs], np.uint8),
        block_hash=np.array([r.h for r in rs], np.uint64),
        ts=np.array([r.ts for r in rs], np.float64),
        medium=np.array([col.media.id_of(MEDIA[r.medium]) for r in rs], np.uint8),
        reason=np.array(
            [col.reasons.id_of(REASONS[r.reason]) if r.op == OP_REMOVE else 0 for r in rs],
            np.uint8,
        ),
        group=np.array([col.groups.id_of(r.group) for r in rs], np.uint8),
        adapter=np.array(
            [col.adapters.id_of(ADAPTERS[r.adapter]) if r.op == OP_STORE else 0 for r in rs],
            np.uint8,
        ),
        tokens=np.array([r.tokens if r.op == OP_STORE else 0 for r in rs], np.uint32),
        copies_left=np.array(
            [
                r.copies_left if r.op == OP_REMOVE and r.copies_left is not None else NO_COPY_COUNT
                for r in rs
            ],
            np.int32,
        ),
    )


def event_of(row: Row) -> dict[str, object]:
    """A row as the vLLM map form decodes to (what the reference reads)."""
    if row.op == OP_CLEAR:
        return {"type": "AllBlocksCleared"}
    event: dict[str, object] = {
        "type": OP_NAMES[row.op],
        "block_hashes": [row.h],
        "medium": MEDIA[row.medium],
        "group_idx": row.group,
    }
    if row.op == OP_STORE:
        event["block_size"] = 16
        event["token_ids"] = list(range(row.tokens))  # fewer than 16: a partial block
        adapter = ADAPTERS[row.adapter]
        if isinstance(adapter, str):
            event["lora_name"] = adapter
        elif adapter is not None:
            event["lora_id"] = adapter
    elif row.op == OP_REMOVE:
        event["reason"] = REASONS[row.reason]
        if row.copies_left is not None:
            event["remaining_copy_counts"] = [row.copies_left]
    return event


def feed_reference(ref: ReferenceCollector, rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Feed the rows one event each; returns what each row did (see ReferenceCollector)."""
    outcomes = []
    for row in (Row(*r) for r in rows):
        outcomes += ref.feed(row.ts, [event_of(row)])
    return outcomes


class LoggedReference(ReferenceCollector):
    """The reference, also keeping each block's end as an eviction record would hold it."""

    def __init__(self, hit_reports: bool = False) -> None:
        super().__init__(hit_reports=hit_reports)
        self.log: list[tuple[int, str, str, str, float, float, float, int]] = []

    def ended(self, key: Key, reason: str, block: Block, ts: float) -> None:
        h, medium, group = key
        self.log.append((h, medium, group, reason, block.stored, block.last, ts, block.accesses))


def assert_hist_row(got: Any, p: int, want: Any, label: object, name: str) -> None:
    assert got.counts[p].tolist() == want.row(label), (name, label)
    assert got.sums[p] == pytest.approx(want.sums[label], rel=1e-6, abs=1e-6), (name, label)


def assert_same(col: BlockLifecycleCollector, ref: ReferenceCollector) -> None:
    """Every counter per place and per medium, the adapter arrays, every histogram per place
    and per medium, and the scalars equal the reference's (sample ratio 1)."""
    snap = col.snapshot()
    seen = {snap.place_labels(p) for p in range(len(snap.places))}
    for (medium, group), counts in ref.places.items():
        if counts.stored or counts.accessed or counts.restores or any(counts.removed.values()):
            assert (medium, group) in seen, (medium, group)
    for p in range(len(snap.places)):
        medium, group = place = snap.place_labels(p)
        want = ref.place(medium, group)
        assert snap.place(medium, group) == p
        assert snap.stored[p] == want.stored, place
        assert snap.accessed[p] == want.accessed, place
        assert snap.restores[p] == want.restores, place
        assert set(want.removed) <= set(snap.reasons), place
        for r, reason in enumerate(snap.reasons):
            assert snap.removed[p, r] == want.removed.get(reason, 0), (place, reason)
        assert snap.resident[p] == ref.resident_at(medium, group), place
        assert snap.resident_hashes[p] == ref.resident_hashes_at(medium, group), place
        assert snap.resident_tokens[p] == ref.resident_tokens_at(medium, group), place
        assert snap.tracked_per_place[p] == snap.resident_hashes[p], place
        for name in HISTOGRAMS:
            assert_hist_row(snap.histograms[name], p, ref.place_hist[name], place, name)
        abe = snap.histograms["accesses_before_evict"]
        assert_hist_row(abe, p, ref.place_accesses_before_evict, place, "accesses_before_evict")
    # Per medium: the sums over groups.
    for m, medium in enumerate(snap.media):
        assert snap.per_medium(snap.stored)[m] == ref.stored[medium], medium
        assert snap.per_medium(snap.accessed)[m] == ref.accessed[medium], medium
        assert snap.per_medium(snap.restores)[m] == ref.restores[medium], medium
        assert snap.per_medium(snap.resident)[m] == ref.resident_count(medium), medium
        for r, reason in enumerate(snap.reasons):
            assert snap.per_medium(snap.removed)[m, r] == ref.removed[(medium, reason)]
        for name in HISTOGRAMS:
            hist = snap.histograms[name]
            assert snap.per_medium(hist.counts)[m].tolist() == ref.hist[name].row(medium), name
    # Per (medium, adapter).
    names = [("base" if a is None else str(a)) for a in ADAPTERS]
    assert set(snap.adapters) >= {a for _, a in ref.adapter_stored}
    for m, medium in enumerate(snap.media):
        for a, adapter in enumerate(snap.adapters):
            assert adapter in names
            key = (medium, adapter)
            assert snap.adapter_stored[m, a] == ref.adapter_stored.get(key, 0), key
            assert snap.adapter_restores[m, a] == ref.adapter_restores.get(key, 0), key
            assert snap.adapter_resident[m, a] == ref.adapter_resident(medium, adapter), key
    assert snap.unknown_removals == ref.unknown_removals
    assert snap.unknown_accesses == ref.unknown_accesses
    assert snap.clears == ref.clears
    assert snap.tracked == len(ref.resident)
    assert snap.untracked_stores == 0
    if isinstance(ref, LoggedReference):
        rec = col.eviction_records()
        got = [
            (
                int(rec.block_hash[i]),
                *snap.place_labels(int(rec.medium[i])),
                snap.reasons[int(rec.reason[i])],
                float(rec.stored_at[i]),
                float(rec.last_access_at[i]),
                float(rec.removed_at[i]),
                int(rec.accesses[i]),
            )
            for i in range(len(rec))
        ]
        assert sorted(got) == sorted(ref.log)


def gpu_place(snap: CollectorSnapshot, group: str = "0") -> int:
    place = snap.place("GPU", group)
    assert place is not None
    return place


def test_store_access_remove_restore_by_hand() -> None:
    col = BlockLifecycleCollector(CollectorConfig(hit_reports=True))
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
    col.apply(make_batch(rows, col))
    snap = col.snapshot()
    g = gpu_place(snap)
    assert snap.place("GPU", "1") is None and snap.place("TPU") is None
    assert snap.place_labels(g) == ("GPU", "0")
    assert snap.stored[g] == 3
    assert snap.accessed[g] == 2
    assert snap.restores[g] == 1
    assert snap.resident[g] == snap.resident_hashes[g] == 2
    assert snap.unknown_removals == 1
    assert snap.removed[g, 0] == 2
    assert not col.copy_rows.any()  # with hit reports there are no copies
    lifetime = snap.histograms["lifetime"]
    assert lifetime.sums[g] == pytest.approx(10.0)
    idle = snap.histograms["idle_before_evict"]
    assert idle.sums[g] == pytest.approx(7.0)
    reuse = snap.histograms["reuse_gap"]
    assert reuse.sums[g] == pytest.approx(3.0)
    assert snap.histograms["restore_gap"].sums[g] == pytest.approx(5.0)
    abe = snap.histograms["accesses_before_evict"]
    assert abe.sums[g] == pytest.approx(2.0)


def test_copies_by_hand() -> None:
    """Without hit reports a store of a resident key is a second physical copy: counted as
    stored and resident, not an access; removing one copy leaves the key resident with its
    life going on; removing the last observes the life from the first store; a store after
    that is a restore."""
    col = BlockLifecycleCollector()
    col.apply(make_batch([(OP_STORE, 1, 10.0, 0, 0, None, 0, 16)], col))
    col.apply(make_batch([(OP_STORE, 1, 12.0, 0, 0, None, 0, 16)], col))
    assert col.copy_rows.tolist() == [True]
    snap = col.snapshot()
    g = gpu_place(snap)
    assert (snap.stored[g], snap.resident[g], snap.resident_hashes[g]) == (2, 2, 1)
    assert snap.resident_tokens[g] == 32
    assert snap.accessed[g] == 0 and snap.restores[g] == 0
    assert snap.histograms["reuse_gap"].counts.sum() == 0

    col.apply(make_batch([(OP_ACCESS, 1, 13.0), (OP_REMOVE, 1, 20.0)], col))
    assert col.copy_rows.tolist() == [False, True]
    snap = col.snapshot()
    assert (snap.resident[g], snap.resident_hashes[g], snap.removed[g, 0]) == (1, 1, 1)
    assert snap.resident_tokens[g] == 16
    assert snap.histograms["reuse_gap"].sums[g] == pytest.approx(3.0)  # 10 -> 13: a copy is no hit
    assert snap.histograms["lifetime"].counts.sum() == 0  # its life goes on
    assert snap.tracked == 1
    block = col.block(1, g)
    assert block is not None and (block.stored_at, block.accesses) == (10.0, 1)

    col.apply(make_batch([(OP_REMOVE, 1, 30.0)], col))
    assert col.copy_rows.tolist() == [False]
    snap = col.snapshot()
    assert (snap.resident[g], snap.resident_hashes[g], snap.removed[g, 0]) == (0, 0, 2)
    assert snap.resident_tokens[g] == 0 and snap.tracked == 0
    assert snap.histograms["lifetime"].counts.sum() == 1
    assert snap.histograms["lifetime"].sums[g] == pytest.approx(20.0)  # from the FIRST store
    assert snap.histograms["idle_before_evict"].sums[g] == pytest.approx(17.0)
    assert snap.histograms["accesses_before_evict"].sums[g] == pytest.approx(1.0)
    assert col.block(1, g) is None
    (stored_at,) = col.eviction_records().stored_at.tolist()
    assert stored_at == 10.0

    col.apply(make_batch([(OP_STORE, 1, 35.0, 0, 0, None, 0, 16)], col))
    snap = col.snapshot()
    assert (snap.stored[g], snap.restores[g], snap.resident[g]) == (3, 1, 1)
    assert snap.histograms["restore_gap"].sums[g] == pytest.approx(5.0)
    assert col.copy_rows.tolist() == [False]


def test_the_same_copies_in_one_batch() -> None:
    """The same history in one batch (so in rounds) gives the same numbers."""
    rows = [
        (OP_STORE, 1, 10.0, 0, 0, None, 0, 16),
        (OP_STORE, 1, 12.0, 0, 0, None, 0, 16),
        (OP_ACCESS, 1, 13.0),
        (OP_REMOVE, 1, 20.0),
        (OP_REMOVE, 1, 30.0),
        (OP_STORE, 1, 35.0, 0, 0, None, 0, 16),
    ]
    col, ref = BlockLifecycleCollector(), LoggedReference()
    col.apply(make_batch(rows, col))
    assert feed_reference(ref, rows) == ["new", "copy", "hit", "uncopy", "end", "restore"]
    assert col.copy_rows.tolist() == [False, True, False, True, False, False]
    assert_same(col, ref)


def test_copies_left_is_authoritative_both_ways() -> None:
    """A removal's copies_left is how many copies the key keeps: more than counted (one
    store, the engine says three remain), fewer (all at once), or none."""
    col = BlockLifecycleCollector()
    col.apply(make_batch([(OP_STORE, 5, 1.0, 0, 0, None, 0, 4)], col))
    col.apply(make_batch([(OP_REMOVE, 5, 2.0, 0, 0, 3)], col))  # one copy known, three left
    snap = col.snapshot()
    g = gpu_place(snap)
    assert (snap.resident[g], snap.resident_hashes[g], snap.removed[g, 0]) == (3, 1, 1)
    assert snap.resident_tokens[g] == 12
    assert col.copy_rows.tolist() == [True]
    assert snap.histograms["lifetime"].counts.sum() == 0
    col.apply(make_batch([(OP_REMOVE, 5, 3.0), (OP_REMOVE, 5, 4.0, 0, 0, 0)], col))
    snap = col.snapshot()  # 3 -> 2 counted down, then the engine says none are left
    assert (snap.resident[g], snap.resident_hashes[g], snap.removed[g, 0]) == (0, 0, 3)
    assert snap.resident_tokens[g] == 0
    assert col.copy_rows.tolist() == [True, False]
    assert snap.histograms["lifetime"].sums[g] == pytest.approx(3.0)

    # Three copies, the engine says all go at once: the key leaves, no count-down.
    stores = [(OP_STORE, 6, 10.0 + i, 0, 0, None, 0, 4) for i in range(3)]
    col.apply(make_batch([*stores, (OP_REMOVE, 6, 20.0, 0, 0, 0)], col))
    snap = col.snapshot()
    assert (snap.resident[g], snap.resident_hashes[g]) == (0, 0)
    assert snap.histograms["lifetime"].counts.sum() == 2
    assert snap.histograms["lifetime"].sums[g] == pytest.approx(3.0 + 10.0)
    assert col.copy_rows.tolist() == [False, True, True, False]
    # A removal of a key not resident says nothing, whatever copies_left claims.
    col.apply(make_batch([(OP_REMOVE, 77, 21.0, 0, 0, 2)], col))
    snap = col.snapshot()
    assert (snap.resident[g], snap.unknown_removals) == (0, 1)


def test_two_groups_with_the_same_hash_are_two_blocks() -> None:
    """One hash in groups 0 and 1 of one medium: two stores (no copy, no access), two places;
    removing it from group 1 leaves group 0's block."""
    col = BlockLifecycleCollector()
    col.apply(make_batch([(OP_STORE, 9, 1.0, 0, 0), (OP_STORE, 9, 1.5, 0, 1)], col))
    assert not col.copy_rows.any()
    snap = col.snapshot()
    g0, g1 = gpu_place(snap, "0"), gpu_place(snap, "1")
    assert g0 != g1 and snap.place_labels(g1) == ("GPU", "1")
    assert snap.stored[g0] == snap.stored[g1] == 1
    assert snap.resident_hashes[g0] == snap.resident_hashes[g1] == 1
    assert int(snap.accessed.sum()) == 0
    col.apply(make_batch([(OP_REMOVE, 9, 2.0, 0, 1)], col))
    snap = col.snapshot()
    assert (snap.resident[g0], snap.resident[g1]) == (1, 0)
    assert snap.per_medium(snap.resident)[snap.media.index("GPU")] == 1
    assert snap.histograms["lifetime"].sums[g1] == pytest.approx(0.5)
    assert snap.histograms["lifetime"].counts[g0].sum() == 0
    assert col.block(9, g0) is not None and col.block(9, g1) is None


def test_hashes_that_differ_only_in_the_top_byte_stay_apart_across_places() -> None:
    """A batch sorts rows by hash with the place mixed into the top byte: H in group 1 and
    H ^ (1 << 56) in group 0 share that mixed key, yet they are two blocks. The access of the
    second (never stored) is unknown, not a hit on the first, and the access of H after it
    is H's hit, applied after H's store."""
    h = 0x5EED_0000_1234
    rows = [
        (OP_STORE, h, 1.0, 0, 1),
        (OP_ACCESS, h ^ 1 << 56, 2.0, 0, 0),
        (OP_ACCESS, h, 3.0, 0, 1),
    ]
    col = BlockLifecycleCollector()
    col.apply(make_batch(rows, col))
    snap = col.snapshot()
    g1 = gpu_place(snap, "1")
    assert snap.accessed[g1] == 1 and int(snap.accessed.sum()) == 1
    assert snap.unknown_accesses == 1
    assert snap.histograms["reuse_gap"].sums[g1] == pytest.approx(2.0)
    assert int(snap.histograms["reuse_gap"].counts.sum()) == 1


def test_clear_removes_every_copy() -> None:
    """AllBlocksCleared removes every physical copy (removed{cleared} counts copies), observes
    each key's life once, and a store after it is a restore."""
    col = BlockLifecycleCollector()
    rows = [
        (OP_STORE, 1, 1.0, 0, 0, None, 0, 8),
        (OP_STORE, 1, 2.0, 0, 0, None, 0, 8),
        (OP_STORE, 1, 3.0, 0, 0, None, 0, 8),
        (OP_STORE, 2, 1.0, 0, 1, None, 1, 8),
        (OP_STORE, 3, 1.0, 1, 0, None, 0, 8),
        (OP_CLEAR, 0, 5.0),
        (OP_STORE, 1, 6.0, 0, 0, None, 0, 8),
    ]
    col.apply(make_batch(rows, col))
    snap = col.snapshot()
    cleared = snap.reasons.index("cleared")
    g0, g1 = gpu_place(snap, "0"), gpu_place(snap, "1")
    cpu = snap.place("CPU")
    assert cpu is not None
    assert (snap.removed[g0, cleared], snap.removed[g1, cleared]) == (3, 1)
    assert snap.removed[cpu, cleared] == 1
    assert int(snap.histograms["lifetime"].counts.sum()) == 3  # one per key
    assert snap.histograms["lifetime"].sums[g0] == pytest.approx(4.0)
    assert (snap.resident[g0], snap.resident[g1], snap.resident[cpu]) == (1, 0, 0)
    assert int(snap.adapter_resident.sum()) == 1
    assert int(snap.resident_tokens.sum()) == 8
    assert snap.restores[g0] == 1 and snap.clears == 1
    assert col.copy_rows.tolist() == [False, True, True, False, False, False, False]


def test_adapters_and_tokens_are_counted() -> None:
    """Stores count under their row's adapter (lora_name, or lora_id when that is all), copies
    and removals under the adapter the block was stored with; tokens per copy."""
    col = BlockLifecycleCollector()
    rows = [
        (OP_STORE, 1, 1.0, 0, 0, None, 1, 16),  # "sql"
        (OP_STORE, 1, 1.5, 0, 0, None, 1, 16),  # a copy
        (OP_STORE, 2, 1.0, 0, 0, None, 2, 5),  # lora_id 7, a partial block
        (OP_STORE, 3, 1.0, 1, 0, None, 0, 16),  # base, on CPU
        (OP_REMOVE, 1, 2.0),  # the removal names no adapter: the block's is used
        (OP_REMOVE, 2, 2.0),
        (OP_STORE, 2, 3.0, 0, 0, None, 2, 5),  # restored for lora_id 7
    ]
    col.apply(make_batch(rows, col))
    snap = col.snapshot()
    gpu, cpu = snap.media.index("GPU"), snap.media.index("CPU")
    base, sql, seven = (snap.adapters.index(a) for a in ("base", "sql", "7"))
    assert snap.adapter_stored[gpu, sql] == 2 and snap.adapter_stored[gpu, seven] == 2
    assert snap.adapter_stored[cpu, base] == 1 and snap.adapter_stored[gpu, base] == 0
    assert snap.adapter_restores[gpu, seven] == 1 and int(snap.adapter_restores.sum()) == 1
    assert snap.adapter_resident[gpu, sql] == 1  # one copy of two left
    assert snap.adapter_resident[gpu, seven] == 1 and snap.adapter_resident[cpu, base] == 1
    assert int(snap.adapter_resident.sum()) == int(snap.resident.sum()) == 3
    g = gpu_place(snap)
    assert snap.resident_tokens[g] == 16 + 5
    assert snap.per_medium(snap.resident_tokens)[cpu] == 16
    ref = LoggedReference()
    feed_reference(ref, rows)
    assert_same(col, ref)


def test_clear_removes_everything_as_cleared_and_restores_after() -> None:
    col = BlockLifecycleCollector()
    rows = [(OP_STORE, h, 1.0, h % 2) for h in range(10)]
    rows += [(OP_CLEAR, 0, 2.0, 0), (OP_STORE, 3, 4.0, 1)]
    col.apply(make_batch(rows, col))
    snap = col.snapshot()
    cleared = snap.reasons.index("cleared")
    assert int(snap.removed[:, cleared].sum()) == 10
    assert int(snap.resident.sum()) == 1
    assert int(snap.restores.sum()) == 1
    assert snap.clears == 1


def test_same_hash_on_two_media_is_two_residencies() -> None:
    col = BlockLifecycleCollector()
    col.apply(make_batch([(OP_STORE, 7, 1.0, 0), (OP_STORE, 7, 1.0, 1)], col))
    snap = col.snapshot()
    assert int(snap.resident.sum()) == 2
    assert int(snap.accessed.sum()) == 0


def test_removed_memory_bounds_restores() -> None:
    col = BlockLifecycleCollector(CollectorConfig(removed_memory=3))
    rows = [(OP_STORE, h, 1.0, 0) for h in range(6)]
    rows += [(OP_REMOVE, h, 2.0, 0) for h in range(6)]
    col.apply(make_batch(rows, col))
    col.apply(make_batch([(OP_STORE, h, 3.0, 0) for h in range(6)], col))
    # only the last three removed hashes are remembered
    assert int(col.snapshot().restores.sum()) == 3


def test_table_full_counts_untracked_stores_and_keeps_counters_exact() -> None:
    col = BlockLifecycleCollector(CollectorConfig(max_tracked_blocks=4))
    col.apply(make_batch([(OP_STORE, h, 1.0, 0) for h in range(10)], col))
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


@pytest.mark.parametrize("hit_reports", [True, False])
@settings(max_examples=300, deadline=None)
@given(rows=rows_strategy, cuts=st.lists(st.integers(0, 120), max_size=6))
def test_random_streams_match_the_reference(
    hit_reports: bool, rows: list[tuple[int, int, int, int]], cuts: list[int]
) -> None:
    ts = 0.0
    timed: list[tuple[int, int, float, int]] = []
    for op, h, step, m in rows:
        ts += step * 0.37
        timed.append((op, h * 0x9E3779B97F4A7C15 % 2**64, ts, m))
    col = BlockLifecycleCollector(CollectorConfig(hit_reports=hit_reports))
    ref = LoggedReference(hit_reports=hit_reports)
    bounds = sorted({0, len(timed), *(c for c in cuts if c <= len(timed))})
    for start, stop in pairwise(bounds):
        col.apply(make_batch(timed[start:stop], col))
    feed_reference(ref, timed)
    assert_same(col, ref)


# Few blocks, most rows on the first ones, so that keys get copies, removals, restores and runs
# of hits between clears. The last two hashes share the low 56 bits with the first: only the
# place (mixed into the top byte of a batch's sort key) tells them apart from it elsewhere.
H0 = 0x5EED_0000_1234
HASHES = (H0, H0, H0, 0x1F00_0000_0000_0042, 0x1F00_0000_0000_0042, 1 << 56 | H0, 2 << 56 | H0)
place_rows = st.lists(
    st.tuples(
        st.sampled_from([OP_STORE] * 6 + [OP_REMOVE] * 4 + [OP_ACCESS] * 3 + [OP_CLEAR]),
        st.sampled_from(HASHES),
        st.sampled_from([0, 0, 1, 2]),  # time step: equal times are frequent
        st.sampled_from([0, 0, 1]),  # medium
        st.sampled_from([0, 0, 1]),  # group
        st.one_of(st.none(), st.none(), st.integers(0, 3)),  # copies_left
        st.integers(0, len(ADAPTERS) - 1),
        st.integers(1, 16),  # tokens
        st.integers(0, len(REASONS) - 1),
    ),
    max_size=150,
)


@pytest.mark.parametrize("hit_reports", [False, True])
@settings(max_examples=400, deadline=None)
@given(rows=place_rows, sizes=st.lists(st.integers(1, 40), max_size=12))
def test_copies_groups_and_adapters_match_the_reference(
    hit_reports: bool, rows: list[tuple[Any, ...]], sizes: list[int]
) -> None:
    """Random interleavings of stores, removals (copies_left sent or not), accesses and clears
    over few hashes, two media, two groups and three adapters, applied in batches of random
    sizes (so rounds, runs of hits and clears inside batches all occur): every per-place
    counter, the adapter arrays, every histogram, the eviction records and each batch's
    copy_rows equal the reference's."""
    ts = 0.0
    timed = []
    for op, h, step, *rest in rows:
        ts += step * 0.37
        timed.append(Row(op, h, ts, *rest))
    col = BlockLifecycleCollector(CollectorConfig(hit_reports=hit_reports))
    ref = LoggedReference(hit_reports=hit_reports)
    start = 0
    for size in [*sizes, len(timed)]:
        piece = timed[start : start + size]
        if not piece:
            break
        col.apply(make_batch(piece, col))
        outcomes = feed_reference(ref, piece)
        assert col.copy_rows.tolist() == [o in ("copy", "uncopy") for o in outcomes]
        start += size
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
    snap = col.snapshot()
    place = {gpu: snap.place("GPU"), cpu: snap.place("CPU")}
    depths = {
        (h, m): col.block(h, place[m]).prefix_depth  # type: ignore[arg-type, union-attr]
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
    assert reported is not None and len(reported) == len(cuts)
    names = ("stored", "evicted", "restores", "resident", "clears")
    expected = []
    start = 0
    for cut in cuts:
        pieces.collector.apply(batch.take(slice(start, cut)))
        expected.append(pieces.collector.totals())
        start = cut
    for k, want in enumerate(expected):
        assert [int(getattr(reported, name)[k]) for name in names] == [
            getattr(want, name) for name in names
        ]
        assert reported.lifetime_counts[k].tolist() == want.lifetime_counts.tolist()
