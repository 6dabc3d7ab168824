# The block table's slot states, home slot and probe, shared by the compiled kernels (``include``d, not imported: an
# inline C function costs nothing across the two modules this way). The numpy reference is
# ``BlockTable._home`` in table.py; the two must stay equal (as the states must
# equal table.py's).
cdef extern from *:
    """
    #include <stdint.h>
    /* The reference's home slot: a multiplicative hash of the key with its place mixed in,
       mapped onto [0, capacity) by the high half of a 64 x 64-bit product. */
    static inline uint64_t kv_home(uint64_t key, uint8_t place, uint64_t capacity) {
        uint64_t mixed = (key ^ ((uint64_t)place * 0xC2B2AE3D27D4EB4FULL))
                         * 0x9E3779B97F4A7C15ULL;
        return (uint64_t)(((unsigned __int128)mixed * capacity) >> 64);
    }
    """
    uint64_t kv_home(uint64_t key, uint8_t place, uint64_t capacity) nogil


cdef enum:
    EMPTY = 0
    RESIDENT = 1
    GHOST = 2
    TOMBSTONE = 3


cdef inline int64_t kv_probe(
    const uint64_t* key, const uint8_t* medium, const uint8_t* state, const double* t_access,
    uint64_t capacity, double horizon, uint64_t k, uint8_t place, int64_t* free_slot,
) noexcept nogil:
    """The slot of live key ``(k, place)`` (resident, or a ghost whose ``t_access`` is at or
    above ``horizon``), or -1; ``free_slot[0]``: the first slot on its path a new key may take
    (empty, tombstone or expired ghost)."""
    cdef uint64_t s = kv_home(k, place, capacity)
    cdef uint8_t st
    free_slot[0] = -1
    while True:
        st = state[s]
        if st == EMPTY:
            if free_slot[0] < 0:
                free_slot[0] = <int64_t>s
            return -1
        if key[s] == k and medium[s] == place and (
            st == RESIDENT or (st == GHOST and t_access[s] >= horizon)
        ):
            return <int64_t>s
        if free_slot[0] < 0 and (st == TOMBSTONE or (st == GHOST and t_access[s] < horizon)):
            free_slot[0] = <int64_t>s
        s += 1
        if s == capacity:
            s = 0
