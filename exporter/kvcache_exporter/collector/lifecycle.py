"""Block-lifecycle state of one engine, updated a whole :class:`EventBatch` at a time.

Counters and residency are exact over every block hash. Lifecycle histograms (lifetime, idle
before evict, reuse gap, restore gap, accesses before evict) come from the spatially sampled
hashes: a hash is tracked iff a hash of it falls under the sample ratio, so a tracked block is
followed through its whole life. Durations are differences of engine timestamps.

A block is a hash in a place, a (medium, KV-cache group) pair (see :mod:`.places`); every
counter is kept per place. Engines count physical blocks: vLLM can hold two copies of one hash
and removes each, so a store of a resident key is one more copy (unless the source says its
stores of resident keys are hit reports, ``hit_reports``), a key stays resident, its lifecycle
going on, until its last copy is removed. Resident blocks are physical; resident hashes are
distinct keys.

:class:`BlockLifecycleCollector` is built in layers, a concern each: :mod:`.state` holds the
arrays and checkpoints them, :mod:`.apply` applies batches (in the rounds of :mod:`.rounds`),
and this module reads them out, as the copies of :mod:`.snapshot`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .apply import BatchApplier
from .eviction_log import EvictionRecords
from .snapshot import BlockRecord, CollectorSnapshot, CollectorTotals, ResidentProfile
from .table import RESIDENT


class BlockLifecycleCollector(BatchApplier):
    """Exact counters and sampled lifecycle histograms for one engine's block stream."""

    def place_labels(self) -> tuple[tuple[str, str], ...]:
        """(medium, group) label values of every place, by place id."""
        with self.lock:
            return tuple(
                (self.media.names[m], self.groups.names[g]) for m, g in self.places.pairs()
            )

    def resident_keys_by_medium(self) -> npt.NDArray[np.int64]:
        """Resident keys (distinct hashes, all groups) per medium id: what a cache of keys
        per medium, as the what-if model sees it, holds now."""
        n = len(self.places)
        return np.bincount(
            self.places.medium[:n], weights=self.resident_hashes[:n], minlength=self.media.capacity
        ).astype(np.int64)

    @property
    def tracked(self) -> int:
        """Resident keys whose lifecycle is tracked (sampled), all places together."""
        return int(self.tracked_per_place.sum())

    def resident_profile(self) -> ResidentProfile:
        """Access counts, prefix depths and media of the resident tracked blocks (a copy)."""
        with self.lock:
            table = self.table
            slots = table.slots_in_state(RESIDENT)
            slots = slots[self._sampled(table.key[slots])]
            return ResidentProfile(
                accesses=table.accesses[slots].copy(),
                depth=table.depth[slots].copy(),
                medium=table.medium[slots].copy(),
            )

    def totals(self) -> CollectorTotals:
        """Cumulative figures over all media: a cheap read for the monitor's points."""
        with self.lock:
            return self._totals()

    def place_counts(self) -> npt.NDArray[np.int64]:
        """Per place (columns, by place id): blocks stored, removed (every reason), restored
        and resident (rows, in that order). A cheap read, for the status page's history."""
        with self.lock:
            n = len(self.places)
            return np.stack(
                [
                    self.stored[:n].astype(np.int64),
                    self.removed[:n].sum(axis=1).astype(np.int64),
                    self.restores[:n].astype(np.int64),
                    self.resident[:n],
                ]
            )

    def eviction_records(self) -> EvictionRecords:
        """The most recent removals of tracked blocks, oldest first (a copy)."""
        with self.lock:
            return self.evictions.records()

    def block(self, key: int, place_id: int) -> BlockRecord | None:
        """One resident block's state, or None when it is not resident (``place_id``: see
        :meth:`CollectorSnapshot.place`)."""
        with self.lock:
            slot = int(
                self.table.find(np.array([key], np.uint64), np.array([place_id], np.uint8))[0]
            )
            if slot < 0 or self.table.state[slot] != RESIDENT:
                return None
            stored = float(self.table.t_store[slot])
            return BlockRecord(
                stored_at=stored,
                last_access_at=float(self.table.t_access[slot]),
                accesses=int(self.table.accesses[slot]),
                prefix_depth=int(self.table.depth[slot]),
            )

    def snapshot(self) -> CollectorSnapshot:
        with self.lock:
            hists = {name: h.snapshot() for name, h in self.hist.items()}
            hists["accesses_before_evict"] = self.accesses_before_evict.snapshot()
            hists["prefix_depth"] = self.prefix_depth.snapshot()
            return CollectorSnapshot(
                media=tuple(self.media.names),
                reasons=tuple(self.reasons.names),
                groups=tuple(self.groups.names),
                adapters=tuple(self.adapters.names),
                places=tuple(self.places.pairs()),
                stored=self.stored.copy(),
                accessed=self.accessed.copy(),
                restores=self.restores.copy(),
                resident=self.resident.copy(),
                resident_hashes=self.resident_hashes.copy(),
                resident_tokens=self.resident_tokens.copy(),
                tracked_per_place=self.tracked_per_place.copy(),
                removed=self.removed.copy(),
                adapter_stored=self.adapter_stored.copy(),
                adapter_restores=self.adapter_restores.copy(),
                adapter_resident=self.adapter_resident.copy(),
                unknown_removals=self.unknown_removals,
                unknown_accesses=self.unknown_accesses,
                untracked_stores=self.untracked_stores,
                clears=self.clears,
                tracked=self.tracked,
                table_bytes=self.table.nbytes + self.evictions.nbytes,
                histograms=hists,
            )
