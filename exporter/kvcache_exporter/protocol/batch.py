"""The columnar batch every decoder produces and every collector consumes.

One row per block operation, in stream order. A ``BlockStored`` event with 16 hashes becomes
16 rows; ``AllBlocksCleared`` becomes one ``OP_CLEAR`` row. Label values from the wire
(medium, removal reason, KV-cache group, LoRA adapter) travel as small integer ids into bounded
:class:`LabelTable` s, so a hostile stream cannot explode label cardinality.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

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
U32Array = npt.NDArray[np.uint32]
I32Array = npt.NDArray[np.int32]
F64Array = npt.NDArray[np.float64]

NO_COPY_COUNT: Final = -1  # a removal that does not say how many copies of its hash remain


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
        """The id for a raw wire value: a str, an int (named by its decimal digits, as group
        indexes and LoRA ids are), None (the default), or anything else (``other``)."""
        if isinstance(value, int) and not isinstance(value, bool):
            key: object = value
            value = str(value)
        elif isinstance(value, str):
            key = value
        else:
            key = None if value is None else OTHER_LABEL
        label_id = self._ids.get(key)
        if label_id is not None:
            return label_id
        if isinstance(value, str) and value:
            name = _UNSAFE.sub("_", value)[:MAX_LABEL_LENGTH]
        else:
            name = OTHER_LABEL
        if name not in self._ids and len(self.names) >= self.capacity - 1:
            name = OTHER_LABEL
        label_id = self._intern(name)
        self._ids[key] = label_id
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

    def ids_of(self, values: Sequence[object]) -> list[int]:
        """Ids for many values; one dict lookup each, interning only what is new (values must
        be hashable: str, int or None, as the decoders pass them)."""
        get = self._ids.get
        ids = list(map(get, values))
        if None in ids:
            ids = [i if i is not None else self.id_of(v) for i, v in zip(ids, values, strict=True)]
        return ids  # type: ignore[return-value]


DEFAULT_GROUP: Final = "0"
BASE_ADAPTER: Final = "base"  # the adapter label of blocks stored without a LoRA adapter
DEFAULT_MAX_ADAPTERS: Final = 32
MAX_ADAPTERS: Final = 250  # adapter ids are one byte, with room for base and other
MAX_GROUPS: Final = 8


def new_group_table() -> LabelTable:
    """KV-cache group labels: ``"0"`` for events that name none; at most 8 (hybrid models
    have two or three), the rest in ``other``."""
    return LabelTable(DEFAULT_GROUP, capacity=MAX_GROUPS)


def new_adapter_table(max_adapters: int = DEFAULT_MAX_ADAPTERS) -> LabelTable:
    """LoRA adapter labels: ``base``, up to ``max_adapters`` names, then ``other``."""
    return LabelTable(BASE_ADAPTER, capacity=max_adapters + 2)


# Marks a column the producer left out (filled in by EventBatch.__post_init__).
_DEFAULT_COLUMN: Final[Any] = None
_OPTIONAL_COLUMNS: Final = (
    ("group", np.uint8, 0),
    ("adapter", np.uint8, 0),
    ("tokens", np.uint32, 0),
    ("copies_left", np.int32, NO_COPY_COUNT),
)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Block operations in stream order, as parallel numpy columns (one row per block).

    ``group`` is the row's KV-cache group (label id; a block is identified by medium, group
    and hash). On stores, ``adapter`` is the LoRA adapter (label id, 0 for the base model) and
    ``tokens`` the tokens the block holds; on removals, ``copies_left`` is how many physical
    copies of the hash the engine says remain (``NO_COPY_COUNT`` where it does not say).
    Columns a producer leaves out are filled with those defaults.

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
    group: U8Array = _DEFAULT_COLUMN
    adapter: U8Array = _DEFAULT_COLUMN
    tokens: U32Array = _DEFAULT_COLUMN
    copies_left: I32Array = _DEFAULT_COLUMN

    def __post_init__(self) -> None:
        n = self.op.shape[0]
        for name, dtype, fill in _OPTIONAL_COLUMNS:
            if getattr(self, name) is _DEFAULT_COLUMN:
                object.__setattr__(self, name, np.full(n, fill, dtype))

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
            group=self.group[rows],
            adapter=self.adapter[rows],
            tokens=self.tokens[rows],
            copies_left=self.copies_left[rows],
        )


@dataclass(frozen=True, slots=True)
class PrefixChain:
    """Where each stored block sits in its prefix chain (see :class:`EventBatch`)."""

    parent: U64Array
    has_parent: npt.NDArray[np.bool_]
    offset: npt.NDArray[np.uint32]

    def take(self, rows: slice | npt.NDArray[np.int64]) -> PrefixChain:
        return PrefixChain(self.parent[rows], self.has_parent[rows], self.offset[rows])


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What a KV-cache group is, as its stores say (``kv_cache_spec_kind`` and
    ``kv_cache_spec_sliding_window``): ``unknown`` / ``""`` until one does."""

    kind: str = "unknown"
    sliding_window: str = ""


@dataclass(slots=True)
class DecodeStats:
    """What a decoder saw besides the rows: event counts and problems, by name."""

    events: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    unknown_fields: int = 0
    tokens_stored: int = 0
    # Per KV-cache group label id: what its stores say it is (kind, sliding window or "").
    groups: dict[int, GroupSpec] = field(default_factory=dict)

    def add_event(self, name: str, count: int = 1) -> None:
        self.events[name] = self.events.get(name, 0) + count

    def add_error(self, reason: str, count: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + count
