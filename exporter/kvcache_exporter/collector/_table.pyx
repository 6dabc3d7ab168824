# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The block table's probe loops in C: one call per batch array, the GIL released inside.

The numpy implementation in :mod:`.table` is the reference; these kernels give the same slot
for every key (same home slot, same linear probing, and ``insert`` claims slots in the same
order as the reference's one-probe-step-per-pass loop), so the two tables are identical slot
for slot. ``find`` is a plain sequential probe: its result does not depend on the order.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

include "_slot_hash.pxi"

STATES = (EMPTY, RESIDENT, GHOST, TOMBSTONE)


def find(
    const uint64_t[::1] key,
    const uint8_t[::1] medium,
    const uint8_t[::1] state,
    const double[::1] t_access,
    double horizon,
    const uint64_t[::1] keys,
    const uint8_t[::1] media,
    int64_t[::1] out,
):
    """``out[i]``: the slot of live key ``(keys[i], media[i])``, or -1 (a ghost whose
    ``t_access`` is below ``horizon`` is not live)."""
    cdef Py_ssize_t n = keys.shape[0]
    cdef Py_ssize_t i
    cdef uint64_t capacity = key.shape[0]
    cdef int64_t free_slot
    with nogil:
        for i in range(n):
            out[i] = kv_probe(&key[0], &medium[0], &state[0], &t_access[0], capacity, horizon,
                              keys[i], media[i], &free_slot)


def insert(
    uint64_t[::1] key,
    uint8_t[::1] medium,
    uint8_t[::1] state,
    const double[::1] t_access,
    double horizon,
    const uint64_t[::1] keys,
    const uint8_t[::1] media,
    uint8_t new_state,
    int64_t[::1] out,
):
    """Claim a free slot (empty, tombstone or expired ghost) for each key, as the reference
    does: every pending key advances one probe step per pass, in key order, and a slot goes
    to the first key that finds it free. Returns how many claimed slots were empty."""
    cdef Py_ssize_t n = keys.shape[0]
    cdef Py_ssize_t i, j, pending_count, kept
    cdef uint64_t capacity = key.shape[0]
    cdef uint64_t s
    cdef uint8_t st
    cdef int64_t claimed_empty = 0
    if n == 0:
        return 0
    cdef Py_ssize_t* pending = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    cdef uint64_t* probe = <uint64_t*>malloc(n * sizeof(uint64_t))
    if pending == NULL or probe == NULL:
        free(pending)
        free(probe)
        raise MemoryError()
    with nogil:
        for i in range(n):
            pending[i] = i
            probe[i] = kv_home(keys[i], media[i], capacity)
        pending_count = n
        while pending_count:
            kept = 0
            for j in range(pending_count):
                i = pending[j]
                s = probe[i]
                st = state[s]
                if (
                    st == EMPTY
                    or st == TOMBSTONE
                    or (st == GHOST and t_access[s] < horizon)
                ):
                    if st == EMPTY:
                        claimed_empty += 1
                    state[s] = new_state
                    key[s] = keys[i]
                    medium[s] = media[i]
                    out[i] = <int64_t>s
                else:
                    s += 1
                    if s == capacity:
                        s = 0
                    probe[i] = s
                    pending[kept] = i
                    kept += 1
            pending_count = kept
    free(pending)
    free(probe)
    return claimed_empty
