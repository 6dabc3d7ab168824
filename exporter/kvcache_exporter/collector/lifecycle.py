"""Block-lifecycle state of one engine, updated a whole :class:`EventBatch` at a time.

Counters and residency are exact over every block hash. Lifecycle histograms (lifetime, idle
before evict, reuse gap, restore gap, accesses before evict) come from the spatially sampled
hashes: a hash is tracked iff a hash of it falls under the sample ratio, so a tracked block is
followed through its whole life. Durations are differences of engine timestamps.

A block is a hash in a place, a (medium, KV-cache group) pair (see :mod:`.places`); every
counter is kept per place. Engines count physical blocks: vLLM can hold two copies of one hash
and removes each, so a store of a resident key is one more copy (unless the source says its
stores of resident keys are hit reports, ``hit_reports``), a key stays resident, its lifecycle
going on, until its last copy is removed, and a removal's ``copies_left``, when the engine
sends it, is authoritative. Resident blocks are physical; resident hashes are distinct keys.

Operations on different keys commute, so a batch is applied in rounds: round *r* holds the
*r*-th occurrence of every key, in stream order, and each round is one vectorized pass.
``AllBlocksCleared`` rows split the batch, since they touch every key.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol.batch import (
    NO_COPY_COUNT,
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    LabelTable,
)
from ..protocol.decode import (
    DEFAULT_MAX_ADAPTERS,
    MAX_ADAPTERS,
    new_adapter_table,
    new_group_table,
)
from .eviction_log import EvictionLog, EvictionRecords
from .histogram import (
    ACCESS_COUNT_BUCKETS,
    PREFIX_DEPTH_BUCKETS,
    RESIDENCY_BUCKETS,
    HistogramSet,
    HistogramSnapshot,
    validate_buckets,
)
from .places import PlaceTable
from .prefix import resolve_depths
from .table import GHOST, RESIDENT, BlockTable

_SAMPLE_MUL1: Final = np.uint64(0xBF58476D1CE4E5B9)
_SAMPLE_MUL2: Final = np.uint64(0x94D049BB133111EB)
_U64 = npt.NDArray[np.uint64]
_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]
_I64 = npt.NDArray[np.int64]

REASON_CLEARED: Final = "cleared"
REASON_RESTART: Final = "engine_restart"
DEFAULT_REASONS: Final = ("evicted", REASON_CLEARED, REASON_RESTART)


def _block_order(seg: EventBatch) -> tuple[npt.NDArray[np.int64], _BOOL]:
    """Rows sorted by block (hash, place), stream order within a block, and for each pair of
    neighbours in that order whether the second is another block.

    One sort of the hash with the place mixed into its top byte; hashes that differ only in
    their top byte can share such a key across places, and then both columns are sorted.
    """
    key = seg.block_hash ^ (seg.medium.astype(np.uint64) << np.uint64(56))
    order: npt.NDArray[np.int64] = np.argsort(key, kind="stable")
    sorted_key = key[order]
    new_block: _BOOL = sorted_key[1:] != sorted_key[:-1]
    same = np.flatnonzero(~new_block)  # one mixed key: the same block unless the hashes differ
    if same.size and (seg.block_hash[order[same + 1]] != seg.block_hash[order[same]]).any():
        order = np.lexsort((seg.medium, seg.block_hash))  # stable: stream order kept
        new_block = (seg.block_hash[order[1:]] != seg.block_hash[order[:-1]]) | (
            seg.medium[order[1:]] != seg.medium[order[:-1]]
        )
    return order, new_block


def sample_hash(keys: _U64) -> _U64:
    """splitmix64's finalizer: a second hash, independent of the table's slot hash."""
    z = keys ^ (keys >> np.uint64(30))
    z = z * _SAMPLE_MUL1
    z = z ^ (z >> np.uint64(27))
    z = z * _SAMPLE_MUL2
    result: _U64 = z ^ (z >> np.uint64(31))
    return result


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """How much the collector tracks and how it buckets what it measures."""

    sample_ratio: float = 1.0
    max_tracked_blocks: int = 4_000_000
    removed_memory: int = 1_000_000
    duration_buckets: tuple[float, ...] = RESIDENCY_BUCKETS
    access_buckets: tuple[float, ...] = ACCESS_COUNT_BUCKETS
    depth_buckets: tuple[float, ...] = PREFIX_DEPTH_BUCKETS
    eviction_log_size: int = 10_000
    hit_reports: bool = False  # stores of resident keys are hits (vLLM's report mode "full")
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # LoRA adapters labelled by name; the rest "other"

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample ratio must be in (0, 1], got {self.sample_ratio}")
        if self.max_tracked_blocks < 1:
            raise ValueError("max tracked blocks must be at least 1")
        if self.removed_memory < 0:
            raise ValueError("removed-block memory cannot be negative")
        if self.eviction_log_size < 0:
            raise ValueError("eviction log size cannot be negative")
        if not 1 <= self.max_adapters <= MAX_ADAPTERS:
            raise ValueError(f"max adapters must be in 1..{MAX_ADAPTERS}")
        validate_buckets(self.duration_buckets, "duration buckets")
        validate_buckets(self.access_buckets, "access-count buckets")
        validate_buckets(self.depth_buckets, "prefix-depth buckets")


@dataclass(frozen=True, slots=True)
class CollectorSnapshot:
    """A consistent copy of one engine's numbers, taken under the collector's lock."""

    media: tuple[str, ...]
    reasons: tuple[str, ...]
    groups: tuple[str, ...]
    adapters: tuple[str, ...]
    places: tuple[tuple[int, int], ...]  # per place id: (medium id, group id)
    stored: npt.NDArray[np.uint64]  # [places]
    accessed: npt.NDArray[np.uint64]
    restores: npt.NDArray[np.uint64]
    resident: npt.NDArray[np.int64]  # physical blocks
    resident_hashes: npt.NDArray[np.int64]  # distinct keys
    resident_tokens: npt.NDArray[np.int64]
    tracked_per_place: npt.NDArray[np.int64]
    removed: npt.NDArray[np.uint64]  # [places, reasons]
    adapter_stored: npt.NDArray[np.uint64]  # [media, adapters]
    adapter_restores: npt.NDArray[np.uint64]
    adapter_resident: npt.NDArray[np.int64]
    unknown_removals: int
    unknown_accesses: int
    untracked_stores: int
    clears: int
    tracked: int
    table_bytes: int
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)

    def place(self, medium: str, group: str = "0") -> int | None:
        """The place id of a (medium, group) pair, or None when the stream never had it."""
        if medium not in self.media or group not in self.groups:
            return None
        pair = (self.media.index(medium), self.groups.index(group))
        return self.places.index(pair) if pair in self.places else None

    def place_labels(self, place_id: int) -> tuple[str, str]:
        """(medium, group) label values of a place."""
        medium_id, group_id = self.places[place_id]
        return self.media[medium_id], self.groups[group_id]

    def per_medium(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A per-place array summed over groups into rows per medium id."""
        medium = np.array([m for m, _ in self.places], np.int64)
        out = np.zeros((len(self.media), *values.shape[1:]), values.dtype)
        np.add.at(out, medium, values[: len(self.places)])
        return out


class _Outcome:
    """What each row of a batch did to the totals, for :meth:`apply`'s ``cuts``."""

    def __init__(self, rows: int, before: CollectorTotals) -> None:
        self.before = before
        self.stored = np.zeros(rows, np.int64)
        self.restored = np.zeros(rows, np.int64)
        self.resident = np.zeros(rows, np.int64)
        self._life_rows: list[npt.NDArray[np.int64]] = []
        self._life_buckets: list[npt.NDArray[np.int64]] = []

    def add_lifetimes(self, rows: npt.NDArray[np.int64], buckets: npt.NDArray[np.int64]) -> None:
        self._life_rows.append(rows)
        self._life_buckets.append(buckets)

    def totals_at(
        self,
        cuts: Sequence[int],
        batch: EventBatch,
        evicting: npt.NDArray[np.bool_],
        lifetime: HistogramSet,
    ) -> list[CollectorTotals]:
        cut = np.asarray(cuts, np.int64)

        def before_cuts(per_row: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            running = np.concatenate(([0], np.cumsum(per_row)))
            return running[cut]

        evicted = (batch.op == OP_REMOVE) & evicting[batch.reason]
        width = len(lifetime.bounds) + 1
        life = np.zeros((cut.size, width), np.uint64)
        if self._life_rows:
            rows = np.concatenate(self._life_rows)
            buckets = np.concatenate(self._life_buckets)
            first_cut = np.searchsorted(cut, rows, side="right")  # cuts at or before: excluded
            inside = first_cut < cut.size
            counts = np.bincount(
                first_cut[inside] * width + buckets[inside], minlength=cut.size * width
            ).reshape(cut.size, width)
            life = np.cumsum(counts, axis=0).astype(np.uint64)
        stored = before_cuts(self.stored)
        restored = before_cuts(self.restored)
        resident = before_cuts(self.resident)
        evictions = before_cuts(evicted.astype(np.int64))
        clears = before_cuts((batch.op == OP_CLEAR).astype(np.int64))
        b = self.before
        return [
            CollectorTotals(
                stored=b.stored + int(stored[k]),
                evicted=b.evicted + int(evictions[k]),
                restores=b.restores + int(restored[k]),
                resident=b.resident + int(resident[k]),
                clears=b.clears + int(clears[k]),
                lifetime_bounds=b.lifetime_bounds,
                lifetime_counts=b.lifetime_counts + life[k],
            )
            for k in range(cut.size)
        ]


@dataclass(slots=True)
class Runs:
    """Per row of a segment: hits collapsed into it (``extra``), the time of the last one,
    the row heading each row's run, whether a head left its block resident, and the block's
    last access once the row is applied (``access_ts``: the row's time, but a copy's store is
    no access, so a head that only added a copy leaves the block's earlier last access)."""

    extra: npt.NDArray[np.int64]
    last_ts: _F64
    head: npt.NDArray[np.int64]
    resident_after: _BOOL
    access_ts: _F64

    @staticmethod
    def none(n: int) -> Runs:
        return Runs(
            extra=np.zeros(n, np.int64),
            last_ts=np.zeros(n),
            head=np.arange(n),
            resident_after=np.zeros(n, bool),
            access_ts=np.zeros(n),
        )


@dataclass(frozen=True, slots=True)
class CollectorTotals:
    """An engine's cumulative counts, all media together (see :meth:`totals`)."""

    stored: int
    evicted: int  # removals other than clears and restarts
    restores: int
    resident: int
    clears: int
    lifetime_bounds: tuple[float, ...]
    lifetime_counts: npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class ResidentProfile:
    """Per resident tracked block: accesses since its store, prefix depth, medium id."""

    accesses: npt.NDArray[np.uint32]
    depth: npt.NDArray[np.uint16]
    medium: npt.NDArray[np.uint8]  # the place id (see CollectorSnapshot.places)


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One resident block as the collector holds it (engine-clock times)."""

    stored_at: float
    last_access_at: float
    accesses: int
    prefix_depth: int


HISTOGRAMS: Final = ("lifetime", "idle_before_evict", "reuse_gap", "restore_gap")


class BlockLifecycleCollector:
    """Exact counters and sampled lifecycle histograms for one engine's block stream."""

    def __init__(
        self,
        config: CollectorConfig | None = None,
        media: LabelTable | None = None,
        reasons: LabelTable | None = None,
        groups: LabelTable | None = None,
        adapters: LabelTable | None = None,
    ) -> None:
        self.config = config or CollectorConfig()
        self.media = media or LabelTable("unknown")
        self.reasons = reasons or LabelTable("evicted", seed=DEFAULT_REASONS)
        self.groups = groups or new_group_table()
        self.adapters = adapters or new_adapter_table(self.config.max_adapters)
        self.places = PlaceTable(self.media, self.groups)
        self.lock = threading.Lock()
        self._threshold = (
            None
            if self.config.sample_ratio >= 1.0
            else np.uint64(min(int(self.config.sample_ratio * 2.0**64), 2**64 - 1))
        )
        self._reset_state()

    def _reset_state(self) -> None:
        m, r = self.places.capacity, self.reasons.capacity
        am = (self.media.capacity, self.adapters.capacity)
        self.table = BlockTable()
        self.stored = np.zeros(m, np.uint64)
        self.accessed = np.zeros(m, np.uint64)
        self.restores = np.zeros(m, np.uint64)
        self.resident = np.zeros(m, np.int64)
        self.resident_hashes = np.zeros(m, np.int64)
        self.resident_tokens = np.zeros(m, np.int64)
        self.tracked_per_place = np.zeros(m, np.int64)
        self.removed = np.zeros((m, r), np.uint64)
        self.adapter_stored = np.zeros(am, np.uint64)
        self.adapter_restores = np.zeros(am, np.uint64)
        self.adapter_resident = np.zeros(am, np.int64)
        self.unknown_removals = 0
        self.unknown_accesses = 0
        self.untracked_stores = 0
        self.clears = 0
        self.hist = {name: HistogramSet(self.config.duration_buckets, m) for name in HISTOGRAMS}
        self.accesses_before_evict = HistogramSet(self.config.access_buckets, m)
        self.prefix_depth = HistogramSet(self.config.depth_buckets, m)
        self.evictions = EvictionLog(self.config.eviction_log_size)
        self._ghosts: deque[tuple[_U64, npt.NDArray[np.uint8], _F64]] = deque()
        self._ghost_count = 0
        # A batch's removals as rounds produce them, with their rows: settled in stream order.
        self._pending_ghosts: list[tuple[npt.NDArray[np.int64], _U64, npt.NDArray[np.uint8], _F64]]
        self._pending_ghosts = []
        self._pending_evictions: list[tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]]
        self._pending_evictions = []
        self._outcome: _Outcome | None = None
        # Rows of the last batch that only changed a key's copy count (see copy_rows).
        self._copy_positions: list[npt.NDArray[np.int64]] = []
        self.copy_rows = np.zeros(0, bool)

    def place_labels(self) -> tuple[tuple[str, str], ...]:
        """(medium, group) label values of every place, by place id."""
        with self.lock:
            return tuple(
                (self.media.names[m], self.groups.names[g]) for m, g in self.places.pairs()
            )

    def resident_keys_by_medium(self) -> npt.NDArray[np.int64]:
        """Resident keys (distinct hashes, all groups) per medium id: what a cache of keys
        per medium, as the what-if model sees it, holds now."""
        n = len(self.places)
        return np.bincount(
            self.places.medium[:n], weights=self.resident_hashes[:n], minlength=self.media.capacity
        ).astype(np.int64)

    @property
    def tracked(self) -> int:
        """Resident keys whose lifecycle is tracked (sampled), all places together."""
        return int(self.tracked_per_place.sum())

    # --- applying batches ------------------------------------------------------------------
    def apply(self, batch: EventBatch, cuts: Sequence[int] = ()) -> list[CollectorTotals]:
        """Apply one batch of block operations, in stream order.

        For each row index in ``cuts`` (ascending), returns the totals as they stood just
        before that row: what a sampler would have read had the batch been split there, at
        the cost of a cumulative sum instead of an apply per piece.
        """
        if not len(batch):
            self.copy_rows = np.zeros(0, bool)
            return [self._totals() for _ in cuts]
        with self.lock:
            # From here on a row's ``medium`` column holds its place id (medium and group).
            batch = replace(batch, medium=self.places.ids(batch.medium, batch.group))
            self._outcome = _Outcome(len(batch), self._totals()) if cuts else None
            depth = resolve_depths(batch, self._known_depth)
            position = np.arange(len(batch))
            clears = np.flatnonzero(batch.op == OP_CLEAR)
            start = 0
            for row in clears.tolist():
                rows = slice(start, row)
                self._apply_segment(batch.take(rows), depth[rows], position[rows])
                self._clear(float(batch.ts[row]), self.reasons.id_of(REASON_CLEARED), row)
                self.clears += 1
                start = row + 1
            rows = slice(start, len(batch))
            self._apply_segment(batch.take(rows), depth[rows], position[rows])
            self._settle_removals()
            self.copy_rows = np.zeros(len(batch), bool)
            for rows_done in self._copy_positions:
                self.copy_rows[rows_done] = True
            self._copy_positions = []
            outcome, self._outcome = self._outcome, None
            if outcome is None:
                return []
            return outcome.totals_at(cuts, batch, self._evicting_reasons(), self.hist["lifetime"])

    def _evicting_reasons(self) -> npt.NDArray[np.bool_]:
        """Per reason id: does a removal for it count as an eviction (not a clear/restart)?"""
        evicting = np.ones(self.reasons.capacity, bool)
        evicting[self.reasons.id_of(REASON_CLEARED)] = False
        evicting[self.reasons.id_of(REASON_RESTART)] = False
        return evicting

    def clear(self, ts: float, reason: str) -> None:
        """Remove every resident block (an engine reset or restart), counted under ``reason``."""
        with self.lock:
            self._clear(ts, self.reasons.id_of(reason), 0)
            self._settle_removals()

    def _sampled(self, keys: _U64) -> _BOOL:
        if self._threshold is None:
            return np.ones(keys.shape[0], bool)
        return sample_hash(keys) < self._threshold

    def _known_depth(self, hashes: _U64) -> npt.NDArray[np.int64]:
        """The prefix depth the table holds for each hash, in whatever place (0: none)."""
        best = np.zeros(hashes.shape[0], np.int64)
        for place_id in range(len(self.places)):
            slots = self.table.find(hashes, np.full(hashes.shape[0], place_id, np.uint8))
            found = slots >= 0
            best[found] = np.maximum(best[found], self.table.depth[slots[found]])
        return best

    def _apply_segment(
        self, seg: EventBatch, depth: npt.NDArray[np.int64], position: npt.NDArray[np.int64]
    ) -> None:
        """Apply rows with no clear among them.

        Runs of hits on one block (an access, or a store of a block a store just made
        resident, following a store or an access of it) collapse into their first row, which
        carries the run's length and last time: a hot block hit by every request of a batch
        costs one round, not one per hit. The other rows go in rounds of distinct keys.
        """
        n = len(seg)
        if not n:
            return
        order, new_block = _block_order(seg)
        starts = np.empty(n, bool)
        starts[0] = True
        starts[1:] = new_block
        if starts.all():
            self._apply_round(seg, depth, position, Runs.none(n), slice(None))
            return
        # previous[i]: the row before row i with the same key (-1 for a key's first row).
        previous = np.full(n, -1, np.int64)
        previous[order[1:][~starts[1:]]] = order[:-1][~starts[1:]]
        op = seg.op
        prev_op = np.where(previous >= 0, op[np.maximum(previous, 0)], 255)
        follower = (previous >= 0) & (
            ((op == OP_ACCESS) & ((prev_op == OP_ACCESS) | (prev_op == OP_STORE)))
            # A store after a store is a hit only where stores of resident keys report hits;
            # else it is one more physical copy, applied in its own round.
            | ((op == OP_STORE) & (prev_op == OP_STORE) & self.config.hit_reports)
        )
        runs = Runs.none(n)
        if follower.any():
            runs = self._collapse(seg, order, follower, previous)
        kept = np.flatnonzero(~follower)
        kept_sorted = order[~follower[order]]
        kept_starts = np.empty(kept_sorted.size, bool)
        kept_starts[0] = True
        block = np.empty(n, np.int64)  # per row: its block's rank in sorted order
        block[order] = np.cumsum(starts)
        np.not_equal(block[kept_sorted[1:]], block[kept_sorted[:-1]], out=kept_starts[1:])
        index = np.arange(kept_sorted.size)
        group_start = np.maximum.accumulate(np.where(kept_starts, index, 0))
        rank = np.empty(n, np.int64)
        rank[kept_sorted] = index - group_start
        for r in range(int(rank[kept].max()) + 1 if kept.size else 0):
            rows = kept[rank[kept] == r]
            self._apply_round(seg.take(rows), depth[rows], position[rows], runs, rows)
        self._apply_followers(seg, follower, previous, runs, position)

    def _collapse(
        self,
        seg: EventBatch,
        order: npt.NDArray[np.int64],
        follower: _BOOL,
        previous: npt.NDArray[np.int64],
    ) -> Runs:
        """Each run's head: how many hits follow it and when the last one was."""
        n = len(seg)
        in_order = np.arange(n)[order]  # rows in key order; a run is contiguous there
        is_head_sorted = ~follower[in_order]
        head_sorted = np.maximum.accumulate(np.where(is_head_sorted, np.arange(n), 0))
        head = np.empty(n, np.int64)
        head[in_order] = in_order[head_sorted]
        followers = np.flatnonzero(follower)
        extra = np.bincount(head[followers], minlength=n)
        last_ts = seg.ts.copy()
        np.maximum.at(last_ts, head[followers], seg.ts[followers])
        return Runs(
            extra=extra,
            last_ts=last_ts,
            head=head,
            resident_after=np.zeros(n, bool),
            access_ts=seg.ts.copy(),
        )

    def _apply_followers(
        self,
        seg: EventBatch,
        follower: _BOOL,
        previous: npt.NDArray[np.int64],
        runs: Runs,
        position: npt.NDArray[np.int64],
    ) -> None:
        """Count the collapsed hits, now that each run's head has said whether it hit."""
        rows = np.flatnonzero(follower)
        if not rows.size:
            return
        m = self.places.capacity
        med = seg.medium[rows]
        hit = runs.resident_after[runs.head[rows]]
        if hit.any():
            self.accessed += np.bincount(med[hit], minlength=m).astype(np.uint64)
            gaps = seg.ts[rows[hit]] - runs.access_ts[previous[rows[hit]]]
            sampled = self._sampled(seg.block_hash[rows[hit]])
            self.hist["reuse_gap"].observe(med[hit][sampled], gaps[sampled])
        missed = ~hit
        if missed.any():
            # A run after a miss: accesses of a block not resident; stores only when the table
            # was full for its head, so they are counted as untracked like it.
            is_store = seg.op[rows[missed]] == OP_STORE
            self.unknown_accesses += int(np.count_nonzero(~is_store))
            self.untracked_stores += int(np.count_nonzero(is_store))
            self.stored += np.bincount(med[missed][is_store], minlength=m).astype(np.uint64)
            if self._outcome is not None:
                self._outcome.stored[position[rows[missed][is_store]]] += 1

    def _apply_round(
        self,
        rnd: EventBatch,
        depth: npt.NDArray[np.int64],
        position: npt.NDArray[np.int64],
        runs: Runs,
        rows_in_segment: slice | npt.NDArray[np.int64],
    ) -> None:
        """Apply rows whose keys are all distinct: one vectorized pass. ``runs`` is the
        segment's; ``rows_in_segment`` says which of its rows these are."""
        op, keys, ts, med = rnd.op, rnd.block_hash, rnd.ts, rnd.medium
        table = self.table
        m = self.places.capacity
        is_store = op == OP_STORE
        table.reserve(int(np.count_nonzero(is_store)))
        slot = table.find(keys, med)
        state = table.state[np.where(slot >= 0, slot, 0)]
        state[slot < 0] = 0
        resident = state == RESIDENT
        sampled = self._sampled(keys)
        resident_after = resident & (op != OP_REMOVE)

        # Accesses: reported hits, and stores of resident keys where those report hits.
        is_access = op == OP_ACCESS
        hit = resident & (is_access | (is_store & self.config.hit_reports))
        if hit.any():
            s, t = slot[hit], ts[hit]
            previous = table.t_access[s]
            obs = sampled[hit]
            self.hist["reuse_gap"].observe(med[hit][obs], (t - previous)[obs])
            table.t_access[s] = t
            table.accesses[s] += np.uint32(1)
            self.accessed += np.bincount(med[hit], minlength=m).astype(np.uint64)
        self.unknown_accesses += int(np.count_nonzero(is_access & ~resident))

        copy = resident & is_store & (not self.config.hit_reports)
        if copy.any():
            # A copy is no access: hits collapsed after it measure from the block's last one.
            runs.access_ts[np.arange(runs.extra.size)[rows_in_segment][copy]] = table.t_access[
                slot[copy]
            ]
            self._add_copies(slot[copy], med[copy], position[copy])

        is_remove = op == OP_REMOVE
        if is_remove.any():
            removing = resident & is_remove
            copies = table.copies[np.where(removing, slot, 0)].astype(np.int64)
            told = rnd.copies_left != NO_COPY_COUNT
            # At most what the u16 copies column holds, so the counters move as it does.
            left = np.where(told, np.minimum(rnd.copies_left, 65535), copies - 1)
            last = removing & (left <= 0)
            kept = removing & ~last
            if kept.any():  # one copy of several goes: the key stays, its lifecycle goes on
                self._drop_copies(slot[kept], med[kept], copies[kept] - left[kept])
                table.copies[slot[kept]] = left[kept]
                self._copy_positions.append(position[kept])
                resident_after[kept] = True
            if last.any():
                self._remove(slot, last, rnd, sampled, position, copies[last])
            self.unknown_removals += int(np.count_nonzero(is_remove & ~resident))
            self.removed += (
                np.bincount(
                    med[is_remove].astype(np.int64) * self.reasons.capacity + rnd.reason[is_remove],
                    minlength=m * self.reasons.capacity,
                )
                .reshape(m, self.reasons.capacity)
                .astype(np.uint64)
            )

        restore = is_store & (state == GHOST)
        if restore.any():
            s, t = slot[restore], ts[restore]
            obs = sampled[restore]
            self.hist["restore_gap"].observe(med[restore][obs], (t - table.t_store[s])[obs])
            table.state[s] = RESIDENT
            self._start_life(s, t, rnd, restore)
            self.restores += np.bincount(med[restore], minlength=m).astype(np.uint64)
            self._count_adapters(self.adapter_restores, med[restore], rnd.adapter[restore])
            self._count_stored(s, med[restore], obs)
            resident_after[restore] = True
            if self._outcome is not None:
                self._outcome.stored[position[restore]] += 1
                self._outcome.restored[position[restore]] += 1
                self._outcome.resident[position[restore]] += 1
        started_rows = [np.flatnonzero(restore)]

        new = is_store & (slot < 0)
        if new.any():
            rows = np.flatnonzero(new)
            room = self.config.max_tracked_blocks - int(self.resident_hashes.sum())
            if self._outcome is not None:
                self._outcome.stored[position[rows]] += 1
                self._outcome.resident[position[rows[: max(room, 0)]]] += 1
            if rows.size > room:
                # Full: keep what fits, count the rest (stored_total stays exact).
                untracked = rows[max(room, 0) :]
                self.untracked_stores += int(untracked.size)
                self.stored += np.bincount(med[untracked], minlength=m).astype(np.uint64)
                self._count_adapters(self.adapter_stored, med[untracked], rnd.adapter[untracked])
                rows = rows[: max(room, 0)]
            s = table.insert(keys[rows], med[rows], RESIDENT)
            mask = np.zeros(len(rnd), bool)
            mask[rows] = True
            self._start_life(s, ts[rows], rnd, mask)
            self._count_stored(s, med[rows], sampled[rows])
            started_rows.append(rows)
            resident_after[rows] = True
        if rnd.chain is not None:
            rows = np.concatenate(started_rows)
            row_depth = depth[rows]
            table.depth[table.find(keys[rows], med[rows])] = np.minimum(row_depth, 65535)
            observed = (row_depth > 0) & sampled[rows]
            self.prefix_depth.observe(med[rows][observed], row_depth[observed].astype(np.float64))

        # Collapsed hits that follow these rows: count them on the block, before any later
        # row of the same key (in a later round) reads its access count or last access.
        runs.resident_after[rows_in_segment] = resident_after
        extra = runs.extra[rows_in_segment]
        extended = resident_after & (extra > 0)
        if extended.any():
            s = table.find(keys[extended], med[extended])
            table.accesses[s] += extra[extended].astype(np.uint32)
            table.t_access[s] = runs.last_ts[rows_in_segment][extended]

    def _start_life(
        self, slots: npt.NDArray[np.int64], ts: _F64, rnd: EventBatch, rows: _BOOL
    ) -> None:
        """A key becomes resident with one copy, stored by the rows ``rows`` of ``rnd``."""
        table = self.table
        table.t_store[slots] = ts
        table.t_access[slots] = ts
        table.accesses[slots] = 0
        table.depth[slots] = 0
        table.copies[slots] = 1
        table.tokens[slots] = np.minimum(rnd.tokens[rows], 65535)
        table.adapter[slots] = rnd.adapter[rows]

    def _count_stored(
        self, slots: npt.NDArray[np.int64], med: npt.NDArray[np.uint8], sampled: _BOOL
    ) -> None:
        """Keys at ``slots`` (in places ``med``) just became resident with one copy each."""
        m = self.places.capacity
        counts = np.bincount(med, minlength=m)
        self.stored += counts.astype(np.uint64)
        self.resident += counts
        self.resident_hashes += counts
        self.resident_tokens += np.bincount(
            med, weights=self.table.tokens[slots], minlength=m
        ).astype(np.int64)
        self.tracked_per_place += np.bincount(med[sampled], minlength=m)
        adapters = self.table.adapter[slots]
        self._count_adapters(self.adapter_stored, med, adapters)
        self._count_adapters(self.adapter_resident, med, adapters)

    def _add_copies(
        self, slots: npt.NDArray[np.int64], med: npt.NDArray[np.uint8], position: _I64
    ) -> None:
        """Stores of resident keys: one more physical copy each; the key's life goes on."""
        table = self.table
        m = self.places.capacity
        table.copies[slots] = np.minimum(table.copies[slots].astype(np.int64) + 1, 65535)
        counts = np.bincount(med, minlength=m)
        self.stored += counts.astype(np.uint64)
        self.resident += counts
        self.resident_tokens += np.bincount(med, weights=table.tokens[slots], minlength=m).astype(
            np.int64
        )
        self._count_adapters(self.adapter_stored, med, table.adapter[slots])
        self._count_adapters(self.adapter_resident, med, table.adapter[slots])
        self._copy_positions.append(position)
        if self._outcome is not None:
            self._outcome.stored[position] += 1

    def _drop_copies(
        self, slots: npt.NDArray[np.int64], med: npt.NDArray[np.uint8], count: _I64
    ) -> None:
        """``count`` physical copies of each resident key at ``slots`` are gone (fewer than
        all: the engine says, or we count, that some remain)."""
        m = self.places.capacity
        tokens = self.table.tokens[slots].astype(np.int64) * count
        self.resident -= np.bincount(med, weights=count, minlength=m).astype(np.int64)
        self.resident_tokens -= np.bincount(med, weights=tokens, minlength=m).astype(np.int64)
        self._count_adapters(self.adapter_resident, med, self.table.adapter[slots], -count)

    def _count_adapters(
        self,
        target: npt.NDArray[Any],
        med: npt.NDArray[np.uint8],
        adapters: npt.NDArray[np.uint8],
        weights: _I64 | None = None,
    ) -> None:
        """Add per (medium, adapter): one per row, or ``weights``; ``med`` holds place ids."""
        a = self.adapters.capacity
        medium = self.places.medium[med].astype(np.int64)
        counts = np.bincount(medium * a + adapters, weights=weights, minlength=target.size).reshape(
            target.shape
        )
        target += counts.astype(target.dtype)

    def _remove(
        self,
        slot: npt.NDArray[np.int64],
        mask: _BOOL,
        rnd: EventBatch,
        sampled: _BOOL,
        position: npt.NDArray[np.int64],
        copies: _I64,
    ) -> None:
        """Resident keys at ``slot[mask]`` lose their last copies (``copies`` each):
        observe, then ghost them."""
        s, t, md, obs = slot[mask], rnd.ts[mask], rnd.medium[mask], sampled[mask]
        self._observe_removal(s, t, md, obs, rnd.reason[mask], position[mask])
        self._drop_copies(s, md, copies)
        m = self.places.capacity
        self.resident_hashes -= np.bincount(md, minlength=m)
        self.tracked_per_place -= np.bincount(md[obs], minlength=m)
        self._ghost(s, t, position[mask])
        if self._outcome is not None:
            self._outcome.resident[position[mask]] -= 1

    def _observe_removal(
        self,
        s: npt.NDArray[np.int64],
        t: _F64,
        md: npt.NDArray[np.uint8],
        obs: _BOOL,
        reason: npt.NDArray[np.uint8],
        position: npt.NDArray[np.int64],
    ) -> None:
        table = self.table
        s, t, md, reason = s[obs], t[obs], md[obs], reason[obs]
        store = table.t_store[s]
        last = table.t_access[s]
        accesses = table.accesses[s]
        self.hist["lifetime"].observe(md, t - store)
        if self._outcome is not None:
            self._outcome.add_lifetimes(position[obs], self.hist["lifetime"].bucket_of(t - store))
        self.hist["idle_before_evict"].observe(md, t - last)
        self.accesses_before_evict.observe(md, accesses.astype(np.float64))
        self._pending_evictions.append(
            (
                position[obs],
                {
                    "block_hash": table.key[s],
                    "medium": md,
                    "reason": reason,
                    "stored_at": store,
                    "last_access_at": last,
                    "removed_at": t,
                    "accesses": accesses,
                    "prefix_depth": table.depth[s],
                },
            )
        )

    def _ghost(
        self, slots: npt.NDArray[np.int64], ts: _F64, position: npt.NDArray[np.int64]
    ) -> None:
        """Turn removed slots into ghosts; they are remembered in stream order once the batch
        is applied (:meth:`_settle_removals`)."""
        table = self.table
        table.state[slots] = GHOST
        table.t_store[slots] = ts
        self._pending_ghosts.append(
            (position, table.key[slots].copy(), table.medium[slots].copy(), ts.copy())
        )

    def _settle_removals(self) -> None:
        """Log this batch's removals in stream order (rounds produce them grouped by
        occurrence), then forget the oldest ghosts beyond ``removed_memory``."""
        if self._pending_evictions:
            order = np.argsort(
                np.concatenate([pos for pos, _ in self._pending_evictions]), kind="stable"
            )
            columns = {
                name: np.concatenate([cols[name] for _, cols in self._pending_evictions])[order]
                for name in self._pending_evictions[0][1]
            }
            self.evictions.append(**columns)
            self._pending_evictions = []
        if self._pending_ghosts:
            pending = self._pending_ghosts
            order = np.argsort(np.concatenate([g[0] for g in pending]), kind="stable")
            keys = np.concatenate([g[1] for g in pending])[order]
            media = np.concatenate([g[2] for g in pending])[order]
            times = np.concatenate([g[3] for g in pending])[order]
            self._ghosts.append((keys, media, times))
            self._ghost_count += int(keys.shape[0])
            self._pending_ghosts = []
        self._forget_oldest_ghosts()

    def _forget_oldest_ghosts(self) -> None:
        """Keep at most ``removed_memory`` ghosts; runs after a whole batch, so no slot that a
        round still holds is deleted under it."""
        table = self.table
        excess = self._ghost_count - self.config.removed_memory
        while excess > 0:
            keys, media, times = self._ghosts[0]
            take = min(excess, keys.shape[0])
            if take == keys.shape[0]:
                self._ghosts.popleft()
            else:
                self._ghosts[0] = (keys[take:], media[take:], times[take:])
            found = table.find(keys[:take], media[:take])
            ok = found >= 0
            found, old_times = found[ok], times[:take][ok]
            # A ghost restored and removed again since has a newer time: it stays.
            stale = found[(table.state[found] == GHOST) & (table.t_store[found] == old_times)]
            table.delete(stale)
            self._ghost_count -= take
            excess -= take

    def _clear(self, ts: float, reason_id: int, row: int) -> None:
        table = self.table
        slots = table.slots_in_state(RESIDENT)
        md = table.medium[slots]
        t = np.full(slots.shape[0], ts)
        reasons = np.full(slots.shape[0], reason_id, np.uint8)
        position = np.full(slots.shape[0], row, np.int64)
        self._observe_removal(slots, t, md, self._sampled(table.key[slots]), reasons, position)
        # Every physical copy goes, so that stored - removed = resident stays true per place.
        physical = np.bincount(md, weights=table.copies[slots], minlength=self.places.capacity)
        self.removed[:, reason_id] += physical.astype(np.uint64)
        if self._outcome is not None:
            self._outcome.resident[row] -= int(self.resident_hashes.sum())
        for counter in (
            self.resident,
            self.resident_hashes,
            self.resident_tokens,
            self.tracked_per_place,
            self.adapter_resident,
        ):
            counter[:] = 0
        self._ghost(slots, t, position)

    # --- checkpoints -----------------------------------------------------------------------
    _COUNTERS: Final = (
        "stored",
        "accessed",
        "restores",
        "resident",
        "resident_hashes",
        "resident_tokens",
        "tracked_per_place",
        "removed",
        "adapter_stored",
        "adapter_restores",
        "adapter_resident",
    )
    _TABLE_COLUMNS: Final = (
        "key",
        "medium",
        "state",
        "t_store",
        "t_access",
        "accesses",
        "depth",
        "copies",
        "tokens",
        "adapter",
    )

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """Everything needed to continue after a restart, as plain arrays (copies)."""
        with self.lock:
            table = self.table
            live = np.flatnonzero((table.state == RESIDENT) | (table.state == GHOST))
            ghosts = list(self._ghosts)
            records = self.evictions.records()
            arrays: dict[str, npt.NDArray[Any]] = {
                f"table.{name}": column[live]
                for name, column in zip(self._TABLE_COLUMNS, table.columns(), strict=True)
            }
            arrays.update({name: getattr(self, name).copy() for name in self._COUNTERS})
            arrays["places"] = np.array(self.places.pairs(), np.uint8).reshape(-1, 2)
            arrays["scalars"] = np.array(
                [self.unknown_removals, self.unknown_accesses, self.untracked_stores, self.clears],
                np.int64,
            )
            arrays["ghosts.key"] = np.concatenate(
                [g[0] for g in ghosts] or [np.zeros(0, np.uint64)]
            )
            arrays["ghosts.medium"] = np.concatenate(
                [g[1] for g in ghosts] or [np.zeros(0, np.uint8)]
            )
            arrays["ghosts.ts"] = np.concatenate([g[2] for g in ghosts] or [np.zeros(0)])
            for name, hist in self._all_histograms().items():
                arrays[f"hist.{name}.counts"] = hist.counts.copy()
                arrays[f"hist.{name}.sums"] = hist.sums.copy()
            for name in records.__dataclass_fields__:
                arrays[f"evictions.{name}"] = getattr(records, name)
            return arrays

    def load_state(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Continue from :meth:`state` (raises ValueError when the shapes do not fit)."""
        with self.lock:
            self._reset_state()
            self.places.restore([(int(m), int(g)) for m, g in arrays["places"].tolist()])
            for name, hist in self._all_histograms().items():
                counts, sums = arrays[f"hist.{name}.counts"], arrays[f"hist.{name}.sums"]
                if counts.shape != hist.counts.shape or sums.shape != hist.sums.shape:
                    raise ValueError(f"histogram {name}: buckets changed since the checkpoint")
                hist.counts[:] = counts
                hist.sums[:] = sums
            for name in self._COUNTERS:
                target = getattr(self, name)
                if arrays[name].shape != target.shape:
                    raise ValueError(f"{name}: shape changed since the checkpoint")
                target[:] = arrays[name]
            (
                self.unknown_removals,
                self.unknown_accesses,
                self.untracked_stores,
                self.clears,
            ) = (int(v) for v in arrays["scalars"])
            keys, places = arrays["table.key"], arrays["table.medium"]
            states = arrays["table.state"]
            table = self.table
            table.reserve(int(keys.shape[0]))
            for state in (RESIDENT, GHOST):
                rows = np.flatnonzero(states == state)
                slots = table.insert(keys[rows], places[rows], state)
                for name, column in zip(self._TABLE_COLUMNS[3:], table.columns()[3:], strict=True):
                    column[slots] = arrays[f"table.{name}"][rows]
            ghost_keys = arrays["ghosts.key"]
            if ghost_keys.size:
                self._ghosts.append((ghost_keys, arrays["ghosts.medium"], arrays["ghosts.ts"]))
                self._ghost_count = int(ghost_keys.size)
            evictions = {
                name.removeprefix("evictions."): values
                for name, values in arrays.items()
                if name.startswith("evictions.")
            }
            if evictions and evictions["block_hash"].size:
                self.evictions.append(**evictions)

    def reset(self) -> None:
        """Forget everything (counters included)."""
        with self.lock:
            self._reset_state()

    def _all_histograms(self) -> dict[str, HistogramSet]:
        return {
            **self.hist,
            "accesses_before_evict": self.accesses_before_evict,
            "prefix_depth": self.prefix_depth,
        }

    # --- reading ---------------------------------------------------------------------------
    def resident_profile(self) -> ResidentProfile:
        """Access counts, prefix depths and media of the resident tracked blocks (a copy)."""
        with self.lock:
            table = self.table
            slots = table.slots_in_state(RESIDENT)
            slots = slots[self._sampled(table.key[slots])]
            return ResidentProfile(
                accesses=table.accesses[slots].copy(),
                depth=table.depth[slots].copy(),
                medium=table.medium[slots].copy(),
            )

    def totals(self) -> CollectorTotals:
        """Cumulative figures over all media: a cheap read for the monitor's points."""
        with self.lock:
            return self._totals()

    def _totals(self) -> CollectorTotals:
        removed = self.removed.sum(axis=0)
        lifetime = self.hist["lifetime"]
        return CollectorTotals(
            stored=int(self.stored.sum()),
            evicted=int(removed[self._evicting_reasons()].sum()),
            restores=int(self.restores.sum()),
            resident=int(self.resident_hashes.sum()),
            clears=self.clears,
            lifetime_bounds=lifetime.bounds,
            lifetime_counts=lifetime.counts.sum(axis=0),
        )

    def eviction_records(self) -> EvictionRecords:
        """The most recent removals of tracked blocks, oldest first (a copy)."""
        with self.lock:
            return self.evictions.records()

    def block(self, key: int, place_id: int) -> BlockRecord | None:
        """One resident block's state, or None when it is not resident (``place_id``: see
        :meth:`CollectorSnapshot.place`)."""
        with self.lock:
            slot = int(
                self.table.find(np.array([key], np.uint64), np.array([place_id], np.uint8))[0]
            )
            if slot < 0 or self.table.state[slot] != RESIDENT:
                return None
            stored = float(self.table.t_store[slot])
            return BlockRecord(
                stored_at=stored,
                last_access_at=float(self.table.t_access[slot]),
                accesses=int(self.table.accesses[slot]),
                prefix_depth=int(self.table.depth[slot]),
            )

    def snapshot(self) -> CollectorSnapshot:
        with self.lock:
            hists = {name: h.snapshot() for name, h in self.hist.items()}
            hists["accesses_before_evict"] = self.accesses_before_evict.snapshot()
            hists["prefix_depth"] = self.prefix_depth.snapshot()
            return CollectorSnapshot(
                media=tuple(self.media.names),
                reasons=tuple(self.reasons.names),
                groups=tuple(self.groups.names),
                adapters=tuple(self.adapters.names),
                places=tuple(self.places.pairs()),
                stored=self.stored.copy(),
                accessed=self.accessed.copy(),
                restores=self.restores.copy(),
                resident=self.resident.copy(),
                resident_hashes=self.resident_hashes.copy(),
                resident_tokens=self.resident_tokens.copy(),
                tracked_per_place=self.tracked_per_place.copy(),
                removed=self.removed.copy(),
                adapter_stored=self.adapter_stored.copy(),
                adapter_restores=self.adapter_restores.copy(),
                adapter_resident=self.adapter_resident.copy(),
                unknown_removals=self.unknown_removals,
                unknown_accesses=self.unknown_accesses,
                untracked_stores=self.untracked_stores,
                clears=self.clears,
                tracked=self.tracked,
                table_bytes=self.table.nbytes + 17 * self._ghost_count + self.evictions.nbytes,
                histograms=hists,
            )
