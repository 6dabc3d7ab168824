"""The columnar batch every decoder produces and every collector consumes.

One row per block operation, in stream order. A ``BlockStored`` event with 16 hashes becomes
16 rows; ``AllBlocksCleared`` becomes one ``OP_CLEAR`` row. Label strings from the wire
(medium, removal reason) travel as small integer ids into a bounded :class:`LabelTable`, so a
hostile stream cannot explode label cardinality.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

OP_STORE: Final = 0
OP_REMOVE: Final = 1
OP_ACCESS: Final = 2
OP_CLEAR: Final = 3

OTHER_LABEL: Final = "other"
MAX_LABEL_LENGTH: Final = 32
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
F64Array = npt.NDArray[np.float64]


class LabelTable:
    """Interns label values from the wire into small ids, bounded in count and length.

    Id 0 is always the table's default value (``unknown`` for media, ``evicted`` for removal
    reasons). Values are sanitized to ``[A-Za-z0-9_.:-]`` and cut to 32 characters; once
    ``capacity`` values exist, new ones map to ``other``.
    """

    def __init__(self, default: str, capacity: int = 16, seed: tuple[str, ...] = ()) -> None:
        if capacity < 3:
            raise ValueError("a label table needs room for the default, 'other' and one value")
        self.capacity = capacity
        self.names: list[str] = []
        self._ids: dict[object, int] = {}
        self._intern(default)
        for name in seed:
            self._intern(name)
        self._ids[None] = 0

    def _intern(self, name: str) -> int:
        label_id = self._ids.get(name)
        if label_id is None:
            label_id = len(self.names)
            self.names.append(name)
            self._ids[name] = label_id
        return label_id

    def id_of(self, value: object) -> int:
        """The id for a raw wire value (str, None, or anything else)."""
        label_id = self._ids.get(value)
        if label_id is not None:
            return label_id
        if isinstance(value, str) and value:
            name = _UNSAFE.sub("_", value)[:MAX_LABEL_LENGTH]
        else:
            name = OTHER_LABEL
        if name not in self._ids and len(self.names) >= self.capacity - 1:
            name = OTHER_LABEL
        label_id = self._intern(name)
        if isinstance(value, str):
            self._ids[value] = label_id
        return label_id

    def restore(self, names: list[str]) -> None:
        """Take back the names a checkpoint recorded, keeping their ids (ValueError if this
        table already gave some id to another name)."""
        for label_id, name in enumerate(names):
            if label_id < len(self.names):
                if self.names[label_id] != name:
                    raise ValueError(f"label {label_id} is {self.names[label_id]!r}, not {name!r}")
            elif label_id >= self.capacity or self._intern(name) != label_id:
                raise ValueError(f"label {name!r} cannot keep id {label_id}")

    def ids_of(self, values: list[object]) -> list[int]:
        """Ids for many values; one dict lookup each, interning only what is new."""
        get = self._ids.get
        ids = list(map(get, values))
        if None in ids:
            ids = [i if i is not None else self.id_of(v) for i, v in zip(ids, values, strict=True)]
        return ids  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Block operations in stream order, as parallel numpy columns (one row per block).

    ``chain`` locates stored blocks in their prefix chains, when the producer said: row *i* is
    block ``offset[i]`` (0-based) of a ``BlockStored`` whose parent is ``parent[i]``
    (``has_parent[i]``), so its prefix depth is the parent's depth + offset + 1.
    """

    op: U8Array
    block_hash: U64Array
    ts: F64Array
    medium: U8Array
    reason: U8Array
    chain: PrefixChain | None = None

    def __len__(self) -> int:
        return int(self.op.shape[0])

    @staticmethod
    def empty() -> EventBatch:
        return EventBatch(
            op=np.zeros(0, np.uint8),
            block_hash=np.zeros(0, np.uint64),
            ts=np.zeros(0, np.float64),
            medium=np.zeros(0, np.uint8),
            reason=np.zeros(0, np.uint8),
        )

    def take(self, rows: slice | npt.NDArray[np.int64]) -> EventBatch:
        """The rows selected by a slice or an index array, in that order."""
        return EventBatch(
            op=self.op[rows],
            block_hash=self.block_hash[rows],
            ts=self.ts[rows],
            medium=self.medium[rows],
            reason=self.reason[rows],
            chain=None if self.chain is None else self.chain.take(rows),
        )


@dataclass(frozen=True, slots=True)
class PrefixChain:
    """Where each stored block sits in its prefix chain (see :class:`EventBatch`)."""

    parent: U64Array
    has_parent: npt.NDArray[np.bool_]
    offset: npt.NDArray[np.uint32]

    def take(self, rows: slice | npt.NDArray[np.int64]) -> PrefixChain:
        return PrefixChain(self.parent[rows], self.has_parent[rows], self.offset[rows])


@dataclass(slots=True)
class DecodeStats:
    """What a decoder saw besides the rows: event counts and problems, by name."""

    events: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    unknown_fields: int = 0
    tokens_stored: int = 0

    def add_event(self, name: str, count: int = 1) -> None:
        self.events[name] = self.events.get(name, 0) + count

    def add_error(self, reason: str, count: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + count
