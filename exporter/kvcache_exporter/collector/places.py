"""Places: where a block lives, a (medium, KV-cache group) pair, as one small id.

A block is identified by its medium, its group and its hash (the same hash in two groups of a
hybrid model, or on two tiers, is two blocks). The collector keys its table and its per-label
counters by place id, so a row costs one lookup whatever the number of media and groups.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..protocol.batch import LabelTable


class PlaceTable:
    """Gives each (medium id, group id) pair seen a place id, in order of first sight."""

    def __init__(self, media: LabelTable, groups: LabelTable) -> None:
        self.media = media
        self.groups = groups
        self.capacity = media.capacity * groups.capacity
        if self.capacity > 256:
            raise ValueError("media x groups must fit in 256 places")
        self._lut = np.full((media.capacity, groups.capacity), -1, np.int16)
        self.medium = np.zeros(self.capacity, np.uint8)  # per place id: its medium id
        self.group = np.zeros(self.capacity, np.uint8)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def ids(
        self, medium: npt.NDArray[np.uint8], group: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]:
        """The place id of each row (new pairs get the next ids)."""
        place = self._lut[medium, group]
        if (place < 0).any():
            new = np.unique(medium[place < 0].astype(np.int64) * 256 + group[place < 0])
            for pair in new.tolist():
                self.add(pair >> 8, pair & 255)
            place = self._lut[medium, group]
        return place.astype(np.uint8)

    def add(self, medium_id: int, group_id: int) -> int:
        """The place id of one pair, given one if it has none."""
        if self._lut[medium_id, group_id] < 0:
            self._lut[medium_id, group_id] = self.count
            self.medium[self.count] = medium_id
            self.group[self.count] = group_id
            self.count += 1
        return int(self._lut[medium_id, group_id])

    def pairs(self) -> list[tuple[int, int]]:
        """(medium id, group id) of every place, by place id."""
        return list(
            zip(self.medium[: self.count].tolist(), self.group[: self.count].tolist(), strict=True)
        )

    def restore(self, pairs: list[tuple[int, int]]) -> None:
        """Take back the places a checkpoint recorded, keeping their ids."""
        for place_id, (medium_id, group_id) in enumerate(pairs):
            if self.add(medium_id, group_id) != place_id:
                raise ValueError(f"place ({medium_id}, {group_id}) cannot keep id {place_id}")
