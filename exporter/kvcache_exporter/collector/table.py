"""A vectorized open-addressing hash table over (uint64 block hash, medium id) keys.

All operations take whole numpy arrays of keys; probing advances every unresolved key one
slot per numpy pass (linear probing), so the Python cost is per pass, not per key. Columns
live in parallel arrays (struct of arrays) and are owned by the table; callers read and write
them by slot index. Deleted slots become tombstones, cleared out by the next rebuild.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

EMPTY: Final = 0
RESIDENT: Final = 1
GHOST: Final = 2  # removed, remembered so that a later store is known as a restore
TOMBSTONE: Final = 3

_MEDIUM_MIX: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_SLOT_MUL: Final = np.uint64(0x9E3779B97F4A7C15)
_MAX_LOAD: Final = 0.6
_TARGET_LOAD: Final = 0.4
_MIN_BITS: Final = 10

I64Array = npt.NDArray[np.int64]


class BlockTable:
    """Slots hold a key (hash, medium), a state and the lifecycle columns of one block.

    Columns per slot: ``key`` u64, ``medium`` u8 (the key's place: medium and group, or just
    the medium for callers with one group), ``state`` u8, ``t_store`` f64 (store time, or
    removal time for a ghost), ``t_access`` f64 (last access; float64 like ``t_store`` so
    that a duration landing exactly on a bucket bound is counted in that bucket),
    ``accesses`` u32, ``depth`` u16 (position in its prefix chain, 0 when unknown),
    ``copies`` u16 (physical blocks the engine holds under the key), ``tokens`` u16 (tokens
    one copy holds) and ``adapter`` u8 (its LoRA adapter's label id) — 37 bytes.
    """

    def __init__(self, initial_capacity: int = 1 << _MIN_BITS) -> None:
        bits = max(_MIN_BITS, int(initial_capacity - 1).bit_length())
        self._allocate(bits)

    def _allocate(self, bits: int) -> None:
        self.bits = bits
        capacity = 1 << bits
        self.mask = capacity - 1
        self.key = np.zeros(capacity, np.uint64)
        self.medium = np.zeros(capacity, np.uint8)
        self.state = np.zeros(capacity, np.uint8)
        self.t_store = np.zeros(capacity, np.float64)
        self.t_access = np.zeros(capacity, np.float64)
        self.accesses = np.zeros(capacity, np.uint32)
        self.depth = np.zeros(capacity, np.uint16)
        self.copies = np.zeros(capacity, np.uint16)
        self.tokens = np.zeros(capacity, np.uint16)
        self.adapter = np.zeros(capacity, np.uint8)
        self.live = 0  # RESIDENT + GHOST
        self.tombstones = 0

    @property
    def capacity(self) -> int:
        return self.mask + 1

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
        """Every column, the key first: what a rebuild or a checkpoint carries per slot."""
        return (
            self.key,
            self.medium,
            self.state,
            self.t_store,
            self.t_access,
            self.accesses,
            self.depth,
            self.copies,
            self.tokens,
            self.adapter,
        )

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns())

    def _home(self, keys: npt.NDArray[np.uint64], media: npt.NDArray[np.uint8]) -> I64Array:
        mixed = (keys ^ (media.astype(np.uint64) * _MEDIUM_MIX)) * _SLOT_MUL
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, keys: npt.NDArray[np.uint64], media: npt.NDArray[np.uint8]) -> I64Array:
        """Slot of each live (resident or ghost) key, or -1 where the key is absent."""
        result = np.full(keys.shape[0], -1, np.int64)
        slot = self._home(keys, media)
        pending = np.arange(keys.shape[0])
        while pending.size:
            probe = slot[pending]
            state = self.state[probe]
            hit = (
                ((state == RESIDENT) | (state == GHOST))
                & (self.key[probe] == keys[pending])
                & (self.medium[probe] == media[pending])
            )
            result[pending[hit]] = probe[hit]
            unresolved = ~hit & (state != EMPTY)
            pending = pending[unresolved]
            slot[pending] = (probe[unresolved] + 1) & self.mask
        return result

    def insert(
        self, keys: npt.NDArray[np.uint64], media: npt.NDArray[np.uint8], state: int
    ) -> I64Array:
        """Claim a slot for each key; keys must be absent and distinct. Returns the slots.

        Call :meth:`reserve` first: a rebuild moves every slot, so it must not happen between
        a :meth:`find` and the writes that use its result.
        """
        count = int(keys.shape[0])
        result = np.empty(count, np.int64)
        slot = self._home(keys, media)
        pending = np.arange(count)
        while pending.size:
            probe = slot[pending]
            free_state = self.state[probe]
            free = (free_state == EMPTY) | (free_state == TOMBSTONE)
            claimed, first = np.unique(probe[free], return_index=True)
            winners = pending[free][first]
            self.tombstones -= int(np.count_nonzero(self.state[claimed] == TOMBSTONE))
            self.state[claimed] = state
            self.key[claimed] = keys[winners]
            self.medium[claimed] = media[winners]
            result[winners] = claimed
            unresolved = np.ones(pending.size, bool)
            unresolved[np.flatnonzero(free)[first]] = False
            pending = pending[unresolved]
            slot[pending] = (probe[unresolved] + 1) & self.mask
        self.live += count
        return result

    def reserve(self, count: int) -> None:
        """Make room for ``count`` more keys (may rebuild, invalidating earlier slots)."""
        if self.live + self.tombstones + count > _MAX_LOAD * self.capacity:
            self._rebuild(self.live + count)

    def delete(self, slots: I64Array) -> None:
        """Turn live slots into tombstones."""
        self.state[slots] = TOMBSTONE
        self.live -= int(slots.shape[0])
        self.tombstones += int(slots.shape[0])

    def slots_in_state(self, state: int) -> I64Array:
        return np.flatnonzero(self.state == state)

    def _rebuild(self, needed: int) -> None:
        """Rehash live slots into a table sized for ``needed`` keys at the target load."""
        old = self.columns()
        live = np.flatnonzero((old[2] == RESIDENT) | (old[2] == GHOST))
        bits = max(_MIN_BITS, int(np.ceil(np.log2(max(needed, 1) / _TARGET_LOAD))))
        self._allocate(bits)
        for state in (RESIDENT, GHOST):
            rows = live[old[2][live] == state]
            if not rows.size:
                continue
            slots = self.insert(old[0][rows], old[1][rows], state)
            for column, values in zip(self.columns()[3:], old[3:], strict=True):
                column[slots] = values[rows]

    def clear(self) -> None:
        self._allocate(_MIN_BITS)
