"""The fleet view: which blocks several engines of one routing domain (a *pool*) hold at once.

A pool is the engines one router could choose between: replicas of one model (same block
size, same hash seed, so one prompt prefix gives the same block hashes everywhere). The
:class:`PoolIndex` counts, for every key (medium, KV-cache group, block hash), how many of the
pool's engines hold it now. It follows each engine's collector exactly: each engine's batch is
applied to its collector first, and the residency transitions the collector reports for it
(:class:`~..collector.transitions.ResidencyChanges`) are then applied here, a whole batch in a
few numpy passes.

**Stores resident elsewhere.** A store that makes a key resident on an engine (a new key or a
restore; not a copy, not a hit report) counts as *resident elsewhere* when at least one other
engine of the pool held the same key at that moment, where "that moment" is the other engines'
state as of the batches the process applied before this one (engines' clocks are not
synchronised, so arrival order on the one ingest thread is the order). Within an engine's own
batch the other engines do not change, so the question is per key: the pool's count before the
batch, less this engine's own holding before the batch (it held the key iff the key's first
transition in the batch is a removal).

**Memory.** The index is the collector's hash table (:class:`~..collector.table.KeyTable`,
its compiled kernels where built) with a one-byte engine count: 19 bytes a slot (hash 8, place
1, state 1, count 1, and the 8-byte ghost column its probes read, unused here). Like the
collector's, it is rebuilt for its keys at 78 % load once keys and tombstones (keys no engine
holds any more) pass 85 %: 22-24 bytes per distinct resident key while keys grow, more after
keys have left since the last rebuild.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..collector import BlockLifecycleCollector
from ..collector.places import PlaceTable
from ..collector.table import RESIDENT, KeyTable
from ..collector.transitions import ResidencyChanges
from ..protocol.batch import OP_STORE, EventBatch, LabelTable, new_group_table
from ..sources.spec import MAX_POOL_ENGINES

log = logging.getLogger("kvcache_exporter.pool")

MAX_ENGINES: Final = MAX_POOL_ENGINES  # a key's engine count is one byte

_U64 = npt.NDArray[np.uint64]
_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]


class KeyCounts(KeyTable):
    """(hash, place) → how many of the pool's engines hold it (1..255): the collector's table
    (compiled kernels where built) with a one-byte ``count`` column; a key no engine holds is
    a tombstone."""

    def _allocate_columns(self, capacity: int) -> None:
        self.count = np.zeros(capacity, np.uint8)

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
        return (*super().columns(), self.count)


@dataclass(frozen=True, slots=True)
class PoolEngine:
    """One engine's figures in its pool, per pool medium id."""

    name: str
    stored: _I64  # stores that made a key resident
    elsewhere: _I64  # of those, keys another engine of the pool held
    mismatches: int  # batches kept out of the pool (block size differs from the pool's)


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A copy of a pool's figures, taken under its lock; arrays are per pool medium id."""

    name: str
    media: tuple[str, ...]
    seen: npt.NDArray[np.bool_]  # media that have held a key
    distinct: _I64  # keys resident on at least one engine
    duplicate: _I64  # keys resident on two or more
    engines: tuple[PoolEngine, ...]
    nbytes: int


class PoolIndex:
    """How many of the pool's engines hold each (medium, group, hash) now.

    Engines :meth:`join` it; each member is fed its collector's transitions on the thread
    that applies the engine's batches (the ingest thread). One lock: that thread holds it while
    applying, a scrape while copying.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.media = LabelTable("unknown")
        self.groups = new_group_table()
        self.places = PlaceTable(self.media, self.groups)
        self.table = KeyCounts()
        self.distinct = np.zeros(self.media.capacity, np.int64)
        self.duplicate = np.zeros(self.media.capacity, np.int64)
        self.seen = np.zeros(self.media.capacity, bool)
        self.members: list[PoolMember] = []
        self.block_size: int | None = None
        self._cached: PoolSnapshot | None = None

    def join(self, name: str, collector: BlockLifecycleCollector) -> PoolMember:
        if len(self.members) >= MAX_ENGINES:
            raise ValueError(f"pool {self.name}: at most {MAX_ENGINES} engines")
        member = PoolMember(self, name, collector)
        self.members.append(member)
        return member

    def snapshot(self) -> PoolSnapshot:
        """The pool's figures (the same object until the index changes)."""
        with self.lock:
            if self._cached is None:
                self._cached = PoolSnapshot(
                    name=self.name,
                    media=tuple(self.media.names),
                    seen=self.seen.copy(),
                    distinct=self.distinct.copy(),
                    duplicate=self.duplicate.copy(),
                    engines=tuple(
                        PoolEngine(m.name, m.stored.copy(), m.elsewhere.copy(), m.mismatches)
                        for m in self.members
                    ),
                    nbytes=self.table.nbytes,
                )
            return self._cached

    def _change(self, keys: _U64, places: _U8, first: npt.NDArray[np.int8], net: _I64) -> _I64:
        """Apply one member's net change per distinct key (``first``: its first transition in
        the batch); returns, per key, how many *other* engines held it before. Holds the lock."""
        table = self.table
        slot = table.find(keys, places)
        present = slot >= 0
        before = np.zeros(keys.shape[0], np.int64)
        before[present] = table.count[slot[present]]
        others = np.maximum(before - (first < 0), 0)
        after = np.maximum(before + net, 0)
        medium = self.places.medium[places].astype(np.int64)
        m = self.media.capacity
        self.distinct += np.bincount(
            medium, weights=(after >= 1).astype(np.int64) - (before >= 1), minlength=m
        ).astype(np.int64)
        self.duplicate += np.bincount(
            medium, weights=(after >= 2).astype(np.int64) - (before >= 2), minlength=m
        ).astype(np.int64)
        self.seen[medium] = True
        kept = present & (after > 0)
        table.count[slot[kept]] = after[kept]
        table.delete(slot[present & (after == 0)])
        new = ~present & (after > 0)
        if new.any():
            # Every write through `slot` is done: a rebuild may move the slots now.
            table.reserve(int(np.count_nonzero(new)))
            table.count[table.insert(keys[new], places[new], RESIDENT)] = after[new]
        self._cached = None
        return others


class PoolMember:
    """One engine of a pool: checks its block size, feeds its transitions to the index."""

    def __init__(self, pool: PoolIndex, name: str, collector: BlockLifecycleCollector) -> None:
        self.pool = pool
        self.name = name
        self.collector = collector
        collector.record_residency = True
        m = pool.media.capacity
        self.stored = np.zeros(m, np.int64)
        self.elsewhere = np.zeros(m, np.int64)
        self.mismatches = 0
        self.block_size: int | None = None  # the most tokens a stored block held
        self.refused = False
        self._lut = np.zeros(0, np.uint8)  # engine place id → pool place id

    def admit(self, batch: EventBatch) -> bool:
        """Before the collector applies ``batch``: does it go into the pool? An engine whose
        block size (the most tokens a stored block of it held) differs from the pool's (the
        first one an engine of it showed) is refused from then on: its keys leave the index,
        and each of its batches is counted as a mismatch."""
        if not self.refused:
            tokens = batch.tokens[batch.op == OP_STORE]
            if tokens.size:
                self.block_size = max(self.block_size or 0, int(tokens.max()))
                pool = self.pool
                with pool.lock:
                    if pool.block_size is None:
                        pool.block_size = self.block_size
                    elif self.block_size != pool.block_size:
                        self._refuse()
        if self.refused:
            with self.pool.lock:
                self.mismatches += 1
                self.pool._cached = None
        return not self.refused

    def _refuse(self) -> None:
        """Leave the pool (holding its lock): the collector's resident keys, as it holds them
        before the batch that showed the mismatch, are taken out of the index."""
        pool = self.pool
        log.warning(
            "engine refused from its pool: block size differs from the pool's",
            extra={
                "pool": pool.name,
                "engine": self.name,
                "block_size": self.block_size,
                "pool_block_size": pool.block_size,
            },
        )
        self.refused = True
        self.collector.record_residency = False
        keys, places = self.collector.resident_keys()
        if keys.size:
            n = keys.shape[0]
            pool._change(
                keys, self._places(places), np.full(n, -1, np.int8), np.full(n, -1, np.int64)
            )

    def load(self) -> None:
        """After the collector's state was restored (a checkpoint): its resident keys join the
        index, counted as neither stores nor stores resident elsewhere."""
        keys, places = self.collector.resident_keys()
        if keys.size and not self.refused:
            n = keys.shape[0]
            with self.pool.lock:
                self.pool._change(
                    keys, self._places(places), np.ones(n, np.int8), np.ones(n, np.int64)
                )

    def _places(self, engine_places: _U8) -> _U8:
        """Pool place ids of the engine's place ids (by medium and group name)."""
        known = len(self.collector.places)
        if self._lut.shape[0] < known:
            media, groups = self.collector.media.names, self.collector.groups.names
            self._lut = np.array(
                [
                    self.pool.places.add(
                        self.pool.media.id_of(media[mid]), self.pool.groups.id_of(groups[gid])
                    )
                    for mid, gid in self.collector.places.pairs()
                ],
                np.uint8,
            )
        return self._lut[engine_places]

    def follow(self, changes: ResidencyChanges) -> None:
        """After the collector applied a batch (or a clear): its residency transitions."""
        if not len(changes) or self.refused:
            return
        pool = self.pool
        with pool.lock:
            places = self._places(changes.place)
            # By key (stable: each key's transitions stay in stream order).
            order = np.lexsort((places, changes.key))
            keys, places, delta = changes.key[order], places[order], changes.delta[order]
            start = np.ones(keys.shape[0], bool)
            start[1:] = (keys[1:] != keys[:-1]) | (places[1:] != places[:-1])
            starts = np.flatnonzero(start)
            net = np.add.reduceat(delta.astype(np.int64), starts)
            stores = np.add.reduceat((delta > 0).astype(np.int64), starts)
            key_places = places[starts]
            others = pool._change(keys[starts], key_places, delta[starts], net)
            medium = pool.places.medium[key_places].astype(np.int64)
            m = pool.media.capacity
            self.stored += np.bincount(medium, weights=stores, minlength=m).astype(np.int64)
            elsewhere = others > 0
            self.elsewhere += np.bincount(
                medium[elsewhere], weights=stores[elsewhere], minlength=m
            ).astype(np.int64)
