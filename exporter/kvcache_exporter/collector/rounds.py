"""The order in which a segment of a batch (rows with no clear among them) is applied.

Operations on different blocks commute, so a segment is applied in rounds: round *r* holds
the *r*-th occurrence of every block, in stream order, and each round is one vectorized pass
(:mod:`.apply`). Runs of hits on one block (an access, or a store of a block a store just made
resident, following a store or an access of it) collapse into their first row, which carries
the run's length and last time: a hot block hit by every request of a batch costs one round,
not one per hit. Pure functions of the rows: nothing here reads or writes collector state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..protocol.batch import OP_ACCESS, OP_STORE, EventBatch

_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]
_I64 = npt.NDArray[np.int64]


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
class SegmentPlan:
    """How a segment is applied: its ``rounds`` in order (rows of distinct blocks each; one
    slice when every row is another block), then the ``followers``, the rows collapsed into
    ``runs``, counted once each run's head has been applied."""

    rounds: list[slice | _I64]
    runs: Runs
    followers: _I64
    previous: _I64  # per row: the row before it of the same block (-1 for a block's first)


def plan_segment(seg: EventBatch, hit_reports: bool) -> SegmentPlan:
    """Rounds and runs of a non-empty segment; ``hit_reports``: stores of resident keys are
    hits (vLLM's report mode "full"), so a store after a store collapses too."""
    n = len(seg)
    order, new_block = _block_order(seg)
    starts = np.empty(n, bool)
    starts[0] = True
    starts[1:] = new_block
    if starts.all():
        return SegmentPlan(
            [slice(None)], Runs.none(n), np.zeros(0, np.int64), np.full(n, -1, np.int64)
        )
    previous = np.full(n, -1, np.int64)
    previous[order[1:][~starts[1:]]] = order[:-1][~starts[1:]]
    op = seg.op
    prev_op = np.where(previous >= 0, op[np.maximum(previous, 0)], 255)
    follower = (previous >= 0) & (
        ((op == OP_ACCESS) & ((prev_op == OP_ACCESS) | (prev_op == OP_STORE)))
        # A store after a store is a hit only where stores of resident keys report hits;
        # else it is one more physical copy, applied in its own round.
        | ((op == OP_STORE) & (prev_op == OP_STORE) & hit_reports)
    )
    runs = Runs.none(n)
    if follower.any():
        runs = _collapse(seg, order, follower)
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
    kept_rank = rank[kept]
    rounds: list[slice | _I64] = [
        kept[kept_rank == r] for r in range(int(kept_rank.max()) + 1 if kept.size else 0)
    ]
    return SegmentPlan(rounds, runs, np.flatnonzero(follower), previous)


def _block_order(seg: EventBatch) -> tuple[_I64, _BOOL]:
    """Rows sorted by block (hash, place), stream order within a block, and for each pair of
    neighbours in that order whether the second is another block.

    One sort of the hash with the place mixed into its top byte; hashes that differ only in
    their top byte can share such a key across places, and then both columns are sorted.
    """
    key = seg.block_hash ^ (seg.medium.astype(np.uint64) << np.uint64(56))
    order: _I64 = np.argsort(key, kind="stable")
    sorted_key = key[order]
    new_block: _BOOL = sorted_key[1:] != sorted_key[:-1]
    same = np.flatnonzero(~new_block)  # one mixed key: the same block unless the hashes differ
    if same.size and (seg.block_hash[order[same + 1]] != seg.block_hash[order[same]]).any():
        order = np.lexsort((seg.medium, seg.block_hash))  # stable: stream order kept
        new_block = (seg.block_hash[order[1:]] != seg.block_hash[order[:-1]]) | (
            seg.medium[order[1:]] != seg.medium[order[:-1]]
        )
    return order, new_block


def _collapse(seg: EventBatch, order: _I64, follower: _BOOL) -> Runs:
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
