"""An open-addressing hash table over (uint64 block hash, place id) keys, whole arrays at a time.

Linear probing over parallel columns (struct of arrays) owned by the table; callers read and
write them by slot index. Every operation takes whole numpy arrays of keys. Two implementations
give the same table slot for slot:

- the compiled kernels of :mod:`._table` (built by ``pip install`` where a C compiler is
  found): one C loop per call, the GIL released inside;
- this module's numpy reference, which advances every unresolved key one probe step per numpy
  pass, so its Python cost is per pass, not per key. It is the fallback, and the one used when
  ``KVCACHE_EXPORTER_NO_EXTENSION=1``.

The capacity is any integer, not a power of two: a key's home slot is the high half of its
64-bit slot hash times the capacity, so growth can be gentle (x1.1) and the load stays
between 0.78 and 0.85. :class:`KeyTable` is the probing core (18 B a slot); the collector's
:class:`BlockTable` adds a block's lifecycle columns (37 B a slot, 44 to 48 B per tracked
block), the pool index (:mod:`..analysis.pool`) an engine count.

A removed slot is a tombstone, or a *ghost* (remembered so that a later store is known as a
restore). A ghost whose ``t_access`` is below :attr:`KeyTable.horizon` has expired: every
operation treats it as a tombstone, and the next rebuild drops it. The collector keeps the
ordinal of a ghost's removal there, so that raising the horizon forgets the oldest removals
without a queue of them.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol.extensions import load_extension

EMPTY: Final = 0
RESIDENT: Final = 1
GHOST: Final = 2  # removed, remembered so that a later store is known as a restore
TOMBSTONE: Final = 3

_MEDIUM_MIX: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_SLOT_MUL: Final = np.uint64(0x9E3779B97F4A7C15)
_LOW32: Final = np.uint64(0xFFFFFFFF)
_MAX_LOAD: Final = 0.85  # used slots (live, tombstones, expired ghosts) before a rebuild
_TARGET_LOAD: Final = 0.78  # live slots / capacity right after a rebuild
MIN_CAPACITY: Final = 1024

I64Array = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]


_KERNELS: Final = load_extension(
    "kvcache_exporter.collector._table", {"STATES": (EMPTY, RESIDENT, GHOST, TOMBSTONE)}
)
COMPILED: Final = _KERNELS is not None
"""Whether tables use the compiled kernels by default (built, and not disabled)."""


class KeyTable:
    """Slots hold a key (hash, place) and its state; subclasses add the columns they keep per
    key.

    The columns every table has are the ones the probe loops read: ``key`` u64, ``medium`` u8
    (the key's place: medium and group, or just the medium for callers with one group),
    ``state`` u8 and ``t_access`` f64 (for a ghost, whatever its owner keeps to compare with
    :attr:`horizon`) — 18 bytes a slot. A subclass allocates its own columns in
    :meth:`_allocate_columns` and lists them after ``key``, ``medium`` and ``state`` in
    :meth:`columns`; a rebuild carries them with their keys.

    ``compiled``: use the compiled kernels (default: :data:`COMPILED`); False is the numpy
    reference.
    """

    def __init__(self, initial_capacity: int = MIN_CAPACITY, compiled: bool | None = None) -> None:
        use = COMPILED if compiled is None else compiled
        if use and _KERNELS is None:
            raise RuntimeError("the compiled block table is not built (or is disabled)")
        self._kernels = _KERNELS if use else None
        self._allocate(max(MIN_CAPACITY, initial_capacity))

    @property
    def compiled(self) -> bool:
        return self._kernels is not None

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.key = np.zeros(capacity, np.uint64)
        self.medium = np.zeros(capacity, np.uint8)
        self.state = np.zeros(capacity, np.uint8)
        self.t_access = np.zeros(capacity, np.float64)
        self._allocate_columns(capacity)
        self.used = 0  # slots not EMPTY: live, tombstones and expired ghosts
        self.horizon = -np.inf  # ghosts whose t_access is below it have expired

    def _allocate_columns(self, capacity: int) -> None:
        """A subclass's own columns, zeroed, ``capacity`` slots each."""

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
        """Every column, ``key``, ``medium`` and ``state`` first: what a rebuild or a
        checkpoint carries per slot."""
        return (self.key, self.medium, self.state, self.t_access)

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns())

    def live_mask(self) -> npt.NDArray[np.bool_]:
        """Per slot: resident, or a ghost that has not expired."""
        ghost = (self.state == GHOST) & (self.t_access >= self.horizon)
        live: npt.NDArray[np.bool_] = (self.state == RESIDENT) | ghost
        return live

    def live_slots(self) -> I64Array:
        return np.flatnonzero(self.live_mask())

    @property
    def live(self) -> int:
        """Resident keys and unexpired ghosts (a pass over the table)."""
        return int(np.count_nonzero(self.live_mask()))

    def _home(self, keys: U64Array, media: U8Array) -> I64Array:
        """floor(mixed * capacity / 2**64), from 32-bit halves (exact for capacity < 2**32)."""
        mixed = (keys ^ (media.astype(np.uint64) * _MEDIUM_MIX)) * _SLOT_MUL
        capacity = np.uint64(self.capacity)
        low = ((mixed & _LOW32) * capacity) >> np.uint64(32)
        return (((mixed >> np.uint64(32)) * capacity + low) >> np.uint64(32)).astype(np.int64)

    def find(self, keys: U64Array, media: U8Array) -> I64Array:
        """Slot of each live (resident or unexpired ghost) key, or -1 where it is absent."""
        keys, media = _u64(keys), _u8(media)
        result = np.empty(keys.shape[0], np.int64)
        if self._kernels is not None:
            self._kernels.find(
                self.key, self.medium, self.state, self.t_access, self.horizon, keys, media, result
            )
            return result
        # Windows of probe steps per numpy pass (2, 8, then 32 slots): a key's first live
        # match or empty slot in the window ends its probe, as the sequential loop's would.
        result[:] = -1
        start = self._home(keys, media)
        pending = np.arange(keys.shape[0])
        width = 2
        while pending.size:
            slots = start[pending, None] + np.arange(width)
            slots[slots >= self.capacity] -= self.capacity
            state = self.state[slots]
            stop = (state == EMPTY) | (
                ((state == RESIDENT) | ((state == GHOST) & (self.t_access[slots] >= self.horizon)))
                & (self.key[slots] == keys[pending, None])
                & (self.medium[slots] == media[pending, None])
            )
            ended = stop.any(axis=1)
            first = slots[ended, stop[ended].argmax(axis=1)]
            hit = self.state[first] != EMPTY
            result[pending[ended][hit]] = first[hit]
            pending = pending[~ended]
            start[pending] = (start[pending] + width) % self.capacity
            width = min(width * 4, 32)
        return result

    def insert(self, keys: U64Array, media: U8Array, state: int) -> I64Array:
        """Claim a slot for each key; keys must be absent and distinct. Returns the slots.

        Call :meth:`reserve` first: a rebuild moves every slot, so it must not happen between
        a :meth:`find` and the writes that use its result. Ghosts are inserted only into a
        table without a horizon (a rebuild, a checkpoint load): a claimed slot's ``t_access``
        is its owner's to set.
        """
        if state == GHOST and self.horizon != -np.inf:
            raise ValueError("ghosts are inserted only before a horizon is set")
        keys, media = _u64(keys), _u8(media)
        count = int(keys.shape[0])
        result = np.empty(count, np.int64)
        if self._kernels is not None:
            self.used += self._kernels.insert(
                self.key,
                self.medium,
                self.state,
                self.t_access,
                self.horizon,
                keys,
                media,
                state,
                result,
            )
            return result
        slot = self._home(keys, media)
        pending = np.arange(count)
        while pending.size:
            probe = slot[pending]
            free_state = self.state[probe]
            free = (
                (free_state == EMPTY)
                | (free_state == TOMBSTONE)
                | ((free_state == GHOST) & (self.t_access[probe] < self.horizon))
            )
            claimed, first = np.unique(probe[free], return_index=True)
            winners = pending[free][first]
            self.used += int(np.count_nonzero(self.state[claimed] == EMPTY))
            self.state[claimed] = state
            self.key[claimed] = keys[winners]
            self.medium[claimed] = media[winners]
            result[winners] = claimed
            unresolved = np.ones(pending.size, bool)
            unresolved[np.flatnonzero(free)[first]] = False
            pending = pending[unresolved]
            slot[pending] = _next(probe[unresolved], self.capacity)
        return result

    def room(self) -> int:
        """Empty slots that may still be claimed before a rebuild is due."""
        return max(0, int(_MAX_LOAD * self.capacity) - self.used)

    def reserve(self, count: int) -> bool:
        """Make room for ``count`` more keys. True when that rebuilt the table, moving every
        slot (slots found before are then stale)."""
        if count <= self.room():
            return False
        self._rebuild(count)
        return True

    def reserve_absent(self, keys: U64Array, media: U8Array) -> bool:
        """Make room for every distinct key of these that is absent now: an upper bound of
        the new keys a run of rows storing them can bring (as :meth:`reserve`)."""
        keys, media = _u64(keys), _u8(media)
        absent = self.find(keys, media) < 0
        k, m = keys[absent], media[absent]
        order = np.lexsort((k, m))
        k, m = k[order], m[order]
        distinct = int(k.size and 1 + np.count_nonzero((k[1:] != k[:-1]) | (m[1:] != m[:-1])))
        return self.reserve(distinct)

    def delete(self, slots: I64Array) -> None:
        """Turn live slots into tombstones."""
        self.state[slots] = TOMBSTONE

    def slots_in_state(self, state: int) -> I64Array:
        return np.flatnonzero(self.state == state)

    def _rebuild(self, count: int) -> None:
        """Rehash the live slots (expired ghosts and tombstones are dropped) into a table
        sized for them and ``count`` more keys at the target load."""
        old = self.columns()
        horizon = self.horizon
        live = self.live_slots()
        needed = int(live.shape[0]) + count
        self._allocate(max(MIN_CAPACITY, int(np.ceil(needed / _TARGET_LOAD))))
        for state in (RESIDENT, GHOST):
            rows = live[old[2][live] == state]
            if not rows.size:
                continue
            slots = self.insert(old[0][rows], old[1][rows], state)
            for column, values in zip(self.columns()[3:], old[3:], strict=True):
                column[slots] = values[rows]
        self.horizon = horizon


class BlockTable(KeyTable):
    """The collector's (and the what-if model's) table: a key's lifecycle columns beside it.

    Columns per slot: ``key``, ``medium``, ``state``; ``t_store`` f64 (store time, or removal
    time for a ghost), ``t_access`` f64 (last access; float64 like ``t_store`` so that a
    duration landing exactly on a bucket bound is counted in that bucket; for a ghost, its
    owner's value for :attr:`horizon`), ``accesses`` u32, ``depth`` u16 (position in its
    prefix chain, 0 when unknown), ``copies`` u16 (physical blocks the engine holds under the
    key), ``tokens`` u16 (tokens one copy holds) and ``adapter`` u8 (its LoRA adapter's label
    id) — 37 bytes.
    """

    def _allocate_columns(self, capacity: int) -> None:
        self.t_store = np.zeros(capacity, np.float64)
        self.accesses = np.zeros(capacity, np.uint32)
        self.depth = np.zeros(capacity, np.uint16)
        self.copies = np.zeros(capacity, np.uint16)
        self.tokens = np.zeros(capacity, np.uint16)
        self.adapter = np.zeros(capacity, np.uint8)

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
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


def _next(slots: I64Array, capacity: int) -> I64Array:
    following = slots + 1
    following[following == capacity] = 0
    return following


def _u64(values: npt.NDArray[Any]) -> U64Array:
    return np.ascontiguousarray(values, np.uint64)


def _u8(values: npt.NDArray[Any]) -> U8Array:
    return np.ascontiguousarray(values, np.uint8)
