"""The wire schema of KV-cache events: msgspec structs and the field tables around them.

Every engine sends a msgpack batch ``[ts, events(, dp_rank)]`` whose events are maps with a
``"type"`` key (vLLM >= 0.24, SGLang, TensorRT-LLM) or arrays whose first element is the type
name (vLLM <= 0.23). Each event type has a strict struct per form, which rejects anything
unexpected (the decoder's fast path), and a lenient subclass that ignores unknown fields or
trailing positions (its slow path, one event at a time). Structs only: nothing here decodes.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, ClassVar, Final

import msgspec

from .batch import OP_ACCESS, OP_CLEAR, OP_REMOVE, OP_STORE

Hash = int | bytes

# Names of the event fields this exporter knows, per type (wire map keys, array positions).
STORED_FIELDS: Final = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    # vLLM >= 0.26: hybrid KV-cache groups (read), multimodal extra keys (ignored).
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    # SGLang >= 0.5.20 and TensorRT-LLM: request salt, session and multimodal keys (ignored).
    "cache_salt",
    "session_id",
    "mm_keys",
)
REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx", "remaining_copy_counts", "reason")
ACCESSED_FIELDS: Final = ("block_hashes", "medium", "group_idx")


# --- map form (vLLM >= 0.24, SGLang, TensorRT-LLM, native extension) ---------------------
_NULL: Final = msgspec.Raw(b"\xc0")


class _MapStored(
    msgspec.Struct, tag="BlockStored", tag_field="type", forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None = None
    token_ids: msgspec.Raw = msgspec.Raw(b"\x90")
    block_size: int | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: msgspec.Raw = _NULL
    group_idx: Any = None
    kv_cache_spec_kind: Any = None
    kv_cache_spec_sliding_window: Any = None
    cache_salt: msgspec.Raw = _NULL
    session_id: msgspec.Raw = _NULL
    mm_keys: msgspec.Raw = _NULL
    reason: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


class _MapRemoved(
    msgspec.Struct, tag="BlockRemoved", tag_field="type", forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: Any = None
    remaining_copy_counts: list[int] | None = None
    reason: str | None = None
    parent_block_hash: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None


class _MapAccessed(
    msgspec.Struct, tag="BlockAccessed", tag_field="type", forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: Any = None
    reason: ClassVar[None] = None
    parent_block_hash: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


class _MapCleared(
    msgspec.Struct, tag="AllBlocksCleared", tag_field="type", forbid_unknown_fields=True, gc=False
):
    block_hashes: ClassVar[tuple[int]] = (0,)
    medium: ClassVar[None] = None
    reason: ClassVar[None] = None
    parent_block_hash: ClassVar[None] = None
    group_idx: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


# --- array form (vLLM <= 0.23): fields by position, trailing ones optional ---------------
class _ArrStored(
    msgspec.Struct, tag="BlockStored", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None = None
    token_ids: msgspec.Raw = msgspec.Raw(b"\x90")
    block_size: int | None = None
    lora_id: int | None = None
    medium: str | None = None
    # vLLM's lora_name; SGLang <= 0.5.19 puts a metadata map ({"cache_salt": ...}) here.
    lora_name: Any = None
    # Positions vLLM 0.23 declares after lora_name: extra_keys (ignored), then the group.
    extra_keys: Any = None
    group_idx: Any = None
    kv_cache_spec_kind: Any = None
    kv_cache_spec_sliding_window: Any = None
    pos11: Any = None
    reason: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


class _ArrRemoved(
    msgspec.Struct, tag="BlockRemoved", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    medium: str | None = None
    # vLLM's group_idx and remaining_copy_counts come first; the native reason follows them.
    group_idx: Any = None
    remaining_copy_counts: list[int] | None = None
    reason: str | None = None
    parent_block_hash: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None


class _ArrAccessed(
    msgspec.Struct, tag="BlockAccessed", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: Any = None
    reason: ClassVar[None] = None
    parent_block_hash: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


class _ArrCleared(
    msgspec.Struct, tag="AllBlocksCleared", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: ClassVar[tuple[int]] = (0,)
    medium: ClassVar[None] = None
    reason: ClassVar[None] = None
    parent_block_hash: ClassVar[None] = None
    group_idx: ClassVar[None] = None
    lora_name: ClassVar[None] = None
    lora_id: ClassVar[None] = None
    remaining_copy_counts: ClassVar[None] = None


_MapEvent = _MapStored | _MapRemoved | _MapAccessed | _MapCleared
_ArrEvent = _ArrStored | _ArrRemoved | _ArrAccessed | _ArrCleared


# Whole payloads, one type per form; LooseBatch leaves the events raw for the slow path.
class MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_MapEvent]
    dp_rank: int | None = None


class ArrBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_ArrEvent]
    dp_rank: int | None = None


class LooseBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: Any = None


# The batch op of each struct class (the lenient subclasses are added below).
OP_OF: Final[dict[type, int]] = {
    _MapStored: OP_STORE,
    _ArrStored: OP_STORE,
    _MapRemoved: OP_REMOVE,
    _ArrRemoved: OP_REMOVE,
    _MapAccessed: OP_ACCESS,
    _ArrAccessed: OP_ACCESS,
    _MapCleared: OP_CLEAR,
    _ArrCleared: OP_CLEAR,
}
EVENT_NAMES: Final = {
    OP_STORE: "BlockStored",
    OP_REMOVE: "BlockRemoved",
    OP_ACCESS: "BlockAccessed",
    OP_CLEAR: "AllBlocksCleared",
}
KNOWN_FIELDS: Final = {
    "BlockStored": frozenset(STORED_FIELDS),
    "BlockRemoved": frozenset(REMOVED_FIELDS),
    "BlockAccessed": frozenset(ACCESSED_FIELDS),
    "AllBlocksCleared": frozenset(),
}
# How many array positions each type declares, vLLM's trailing ones included.
ARRAY_WIDTH: Final = {
    "BlockStored": 12,
    "BlockRemoved": 5,
    "BlockAccessed": 3,
    "AllBlocksCleared": 0,
}
# Map form on the slow path: unknown keys are ignored (counted before).
MAP_LENIENT: Final = {
    name: type(f"Lenient{cls.__name__}", (cls,), {}, forbid_unknown_fields=False, tag=name)
    for name, cls in (
        ("BlockStored", _MapStored),
        ("BlockRemoved", _MapRemoved),
        ("BlockAccessed", _MapAccessed),
        ("AllBlocksCleared", _MapCleared),
    )
}
_ARR_BY_NAME: Final[dict[str, type]] = {
    "BlockStored": _ArrStored,
    "BlockRemoved": _ArrRemoved,
    "BlockAccessed": _ArrAccessed,
    "AllBlocksCleared": _ArrCleared,
}
# Array form on the slow path: positions past the declared ones are ignored (counted before).
ARR_LENIENT: Final = {
    name: type(
        f"Lenient{cls.__name__}", (cls,), {}, forbid_unknown_fields=False, tag=name, array_like=True
    )
    for name, cls in _ARR_BY_NAME.items()
}
for _cls in chain(MAP_LENIENT.values(), ARR_LENIENT.values()):
    OP_OF[_cls] = OP_OF[_cls.__mro__[1]]
