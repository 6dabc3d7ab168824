"""A bounded ring of the most recent removals of tracked blocks, one row each.

It keeps what the histograms cannot: per-block records for ``/api/v1/export`` and for
distributions over buckets chosen after the fact. Appends are whole numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

_COLUMNS = (
    ("block_hash", np.uint64),
    ("medium", np.uint8),
    ("reason", np.uint8),
    ("stored_at", np.float64),
    ("last_access_at", np.float64),
    ("removed_at", np.float64),
    ("accesses", np.uint32),
    ("prefix_depth", np.uint16),
)


@dataclass(frozen=True, slots=True)
class EvictionRecords:
    """Removals oldest first, as parallel columns."""

    block_hash: npt.NDArray[np.uint64]
    medium: npt.NDArray[np.uint8]
    reason: npt.NDArray[np.uint8]
    stored_at: npt.NDArray[np.float64]
    last_access_at: npt.NDArray[np.float64]
    removed_at: npt.NDArray[np.float64]
    accesses: npt.NDArray[np.uint32]
    prefix_depth: npt.NDArray[np.uint16]

    def __len__(self) -> int:
        return int(self.block_hash.shape[0])


class EvictionLog:
    """The last ``capacity`` removals; older ones are overwritten."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._columns = {name: np.zeros(capacity, dtype) for name, dtype in _COLUMNS}
        self._next = 0  # total appended; the write position is this modulo capacity

    def append(self, **columns: npt.NDArray[np.generic]) -> None:
        """Append rows; every column of the log must be given, all of one length."""
        if self.capacity == 0:
            return
        count = int(columns["block_hash"].shape[0])
        if count > self.capacity:
            columns = {name: values[-self.capacity :] for name, values in columns.items()}
            self._next += count - self.capacity
            count = self.capacity
        positions = (self._next + np.arange(count)) % self.capacity
        for name, _ in _COLUMNS:
            self._columns[name][positions] = columns[name]
        self._next += count

    def records(self) -> EvictionRecords:
        size = min(self._next, self.capacity)
        order = (self._next - size + np.arange(size)) % self.capacity if size else np.arange(0)
        columns: dict[str, Any] = {name: self._columns[name][order] for name, _ in _COLUMNS}
        return EvictionRecords(**columns)

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self._columns.values())

    def clear(self) -> None:
        self._next = 0
