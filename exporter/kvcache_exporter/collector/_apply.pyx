# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The collector's apply of a segment (rows with no clear among them) in one C loop.

Row by row in stream order, as the engine did them: each row probes the block table once and
moves its block through the lifecycle (store, copy, restore, hit, removal of a copy or of the
last one), updating the per-place counters and histograms in place and writing per-row flags
for the caller (copy rows, and what the monitor's cuts need). The vectorized rounds of
:mod:`.apply` are the reference and the fallback; both give the same counters and histogram
counts (sums may differ in the last bits: here they are added in stream order).

A removal numbers its ghost at once (the next removal ordinal): the reference numbers a
batch's ghosts in stream order after the batch, which gives the same ordinals, and the
table's horizon moves only between batches in both.
"""

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

import numpy as np

include "_slot_hash.pxi"

# The protocol's op codes and no-count sentinel (protocol/batch.py), and the row flags the
# caller reads: apply.py compares these tuples with its own values before using this module.
cdef enum:
    STORE = 0
    REMOVE = 1
    ACCESS = 2
    NO_COUNT = -1
    F_COPY = 1  # a copy came or went, the key's life goes on
    F_STORED = 2
    F_RESTORED = 4
    F_RESIDENT = 8  # the key became resident
    F_GONE = 16  # the key's last copy went

OP_CODES = (STORE, REMOVE, ACCESS, NO_COUNT)
FLAGS = (F_COPY, F_STORED, F_RESTORED, F_RESIDENT, F_GONE)
STATES = (EMPTY, RESIDENT, GHOST, TOMBSTONE)


cdef struct Hist:
    # One HistogramSet's arrays as raw pointers: memoryviews passed to a function in the loop
    # would cost an atomic reference count each.
    const double* edges
    Py_ssize_t bounds
    uint64_t* counts  # [labels, bounds + 1]
    double* sums  # [labels]


cdef inline Hist hist_of(const double[::1] edges, uint64_t[:, ::1] counts, double[::1] sums):
    cdef Hist h
    h.edges = &edges[0]
    h.bounds = edges.shape[0]
    h.counts = &counts[0, 0]
    h.sums = &sums[0]
    return h


cdef inline Py_ssize_t observe(Hist* h, uint8_t label, double value) noexcept nogil:
    """Count ``value`` in the first bucket whose bound is at or above it (le semantics; the
    last is +Inf), as numpy's searchsorted(side="left") finds it, NaN included (last)."""
    cdef Py_ssize_t lo = 0, hi = h.bounds, mid
    if value == value:
        while lo < hi:
            mid = (lo + hi) >> 1
            if h.edges[mid] < value:
                lo = mid + 1
            else:
                hi = mid
    else:
        lo = hi
    h.counts[label * (h.bounds + 1) + lo] += 1
    h.sums[label] += value
    return lo


def apply_segment(
    # the segment's rows (``place``: place ids)
    const uint8_t[::1] op,
    const uint64_t[::1] keys,
    const double[::1] ts,
    const uint8_t[::1] place,
    const uint8_t[::1] reason,
    const uint8_t[::1] adapter,
    const uint32_t[::1] tokens,
    const int32_t[::1] copies_left,
    const int64_t[::1] depth,
    const uint8_t[::1] sampled,
    Py_ssize_t start,
    int64_t room,
    bint hit_reports,
    bint has_chain,
    int64_t max_tracked,
    int64_t tracked_total,
    double first_ordinal,
    # the block table's columns (room for every store reserved by the caller)
    uint64_t[::1] t_key,
    uint8_t[::1] t_medium,
    uint8_t[::1] t_state,
    double[::1] t_store,
    double[::1] t_access,
    uint32_t[::1] t_accesses,
    uint16_t[::1] t_depth,
    uint16_t[::1] t_copies,
    uint16_t[::1] t_tokens,
    uint8_t[::1] t_adapter,
    double horizon,
    # per place: its medium id; the counters
    const uint8_t[::1] place_medium,
    uint64_t[::1] stored,
    uint64_t[::1] accessed,
    uint64_t[::1] restores,
    int64_t[::1] resident,
    int64_t[::1] resident_hashes,
    int64_t[::1] resident_tokens,
    int64_t[::1] tracked_per_place,
    uint64_t[:, ::1] removed,
    uint64_t[:, ::1] adapter_stored,
    uint64_t[:, ::1] adapter_restores,
    int64_t[:, ::1] adapter_resident,
    # histograms: bounds, counts per place, sums per place
    const double[::1] duration_edges,
    uint64_t[:, ::1] lifetime_counts,
    double[::1] lifetime_sums,
    uint64_t[:, ::1] idle_counts,
    double[::1] idle_sums,
    uint64_t[:, ::1] reuse_counts,
    double[::1] reuse_sums,
    uint64_t[:, ::1] restore_counts,
    double[::1] restore_sums,
    const double[::1] access_edges,
    uint64_t[:, ::1] abe_counts,
    double[::1] abe_sums,
    const double[::1] depth_edges,
    uint64_t[:, ::1] depth_counts,
    double[::1] depth_sums,
    # outputs per row, and per logged eviction (the row, and the block's columns)
    uint8_t[::1] flags,
    int16_t[::1] life_bucket,
    int64_t[::1] ev_row,
    double[::1] ev_stored,
    double[::1] ev_last,
    uint32_t[::1] ev_accesses,
    uint16_t[::1] ev_depth,
    Py_ssize_t logged,
):
    """Apply the rows from ``start`` on, claiming at most ``room`` empty slots: the loop stops
    before a row that would claim one more (the caller grows the table and calls again from
    there). Returns (the row it stopped at, or the row count; unknown accesses, unknown
    removals, untracked stores, ghosts numbered, empty slots claimed; evictions logged so
    far, counting the ``logged`` before this call)."""
    cdef Py_ssize_t n = op.shape[0]
    cdef Py_ssize_t i
    cdef uint64_t capacity = t_key.shape[0]
    cdef uint64_t k
    cdef int64_t slot, free_slot, left, count
    cdef int64_t unknown_accesses = 0, unknown_removals = 0, untracked = 0
    cdef int64_t ghosts = 0, claimed_empty = 0
    cdef Py_ssize_t evictions = logged, stop = n
    cdef uint8_t p, m, st, o, a, smp
    cdef double t
    cdef Hist lifetime = hist_of(duration_edges, lifetime_counts, lifetime_sums)
    cdef Hist idle = hist_of(duration_edges, idle_counts, idle_sums)
    cdef Hist reuse = hist_of(duration_edges, reuse_counts, reuse_sums)
    cdef Hist restore = hist_of(duration_edges, restore_counts, restore_sums)
    cdef Hist abe = hist_of(access_edges, abe_counts, abe_sums)
    cdef Hist depth_hist = hist_of(depth_edges, depth_counts, depth_sums)
    for i in range(start, n):
        flags[i] = 0
        life_bucket[i] = -1
    with nogil:
        for i in range(start, n):
            k = keys[i]
            p = place[i]
            t = ts[i]
            o = op[i]
            smp = sampled[i]
            m = place_medium[p]
            # One probe: the key's live slot, or the first free slot on its path.
            slot = kv_probe(&t_key[0], &t_medium[0], &t_state[0], &t_access[0], capacity,
                            horizon, k, p, &free_slot)
            st = t_state[slot] if slot >= 0 else EMPTY

            if o == ACCESS or (o == STORE and st == RESIDENT and hit_reports):
                if st != RESIDENT:
                    unknown_accesses += 1
                    continue
                if smp:
                    observe(&reuse, p, t - t_access[slot])
                t_access[slot] = t
                t_accesses[slot] += 1
                accessed[p] += 1
            elif o == STORE:
                flags[i] = F_STORED
                if st == RESIDENT:  # one more physical copy; the block's life goes on
                    t_copies[slot] = t_copies[slot] + 1 if t_copies[slot] < 65535 else 65535
                    stored[p] += 1
                    resident[p] += 1
                    resident_tokens[p] += t_tokens[slot]
                    a = t_adapter[slot]
                    adapter_stored[m, a] += 1
                    adapter_resident[m, a] += 1
                    flags[i] |= F_COPY
                    continue
                if st == GHOST:
                    if smp:
                        observe(&restore, p, t - t_store[slot])
                    restores[p] += 1
                    adapter_restores[m, adapter[i]] += 1
                    flags[i] |= F_RESTORED
                elif tracked_total >= max_tracked:  # full: counted, not followed
                    untracked += 1
                    stored[p] += 1
                    adapter_stored[m, adapter[i]] += 1
                    continue
                else:
                    slot = free_slot
                    if t_state[slot] == EMPTY:
                        if claimed_empty == room:  # the table must grow first
                            flags[i] = 0
                            stop = i
                            break
                        claimed_empty += 1
                    t_key[slot] = k
                    t_medium[slot] = p
                # The block's life begins, with one copy.
                t_state[slot] = RESIDENT
                t_store[slot] = t
                t_access[slot] = t
                t_accesses[slot] = 0
                t_copies[slot] = 1
                t_tokens[slot] = tokens[i] if tokens[i] < 65535 else 65535
                t_adapter[slot] = adapter[i]
                t_depth[slot] = 0
                stored[p] += 1
                resident[p] += 1
                resident_hashes[p] += 1
                tracked_total += 1
                resident_tokens[p] += t_tokens[slot]
                tracked_per_place[p] += smp
                adapter_stored[m, adapter[i]] += 1
                adapter_resident[m, adapter[i]] += 1
                flags[i] |= F_RESIDENT
                if has_chain:
                    t_depth[slot] = depth[i] if depth[i] < 65535 else 65535
                    if depth[i] > 0 and smp:
                        observe(&depth_hist, p, <double>depth[i])
            elif o == REMOVE:
                removed[p, reason[i]] += 1
                if st != RESIDENT:
                    unknown_removals += 1
                    continue
                count = t_copies[slot]
                if copies_left[i] != NO_COUNT:
                    left = copies_left[i] if copies_left[i] < 65535 else 65535
                else:
                    left = count - 1
                a = t_adapter[slot]
                if left > 0:  # copies go, some remain: the block's life goes on
                    count -= left
                    resident[p] -= count
                    resident_tokens[p] -= <int64_t>t_tokens[slot] * count
                    adapter_resident[m, a] -= count
                    t_copies[slot] = <uint16_t>left
                    flags[i] = F_COPY
                    continue
                if smp:
                    life_bucket[i] = <int16_t>observe(&lifetime, p, t - t_store[slot])
                    observe(&idle, p, t - t_access[slot])
                    observe(&abe, p, <double>t_accesses[slot])
                    ev_row[evictions] = i
                    ev_stored[evictions] = t_store[slot]
                    ev_last[evictions] = t_access[slot]
                    ev_accesses[evictions] = t_accesses[slot]
                    ev_depth[evictions] = t_depth[slot]
                    evictions += 1
                resident[p] -= count
                resident_tokens[p] -= <int64_t>t_tokens[slot] * count
                adapter_resident[m, a] -= count
                resident_hashes[p] -= 1
                tracked_total -= 1
                tracked_per_place[p] -= smp
                # Its last copy is gone: a ghost, numbered with its removal's ordinal.
                t_state[slot] = GHOST
                t_store[slot] = t
                t_access[slot] = first_ordinal + ghosts
                ghosts += 1
                flags[i] = F_GONE
    return stop, unknown_accesses, unknown_removals, untracked, ghosts, claimed_empty, evictions


def resolve_depths(
    const uint8_t[::1] op,
    const uint64_t[::1] keys,
    const uint64_t[::1] parent,
    const uint8_t[::1] has_parent,
    const uint32_t[::1] offset,
    const uint64_t[::1] t_key,
    const uint8_t[::1] t_medium,
    const uint8_t[::1] t_state,
    const double[::1] t_access,
    const uint16_t[::1] t_depth,
    double horizon,
    int places,
    int64_t[::1] depth,
):
    """Each store row's prefix depth (0: unknown), as :func:`.prefix.resolve_depths` gives it:
    an event's base is the depth of the latest row storing its parent earlier in the batch,
    else the deepest the table knows for the parent in any place (the batch has not been
    applied yet), else unknown. A map of the batch's stored hashes to their latest row's depth
    (open addressing, twice the batch's rows) replaces the reference's sorts."""
    cdef Py_ssize_t n = op.shape[0], i
    cdef uint64_t size = 16, mask, h, s, k
    cdef uint64_t capacity = t_key.shape[0]
    cdef int64_t base = 0, known
    cdef int place
    cdef uint8_t st
    cdef uint64_t[::1] map_key
    cdef int64_t[::1] map_depth
    while size < <uint64_t>(2 * n):
        size <<= 1
    mask = size - 1
    map_key = np.zeros(size, np.uint64)
    map_depth = np.full(size, -1, np.int64)  # -1: slot empty
    with nogil:
        for i in range(n):
            depth[i] = 0
            if op[i] != STORE:
                continue
            if offset[i] == 0:  # an event's first block: its base
                base = 0
                if has_parent[i]:
                    base = -1
                    k = parent[i]
                    h = (k * 0x9E3779B97F4A7C15ULL) >> 32 & mask
                    while map_depth[h] >= 0:
                        if map_key[h] == k:
                            base = map_depth[h] if map_depth[h] > 0 else -1
                            break
                        h = (h + 1) & mask
                    if map_depth[h] < 0:  # not stored earlier in the batch: the table
                        known = 0
                        for place in range(places):
                            s = kv_home(k, <uint8_t>place, capacity)
                            while True:
                                st = t_state[s]
                                if st == EMPTY:
                                    break
                                if t_key[s] == k and t_medium[s] == place and (
                                    st == RESIDENT or (st == GHOST and t_access[s] >= horizon)
                                ):
                                    if t_depth[s] > known:
                                        known = t_depth[s]
                                    break
                                s += 1
                                if s == capacity:
                                    s = 0
                        base = known if known > 0 else -1
            if base >= 0:
                depth[i] = base + offset[i] + 1
            k = keys[i]
            h = (k * 0x9E3779B97F4A7C15ULL) >> 32 & mask
            while map_depth[h] >= 0 and map_key[h] != k:
                h = (h + 1) & mask
            map_key[h] = k
            map_depth[h] = depth[i]
    return None
