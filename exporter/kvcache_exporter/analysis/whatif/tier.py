"""One medium's what-if state, and the sampling that decides which keys it follows.

The sampling hash is murmur3's 64-bit finalizer of the key XOR a constant: independent of the
collector's sampling (splitmix64) and of the block table's multiplicative slot hash, so the
sampled keys spread over the table (the same function for both would crowd one corner of it).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .config import WhatIfConfig
from .orders import Order, earlier_greater

_U64 = npt.NDArray[np.uint64]
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]
_BOOL = npt.NDArray[np.bool_]

_FMIX1: Final = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2: Final = np.uint64(0xC4CEB9FE1A85EC53)
_SEED: Final = np.uint64(0x5851F42D4C957F2D)
# The distance histogram's sum is kept in integer units of 2**-16 blocks: a float sum depends on
# how the rows were cut into chunks (reads flush whatever is buffered), an integer sum does not,
# so a live exporter and an analysis of its recording publish the same value.
SUM_UNITS_PER_BLOCK: Final = 2.0**16


def whatif_hash(keys: _U64) -> _U64:
    """murmur3's fmix64 of ``keys ^ seed``: the what-if model's own sampling hash."""
    z = keys ^ _SEED
    z = z ^ (z >> np.uint64(33))
    z = z * _FMIX1
    z = z ^ (z >> np.uint64(33))
    z = z * _FMIX2
    result: _U64 = z ^ (z >> np.uint64(33))
    return result


def ghost_limits(config: WhatIfConfig, capacity: _I64, ratio: float) -> _I64:
    """The sampled ghosts a medium keeps, at each of these capacities: ``max_ghosts``, and
    where the capacity is known no more than reach ``ghost_horizon`` capacities deep at the
    sampling rate."""
    reach = np.ceil(config.ghost_horizon * capacity * ratio).astype(np.int64) + 1
    limits: _I64 = np.where(capacity > 0, np.minimum(reach, config.max_ghosts), config.max_ghosts)
    return limits


class MediumState:
    """The state of one medium: its ghost order, reference order, sampling threshold and
    counters."""

    def __init__(
        self,
        config: WhatIfConfig,
        configured: int | None,
        threshold: np.uint64 | None,
        chunk: int,
    ) -> None:
        self.ghosts = Order(with_keys=True)
        self.recency: Order | None = None  # from the first hit on: stack distances of hits
        self.capacity = configured or 0
        self.configured = configured is not None
        # The capacity observed in the batch being applied, in force from its first eviction
        # on (not from the batch's first row: the numbers must not depend on batching).
        self.next_capacity = self.capacity
        self.pending = 0  # references since the last sampled one (the next one's weight)
        self.threshold = threshold  # sampling hashes below it are sampled; None: every key
        self.sampled = 0  # keys of this medium in the table (resident and ghosts)
        self.avoided = np.zeros(len(config.avoided_factors), np.int64)
        self.hits = np.zeros(len(config.capacity_factors), np.int64)
        self.bounds: _F64 | None = None
        self.counts = np.zeros(len(config.distance_buckets) + 1, np.int64)
        self.sum_units = 0  # see SUM_UNITS_PER_BLOCK
        self.stores = 0
        self.restores = 0
        self.sampled_hits = 0
        # Sampled rows not applied yet: op, key, step correction, weight, capacity at the time.
        self.buffer: list[tuple[npt.NDArray[np.uint8], _U64, _I64, _I64, _I64]] = []
        self.buffered = 0
        self.until_boundary = chunk  # sampled rows until the next boundary
        self.factors = np.asarray(config.capacity_factors, np.float64)
        self.avoided_factors = np.asarray(config.avoided_factors, np.float64)
        self.distance_buckets = np.asarray(config.distance_buckets, np.float64)

    @property
    def sum(self) -> float:
        """The distance histogram's sum, in blocks."""
        return self.sum_units / SUM_UNITS_PER_BLOCK

    @property
    def ratio(self) -> float:
        """The sampling rate in force."""
        return 1.0 if self.threshold is None else float(self.threshold) / 2.0**64

    def forget_all(self) -> None:
        """A clear: nothing of the old cache can come back as a restore or a hit."""
        self.sampled = 0
        self.ghosts = Order(with_keys=True)
        if self.recency is not None:
            self.recency = Order(with_keys=False)

    # --- counting ------------------------------------------------------------------------
    def count_restores(self, extra: _F64, weight: _I64, capacity: _I64) -> None:
        """Restores with their ghost ranks (scaled, in blocks), weights and the capacity at
        their time."""
        within = extra[None, :] <= (self.avoided_factors[:, None] - 1.0) * capacity[None, :]
        self.avoided += within.astype(np.int64) @ weight
        at_least_one = self.factors >= 1.0
        served = extra[None, :] <= (self.factors[at_least_one, None] - 1.0) * capacity[None, :]
        self.hits[at_least_one] += served.astype(np.int64) @ weight
        if self.bounds is None and capacity.any():
            # Fixed once: a histogram's bounds must not move under Prometheus.
            known = capacity[np.flatnonzero(capacity)[0] :]
            self.bounds = self.distance_buckets * known[0]
            extra, weight = extra[-known.size :], weight[-known.size :]
        if self.bounds is not None:
            bucket = np.searchsorted(self.bounds, extra, side="left")  # le semantics
            self.counts += np.bincount(bucket, weights=weight, minlength=self.counts.size).astype(
                np.int64
            )
            units = np.rint(extra * weight * SUM_UNITS_PER_BLOCK).astype(np.int64)
            self.sum_units += sum(units.tolist())  # Python ints: exact, never overflow

    def count_hits(self, hit: _BOOL, weight: _I64) -> None:
        """A hit counts at every factor from 1 up (a larger LRU cache holds what this one
        does); below 1, :meth:`_count_distances` decides."""
        hit_rows = np.flatnonzero(hit)
        self.sampled_hits += int(hit_rows.size)
        self.hits[self.factors >= 1.0] += int(weight[hit_rows].sum())

    def count_distances(
        self,
        hit: _BOOL,
        followed: _I64,
        prev_ref: _I64,
        weight: _I64,
        capacity: _I64,
    ) -> None:
        """Hits at the factors below 1: those whose stack distance is at most k times C.

        ``followed`` are the chunk's reference rows, at positions ``recency.end`` on (not yet
        appended); ``prev_ref`` the position of each row's previous reference (-1: none known).
        The distinct keys referenced after a hit's previous reference: those whose last
        reference before the chunk is later (live marks in the tree), plus the chunk's earlier
        references whose own previous reference is no later than it (each counts its key
        once), minus the chunk's references up to it (counted by the second term, but not
        after it).
        """
        below = self.factors < 1.0
        recency = self.recency
        if recency is None or not below.any() or not hit[followed].any():
            return
        first_ref = recency.end
        previous = prev_ref[followed]
        no_later = np.arange(followed.size) - earlier_greater(previous)
        in_chunk = no_later - np.maximum(0, previous - first_ref + 1)
        known = hit[followed] & (previous >= 0)
        old = known & (previous < first_ref)
        before_chunk = np.zeros(followed.size, np.int64)
        before_chunk[old] = recency.between(previous[old] + 1, first_ref)
        rows = followed[known]
        self.count_known_distances(
            before_chunk[known] + in_chunk[known], weight[rows], capacity[rows]
        )

    def count_known_distances(self, others: _I64, weight: _I64, capacity: _I64) -> None:
        """Hits at the factors below 1, from the sampled keys referenced since each hit's
        previous reference (``others``), with their weights and capacities."""
        below = self.factors < 1.0
        if not below.any() or not others.size:
            return
        distance = others / self.ratio + 1.0
        fits = distance[None, :] <= self.factors[below, None] * capacity[None, :]
        self.hits[below] += fits.astype(np.int64) @ weight

    # --- checkpoints -------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
        """Arrays and scalars to continue from (nothing may be buffered)."""
        if self.buffered:
            raise ValueError("apply the buffered rows before taking the state")
        arrays = {
            **{f"ghosts.{name}": values for name, values in self.ghosts.state().items()},
            "avoided": self.avoided,
            "hits": self.hits,
            "counts": self.counts,
        }
        if self.recency is not None:
            arrays |= {f"recency.{name}": v for name, v in self.recency.state().items()}
        if self.bounds is not None:
            arrays["bounds"] = self.bounds
        scalars = {
            "capacity": self.capacity,
            "configured": self.configured,
            "next_capacity": self.next_capacity,
            "pending": self.pending,
            "threshold": None if self.threshold is None else int(self.threshold),
            "sampled": self.sampled,
            "until_boundary": self.until_boundary,
            "sum_units": self.sum_units,
            "stores": self.stores,
            "restores": self.restores,
            "sampled_hits": self.sampled_hits,
        }
        return arrays, scalars

    def load_state(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        """Continue from :meth:`state` (ValueError when the factors or buckets changed)."""
        for name in ("avoided", "hits", "counts"):
            if arrays[name].shape != getattr(self, name).shape:
                raise ValueError(f"what-if {name}: factors or buckets changed")
            getattr(self, name)[:] = arrays[name]
        self.ghosts = Order.from_state(_prefixed(arrays, "ghosts."), with_keys=True)
        recency = _prefixed(arrays, "recency.")
        self.recency = Order.from_state(recency, with_keys=False) if recency else None
        self.bounds = arrays["bounds"].astype(np.float64) if "bounds" in arrays else None
        threshold = scalars["threshold"]
        self.threshold = None if threshold is None else np.uint64(int(threshold))
        self.capacity = int(scalars["capacity"])
        self.configured = bool(scalars["configured"])
        self.next_capacity = int(scalars["next_capacity"])
        self.pending = int(scalars["pending"])
        self.sampled = int(scalars["sampled"])
        self.until_boundary = int(scalars["until_boundary"])
        self.sum_units = int(scalars["sum_units"])
        self.stores = int(scalars["stores"])
        self.restores = int(scalars["restores"])
        self.sampled_hits = int(scalars["sampled_hits"])


def _prefixed(arrays: dict[str, npt.NDArray[Any]], prefix: str) -> dict[str, npt.NDArray[Any]]:
    return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
