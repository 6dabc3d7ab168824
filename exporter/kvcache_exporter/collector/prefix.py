"""Prefix depth of stored blocks, resolved for a whole batch in stream order.

A ``BlockStored`` names its parent (the block before its first one); block *i* of the event
then sits at depth ``depth(parent) + i + 1``, or ``i + 1`` with no parent. Depth is a property
of the hash chain, not of the medium, so a CPU copy of a block has its GPU original's depth.

Within a batch the parent may itself be stored earlier in the same batch; it is found by
(hash, row) search and chains of such events settle in a few vectorized passes. A parent not
stored earlier in the batch is looked up as the table stood before the batch. Either way the
result depends only on the stream, never on how it was cut into batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..protocol.batch import OP_STORE, EventBatch

DepthLookup = Callable[[npt.NDArray[np.uint64]], npt.NDArray[np.int64]]


def resolve_depths(batch: EventBatch, lookup: DepthLookup) -> npt.NDArray[np.int64]:
    """Depth per row (0 for rows that are not stores, or whose chain is unknown).

    ``lookup(parent_hashes)`` gives the depth the table already knows for each hash (0 when
    it knows none).
    """
    depth = np.zeros(len(batch), np.int64)
    chain = batch.chain
    if chain is None:
        return depth
    stored = np.flatnonzero(batch.op == OP_STORE)
    if not stored.size:
        return depth
    offset = chain.offset[stored].astype(np.int64)
    first = offset == 0
    event_of = np.cumsum(first) - 1  # event index of each stored row
    event_rows = stored[first]  # first row of each event
    has_parent = chain.has_parent[event_rows]
    parent = chain.parent[event_rows]
    events = event_rows.shape[0]

    # Base depth per event: 0 with no parent, else the parent's depth (-1 while unknown).
    base = np.where(has_parent, -1, 0)
    # Parents stored earlier in this batch: the latest such row before the event.
    hashes = batch.block_hash[stored]
    unique, hash_id = np.unique(hashes, return_inverse=True)
    width = np.int64(stored.size + 1)
    composite = hash_id.astype(np.int64) * width + np.arange(stored.size)
    order = np.argsort(composite)
    composite_sorted = composite[order]
    in_batch = np.full(events, -1, np.int64)  # index into `stored` of the parent's row
    with_parent = np.flatnonzero(has_parent)
    if with_parent.size:
        pos = np.searchsorted(unique, parent[with_parent])
        present = (pos < unique.size) & (
            unique[np.minimum(pos, unique.size - 1)] == parent[with_parent]
        )
        # Position in `stored` of each event's first row bounds the search (strictly before).
        first_index = np.flatnonzero(first)[with_parent]
        query = np.minimum(pos, unique.size - 1).astype(np.int64) * width + first_index
        found = np.searchsorted(composite_sorted, query, side="left") - 1
        ok = present & (found >= 0)
        ok[ok] = composite_sorted[found[ok]] // width == pos[ok]
        in_batch[with_parent[ok]] = order[found[ok]]
        outside = with_parent[~ok]
        if outside.size:
            known = lookup(parent[outside])
            base[outside] = np.where(known > 0, known, -1)
            # A parent unknown to the table and absent from the batch stays unknown.
            base[outside[known <= 0]] = -2

    pending = np.flatnonzero(in_batch >= 0)
    while pending.size:  # each pass settles one more link of chains stored together
        parent_event = event_of[in_batch[pending]]
        parent_base = base[parent_event]
        settled = parent_base != -1
        if not settled.any():
            break
        rows = pending[settled]
        parent_row_depth = np.where(
            parent_base[settled] >= 0, parent_base[settled] + offset[in_batch[rows]] + 1, -2
        )
        base[rows] = parent_row_depth
        pending = pending[~settled]

    row_base = base[event_of]
    depth[stored] = np.where(row_base >= 0, row_base + offset + 1, 0)
    return depth
