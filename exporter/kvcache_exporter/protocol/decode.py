"""Decoding the engines' KV-event payloads into columnar :class:`EventBatch` rows.

:class:`PayloadDecoder` reads payloads with :mod:`.schema`'s structs. The fast path decodes a
whole payload with the strict structs, which reject anything unexpected; only when it fails does
the slow path take the payload apart event by event with the lenient ones, so one bad or unknown
event is counted and skipped without losing the rest. Per-event work on the fast path is C-level
``map`` over the decoded structs; rows are built with numpy (:mod:`.columns`) once per flush, so
many small messages coalesce into one batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from .batch import (
    MAX_LABEL_LENGTH,
    OP_STORE,
    OTHER_LABEL,
    DecodeStats,
    EventBatch,
    GroupSpec,
    LabelTable,
    new_adapter_table,
    new_group_table,
)
from .columns import block_tokens, copies_left, hashes_to_array, prefix_chain
from .schema import (
    ARR_LENIENT,
    ARRAY_WIDTH,
    EVENT_NAMES,
    KNOWN_FIELDS,
    MAP_LENIENT,
    OP_OF,
    ArrBatch,
    LooseBatch,
    MapBatch,
)

_get_hashes = attrgetter("block_hashes")
_get_medium = attrgetter("medium")
_get_reason = attrgetter("reason")
_get_group = attrgetter("group_idx")
_get_lora_name = attrgetter("lora_name")
_get_lora_id = attrgetter("lora_id")
_get_spec = attrgetter("group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
# Pending events that make a batch due (:attr:`PayloadDecoder.batch_due`): small enough that
# decoded events die young (they are Python objects until the flush, and holding tens of
# thousands makes every GC pass rescan them), large enough to amortize numpy calls.
BATCH_EVENTS: Final = 4096
_UNSAFE_KIND: Final = re.compile(r"[^A-Za-z0-9_.:-]")


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
        self._map = msgspec.msgpack.Decoder(MapBatch)
        self._arr = msgspec.msgpack.Decoder(ArrBatch)
        self._loose = msgspec.msgpack.Decoder(LooseBatch)
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
        batch: MapBatch | ArrBatch | LooseBatch
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
        if isinstance(batch, LooseBatch):
            events = self._decode_events_one_by_one(events)
        self._events.extend(events)
        self._event_ts.extend([batch.ts] * len(events))
        self.last_ts = batch.ts
        if isinstance(batch.dp_rank, int) and not isinstance(batch.dp_rank, bool):
            self.last_dp_rank = batch.dp_rank
        return len(events)

    def _decode_loose(self, payload: bytes | memoryview) -> LooseBatch:
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
            width = ARRAY_WIDTH.get(name, 0) if isinstance(name, str) else 0
            self.stats.unknown_fields += sum(1 for v in value[1 + width :] if v is not None)
            value = value[: 1 + width]
        else:
            self.stats.add_error("event_schema")
            return None
        if not isinstance(name, str) or name not in KNOWN_FIELDS:
            self.stats.add_event("unknown")
            return None
        self.stats.unknown_fields += len(fields - KNOWN_FIELDS[name])
        lenient = MAP_LENIENT[name] if isinstance(value, dict) else ARR_LENIENT[name]
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

    @property
    def batch_due(self) -> bool:
        """Whether enough is pending that the caller should flush: :data:`BATCH_EVENTS`."""
        return len(self._events) >= BATCH_EVENTS

    def flush(self) -> EventBatch:
        """All rows fed since the last flush, as one columnar batch."""
        events, event_ts = self._events, self._event_ts
        self._events, self._event_ts = [], []
        if not events:
            return EventBatch.empty()
        ops = list(map(OP_OF.__getitem__, map(type, events)))
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
        tokens = block_tokens(events, op_ev, counts)
        self._count_events(op_ev, events, int(tokens.sum()))
        return EventBatch(
            op=op,
            block_hash=hashes,
            ts=np.repeat(np.array(event_ts, dtype=np.float64), counts),
            medium=np.repeat(np.array(media, dtype=np.uint8), counts),
            reason=np.repeat(np.array(reasons, dtype=np.uint8), counts),
            chain=prefix_chain(events, counts),
            group=np.repeat(groups, counts),
            adapter=np.repeat(self._adapter_ids(events, op_ev), counts),
            tokens=tokens,
            copies_left=copies_left(events, counts),
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
