"""Block-lifecycle state of one engine, updated a whole :class:`EventBatch` at a time.

Counters and residency are exact over every block hash. Lifecycle histograms (lifetime, idle
before evict, reuse gap, restore gap, accesses before evict) come from the spatially sampled
hashes: a hash is tracked iff a hash of it falls under the sample ratio, so a tracked block is
followed through its whole life. Durations are differences of engine timestamps.

Operations on different keys commute, so a batch is applied in rounds: round *r* holds the
*r*-th occurrence of every key, in stream order, and each round is one vectorized pass.
``AllBlocksCleared`` rows split the batch, since they touch every key.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol.batch import OP_ACCESS, OP_CLEAR, OP_REMOVE, OP_STORE, EventBatch, LabelTable
from .eviction_log import EvictionLog, EvictionRecords
from .histogram import (
    ACCESS_COUNT_BUCKETS,
    PREFIX_DEPTH_BUCKETS,
    RESIDENCY_BUCKETS,
    HistogramSet,
    HistogramSnapshot,
    validate_buckets,
)
from .prefix import resolve_depths
from .table import GHOST, RESIDENT, BlockTable

_SAMPLE_MUL1: Final = np.uint64(0xBF58476D1CE4E5B9)
_SAMPLE_MUL2: Final = np.uint64(0x94D049BB133111EB)
_U64 = npt.NDArray[np.uint64]
_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]

REASON_CLEARED: Final = "cleared"
REASON_RESTART: Final = "engine_restart"
DEFAULT_REASONS: Final = ("evicted", REASON_CLEARED, REASON_RESTART)


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

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample ratio must be in (0, 1], got {self.sample_ratio}")
        if self.max_tracked_blocks < 1:
            raise ValueError("max tracked blocks must be at least 1")
        if self.removed_memory < 0:
            raise ValueError("removed-block memory cannot be negative")
        if self.eviction_log_size < 0:
            raise ValueError("eviction log size cannot be negative")
        validate_buckets(self.duration_buckets, "duration buckets")
        validate_buckets(self.access_buckets, "access-count buckets")
        validate_buckets(self.depth_buckets, "prefix-depth buckets")


@dataclass(frozen=True, slots=True)
class CollectorSnapshot:
    """A consistent copy of one engine's numbers, taken under the collector's lock."""

    media: tuple[str, ...]
    reasons: tuple[str, ...]
    stored: npt.NDArray[np.uint64]  # [media]
    accessed: npt.NDArray[np.uint64]
    restores: npt.NDArray[np.uint64]
    resident: npt.NDArray[np.int64]
    removed: npt.NDArray[np.uint64]  # [media, reasons]
    unknown_removals: int
    unknown_accesses: int
    untracked_stores: int
    clears: int
    tracked: int
    table_bytes: int
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)


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
    the row heading each row's run, and whether a head left its block resident."""

    extra: npt.NDArray[np.int64]
    last_ts: _F64
    head: npt.NDArray[np.int64]
    resident_after: _BOOL

    @staticmethod
    def none(n: int) -> Runs:
        return Runs(
            extra=np.zeros(n, np.int64),
            last_ts=np.zeros(n),
            head=np.arange(n),
            resident_after=np.zeros(n, bool),
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
    medium: npt.NDArray[np.uint8]


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
    ) -> None:
        self.config = config or CollectorConfig()
        self.media = media or LabelTable("unknown")
        self.reasons = reasons or LabelTable("evicted", seed=DEFAULT_REASONS)
        self.lock = threading.Lock()
        self._threshold = (
            None
            if self.config.sample_ratio >= 1.0
            else np.uint64(min(int(self.config.sample_ratio * 2.0**64), 2**64 - 1))
        )
        self._reset_state()

    def _reset_state(self) -> None:
        m, r = self.media.capacity, self.reasons.capacity
        self.table = BlockTable()
        self.stored = np.zeros(m, np.uint64)
        self.accessed = np.zeros(m, np.uint64)
        self.restores = np.zeros(m, np.uint64)
        self.resident = np.zeros(m, np.int64)
        self.removed = np.zeros((m, r), np.uint64)
        self.unknown_removals = 0
        self.unknown_accesses = 0
        self.untracked_stores = 0
        self.clears = 0
        self.tracked = 0
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

    # --- applying batches ------------------------------------------------------------------
    def apply(self, batch: EventBatch, cuts: Sequence[int] = ()) -> list[CollectorTotals]:
        """Apply one batch of block operations, in stream order.

        For each row index in ``cuts`` (ascending), returns the totals as they stood just
        before that row: what a sampler would have read had the batch been split there, at
        the cost of a cumulative sum instead of an apply per piece.
        """
        if not len(batch):
            return [self._totals() for _ in cuts]
        with self.lock:
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
        """The prefix depth the table holds for each hash, on whatever medium (0: none)."""
        best = np.zeros(hashes.shape[0], np.int64)
        for medium_id in range(len(self.media.names)):
            slots = self.table.find(hashes, np.full(hashes.shape[0], medium_id, np.uint8))
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
        key = seg.block_hash ^ (seg.medium.astype(np.uint64) << np.uint64(56))
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.empty(n, bool)
        starts[0] = True
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=starts[1:])
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
            | ((op == OP_STORE) & (prev_op == OP_STORE))
        )
        runs = Runs.none(n)
        if follower.any():
            runs = self._collapse(seg, order, follower, previous)
        kept = np.flatnonzero(~follower)
        kept_sorted = order[~follower[order]]
        kept_starts = np.empty(kept_sorted.size, bool)
        kept_starts[0] = True
        np.not_equal(key[kept_sorted[1:]], key[kept_sorted[:-1]], out=kept_starts[1:])
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
        return Runs(extra=extra, last_ts=last_ts, head=head, resident_after=np.zeros(n, bool))

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
        m = self.media.capacity
        med = seg.medium[rows]
        hit = runs.resident_after[runs.head[rows]]
        if hit.any():
            self.accessed += np.bincount(med[hit], minlength=m).astype(np.uint64)
            gaps = seg.ts[rows[hit]] - seg.ts[previous[rows[hit]]]
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
        m = self.media.capacity
        is_store = op == OP_STORE
        table.reserve(int(np.count_nonzero(is_store)))
        slot = table.find(keys, med)
        state = table.state[np.where(slot >= 0, slot, 0)]
        state[slot < 0] = 0
        resident = state == RESIDENT
        sampled = self._sampled(keys)
        resident_after = resident & (op != OP_REMOVE)

        # Accesses: reported hits, and re-announcements of resident blocks (SPEC §2.1.1).
        is_access = op == OP_ACCESS
        hit = resident & (is_access | is_store)
        if hit.any():
            s, t = slot[hit], ts[hit]
            previous = table.t_access[s]
            obs = sampled[hit]
            self.hist["reuse_gap"].observe(med[hit][obs], (t - previous)[obs])
            table.t_access[s] = t
            table.accesses[s] += np.uint32(1)
            self.accessed += np.bincount(med[hit], minlength=m).astype(np.uint64)
        self.unknown_accesses += int(np.count_nonzero(is_access & ~resident))

        is_remove = op == OP_REMOVE
        if is_remove.any():
            self._remove(slot, resident & is_remove, rnd, sampled, position)
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
            self._start_life(s, t)
            self.restores += np.bincount(med[restore], minlength=m).astype(np.uint64)
            self._count_stored(med[restore], obs)
            resident_after[restore] = True
            if self._outcome is not None:
                self._outcome.stored[position[restore]] += 1
                self._outcome.restored[position[restore]] += 1
                self._outcome.resident[position[restore]] += 1
        started_rows = [np.flatnonzero(restore)]

        new = is_store & (slot < 0)
        if new.any():
            rows = np.flatnonzero(new)
            room = self.config.max_tracked_blocks - int(self.resident.sum())
            if self._outcome is not None:
                self._outcome.stored[position[rows]] += 1
                self._outcome.resident[position[rows[: max(room, 0)]]] += 1
            if rows.size > room:
                # Full: keep what fits, count the rest (stored_total stays exact).
                self.untracked_stores += int(rows.size - max(room, 0))
                self.stored += np.bincount(med[rows[max(room, 0) :]], minlength=m).astype(np.uint64)
                rows = rows[: max(room, 0)]
            s = table.insert(keys[rows], med[rows], RESIDENT)
            self._start_life(s, ts[rows])
            self._count_stored(med[rows], sampled[rows])
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

    def _start_life(self, slots: npt.NDArray[np.int64], ts: _F64) -> None:
        self.table.t_store[slots] = ts
        self.table.t_access[slots] = ts
        self.table.accesses[slots] = 0
        self.table.depth[slots] = 0

    def _count_stored(self, med: npt.NDArray[np.uint8], sampled: _BOOL) -> None:
        counts = np.bincount(med, minlength=self.media.capacity)
        self.stored += counts.astype(np.uint64)
        self.resident += counts
        self.tracked += int(np.count_nonzero(sampled))

    def _remove(
        self,
        slot: npt.NDArray[np.int64],
        mask: _BOOL,
        rnd: EventBatch,
        sampled: _BOOL,
        position: npt.NDArray[np.int64],
    ) -> None:
        """Resident blocks at ``slot[mask]`` are removed: observe, then ghost them."""
        s, t, md, obs = slot[mask], rnd.ts[mask], rnd.medium[mask], sampled[mask]
        self._observe_removal(s, t, md, obs, rnd.reason[mask], position[mask])
        self.resident -= np.bincount(md, minlength=self.media.capacity)
        self.tracked -= int(np.count_nonzero(obs))
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
        self.removed[:, reason_id] += np.bincount(md, minlength=self.media.capacity).astype(
            np.uint64
        )
        if self._outcome is not None:
            self._outcome.resident[row] -= int(self.resident.sum())
        self.resident[:] = 0
        self.tracked = 0
        self._ghost(slots, t, position)

    # --- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, npt.NDArray[Any]]:
        """Everything needed to continue after a restart, as plain arrays (copies)."""
        with self.lock:
            table = self.table
            live = np.flatnonzero((table.state == RESIDENT) | (table.state == GHOST))
            ghosts = list(self._ghosts)
            records = self.evictions.records()
            arrays: dict[str, npt.NDArray[Any]] = {
                "table.key": table.key[live],
                "table.medium": table.medium[live],
                "table.state": table.state[live],
                "table.t_store": table.t_store[live],
                "table.t_access": table.t_access[live],
                "table.accesses": table.accesses[live],
                "table.depth": table.depth[live],
                "stored": self.stored.copy(),
                "accessed": self.accessed.copy(),
                "restores": self.restores.copy(),
                "resident": self.resident.copy(),
                "removed": self.removed.copy(),
                "scalars": np.array(
                    [
                        self.unknown_removals,
                        self.unknown_accesses,
                        self.untracked_stores,
                        self.clears,
                        self.tracked,
                    ],
                    np.int64,
                ),
                "ghosts.key": np.concatenate([g[0] for g in ghosts] or [np.zeros(0, np.uint64)]),
                "ghosts.medium": np.concatenate([g[1] for g in ghosts] or [np.zeros(0, np.uint8)]),
                "ghosts.ts": np.concatenate([g[2] for g in ghosts] or [np.zeros(0)]),
            }
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
            for name, hist in self._all_histograms().items():
                counts, sums = arrays[f"hist.{name}.counts"], arrays[f"hist.{name}.sums"]
                if counts.shape != hist.counts.shape or sums.shape != hist.sums.shape:
                    raise ValueError(f"histogram {name}: buckets changed since the checkpoint")
                hist.counts[:] = counts
                hist.sums[:] = sums
            for name in ("stored", "accessed", "restores", "resident", "removed"):
                target = getattr(self, name)
                if arrays[name].shape != target.shape:
                    raise ValueError(f"{name}: shape changed since the checkpoint")
                target[:] = arrays[name]
            (
                self.unknown_removals,
                self.unknown_accesses,
                self.untracked_stores,
                self.clears,
                self.tracked,
            ) = (int(v) for v in arrays["scalars"])
            keys, media, states = arrays["table.key"], arrays["table.medium"], arrays["table.state"]
            table = self.table
            table.reserve(int(keys.shape[0]))
            for state in (RESIDENT, GHOST):
                rows = np.flatnonzero(states == state)
                slots = table.insert(keys[rows], media[rows], state)
                table.t_store[slots] = arrays["table.t_store"][rows]
                table.t_access[slots] = arrays["table.t_access"][rows]
                table.accesses[slots] = arrays["table.accesses"][rows]
                table.depth[slots] = arrays["table.depth"][rows]
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
            resident=int(self.resident.sum()),
            clears=self.clears,
            lifetime_bounds=lifetime.bounds,
            lifetime_counts=lifetime.counts.sum(axis=0),
        )

    def eviction_records(self) -> EvictionRecords:
        """The most recent removals of tracked blocks, oldest first (a copy)."""
        with self.lock:
            return self.evictions.records()

    def block(self, key: int, medium_id: int) -> BlockRecord | None:
        """One resident block's state, or None when it is not resident."""
        with self.lock:
            slot = int(
                self.table.find(np.array([key], np.uint64), np.array([medium_id], np.uint8))[0]
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
                stored=self.stored.copy(),
                accessed=self.accessed.copy(),
                restores=self.restores.copy(),
                resident=self.resident.copy(),
                removed=self.removed.copy(),
                unknown_removals=self.unknown_removals,
                unknown_accesses=self.unknown_accesses,
                untracked_stores=self.untracked_stores,
                clears=self.clears,
                tracked=self.tracked,
                table_bytes=self.table.nbytes + 17 * self._ghost_count + self.evictions.nbytes,
                histograms=hists,
            )
