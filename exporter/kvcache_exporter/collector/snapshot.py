"""What a collector's readers get: consistent copies of its numbers, taken under its lock.

A snapshot for the sinks, cumulative totals for the monitor's points, the resident blocks'
profile for access patterns, one block's record for the library. Plain frozen values, so a
reader never holds the lock while it formats them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .histogram import HistogramSnapshot


@dataclass(frozen=True, slots=True)
class CollectorSnapshot:
    """A consistent copy of one engine's numbers, taken under the collector's lock."""

    media: tuple[str, ...]
    reasons: tuple[str, ...]
    groups: tuple[str, ...]
    adapters: tuple[str, ...]
    places: tuple[tuple[int, int], ...]  # per place id: (medium id, group id)
    stored: npt.NDArray[np.uint64]  # [places]
    accessed: npt.NDArray[np.uint64]
    restores: npt.NDArray[np.uint64]
    resident: npt.NDArray[np.int64]  # physical blocks
    resident_hashes: npt.NDArray[np.int64]  # distinct keys
    resident_tokens: npt.NDArray[np.int64]
    tracked_per_place: npt.NDArray[np.int64]
    removed: npt.NDArray[np.uint64]  # [places, reasons]
    adapter_stored: npt.NDArray[np.uint64]  # [media, adapters]
    adapter_restores: npt.NDArray[np.uint64]
    adapter_resident: npt.NDArray[np.int64]
    unknown_removals: int
    unknown_accesses: int
    untracked_stores: int
    clears: int
    tracked: int
    table_bytes: int
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)

    def place(self, medium: str, group: str = "0") -> int | None:
        """The place id of a (medium, group) pair, or None when the stream never had it."""
        if medium not in self.media or group not in self.groups:
            return None
        pair = (self.media.index(medium), self.groups.index(group))
        return self.places.index(pair) if pair in self.places else None

    def place_labels(self, place_id: int) -> tuple[str, str]:
        """(medium, group) label values of a place."""
        medium_id, group_id = self.places[place_id]
        return self.media[medium_id], self.groups[group_id]

    def per_medium(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A per-place array summed over groups into rows per medium id."""
        medium = np.array([m for m, _ in self.places], np.int64)
        out = np.zeros((len(self.media), *values.shape[1:]), values.dtype)
        np.add.at(out, medium, values[: len(self.places)])
        return out


@dataclass(frozen=True, slots=True)
class CollectorTotals:
    """An engine's cumulative counts, all media together (see :meth:`totals`)."""

    stored: int
    evicted: int  # removals other than clears and restarts
    restores: int
    resident: int
    clears: int
    lifetime_bounds: tuple[float, ...]
    lifetime_counts: npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class CutTotals:
    """:class:`CollectorTotals` at several rows of one batch, as columns (one entry per row)."""

    stored: npt.NDArray[np.int64]
    evicted: npt.NDArray[np.int64]
    restores: npt.NDArray[np.int64]
    resident: npt.NDArray[np.int64]
    clears: npt.NDArray[np.int64]
    lifetime_bounds: tuple[float, ...]
    lifetime_counts: npt.NDArray[np.uint64]  # one row of buckets per entry

    def __len__(self) -> int:
        return int(self.stored.size)


@dataclass(frozen=True, slots=True)
class ResidentProfile:
    """Per resident tracked block: accesses since its store, prefix depth, medium id."""

    accesses: npt.NDArray[np.uint32]
    depth: npt.NDArray[np.uint16]
    medium: npt.NDArray[np.uint8]  # the place id (see CollectorSnapshot.places)


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One resident block as the collector holds it (engine-clock times)."""

    stored_at: float
    last_access_at: float
    accesses: int
    prefix_depth: int
