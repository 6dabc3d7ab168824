# The block table's slot states and home slot, shared by the compiled kernels (``include``d, not imported: an
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
