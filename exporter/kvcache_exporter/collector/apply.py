"""Applying batches: how each row changes one engine's collector state.

A batch is split at its ``AllBlocksCleared`` rows (they touch every key); each segment between
them is applied by the compiled loop of ``_apply.pyx`` (row by row, in stream order) where it
is built, else in the rounds of :mod:`.rounds`, one vectorized pass per round: the reference.
A store of a resident key adds a physical copy (unless stores of resident keys are hit
reports); a key's lifecycle ends with its last copy, and a removal's ``copies_left``, when the
engine sends it, is authoritative. Removals are observed into the lifecycle histograms,
remembered as ghosts so a later store is recognised as a restore, and logged in stream order.
Each ghost gets the ordinal of its removal (in its ``t_access`` slot, unused by a ghost: the
compiled loop at once, the rounds once the batch is done, the same ordinals), and after each
batch the table's horizon moves up to forget the ghosts whose removal is no longer among the
last ``removed_memory``: memory per distinct removed key, no queue of removals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol.batch import NO_COPY_COUNT, OP_ACCESS, OP_CLEAR, OP_REMOVE, OP_STORE, EventBatch
from ..protocol.extensions import load_extension
from .config import REASON_CLEARED
from .histogram import HistogramSet
from .prefix import resolve_depths
from .rounds import Runs, plan_segment
from .snapshot import CollectorTotals, CutTotals
from .state import CollectorState
from .table import EMPTY, GHOST, RESIDENT, TOMBSTONE
from .transitions import ResidencyChanges

_U64 = npt.NDArray[np.uint64]
_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]
_I64 = npt.NDArray[np.int64]


# What the compiled loop says each row did (bits of its per-row flags).
_F_COPY: Final = 1  # a copy came or went, the key's life goes on
_F_STORED: Final = 2
_F_RESTORED: Final = 4
_F_RESIDENT: Final = 8  # the key became resident
_F_GONE: Final = 16  # the key's last copy went


_KERNEL: Final = load_extension(
    "kvcache_exporter.collector._apply",
    {
        "OP_CODES": (OP_STORE, OP_REMOVE, OP_ACCESS, NO_COPY_COUNT),
        "FLAGS": (_F_COPY, _F_STORED, _F_RESTORED, _F_RESIDENT, _F_GONE),
        "STATES": (EMPTY, RESIDENT, GHOST, TOMBSTONE),
    },
)
COMPILED: Final = _KERNEL is not None
"""Whether collectors with a compiled block table apply segments in the compiled loop."""


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
    ) -> CutTotals:
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
        b = self.before
        return CutTotals(
            stored=b.stored + before_cuts(self.stored),
            evicted=b.evicted + before_cuts(evicted.astype(np.int64)),
            restores=b.restores + before_cuts(self.restored),
            resident=b.resident + before_cuts(self.resident),
            clears=b.clears + before_cuts((batch.op == OP_CLEAR).astype(np.int64)),
            lifetime_bounds=b.lifetime_bounds,
            lifetime_counts=b.lifetime_counts[None, :] + life,
        )


class BatchApplier(CollectorState):
    """The collector's state, updated a whole :class:`EventBatch` at a time."""

    # Set by a pool index that follows this engine: the last batch's (or clear's) residency
    # transitions are then kept in ``residency_changes``.
    record_residency = False

    def _reset_state(self) -> None:
        super()._reset_state()
        # A batch's removals as rounds produce them, with their rows: settled in stream order.
        self._pending_ghosts: list[tuple[npt.NDArray[np.int64], _U64, npt.NDArray[np.uint8]]]
        self._pending_ghosts = []
        self._pending_evictions: list[tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]]
        self._pending_evictions = []
        self._outcome: _Outcome | None = None
        # Rows of the last batch that only changed a key's copy count (see copy_rows).
        self._copy_positions: list[npt.NDArray[np.int64]] = []
        self.copy_rows = np.zeros(0, bool)
        self._residency_parts: list[ResidencyChanges] = []
        self.residency_changes = ResidencyChanges.empty()

    def apply(self, batch: EventBatch, cuts: Sequence[int] = ()) -> CutTotals | None:
        """Apply one batch of block operations, in stream order.

        For the row indices in ``cuts`` (ascending, if any), returns the totals as they stood
        just before each: what a sampler would have read had the batch been split there, at
        the cost of a cumulative sum instead of an apply per piece.
        """
        if not len(batch):
            self.copy_rows = np.zeros(0, bool)
            self.residency_changes = ResidencyChanges.empty()
            if not cuts:
                return None
            # Nothing happened before any cut: each is the totals as they stand.
            nothing = _Outcome(0, self._totals())
            return nothing.totals_at(cuts, batch, self._evicting_reasons(), self.hist["lifetime"])
        with self.lock:
            # From here on a row's ``medium`` column holds its place id (medium and group).
            batch = replace(batch, medium=self.places.ids(batch.medium, batch.group))
            self._outcome = _Outcome(len(batch), self._totals()) if cuts else None
            depth = self._depths(batch)
            position = np.arange(len(batch))
            clears = np.flatnonzero(batch.op == OP_CLEAR)
            start = 0
            for row in clears.tolist():
                rows = slice(start, row)
                self._apply_segment(batch.take(rows), depth[rows], position[rows])
                self._clear(float(batch.ts[row]), self.reasons.id_of(REASON_CLEARED), row)
                if self._compiled_apply:
                    self._number_pending_ghosts()  # the compiled loop numbers its own at once
                self.clears += 1
                start = row + 1
            rows = slice(start, len(batch))
            self._apply_segment(batch.take(rows), depth[rows], position[rows])
            self._settle_removals()
            self.copy_rows = np.zeros(len(batch), bool)
            for rows_done in self._copy_positions:
                self.copy_rows[rows_done] = True
            self._copy_positions = []
            self._settle_residency()
            outcome, self._outcome = self._outcome, None
            if outcome is None:
                return None
            return outcome.totals_at(cuts, batch, self._evicting_reasons(), self.hist["lifetime"])

    def clear(self, ts: float, reason: str) -> None:
        """Remove every resident block (an engine reset or restart), counted under ``reason``."""
        with self.lock:
            self._clear(ts, self.reasons.id_of(reason), 0)
            self._settle_removals()
            self._settle_residency()

    def _note_residency(self, slots: npt.NDArray[np.int64], rows: _I64, delta: int) -> None:
        """Keys at ``slots`` became resident (+1) or stopped being resident (-1) at ``rows``."""
        if self.record_residency:
            table = self.table
            self._residency_parts.append(
                ResidencyChanges(
                    rows, table.key[slots], table.medium[slots], np.full(rows.size, delta, np.int8)
                )
            )

    def _settle_residency(self) -> None:
        self.residency_changes = ResidencyChanges.gather(self._residency_parts)
        self._residency_parts = []

    def _depths(self, batch: EventBatch) -> npt.NDArray[np.int64]:
        """Each row's prefix depth, from the table as it stands before the batch."""
        chain = batch.chain
        if not self._compiled_apply or chain is None:
            return resolve_depths(batch, self._known_depth)
        assert _KERNEL is not None
        depth = np.empty(len(batch), np.int64)
        table, c = self.table, np.ascontiguousarray
        _KERNEL.resolve_depths(
            c(batch.op), c(batch.block_hash), c(chain.parent), c(chain.has_parent).view(np.uint8),
            c(chain.offset), table.key, table.medium, table.state, table.t_access, table.depth,
            table.horizon, len(self.places), depth,
        )  # fmt: skip
        return depth

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
        """Apply rows with no clear among them: in the compiled loop, or round by round and
        then the collapsed hits."""
        if not len(seg):
            return
        if self._compiled_apply:
            self._apply_segment_compiled(seg, depth, position)
            return
        plan = plan_segment(seg, self.config.hit_reports)
        for rows in plan.rounds:
            rnd = seg if isinstance(rows, slice) else seg.take(rows)
            self._apply_round(rnd, depth[rows], position[rows], plan.runs, rows)
        self._apply_followers(seg, plan.followers, plan.previous, plan.runs, position)

    @property
    def _compiled_apply(self) -> bool:
        return _KERNEL is not None and self.table.compiled

    def _apply_segment_compiled(
        self, seg: EventBatch, depth: npt.NDArray[np.int64], position: npt.NDArray[np.int64]
    ) -> None:
        """The segment in the compiled loop (rows in stream order; one call, or one more each
        time the table has to grow), then what it says each row did, as the rounds would have
        left it."""
        assert _KERNEL is not None
        table = self.table
        n = len(seg)
        flags = np.empty(n, np.uint8)
        life_bucket = np.empty(n, np.int16)
        ev_row = np.empty(n, np.int64)
        ev_stored, ev_last = np.empty(n, np.float64), np.empty(n, np.float64)
        ev_accesses, ev_depth = np.empty(n, np.uint32), np.empty(n, np.uint16)
        hist = self.hist
        c = np.ascontiguousarray
        rows_in = (
            c(seg.op), c(seg.block_hash), c(seg.ts), c(seg.medium), c(seg.reason),
            c(seg.adapter), c(seg.tokens), c(seg.copies_left), c(depth),
            self._sampled(seg.block_hash).view(np.uint8),
        )  # fmt: skip
        start = logged = 0
        while True:
            stop, unknown_accesses, unknown_removals, untracked, ghosts, claimed, logged = (
                _KERNEL.apply_segment(
                    *rows_in, start, table.room(),
                    self.config.hit_reports, seg.chain is not None,
                    self.config.max_tracked_blocks, int(self.resident_hashes.sum()),
                    float(self.removals),
                    table.key, table.medium, table.state, table.t_store, table.t_access,
                    table.accesses, table.depth, table.copies, table.tokens, table.adapter,
                    table.horizon,
                    self.places.medium, self.stored, self.accessed, self.restores,
                    self.resident, self.resident_hashes, self.resident_tokens,
                    self.tracked_per_place, self.removed, self.adapter_stored,
                    self.adapter_restores, self.adapter_resident,
                    hist["lifetime"].edges,
                    hist["lifetime"].counts, hist["lifetime"].sums,
                    hist["idle_before_evict"].counts, hist["idle_before_evict"].sums,
                    hist["reuse_gap"].counts, hist["reuse_gap"].sums,
                    hist["restore_gap"].counts, hist["restore_gap"].sums,
                    self.accesses_before_evict.edges,
                    self.accesses_before_evict.counts, self.accesses_before_evict.sums,
                    self.prefix_depth.edges, self.prefix_depth.counts, self.prefix_depth.sums,
                    flags, life_bucket, ev_row, ev_stored, ev_last, ev_accesses, ev_depth,
                    logged,
                )
            )  # fmt: skip
            table.used += claimed
            self.removals += ghosts
            self.unknown_accesses += unknown_accesses
            self.unknown_removals += unknown_removals
            self.untracked_stores += untracked
            if stop == n:
                break
            # Out of room: grow for every distinct key the rest stores that is absent now (an
            # upper bound of its new keys; the row it stopped at is one), and go on from there.
            rest = np.flatnonzero(seg.op[stop:] == OP_STORE) + stop
            table.reserve_absent(seg.block_hash[rest], seg.medium[rest])
            start = stop
        self._copy_positions.append(position[(flags & _F_COPY) != 0])
        if logged:
            rows = ev_row[:logged]
            columns: dict[str, npt.NDArray[Any]] = {
                "block_hash": seg.block_hash[rows],
                "medium": seg.medium[rows],
                "reason": seg.reason[rows],
                "stored_at": ev_stored[:logged],
                "last_access_at": ev_last[:logged],
                "removed_at": seg.ts[rows],
                "accesses": ev_accesses[:logged],
                "prefix_depth": ev_depth[:logged],
            }
            self._pending_evictions.append((position[rows], columns))
        if self.record_residency:
            became, gone = (flags & _F_RESIDENT) != 0, (flags & _F_GONE) != 0
            rows = np.flatnonzero(became | gone)
            self._residency_parts.append(
                ResidencyChanges(
                    position[rows],
                    seg.block_hash[rows],
                    seg.medium[rows],
                    np.where(became[rows], 1, -1).astype(np.int8),
                )
            )
        outcome = self._outcome
        if outcome is not None:
            rows_of = slice(int(position[0]), int(position[-1]) + 1)  # a segment: contiguous
            outcome.stored[rows_of] += (flags & _F_STORED) != 0
            outcome.restored[rows_of] += (flags & _F_RESTORED) != 0
            outcome.resident[rows_of] += (flags & _F_RESIDENT) != 0
            outcome.resident[rows_of] -= (flags & _F_GONE) != 0
            observed = np.flatnonzero(life_bucket >= 0)
            outcome.add_lifetimes(position[observed], life_bucket[observed].astype(np.int64))

    def _apply_followers(
        self,
        seg: EventBatch,
        rows: npt.NDArray[np.int64],
        previous: npt.NDArray[np.int64],
        runs: Runs,
        position: npt.NDArray[np.int64],
    ) -> None:
        """Count the collapsed hits (``rows``), now that each run's head has said whether it hit."""
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
            self._note_residency(s, position[restore], 1)
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
            # Every write through `slot` is done: a rebuild may move the slots now.
            table.reserve(int(rows.size))
            s = table.insert(keys[rows], med[rows], RESIDENT)
            mask = np.zeros(len(rnd), bool)
            mask[rows] = True
            self._start_life(s, ts[rows], rnd, mask)
            self._count_stored(s, med[rows], sampled[rows])
            self._note_residency(s, position[rows], 1)
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
        self._note_residency(s, position[mask], -1)
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
        """Turn removed slots into ghosts; they get their removal ordinals in stream order once
        the batch is applied (:meth:`_settle_removals`), and stay live until then."""
        table = self.table
        table.state[slots] = GHOST
        table.t_store[slots] = ts
        table.t_access[slots] = np.inf
        self._pending_ghosts.append((position, table.key[slots].copy(), table.medium[slots].copy()))

    def _settle_removals(self) -> None:
        """Log this batch's removals in stream order (rounds produce them grouped by
        occurrence), then forget the oldest ghosts beyond ``removed_memory``."""
        pending = self._pending_evictions
        if len(pending) == 1:  # one segment of the compiled loop: in stream order already
            self.evictions.append(**pending[0][1])
        elif pending:
            order = np.argsort(np.concatenate([pos for pos, _ in pending]), kind="stable")
            columns = {
                name: np.concatenate([cols[name] for _, cols in pending])[order]
                for name in pending[0][1]
            }
            self.evictions.append(**columns)
        self._pending_evictions = []
        self._number_pending_ghosts()
        # A ghost is remembered while its removal is among the last `removed_memory`.
        self.table.horizon = float(self.removals - self.config.removed_memory)

    def _number_pending_ghosts(self) -> None:
        if self._pending_ghosts:
            pending = self._pending_ghosts
            order = np.argsort(np.concatenate([g[0] for g in pending]), kind="stable")
            keys = np.concatenate([g[1] for g in pending])[order]
            media = np.concatenate([g[2] for g in pending])[order]
            self._pending_ghosts = []
            self._number_ghosts(keys, media)

    def _number_ghosts(self, keys: _U64, media: npt.NDArray[np.uint8]) -> None:
        """Give this batch's removals (in stream order) the next removal ordinals; a key
        still a ghost keeps its last removal's. Runs after the whole batch: the slots the
        rounds held may have moved since, so the keys are looked up again."""
        table = self.table
        ordinals = self.removals + np.arange(keys.shape[0], dtype=np.float64)
        self.removals += int(keys.shape[0])
        slots = table.find(keys, media)
        # Restored since (resident): no ordinal. Removed twice: the last removal's.
        last = slots.shape[0] - 1 - np.unique(slots[::-1], return_index=True)[1]
        last = last[(slots[last] >= 0) & (table.state[slots[last]] == GHOST)]
        table.t_access[slots[last]] = ordinals[last]

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
        self._note_residency(slots, position, -1)
        self._ghost(slots, t, position)
