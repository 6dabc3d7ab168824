"""Decoding the engines' KV-event payloads into columnar :class:`EventBatch` rows.

Every engine (vLLM, SGLang, TensorRT-LLM) sends a msgpack batch ``[ts, events(, dp_rank)]``.
Events are maps with a ``"type"`` key (vLLM >= 0.24, SGLang) or arrays whose first element is
the type name (vLLM <= 0.23). The fast path decodes a whole payload with typed msgspec structs
that reject anything unexpected; only when it fails does the slow path take the payload apart
event by event, so one bad or unknown event is counted and skipped without losing the rest.
Per-event work on the fast path is C-level ``map`` over the decoded structs; rows are built
with numpy once per flush, so many small messages coalesce into one batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_not
from typing import Any, ClassVar, Final

import msgspec
import numpy as np
import numpy.typing as npt

from .batch import (
    MAX_LABEL_LENGTH,
    NO_COPY_COUNT,
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    OTHER_LABEL,
    DecodeStats,
    EventBatch,
    GroupSpec,
    LabelTable,
    PrefixChain,
)

U64_MASK: Final = (1 << 64) - 1
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


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds that keep a hostile or broken producer from exhausting memory."""

    max_payload_bytes: int = 16 * 1024 * 1024
    max_events_per_batch: int = 1_000_000
    max_hashes_per_event: int = 1_000_000


class DecodeError(Exception):
    """A whole message could not be read; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


class _MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_MapEvent]
    dp_rank: int | None = None


class _ArrBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_ArrEvent]
    dp_rank: int | None = None


class _LooseBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: Any = None


_OP_OF: Final[dict[type, int]] = {
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
_KNOWN_FIELDS: Final = {
    "BlockStored": frozenset(STORED_FIELDS),
    "BlockRemoved": frozenset(REMOVED_FIELDS),
    "BlockAccessed": frozenset(ACCESSED_FIELDS),
    "AllBlocksCleared": frozenset(),
}
# How many array positions each type declares, vLLM's trailing ones included.
_ARRAY_WIDTH: Final = {
    "BlockStored": 12,
    "BlockRemoved": 5,
    "BlockAccessed": 3,
    "AllBlocksCleared": 0,
}
_MAP_LENIENT: Final = {
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
_ARR_LENIENT: Final = {
    name: type(
        f"Lenient{cls.__name__}", (cls,), {}, forbid_unknown_fields=False, tag=name, array_like=True
    )
    for name, cls in _ARR_BY_NAME.items()
}
for _cls in chain(_MAP_LENIENT.values(), _ARR_LENIENT.values()):
    _OP_OF[_cls] = _OP_OF[_cls.__mro__[1]]

_get_hashes = attrgetter("block_hashes")
_get_medium = attrgetter("medium")
_get_reason = attrgetter("reason")
_get_tokens = attrgetter("token_ids")
_get_parent = attrgetter("parent_block_hash")
_get_group = attrgetter("group_idx")
_get_block_size = attrgetter("block_size")
_get_lora_name = attrgetter("lora_name")
_get_lora_id = attrgetter("lora_id")
_get_copies_left = attrgetter("remaining_copy_counts")
_get_spec = attrgetter("group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
_UNSAFE_KIND: Final = re.compile(r"[^A-Za-z0-9_.:-]")


def fold_hash(value: object) -> int:
    """Fold a wire hash to uint64: ints by two's complement, bytes by their last 8 bytes."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a block hash")
    if isinstance(value, int):
        return value & U64_MASK
    if isinstance(value, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(value)[-8:], "big")
    raise TypeError(f"a block hash is an int or bytes, not {type(value).__name__}")


def hashes_to_array(hashes: list[Hash]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """uint64 array of folded hashes; the common all-non-negative-int case stays in C."""
    # numpy parses bytes as decimal text (b"12" -> 12), so bytes never take the fast path.
    if bytes not in set(map(type, hashes)):
        try:
            return np.array(hashes, dtype=np.uint64)
        except (OverflowError, TypeError, ValueError):
            pass
        try:  # signed 64-bit hashes (SGLang): the same bits
            return np.array(hashes, dtype=np.int64).view(np.uint64)
        except (OverflowError, TypeError, ValueError):
            pass
    return np.fromiter(map(fold_hash, hashes), dtype=np.uint64, count=len(hashes))


def msgpack_array_length(raw: msgspec.Raw) -> int:
    """Element count of a msgpack array from its header alone (token_ids are never decoded)."""
    view = memoryview(raw)
    if not view:
        return 0
    head = view[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(view) >= 3:
        return int.from_bytes(view[1:3], "big")
    if head == 0xDD and len(view) >= 5:
        return int.from_bytes(view[1:5], "big")
    return 0


def _prefix_chain(events: list[Any], counts: npt.NDArray[np.int64]) -> PrefixChain:
    """Per row: its event's parent hash and its offset inside the event."""
    parents = list(map(_get_parent, events))
    has_parent = np.fromiter(map(is_not, parents, repeat(None)), bool, count=len(parents))
    parent = np.zeros(len(parents), np.uint64)
    if has_parent.any():
        parent[has_parent] = hashes_to_array([p for p in parents if p is not None])
    starts = np.cumsum(counts) - counts
    offset = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    return PrefixChain(
        parent=np.repeat(parent, counts),
        has_parent=np.repeat(has_parent, counts),
        offset=offset.astype(np.uint32),
    )


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


def _block_tokens(
    events: list[Any], op_ev: npt.NDArray[np.uint8], counts: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint32]:
    """Tokens each stored block holds (0 on other rows): ``block_size``, the engine's unit of
    caching, and fewer only for a trailing partial block of a store whose ``token_ids`` stop
    short of it.

    ``token_ids`` cannot be split per block in general: a sliding-window group's stores carry
    tokens of blocks that are not in ``block_hashes``. Where ``block_size`` is not sent, each
    block is taken to hold an equal share of the store's tokens.
    """
    tokens = np.zeros(int(counts.sum()), np.uint32)
    store_events = np.flatnonzero(op_ev == OP_STORE)
    if not store_events.size:
        return tokens
    stores = list(map(events.__getitem__, store_events.tolist()))
    n = counts[store_events]
    sent = np.fromiter(map(msgpack_array_length, map(_get_tokens, stores)), np.int64, len(stores))
    sizes = list(map(_get_block_size, stores))
    try:
        size = np.array(sizes, dtype=np.int64)
    except (TypeError, OverflowError):  # some store without a block size (or a bad one)
        size = np.array([b if isinstance(b, int) and 0 < b < 2**31 else 0 for b in sizes])
    size = np.where((size > 0) & (size < 2**31), size, -(-sent // np.maximum(n, 1)))
    offset = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    row_size = np.repeat(size, n)
    held = np.clip(np.repeat(sent, n) - offset * row_size, 0, row_size)
    row_is_store = np.repeat(op_ev == OP_STORE, counts)
    tokens[row_is_store] = np.minimum(held, np.iinfo(np.uint32).max)
    return tokens


def _copies_left(events: list[Any], counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]:
    """Per row: the removal's ``remaining_copy_counts`` entry, or NO_COPY_COUNT."""
    lists = list(map(_get_copies_left, events))
    out = np.full(int(counts.sum()), NO_COPY_COUNT, np.int32)
    if lists.count(None) == len(lists):
        return out
    starts = np.cumsum(counts) - counts
    for start, count, values in zip(starts.tolist(), counts.tolist(), lists, strict=True):
        # A list that does not match the hashes one to one says nothing usable.
        if values is not None and len(values) == count:
            out[start : start + count] = np.clip(values, 0, np.iinfo(np.int32).max)
    return out


def _is_label_value(value: object) -> bool:
    """Can a wire value be a label table key (a str, an int, or None)?"""
    return value is None or isinstance(value, str | int)


def _spec_name(value: object) -> str:
    if isinstance(value, str) and value:
        return _UNSAFE_KIND.sub("_", value)[:MAX_LABEL_LENGTH]
    return "unknown"


class PayloadDecoder:
    """Decodes payloads of one source into pending rows; :meth:`flush` returns them as a batch.

    Not thread-safe: one decoder per source, used by the thread that reads the socket.
    """

    def __init__(
        self,
        media: LabelTable,
        reasons: LabelTable,
        limits: DecodeLimits | None = None,
        groups: LabelTable | None = None,
        adapters: LabelTable | None = None,
    ) -> None:
        self.media = media
        self.reasons = reasons
        self.groups = groups or new_group_table()
        self.adapters = adapters or new_adapter_table()
        self.limits = limits or DecodeLimits()
        self.stats = DecodeStats()
        self._map = msgspec.msgpack.Decoder(_MapBatch)
        self._arr = msgspec.msgpack.Decoder(_ArrBatch)
        self._loose = msgspec.msgpack.Decoder(_LooseBatch)
        self._generic = msgspec.msgpack.Decoder()
        self._first: msgspec.msgpack.Decoder[Any] = self._map
        self._second: msgspec.msgpack.Decoder[Any] = self._arr
        self._events: list[Any] = []
        self._event_ts: list[float] = []
        self.last_ts: float | None = None
        self.last_dp_rank: int | None = None

    def feed(self, payload: bytes | memoryview) -> int:
        """Decode one payload into the pending rows; returns the events it held.

        Raises :class:`DecodeError` when nothing of the message can be used; problems with
        single events are counted in :attr:`stats` and those events skipped.
        """
        if len(payload) > self.limits.max_payload_bytes:
            raise DecodeError("too_large", f"payload of {len(payload)} bytes")
        batch: _MapBatch | _ArrBatch | _LooseBatch
        try:
            batch = self._first.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            try:
                batch = self._second.decode(payload)
                self._first, self._second = self._second, self._first
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                batch = self._decode_loose(payload)
        events: list[Any] = batch.events
        if len(events) > self.limits.max_events_per_batch:
            raise DecodeError("too_large", f"{len(events)} events in one batch")
        if not np.isfinite(batch.ts):
            raise DecodeError("schema", "batch timestamp is not finite")
        if isinstance(batch, _LooseBatch):
            events = self._decode_events_one_by_one(events)
        self._events.extend(events)
        self._event_ts.extend([batch.ts] * len(events))
        self.last_ts = batch.ts
        if isinstance(batch.dp_rank, int) and not isinstance(batch.dp_rank, bool):
            self.last_dp_rank = batch.dp_rank
        return len(events)

    def _decode_loose(self, payload: bytes | memoryview) -> _LooseBatch:
        try:
            return self._loose.decode(payload)
        except msgspec.ValidationError as exc:
            raise DecodeError("schema", str(exc)) from None
        except msgspec.DecodeError as exc:
            truncated = "truncated" in str(exc).lower()
            raise DecodeError("truncated" if truncated else "msgpack", str(exc)) from None
        except RecursionError:
            raise DecodeError("msgpack", "nested too deeply") from None

    def _decode_events_one_by_one(self, raws: list[msgspec.Raw]) -> list[Any]:
        events: list[Any] = []
        for raw in raws:
            event = self._decode_event(raw)
            if event is not None:
                events.append(event)
        return events

    def _decode_event(self, raw: msgspec.Raw) -> Any:
        """One event on the slow path: unknown types and fields are counted and skipped."""
        try:
            value = self._generic.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            self.stats.add_error("event_msgpack")
            return None
        if isinstance(value, dict):
            name = value.get("type")
            fields = set(value) - {"type"}
        elif isinstance(value, list) and value:
            name = value[0]
            fields = set()
            width = _ARRAY_WIDTH.get(name, 0) if isinstance(name, str) else 0
            self.stats.unknown_fields += sum(1 for v in value[1 + width :] if v is not None)
            value = value[: 1 + width]
        else:
            self.stats.add_error("event_schema")
            return None
        if not isinstance(name, str) or name not in _KNOWN_FIELDS:
            self.stats.add_event("unknown")
            return None
        self.stats.unknown_fields += len(fields - _KNOWN_FIELDS[name])
        lenient = _MAP_LENIENT[name] if isinstance(value, dict) else _ARR_LENIENT[name]
        # Typed decode of the raw bytes, not convert(value): convert cannot fill the
        # msgspec.Raw token_ids field from a decoded list, so every BlockStored failed here.
        try:
            event: Any = msgspec.msgpack.decode(raw, type=lenient)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            self.stats.add_error("event_schema")
            return None
        if len(getattr(event, "block_hashes", ())) > self.limits.max_hashes_per_event:
            self.stats.add_error("too_large")
            return None
        return event

    @property
    def pending_events(self) -> int:
        return len(self._events)

    def flush(self) -> EventBatch:
        """All rows fed since the last flush, as one columnar batch."""
        events, event_ts = self._events, self._event_ts
        self._events, self._event_ts = [], []
        if not events:
            return EventBatch.empty()
        ops = list(map(_OP_OF.__getitem__, map(type, events)))
        hash_lists = list(map(_get_hashes, events))
        counts = np.fromiter(map(len, hash_lists), dtype=np.int64, count=len(events))
        if int(counts.max(initial=0)) > self.limits.max_hashes_per_event:
            return self._flush_oversized(events, event_ts)
        op_ev = np.array(ops, dtype=np.uint8)
        media = self.media.ids_of(list(map(_get_medium, events)))
        reasons = self.reasons.ids_of(list(map(_get_reason, events)))
        groups = self._group_ids(events)
        hashes = hashes_to_array(list(chain.from_iterable(hash_lists)))
        op = np.repeat(op_ev, counts)
        tokens = _block_tokens(events, op_ev, counts)
        self._count_events(op_ev, events, int(tokens.sum()))
        return EventBatch(
            op=op,
            block_hash=hashes,
            ts=np.repeat(np.array(event_ts, dtype=np.float64), counts),
            medium=np.repeat(np.array(media, dtype=np.uint8), counts),
            reason=np.repeat(np.array(reasons, dtype=np.uint8), counts),
            chain=_prefix_chain(events, counts),
            group=np.repeat(groups, counts),
            adapter=np.repeat(self._adapter_ids(events, op_ev), counts),
            tokens=tokens,
            copies_left=_copies_left(events, counts),
        )

    def _group_ids(self, events: list[Any]) -> npt.NDArray[np.uint8]:
        """Per event: its KV-cache group's label id (group 0 where the event names none)."""
        values = list(map(_get_group, events))
        if values.count(None) == len(values):
            return np.zeros(len(events), np.uint8)
        if not all(map(_is_label_value, values)):
            values = [v if _is_label_value(v) else OTHER_LABEL for v in values]
        return np.array(self.groups.ids_of(values), np.uint8)

    def _adapter_ids(
        self, events: list[Any], op_ev: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]:
        """Per event: its LoRA adapter's label id (0, ``base``, for none and non-stores):
        ``lora_name``, else ``lora_id`` where that is all an engine sends (TensorRT-LLM)."""
        names = list(map(_get_lora_name, events))
        ids = list(map(_get_lora_id, events))
        if names.count(None) == len(names) and ids.count(None) == len(ids):
            return np.zeros(len(events), np.uint8)
        values = [
            n if isinstance(n, str) and n else (i if isinstance(i, int) else None)
            for n, i in zip(names, ids, strict=True)
        ]
        adapter = np.array(self.adapters.ids_of(values), np.uint8)
        adapter[op_ev != OP_STORE] = 0
        return adapter

    def _flush_oversized(self, events: list[Any], event_ts: list[float]) -> EventBatch:
        limit = self.limits.max_hashes_per_event
        keep = [len(_get_hashes(e)) <= limit for e in events]
        self.stats.add_error("too_large", keep.count(False))
        self._events = [e for e, k in zip(events, keep, strict=True) if k]
        self._event_ts = [t for t, k in zip(event_ts, keep, strict=True) if k]
        return self.flush()

    def _count_events(self, op_ev: npt.NDArray[np.uint8], events: list[Any], tokens: int) -> None:
        per_op = np.bincount(op_ev, minlength=4)
        for op, count in enumerate(per_op.tolist()):
            if count:
                self.stats.add_event(EVENT_NAMES[op], count)
        self.stats.tokens_stored += tokens
        if per_op[OP_STORE]:
            rows = np.flatnonzero(op_ev == OP_STORE).tolist()
            spec_list = list(map(_get_spec, map(events.__getitem__, rows)))
            specs: dict[tuple[Any, ...], None]  # distinct, in stream order: the last one wins
            try:
                specs = dict.fromkeys(spec_list)
            except TypeError:  # a list or map where a group, kind or window belongs
                specs = dict.fromkeys(
                    tuple(v if _is_label_value(v) else OTHER_LABEL for v in spec)
                    for spec in spec_list
                )
            if specs.keys() != {(None, None, None)}:
                self._learn_groups(specs)

    def _learn_groups(self, specs: Iterable[tuple[Any, ...]]) -> None:
        """Remember what each group's stores say it is (a handful of distinct specs a flush,
        in the order they first appear: of two specs for one group, the later one wins)."""
        for group, kind, window in specs:
            if kind is None and window is None:
                continue
            label = self.groups.id_of(group if _is_label_value(group) else OTHER_LABEL)
            sliding = (
                str(window) if isinstance(window, int) and not isinstance(window, bool) else ""
            )
            self.stats.groups[label] = GroupSpec(_spec_name(kind), sliding)
