"""What one engine's collector holds, and its checkpoint form.

The block table (with its ghosts: removed keys still remembered, each with the ordinal of its
removal), the per-place counters and histograms and the eviction log: the arrays :mod:`.apply`
updates and :mod:`.lifecycle` reads. :meth:`CollectorState.state` and
:meth:`~CollectorState.load_state` turn them into plain arrays and back, so a restart continues
where the last process stopped.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol.batch import LabelTable, new_adapter_table, new_group_table
from .config import DEFAULT_REASONS, REASON_CLEARED, REASON_RESTART, CollectorConfig, sample_hash
from .eviction_log import EvictionLog
from .histogram import HistogramSet
from .places import PlaceTable
from .snapshot import CollectorTotals
from .table import GHOST, RESIDENT, BlockTable

_U64 = npt.NDArray[np.uint64]
_BOOL = npt.NDArray[np.bool_]

HISTOGRAMS: Final = ("lifetime", "idle_before_evict", "reuse_gap", "restore_gap")


class CollectorState:
    """The arrays of one engine's block stream, its label tables and its lock."""

    def __init__(
        self,
        config: CollectorConfig | None = None,
        media: LabelTable | None = None,
        reasons: LabelTable | None = None,
        groups: LabelTable | None = None,
        adapters: LabelTable | None = None,
    ) -> None:
        self.config = config or CollectorConfig()
        self.media = media or LabelTable("unknown")
        self.reasons = reasons or LabelTable("evicted", seed=DEFAULT_REASONS)
        self.groups = groups or new_group_table()
        self.adapters = adapters or new_adapter_table(self.config.max_adapters)
        self.places = PlaceTable(self.media, self.groups)
        self.lock = threading.Lock()
        self._threshold = (
            None
            if self.config.sample_ratio >= 1.0
            else np.uint64(min(int(self.config.sample_ratio * 2.0**64), 2**64 - 1))
        )
        self._reset_state()

    def _reset_state(self) -> None:
        """Empty counters, histograms, table and ghosts, sized for the places seen so far."""
        m, r = self.places.capacity, self.reasons.capacity
        am = (self.media.capacity, self.adapters.capacity)
        self.table = BlockTable()
        self.stored = np.zeros(m, np.uint64)
        self.accessed = np.zeros(m, np.uint64)
        self.restores = np.zeros(m, np.uint64)
        self.resident = np.zeros(m, np.int64)
        self.resident_hashes = np.zeros(m, np.int64)
        self.resident_tokens = np.zeros(m, np.int64)
        self.tracked_per_place = np.zeros(m, np.int64)
        self.removed = np.zeros((m, r), np.uint64)
        self.adapter_stored = np.zeros(am, np.uint64)
        self.adapter_restores = np.zeros(am, np.uint64)
        self.adapter_resident = np.zeros(am, np.int64)
        self.unknown_removals = 0
        self.unknown_accesses = 0
        self.untracked_stores = 0
        self.clears = 0
        self.hist = {name: HistogramSet(self.config.duration_buckets, m) for name in HISTOGRAMS}
        self.accesses_before_evict = HistogramSet(self.config.access_buckets, m)
        self.prefix_depth = HistogramSet(self.config.depth_buckets, m)
        self.evictions = EvictionLog(self.config.eviction_log_size)
        self.removals = 0  # removals into ghosts so far: the next ghost's ordinal

    def _sampled(self, keys: _U64) -> _BOOL:
        if self._threshold is None:
            return np.ones(keys.shape[0], bool)
        return sample_hash(keys) < self._threshold

    def _evicting_reasons(self) -> npt.NDArray[np.bool_]:
        """Per reason id: does a removal for it count as an eviction (not a clear/restart)?"""
        evicting = np.ones(self.reasons.capacity, bool)
        evicting[self.reasons.id_of(REASON_CLEARED)] = False
        evicting[self.reasons.id_of(REASON_RESTART)] = False
        return evicting

    def _totals(self) -> CollectorTotals:
        """Cumulative figures over all media (the caller holds the lock)."""
        removed = self.removed.sum(axis=0)
        lifetime = self.hist["lifetime"]
        return CollectorTotals(
            stored=int(self.stored.sum()),
            evicted=int(removed[self._evicting_reasons()].sum()),
            restores=int(self.restores.sum()),
            resident=int(self.resident_hashes.sum()),
            clears=self.clears,
            lifetime_bounds=lifetime.bounds,
            lifetime_counts=lifetime.counts.sum(axis=0),
        )

    def _all_histograms(self) -> dict[str, HistogramSet]:
        return {
            **self.hist,
            "accesses_before_evict": self.accesses_before_evict,
            "prefix_depth": self.prefix_depth,
        }

    # --- checkpoints -----------------------------------------------------------------------
    _COUNTERS: Final = (
        "stored",
        "accessed",
        "restores",
        "resident",
        "resident_hashes",
        "resident_tokens",
        "tracked_per_place",
        "removed",
        "adapter_stored",
        "adapter_restores",
        "adapter_resident",
    )
    _TABLE_COLUMNS: Final = (
        "key",
        "medium",
        "state",
        "t_store",
        "t_access",
        "accesses",
        "depth",
        "copies",
        "tokens",
        "adapter",
    )

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """Everything needed to continue after a restart, as plain arrays (copies)."""
        with self.lock:
            table = self.table
            live = table.live_slots()
            records = self.evictions.records()
            arrays: dict[str, npt.NDArray[Any]] = {
                f"table.{name}": column[live]
                for name, column in zip(self._TABLE_COLUMNS, table.columns(), strict=True)
            }
            arrays.update({name: getattr(self, name).copy() for name in self._COUNTERS})
            arrays["places"] = np.array(self.places.pairs(), np.uint8).reshape(-1, 2)
            arrays["scalars"] = np.array(
                [
                    self.unknown_removals,
                    self.unknown_accesses,
                    self.untracked_stores,
                    self.clears,
                    self.removals,
                    # Below every ordinal (-1) until a batch has set it: no ghost expired yet.
                    max(table.horizon, -1.0),
                ],
                np.int64,
            )
            for name, hist in self._all_histograms().items():
                arrays[f"hist.{name}.counts"] = hist.counts.copy()
                arrays[f"hist.{name}.sums"] = hist.sums.copy()
            for name in records.__dataclass_fields__:
                arrays[f"evictions.{name}"] = getattr(records, name)
            return arrays

    def load_state(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Continue from :meth:`state` (raises ValueError when the shapes do not fit)."""
        with self.lock:
            self._reset_state()
            self.places.restore([(int(m), int(g)) for m, g in arrays["places"].tolist()])
            for name, hist in self._all_histograms().items():
                counts, sums = arrays[f"hist.{name}.counts"], arrays[f"hist.{name}.sums"]
                if counts.shape != hist.counts.shape or sums.shape != hist.sums.shape:
                    raise ValueError(f"histogram {name}: buckets changed since the checkpoint")
                hist.counts[:] = counts
                hist.sums[:] = sums
            for name in self._COUNTERS:
                target = getattr(self, name)
                if arrays[name].shape != target.shape:
                    raise ValueError(f"{name}: shape changed since the checkpoint")
                target[:] = arrays[name]
            (
                self.unknown_removals,
                self.unknown_accesses,
                self.untracked_stores,
                self.clears,
                self.removals,
                horizon,
            ) = (int(v) for v in arrays["scalars"])
            keys, places = arrays["table.key"], arrays["table.medium"]
            states = arrays["table.state"]
            table = self.table
            table.reserve(int(keys.shape[0]))
            for state in (RESIDENT, GHOST):
                rows = np.flatnonzero(states == state)
                slots = table.insert(keys[rows], places[rows], state)
                for name, column in zip(self._TABLE_COLUMNS[3:], table.columns()[3:], strict=True):
                    column[slots] = arrays[f"table.{name}"][rows]
            table.horizon = float(horizon)
            evictions = {
                name.removeprefix("evictions."): values
                for name, values in arrays.items()
                if name.startswith("evictions.")
            }
            if evictions and evictions["block_hash"].size:
                self.evictions.append(**evictions)

    def reset(self) -> None:
        """Forget everything (counters included)."""
        with self.lock:
            self._reset_state()
