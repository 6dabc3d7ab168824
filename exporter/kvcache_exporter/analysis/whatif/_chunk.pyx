# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""A chunk of one medium's sampled rows in one C loop: the what-if model's sequential part.

Row by row in stream order, as the model defines it: each row probes the model's block table
once; a ghost's rank is the live ghosts evicted at or after it (a prefix query on the ghost
order's Fenwick tree), a hit's distance the live references after its key's previous one (on
the reference order's); marks are killed and appended as the rows go. The counting over the
ranks and distances stays vectorized in the caller. ``model.py``'s numpy passes are the
reference and the fallback; both give the same figures.
"""

from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t

include "../../collector/_slot_hash.pxi"

cdef enum:
    STORE = 0
    REMOVE = 1

OP_CODES = (STORE, REMOVE)
STATES = (EMPTY, RESIDENT, GHOST, TOMBSTONE)
STOPPED_FOR = (1, 2)  # a table slot, a reference order


cdef inline int64_t prefix(const int64_t* tree, int64_t p) noexcept nogil:
    """Live marks at positions [0, p)."""
    cdef int64_t total = 0
    while p > 0:
        total += tree[p]
        p &= p - 1
    return total


cdef inline void add(int64_t* tree, int64_t size, int64_t position, int64_t delta) noexcept nogil:
    cdef int64_t i = position + 1
    while i <= size:
        tree[i] += delta
        i += i & -i


def apply_chunk(
    const uint8_t[::1] op,
    const uint64_t[::1] keys,
    Py_ssize_t start,
    uint8_t medium,
    # the model's block table (a ghost's position in t_store, the last reference's in t_access)
    uint64_t[::1] t_key,
    uint8_t[::1] t_medium,
    uint8_t[::1] t_state,
    double[::1] t_store,
    double[::1] t_access,
    double horizon,
    int64_t room,
    # the ghost order (room for every removal made by the caller)
    uint8_t[::1] g_alive,
    uint64_t[::1] g_keys,
    int64_t[::1] g_tree,
    int64_t g_end,
    # the reference order, when followed (room for every reference made by the caller)
    bint has_recency,
    uint8_t[::1] r_alive,
    int64_t[::1] r_tree,
    int64_t r_end,
    # per row: a store's ghost rank (0: not a restore), hit, live references since (-1: unknown)
    int64_t[::1] rank,
    int8_t[::1] hit,
    int64_t[::1] others,
):
    """Apply the rows from ``start`` on. The loop stops before a row that needs what the
    caller must provide first: a table slot beyond ``room`` empty ones (why: 1), or, without
    ``has_recency``, a reference order at the first hit (why: 2). Returns (the row it stopped
    at, or the row count; why, 0 when done; ghost order end, live ghosts added; reference
    order end, live references added; keys added to the table, empty slots claimed, first
    stores)."""
    cdef Py_ssize_t n = op.shape[0], i
    cdef uint64_t capacity = t_key.shape[0], k
    cdef int64_t slot, free_slot, position
    cdef int64_t g_size = g_alive.shape[0], r_size = r_alive.shape[0]
    cdef int64_t g_live = 0, r_live = 0, added = 0, claimed = 0, stores = 0
    cdef Py_ssize_t stop = n
    cdef int why = 0
    cdef uint8_t st, o
    cdef bint was_ghost, was_resident
    cdef int64_t* gt = &g_tree[0]
    cdef int64_t* rt = &r_tree[0] if has_recency else NULL
    with nogil:
        for i in range(start, n):
            k = keys[i]
            o = op[i]
            slot = kv_probe(&t_key[0], &t_medium[0], &t_state[0], &t_access[0], capacity,
                            horizon, k, medium, &free_slot)
            st = t_state[slot] if slot >= 0 else EMPTY
            was_ghost = st == GHOST
            was_resident = st == RESIDENT
            # What the caller must provide first, before anything of this row changes.
            if slot < 0 and t_state[free_slot] == EMPTY and claimed == room:
                stop, why = i, 1
                break
            if o != REMOVE and was_resident and not has_recency:
                stop, why = i, 2
                break
            rank[i] = 0
            hit[i] = 0
            others[i] = -1
            if slot < 0:  # a key first seen: in the table from now on
                slot = free_slot
                if t_state[slot] == EMPTY:
                    claimed += 1
                t_key[slot] = k
                t_medium[slot] = medium
                t_access[slot] = -1.0
                added += 1
            if was_ghost:  # its ghost dies, whatever the row: ranked first, if a store
                position = <int64_t>t_store[slot]
                if o == STORE:
                    rank[i] = prefix(gt, g_end) - prefix(gt, position)
                g_alive[position] = 0
                add(gt, g_size, position, -1)
                g_live -= 1
            if o == REMOVE:
                g_alive[g_end] = 1
                g_keys[g_end] = k
                add(gt, g_size, g_end, 1)
                t_store[slot] = <double>g_end
                g_end += 1
                g_live += 1
                t_state[slot] = GHOST
                continue
            # A reference (store or access).
            if o == STORE and not was_resident:
                stores += 1
            if has_recency:
                position = <int64_t>t_access[slot]
                if was_resident:
                    hit[i] = 1
                    if position >= 0:
                        others[i] = prefix(rt, r_end) - prefix(rt, position + 1)
                if position >= 0:
                    r_alive[position] = 0
                    add(rt, r_size, position, -1)
                    r_live -= 1
                r_alive[r_end] = 1
                add(rt, r_size, r_end, 1)
                t_access[slot] = <double>r_end
                r_end += 1
                r_live += 1
            t_state[slot] = RESIDENT
    return stop, why, g_end, g_live, r_end, r_live, added, claimed, stores
