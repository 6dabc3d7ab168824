"""Cache sizing from the live stream: what a bigger KV cache, or an offload tier, would save.

**Model.** Under LRU eviction with capacity C, hits only reorder blocks inside the cache. The
blocks below it — the part of the LRU stack a cache of C does not hold — are ordered by when
they were evicted, most recent first, and that order is fully determined by the visible
``BlockStored`` / ``BlockRemoved`` sequence. So when a removed block is stored again, its
*ghost rank* r (how many removed blocks, itself included, were evicted at or after it and not
stored again since) says that a cache of C + r blocks would still have held it: that store was
recomputation a cache ``1 + r / C`` times as large avoids. With hits reported (``BlockAccessed``,
or stores re-announcing resident blocks) the whole reference stream is visible, and each hit's
LRU stack distance (Mattson et al., 1970: the distinct blocks referenced since its previous
reference, plus itself) says which *smaller* caches would have hit too: a full hit-ratio curve.

**Cost.** Spatial sampling, as SHARDS does (Waldspurger et al., FAST '15): only hashes whose
sampling hash falls under a threshold (the rate R) are modelled, and counts of ghosts or of
distinct blocks among them are scaled by 1/R. The sample has a fixed size (fixed-size SHARDS,
§4.3): each medium starts at the configured rate (every key, by default); at fixed counts of
sampled rows (:meth:`WhatIfModel._boundary`), when its sampled keys (resident and ghosts) come
near ``max_sampled_blocks``, the threshold is lowered to a sampling hash that keeps fewer, and
the keys at or above it are dropped. A small cache is followed exactly, a large one in fixed
memory, and the numbers do not depend on how the stream is cut into batches. Each sampled
reference stands for the references since the previous sampled one on its medium (its
*weight*), so weighted counts add up to the exact number of references at every moment and
``rate(avoided) / rate(stored)`` normalises itself over any window: SHARDS' count adjustment,
applied per reference instead of once per histogram, which needs no rescaling when R falls.
Every row costs a hash and a few numpy passes; only sampled rows reach the table, and a batch
is applied with numpy passes, not per row (see :func:`.orders.earlier_greater`). Ghosts deeper
than the figures look (``ghost_horizon`` capacities) or beyond ``max_ghosts`` are forgotten at
the boundaries, the oldest first.

**Grouped orderings.** Engines publish a step's removals before its stores (vLLM does, and so
does the embedded simulator): a restore then sees ghosts that were evicted to make room for it
and for the blocks stored after it in the same step. Each rank is corrected by the removals of
the step not yet matched by a store (:func:`_unmatched`), which makes it exact under LRU
whether an engine groups a step's removals before its stores or interleaves them.

The sampling hash and each medium's state are in :mod:`.tier`.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ...collector.histogram import HistogramSnapshot
from ...collector.table import EMPTY, GHOST, RESIDENT, TOMBSTONE, BlockTable
from ...protocol.batch import OP_CLEAR, OP_REMOVE, OP_STORE, EventBatch, LabelTable
from ...protocol.extensions import load_extension
from .config import WhatIfConfig
from .orders import Order, earlier_greater
from .snapshot import MediumWhatIf, WhatIfSnapshot
from .tier import MediumState, ghost_limits, whatif_hash

_U64 = npt.NDArray[np.uint64]
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]

_GROUP_MIX: Final = np.uint64(0xD6E8FEB86659FD93)
_ABSENT: Final = 0  # a table state meaning "not in the table" (EMPTY there)
# Sampled rows wait in a buffer and are applied at most this many at a time (at each boundary,
# or when read, or before a clear): at a low sample ratio a batch holds a few dozen of them, and
# the fixed cost of the passes that apply them would otherwise dominate.
CHUNK_ROWS: Final = 4096
# The table columns the model uses (a ghost's position in ``t_store``, the last reference's in
# ``t_access``): what a checkpoint holds per sampled key.
_TABLE_COLUMNS: Final = ("key", "medium", "state", "t_store", "t_access")


def _unmatched(is_remove: _BOOL, is_store: _BOOL, ts: _F64, rows: _I64) -> _I64:
    """For each of ``rows``: the removals of its step (the run of rows sharing its timestamp)
    before it, less the stores before it in the step, floored at 0 — the evictions not yet
    matched by the stores they made room for."""
    x = is_remove.view(np.int8) - is_store.view(np.int8)
    before = np.cumsum(x, dtype=np.int64) - x
    starts = np.flatnonzero(np.concatenate(([True], ts[1:] != ts[:-1])))
    first = starts[np.searchsorted(starts, rows, side="right") - 1]
    unmatched: _I64 = np.maximum(before[rows] - before[first], 0)
    return unmatched


_STOPPED_FOR_SLOT: Final = 1
_STOPPED_FOR_RECENCY: Final = 2
_KERNEL: Final = load_extension(
    "kvcache_exporter.analysis.whatif._chunk",
    {
        "OP_CODES": (OP_STORE, OP_REMOVE),
        "STATES": (EMPTY, RESIDENT, GHOST, TOMBSTONE),
        "STOPPED_FOR": (_STOPPED_FOR_SLOT, _STOPPED_FOR_RECENCY),
    },
)
COMPILED: Final = _KERNEL is not None
"""Whether models with a compiled table apply their chunks in the compiled loop."""
_NO_ORDER: Final = Order(with_keys=False)  # what the loop is given before references are followed


class WhatIfModel:
    """Ghost ranks of restores and stack distances of hits, per medium of one engine.

    Feed it every batch the engine's collector applied (:meth:`apply`, with the collector's
    resident counts after it); read it with :meth:`snapshot`. One lock: the ingest thread holds
    it while applying, a scrape while copying.
    """

    def __init__(self, config: WhatIfConfig, media: LabelTable) -> None:
        if not config.enabled:
            raise ValueError("the what-if model needs a sample ratio above 0")
        self.config = config
        self.media = media
        self.lock = threading.Lock()
        self.table = BlockTable()
        self._tiers: dict[int, MediumState] = {}
        self._resident = np.zeros(media.capacity, np.int64)
        self._observed = np.zeros(media.capacity, np.int64)
        self._threshold = (
            None
            if config.sample_ratio >= 1.0
            else np.uint64(min(int(config.sample_ratio * 2.0**64), 2**64 - 1))
        )  # each medium's to begin with
        self.chunk_rows = CHUNK_ROWS  # sampled rows buffered per medium (tests lower it)

    @property
    def _compiled(self) -> bool:
        return _KERNEL is not None and self.table.compiled

    def _tier(self, medium_id: int) -> MediumState:
        tier = self._tiers.get(medium_id)
        if tier is None:
            configured = self.config.capacity_of(self.media.names[medium_id])
            tier = self._tiers[medium_id] = MediumState(
                self.config, configured, self._threshold, self.chunk
            )
        return tier

    @staticmethod
    def _sampled(keys: _U64, tier: MediumState) -> _BOOL:
        if tier.threshold is None:
            return np.ones(keys.shape[0], bool)
        return whatif_hash(keys) < tier.threshold

    # --- applying --------------------------------------------------------------------------
    def apply(self, batch: EventBatch, resident: npt.NDArray[np.int64]) -> None:
        """Apply a batch the collector has applied, less the rows that only changed a key's
        copy count; ``resident`` is its count of resident keys per medium id after it (the
        observed capacity is the largest seen around evictions)."""
        if not len(batch):
            return
        with self.lock:
            # bincount, not unique: a pass instead of a sort (media ids are small)
            evicting = np.flatnonzero(np.bincount(batch.medium[batch.op == OP_REMOVE]))
            after = resident[: self._resident.shape[0]]
            for medium_id in evicting.tolist():
                self._observed[medium_id] = max(
                    int(self._observed[medium_id]),
                    int(self._resident[medium_id]),
                    int(after[medium_id]),
                )
                tier = self._tier(medium_id)
                if not tier.configured:
                    tier.next_capacity = int(self._observed[medium_id])
            self._resident[: after.shape[0]] = after
            start = 0
            for row in np.flatnonzero(batch.op == OP_CLEAR).tolist():
                self._apply_segment(batch.take(slice(start, row)))
                self._forget_all()
                start = row + 1
            self._apply_segment(batch.take(slice(start, len(batch))))

    def clear(self) -> None:
        """The engine lost its cache (a publisher restart): forget every block."""
        with self.lock:
            self._forget_all()
            self._resident[:] = 0

    def _forget_all(self) -> None:
        self._flush_all()
        self.table = BlockTable()
        for tier in self._tiers.values():
            tier.forget_all()

    def _apply_segment(self, seg: EventBatch) -> None:
        if not len(seg):
            return
        # An engine's KV-cache groups on one medium share its pool: one cache of (group, hash).
        keys = seg.block_hash
        if seg.group.any():
            keys = keys ^ (seg.group.astype(np.uint64) * _GROUP_MIX)
        media = np.flatnonzero(np.bincount(seg.medium))
        for medium_id in media.tolist():
            rows = slice(None) if media.size == 1 else np.flatnonzero(seg.medium == medium_id)
            self._apply_medium(
                medium_id, seg.op[rows], keys[rows], seg.ts[rows], self._tier(medium_id)
            )

    def _apply_medium(
        self, medium_id: int, op: npt.NDArray[np.uint8], keys: _U64, ts: _F64, tier: MediumState
    ) -> None:
        """One medium's rows, in stream order, no clear among them: the sampled ones are
        buffered, with their weights, step corrections and the capacity at their time. Every
        ``chunk`` sampled rows of the medium is a boundary (:meth:`_boundary`), which may
        lower the threshold for the rows after it."""
        n = int(op.shape[0])
        is_remove = op == OP_REMOVE
        is_store = op == OP_STORE
        is_ref = ~is_remove  # stores and accesses reference a block; removals do not
        refs_through = np.cumsum(is_ref)
        capacity = np.full(n, tier.capacity, np.int64)
        if tier.next_capacity != tier.capacity and is_remove.any():
            capacity[int(np.argmax(is_remove)) :] = tier.next_capacity  # from its first eviction
        last_ref, carry, start = 0, tier.pending, 0
        while start < n:
            candidates = start + np.flatnonzero(self._sampled(keys[start:], tier))
            at_boundary = candidates.size >= tier.until_boundary
            rows = candidates[: tier.until_boundary]
            if rows.size:
                ref_rows = rows[is_ref[rows]]
                ref_weight = np.diff(refs_through[ref_rows], prepend=last_ref)
                if ref_weight.size:
                    ref_weight[0] += carry
                    carry, last_ref = 0, int(refs_through[ref_rows[-1]])
                weight = np.zeros(rows.shape[0], np.int64)
                weight[is_ref[rows]] = ref_weight
                correction = _unmatched(is_remove, is_store, ts, rows)
                tier.buffer.append((op[rows], keys[rows], correction, weight, capacity[rows]))
                tier.buffered += int(rows.shape[0])
                tier.until_boundary -= int(rows.shape[0])
            if not at_boundary:
                break
            tier.capacity = int(capacity[rows[-1]])
            self._boundary(medium_id, tier)
            start = int(rows[-1]) + 1
        if n:
            tier.capacity = int(capacity[-1])
            tier.pending = carry + int(refs_through[-1]) - last_ref

    @property
    def chunk(self) -> int:
        """Sampled rows between boundaries: at most ``chunk_rows``, and an eighth of the
        budget, so that the keys one chunk can add fit in the room a boundary leaves."""
        return max(1, min(self.chunk_rows, self.config.max_sampled_blocks // 8))

    def _boundary(self, medium_id: int, tier: MediumState) -> None:
        """Apply the buffered rows, forget the oldest ghosts, and judge the budget: with more
        than ``budget - chunk`` keys, lower the threshold to the sampling hash that keeps
        ``budget - chunk - budget / 8`` of them and drop the keys at or above it. So the next
        chunk cannot take the medium past the budget, and the rate falls once per many new
        keys. Boundaries sit at fixed counts of sampled rows: the same rows, however the
        stream is cut into batches or buffered."""
        self._flush(medium_id, tier)
        self._forget_oldest(tier, medium_id)
        budget, chunk = self.config.max_sampled_blocks, self.chunk
        if tier.sampled > budget - chunk:
            slots = self._slots_of(medium_id)
            hashes = whatif_hash(self.table.key[slots])
            tier.threshold = np.sort(hashes)[budget - chunk - budget // 8]
            self._drop(tier, slots[hashes >= tier.threshold])
        tier.until_boundary = chunk

    def _slots_of(self, medium_id: int) -> _I64:
        """The table's slots holding the medium's keys (resident or ghost)."""
        table = self.table
        return np.flatnonzero(table.live_mask() & (table.medium == medium_id))

    def _drop(self, tier: MediumState, slots: _I64) -> None:
        """Forget these keys of the tier: their ghost and reference marks, their slots."""
        table = self.table
        ghost = table.state[slots] == GHOST
        tier.ghosts.kill(table.t_store[slots[ghost]].astype(np.int64))
        if tier.recency is not None:
            referenced = table.t_access[slots]
            tier.recency.kill(referenced[referenced >= 0].astype(np.int64))
        table.delete(slots)
        tier.sampled -= int(slots.shape[0])

    def _flush_all(self) -> None:
        for medium_id, tier in self._tiers.items():
            self._flush(medium_id, tier)

    def _flush(self, medium_id: int, tier: MediumState) -> None:
        """Apply a medium's buffered sampled rows (a read does, so that it sees them; what
        is forgotten and the budget wait for the next boundary)."""
        if not tier.buffered:
            return
        columns = tuple(np.concatenate(parts) for parts in zip(*tier.buffer, strict=True))
        tier.buffer, tier.buffered = [], 0
        op, keys, correction, weight, capacity = columns
        apply = self._apply_sampled_compiled if self._compiled else self._apply_sampled
        apply(medium_id, op, keys, correction, weight, capacity, tier)

    def _apply_sampled_compiled(
        self,
        medium_id: int,
        op: npt.NDArray[np.uint8],
        keys: _U64,
        correction: _I64,
        weight: _I64,
        capacity: _I64,
        tier: MediumState,
    ) -> None:
        """The chunk in the compiled loop (``_chunk.pyx``: ranks and distances row by row),
        then the same vectorized counting as :meth:`_apply_sampled`."""
        assert _KERNEL is not None
        m = int(op.shape[0])
        table, ghosts = self.table, tier.ghosts
        removals = int(np.count_nonzero(op == OP_REMOVE))
        self._make_room(ghosts, removals, medium_id, ghost=True)
        if tier.recency is not None:
            self._make_room(tier.recency, m - removals, medium_id, ghost=False)
        rank = np.empty(m, np.int64)
        hit = np.empty(m, np.int8)
        others = np.empty(m, np.int64)
        op, keys = np.ascontiguousarray(op), np.ascontiguousarray(keys)
        start = 0
        while True:
            recency = tier.recency or _NO_ORDER
            stop, why, g_end, g_live, r_end, r_live, added, claimed, stores = (
                _KERNEL.apply_chunk(
                    op, keys, start, medium_id,
                    table.key, table.medium, table.state, table.t_store, table.t_access,
                    table.horizon, table.room(),
                    ghosts.alive.view(np.uint8), ghosts.keys, ghosts.tree.tree, ghosts.end,
                    tier.recency is not None,
                    recency.alive.view(np.uint8), recency.tree.tree, recency.end,
                    rank, hit, others,
                )
            )  # fmt: skip
            ghosts.end, ghosts.live = g_end, ghosts.live + g_live
            if tier.recency is not None:
                tier.recency.end, tier.recency.live = r_end, tier.recency.live + r_live
            tier.sampled += added
            table.used += claimed
            tier.stores += stores
            if stop == m:
                break
            if why == _STOPPED_FOR_SLOT:  # room for every distinct key the rest brings
                rest = keys[stop:]
                table.reserve_absent(rest, np.full(rest.shape[0], medium_id, np.uint8))
            else:  # the first hit: references are followed from here on
                tier.recency = Order(with_keys=False)
                references = int(np.count_nonzero(op[stop:] != OP_REMOVE))
                self._make_room(tier.recency, references, medium_id, ghost=False)
            start = stop
        ratio = tier.ratio
        restored = np.flatnonzero(rank > 0)
        if restored.size:
            # A ghost deeper than the medium keeps counts as forgotten (see _apply_sampled).
            remembered = rank[restored] <= ghost_limits(self.config, capacity[restored], ratio)
            restored = restored[remembered]
            extra = np.maximum((rank[restored] - 1) / ratio + 1.0 - correction[restored], 1.0)
            tier.count_restores(extra, weight[restored], capacity[restored])
        known = np.flatnonzero(others >= 0)
        tier.count_known_distances(others[known], weight[known], capacity[known])
        tier.count_hits(hit.view(np.bool_), weight)
        tier.restores += int(restored.size)

    def _apply_sampled(
        self,
        medium_id: int,
        op: npt.NDArray[np.uint8],
        keys: _U64,
        correction: _I64,
        weight: _I64,
        capacity: _I64,
        tier: MediumState,
    ) -> None:
        """A chunk of one medium's sampled rows, in stream order (from one batch or several):
        classify each row against the state before it (the table's, or the previous row of its
        key in the chunk), rank restores, measure hits, count, then write the state back."""
        m = int(op.shape[0])
        ratio = tier.ratio
        is_remove = op == OP_REMOVE
        is_store = op == OP_STORE

        # Rows grouped by key, in stream order within a key.
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = np.zeros(m, bool)  # sorted row follows a row of the same key
        np.equal(sorted_keys[1:], sorted_keys[:-1], out=same[1:])
        group_sorted = np.cumsum(~same) - 1
        group = np.empty(m, np.int64)
        group[order] = group_sorted
        previous = np.full(m, -1, np.int64)
        previous[order[same]] = order[np.flatnonzero(same) - 1]
        is_last_sorted = np.ones(m, bool)
        is_last_sorted[:-1] = ~same[1:]
        last_rows = order[is_last_sorted]  # the last row of each key, by group

        # The table at the start of the chunk, one slot per key (absent keys inserted now).
        distinct = sorted_keys[~same]
        medium = np.full(distinct.shape[0], medium_id, np.uint8)
        table = self.table
        table.reserve(int(distinct.shape[0]))
        slots = table.find(distinct, medium)
        absent = slots < 0
        state0 = np.where(absent, _ABSENT, table.state[np.maximum(slots, 0)])
        ghost_at0 = np.where(state0 == GHOST, table.t_store[np.maximum(slots, 0)], -1.0)
        ref_at0 = np.where(absent, -1.0, table.t_access[np.maximum(slots, 0)])
        if absent.any():
            slots[absent] = table.insert(distinct[absent], medium[absent], RESIDENT)
            table.t_access[slots[absent]] = -1.0
            tier.sampled += int(np.count_nonzero(absent))

        # The state before each row, and the new ghost position each removal takes.
        ghosts = tier.ghosts
        first_new = ghosts.end
        removals_before = np.cumsum(is_remove) - is_remove
        new_position = first_new + removals_before
        prev = np.maximum(previous, 0)
        has_prev = previous >= 0
        was_ghost = np.where(has_prev, is_remove[prev], state0[group] == GHOST)
        was_resident = np.where(has_prev, ~is_remove[prev], state0[group] == RESIDENT)
        ghost_at = np.where(has_prev, new_position[prev], ghost_at0[group].astype(np.int64))

        # Restores: ghost rank = live ghosts evicted at or after this one, just before it.
        dying = np.flatnonzero(was_ghost)  # a ghost stored, accessed or removed again
        dying_at = ghost_at[dying]
        restore = is_store[dying]
        restored = dying[restore]
        if restored.size:
            at = dying_at[restore]
            died_since = earlier_greater(dying_at)[restore]
            before_chunk = at < first_new
            live_old = np.zeros(restored.size, np.int64)
            live_old[before_chunk] = ghosts.between(at[before_chunk], first_new)
            fresh = first_new + removals_before[restored] - np.maximum(at, first_new)
            rank = live_old + fresh - died_since
            # A ghost deeper than the medium keeps counts as forgotten, whether or not it has
            # been yet (that happens at a boundary): the figures must not depend on when.
            remembered = rank <= ghost_limits(self.config, capacity[restored], ratio)
            restored, rank = restored[remembered], rank[remembered]
            extra = np.maximum((rank - 1) / ratio + 1.0 - correction[restored], 1.0)
            tier.count_restores(extra, weight[restored], capacity[restored])

        # Hits: stack distances where references are followed (from the first hit on).
        hit = ~is_remove & was_resident
        followed = np.flatnonzero(~is_remove)  # references whose order is kept
        if tier.recency is None and hit.any():
            # Until a first hit nothing needs the reference order: follow it from there on.
            tier.recency = Order(with_keys=False)
            followed = followed[followed >= np.flatnonzero(hit)[0]]
        reference_at = np.full(m, -1, np.int64)
        if tier.recency is not None:
            first_ref = tier.recency.end
            reference_at[followed] = first_ref + np.arange(followed.size)
            # The previous reference of each row's key: the last earlier reference row of the
            # key in this chunk (a running maximum within each key group), else the table's.
            mark = np.where(reference_at[order] >= 0, reference_at[order] - first_ref + 1, 0)
            span = m + 2
            through_row = np.maximum.accumulate(mark + group_sorted * span) - group_sorted * span
            before_row = np.zeros(m, np.int64)
            before_row[1:] = through_row[:-1]
            before_row[~same] = 0
            prev_ref = np.empty(m, np.int64)
            prev_ref[order] = np.where(
                before_row > 0, first_ref + before_row - 1, ref_at0[group_sorted].astype(np.int64)
            )
            tier.count_distances(hit, followed, prev_ref, weight, capacity)
        tier.count_hits(hit, weight)
        tier.stores += int(np.count_nonzero(is_store & ~was_resident))
        tier.restores += int(restored.size)

        # Write back: ghost marks, reference marks, then each key's state after its last row.
        is_last = np.zeros(m, bool)
        is_last[last_rows] = True
        new_alive = is_remove & is_last  # a removal not followed by a row of its key
        shift = self._commit_order(
            ghosts, dying_at[dying_at < first_new], new_alive[is_remove], keys[is_remove],
            medium_id, ghost=True,
        )  # fmt: skip
        last = last_rows
        final_ghost = is_remove[last]
        table.state[slots] = np.where(final_ghost, GHOST, RESIDENT)
        table.t_store[slots[final_ghost]] = new_position[last[final_ghost]] + shift
        if tier.recency is not None:
            was_referenced = np.zeros(int(distinct.shape[0]), bool)
            was_referenced[group[followed]] = True
            killed = ref_at0[was_referenced]
            last_ref = np.zeros(int(distinct.shape[0]), np.int64)
            last_ref[group[followed]] = reference_at[followed]  # ascending: the last one wins
            alive_refs = reference_at[followed] == last_ref[group[followed]]
            shift_ref = self._commit_order(
                tier.recency, killed[killed >= 0].astype(np.int64), alive_refs, None, medium_id,
                ghost=False,
            )  # fmt: skip
            table.t_access[slots[was_referenced]] = last_ref[was_referenced] + shift_ref

    def _commit_order(
        self,
        order: Order,
        killed: _I64,
        alive: _BOOL,
        keys: _U64 | None,
        medium_id: int,
        ghost: bool,
    ) -> int:
        """Kill the marks the chunk superseded, append its new ones (renumbering the table's
        positions of this medium if the order had to compact); returns how far the chunk's
        positions moved."""
        expected = order.end
        order.kill(killed)
        self._make_room(order, int(alive.shape[0]), medium_id, ghost)
        return order.append(alive, keys) - expected

    def _make_room(self, order: Order, count: int, medium_id: int, ghost: bool) -> None:
        """Room for ``count`` more marks; when the order compacts, the table's positions of
        this medium (ghosts' in ``t_store``, references' in ``t_access``) move with it."""
        old = order.make_room(count)
        if old is not None:
            table = self.table
            column = table.t_store if ghost else table.t_access
            live = (table.state == GHOST) if ghost else table.live_mask()
            mine = (table.medium == medium_id) & live & (column >= 0)
            column[mine] = np.searchsorted(old, column[mine].astype(np.int64))

    def _forget_oldest(self, tier: MediumState, medium_id: int) -> None:
        """Keep at most ``max_ghosts`` ghosts of a medium, and none deeper than the ghost
        horizon: the oldest go (their restores will count as first stores, which only
        matters for ranks beyond what is kept)."""
        limit = ghost_limits(self.config, np.array([tier.capacity], np.int64), tier.ratio)
        excess = tier.ghosts.live - int(limit[0])
        if excess <= 0:
            return
        keys = tier.ghosts.keys[tier.ghosts.oldest(excess)]
        slots = self.table.find(keys, np.full(keys.shape[0], medium_id, np.uint8))
        self._drop(tier, slots[slots >= 0])

    # --- checkpoints -----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
        """Arrays and scalars to continue from: the sampled keys, every medium's orders,
        threshold and counters (buffered rows are applied first)."""
        with self.lock:
            self._flush_all()
            table = self.table
            live = table.live_slots()
            arrays: dict[str, npt.NDArray[Any]] = {
                f"table.{name}": getattr(table, name)[live].copy() for name in _TABLE_COLUMNS
            }
            arrays["resident"], arrays["observed"] = self._resident.copy(), self._observed.copy()
            media: dict[str, Any] = {}
            for medium_id, tier in self._tiers.items():
                tier_arrays, media[str(medium_id)] = tier.state()
                arrays |= {f"medium.{medium_id}.{k}": v for k, v in tier_arrays.items()}
            return arrays, {"config": self._fingerprint(), "media": media}

    def load_state(self, arrays: dict[str, npt.NDArray[Any]], meta: dict[str, Any]) -> None:
        """Continue from :meth:`state`; ValueError (and nothing changed) when it was taken
        under other settings or does not fit."""
        if meta.get("config") != self._fingerprint():
            raise ValueError("what-if settings changed since the checkpoint")
        tiers: dict[int, MediumState] = {}
        for medium, scalars in meta["media"].items():
            tier = MediumState(self.config, None, self._threshold, self.chunk)
            prefix = f"medium.{medium}."
            tier.load_state(
                {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)},
                scalars,
            )
            tiers[int(medium)] = tier
        table = BlockTable()
        states = arrays["table.state"]
        table.reserve(int(states.shape[0]))
        for state in (RESIDENT, GHOST):
            rows = np.flatnonzero(states == state)
            slots = table.insert(arrays["table.key"][rows], arrays["table.medium"][rows], state)
            table.t_store[slots] = arrays["table.t_store"][rows]
            table.t_access[slots] = arrays["table.t_access"][rows]
        with self.lock:
            self.table, self._tiers = table, tiers
            self._resident[: arrays["resident"].shape[0]] = arrays["resident"]
            self._observed[: arrays["observed"].shape[0]] = arrays["observed"]

    def _fingerprint(self) -> dict[str, Any]:
        config = self.config
        return {
            "sample_ratio": config.sample_ratio,
            "max_sampled_blocks": config.max_sampled_blocks,
            "max_ghosts": config.max_ghosts,
            "capacity_factors": list(config.capacity_factors),
            "distance_buckets": list(config.distance_buckets),
            "capacity": [list(c) for c in config.capacity],
        }

    # --- reading ---------------------------------------------------------------------------
    def snapshot(self) -> WhatIfSnapshot:
        with self.lock:
            self._flush_all()
            media: dict[int, MediumWhatIf] = {}
            nbytes = self.table.nbytes
            for medium_id, tier in self._tiers.items():
                nbytes += tier.ghosts.nbytes + (tier.recency.nbytes if tier.recency else 0)
                distance = None
                if tier.bounds is not None:
                    distance = HistogramSnapshot(
                        tuple(float(b) for b in tier.bounds),
                        tier.counts.astype(np.uint64)[None, :].copy(),
                        np.array([tier.sum]),
                    )
                media[medium_id] = MediumWhatIf(
                    capacity=tier.capacity,
                    capacity_configured=tier.configured,
                    avoided=tuple(int(x) for x in tier.avoided),
                    hits=tuple(int(x) for x in tier.hits),
                    distances_known=tier.recency is not None,
                    distance=distance,
                    sampled_stores=tier.stores,
                    sampled_restores=tier.restores,
                    sampled_hits=tier.sampled_hits,
                    ghosts=tier.ghosts.live,
                    sample_ratio=tier.ratio,
                    sampled_blocks=tier.sampled,
                )
            return WhatIfSnapshot(
                sample_ratio=self.config.sample_ratio,
                max_sampled_blocks=self.config.max_sampled_blocks,
                factors=self.config.capacity_factors,
                avoided_factors=self.config.avoided_factors,
                media=media,
                nbytes=nbytes,
            )
