"""Which keys became resident, or stopped being resident, in the batch a collector applied.

A pool index (:mod:`..analysis.pool`) follows several engines' residency from these, so it
sees exactly what each collector sees: a key becomes resident when a store makes it so (a new
key or a restore; not a copy, not a hit report, not a store beyond the table's capacity) and
stops being resident when its last copy is removed or a clear (or engine restart) empties the
table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ResidencyChanges:
    """One batch's residency transitions, in stream order (parallel columns).

    ``row`` is the batch row that made the change (a clear's row for every key it removed),
    ``key`` the block hash, ``place`` the collector's place id (medium and group) and ``delta``
    +1 (became resident, by a store) or -1 (no longer resident).
    """

    row: npt.NDArray[np.int64]
    key: npt.NDArray[np.uint64]
    place: npt.NDArray[np.uint8]
    delta: npt.NDArray[np.int8]

    def __len__(self) -> int:
        return int(self.row.shape[0])

    @staticmethod
    def empty() -> ResidencyChanges:
        return ResidencyChanges(
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint8),
            np.zeros(0, np.int8),
        )

    @staticmethod
    def gather(parts: list[ResidencyChanges]) -> ResidencyChanges:
        """Parts recorded as the rounds went, into stream order (stable: a row's changes keep
        their order)."""
        if not parts:
            return ResidencyChanges.empty()
        row = np.concatenate([p.row for p in parts])
        order = np.argsort(row, kind="stable")
        return ResidencyChanges(
            row[order],
            np.concatenate([p.key for p in parts])[order],
            np.concatenate([p.place for p in parts])[order],
            np.concatenate([p.delta for p in parts])[order],
        )
