"""The compiled decode stage, and the choice between it and the msgspec reference.

:class:`CompiledPayloadDecoder` reads payloads with the C walker in ``_wire.c``: one call per
payload walks the msgpack bytes and appends to C buffers (one record per event, one folded hash
per row); :meth:`~CompiledPayloadDecoder.flush` writes the :class:`EventBatch` columns in one
pass. No Python object is made per event. The results are those of
:class:`~.decode.PayloadDecoder` (the reference), bit for bit: the same columns, the same label
ids (label values are interned at flush, in first-appearance order, as the reference does),
the same :class:`DecodeStats` at every moment, the same ``pending_events``.

Fallback, per payload. The walker reports *unsure* for shapes whose exact reference result it
does not reproduce, and the reference decides:

- anything wrong with the payload as a whole (not msgpack, truncated, trailing bytes, a
  batch that is not ``[ts, events, ...]``, a timestamp that is not a finite number, more events
  than ``max_events_per_batch``): the reference raises the same :class:`DecodeError` it
  always does (a probe decoder finds the reason; the pending rows are untouched);
- msgpack the reference reads as Python objects but this walker does not follow: ext types,
  strings that are not valid UTF-8, map keys that are arrays or maps, nesting deeper than 32,
  non-str or repeated keys in an event map;
- ``group_idx``, ``kv_cache_spec_kind`` or ``kv_cache_spec_sliding_window`` that is not
  None, an int or a str (the reference files them under ``other`` after deduplicating the raw
  values); more than 4,096 distinct group specs or 32 distinct unknown keys in one event.

Such a payload turns the rest of its flush window over to the reference: the payloads already
walked since the last flush are fed again to the reference (their feed-time counts, already
made, go to a scratch :class:`DecodeStats`), then this one and the following ones until the
flush. The window's batch is then the reference's own. Every other shape, unknown event types,
unknown fields, unreadable events (``event_schema``) and events over ``max_hashes_per_event``
(``too_large``, at feed or at flush exactly as the reference counts them) included, is decoded
here.

``KVCACHE_EXPORTER_NO_EXTENSION=1`` (or a build without a C compiler) selects the reference.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from .batch import DecodeStats, EventBatch, LabelTable, PrefixChain
from .decode import DecodeError, DecodeLimits, PayloadDecoder
from .extensions import DISABLE_ENV, extensions_disabled
from .schema import EVENT_NAMES

try:
    from ._wire import Walker
except ImportError:  # built without a C compiler
    Walker = None  # type: ignore[assignment,misc]

COMPILED: Final = Walker is not None and not extensions_disabled()
_UNSURE: Final = -1
# Pending rows that make a batch due (:attr:`CompiledPayloadDecoder.batch_due`). The walker
# holds no Python object per event, so what bounds a batch here is its rows: enough to amortize
# each stage's per-batch work, few enough that one apply holds the collector's lock briefly
# (a scrape waits for it), whatever the number of blocks per event.
BATCH_ROWS: Final = 32768


def decode_path() -> str:
    """Which decoder the exporter uses, for the start log."""
    if COMPILED:
        return "compiled"
    if Walker is not None:
        return f"reference (disabled by {DISABLE_ENV})"
    return "reference (extension not built)"


class CompiledPayloadDecoder(PayloadDecoder):
    """:class:`PayloadDecoder` with the compiled walker; the reference where it is unsure."""

    def __init__(
        self,
        media: LabelTable,
        reasons: LabelTable,
        limits: DecodeLimits | None = None,
        groups: LabelTable | None = None,
        adapters: LabelTable | None = None,
    ) -> None:
        super().__init__(media, reasons, limits, groups, adapters)
        if Walker is None:
            raise RuntimeError("kvcache_exporter.protocol._wire was not built")
        self._walker = Walker(self.limits.max_events_per_batch, self.limits.max_hashes_per_event)
        self._window: list[bytes | memoryview] = []  # payloads walked since the last flush
        self._by_reference = False  # the rest of this window goes to the reference
        self._probe: PayloadDecoder | None = None

    def feed(self, payload: bytes | memoryview) -> int:
        if self._by_reference:
            return super().feed(payload)
        if len(payload) > self.limits.max_payload_bytes:
            raise DecodeError("too_large", f"payload of {len(payload)} bytes")
        walker = self._walker
        n: int = walker.feed(payload)
        if n == _UNSURE:
            return self._feed_by_reference(payload)
        # Kept for a switch to the reference before the flush (bytes are immutable; a view
        # may not be).
        self._window.append(payload if isinstance(payload, bytes) else bytes(payload))
        self.last_ts = walker.last_ts
        dp_rank = walker.dp_rank
        if dp_rank is not None:
            self.last_dp_rank = dp_rank
        counts = walker.feed_counts
        if counts is not None:
            self._count_feed(*counts)
        return n

    def _count_feed(self, unknown: int, unknown_fields: int, schema: int, too_large: int) -> None:
        """What the reference counts while it reads a payload event by event."""
        stats = self.stats
        if unknown:
            stats.add_event("unknown", unknown)
        stats.unknown_fields += unknown_fields
        if schema:
            stats.add_error("event_schema", schema)
        if too_large:
            stats.add_error("too_large", too_large)

    def _feed_by_reference(self, payload: bytes | memoryview) -> int:
        if self._probe is None:
            self._probe = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"), self.limits)
        self._probe.feed(payload)  # a DecodeError leaves this decoder as it was
        self._probe.flush()
        stats, self.stats = self.stats, DecodeStats()
        try:
            for walked in self._window:
                super().feed(walked)
        finally:
            self.stats = stats
        self._window.clear()
        self._walker.reset()
        self._by_reference = True
        return super().feed(payload)

    @property
    def pending_events(self) -> int:
        return super().pending_events + self._walker.pending

    @property
    def batch_due(self) -> bool:
        """:data:`BATCH_ROWS` rows (or events) pending; while the reference reads this flush
        window, the reference's own rule."""
        if self._by_reference:
            return super().batch_due
        walker = self._walker
        return walker.rows >= BATCH_ROWS or walker.pending >= BATCH_ROWS

    def flush(self) -> EventBatch:
        if self._by_reference:
            self._by_reference = False
            return super().flush()
        self._window.clear()
        walker = self._walker
        if not walker.pending:
            return EventBatch.empty()
        media, reasons, groups, adapters, specs = walker.labels()
        luts = (
            bytes(self.media.ids_of(media)),
            bytes(self.reasons.ids_of(reasons)),
            bytes(self.groups.ids_of(groups)),
            bytes(self.adapters.ids_of(adapters)),
        )
        had_rows = walker.events > 0
        (op, block_hash, ts, medium, reason, parent, has_parent, offset, group, adapter, tokens,
         copies_left, per_op, tokens_stored, oversized) = walker.flush(*luts)  # fmt: skip
        if oversized:
            self.stats.add_error("too_large", oversized)
        if not had_rows:
            return EventBatch.empty()
        for op_id, count in enumerate(per_op):
            if count:
                self.stats.add_event(EVENT_NAMES[op_id], count)
        self.stats.tokens_stored += tokens_stored
        if specs:
            self._learn_groups(dict.fromkeys(specs))
        return EventBatch(
            op=np.frombuffer(op, np.uint8),
            block_hash=np.frombuffer(block_hash, np.uint64),
            ts=np.frombuffer(ts, np.float64),
            medium=np.frombuffer(medium, np.uint8),
            reason=np.frombuffer(reason, np.uint8),
            chain=PrefixChain(
                parent=np.frombuffer(parent, np.uint64),
                has_parent=np.frombuffer(has_parent, np.bool_),
                offset=np.frombuffer(offset, np.uint32),
            ),
            group=np.frombuffer(group, np.uint8),
            adapter=np.frombuffer(adapter, np.uint8),
            tokens=np.frombuffer(tokens, np.uint32),
            copies_left=np.frombuffer(copies_left, np.int32),
        )


def new_payload_decoder(
    media: LabelTable,
    reasons: LabelTable,
    limits: DecodeLimits | None = None,
    groups: LabelTable | None = None,
    adapters: LabelTable | None = None,
) -> PayloadDecoder:
    """The decoder the exporter uses: compiled where built and not disabled."""
    cls = CompiledPayloadDecoder if COMPILED else PayloadDecoder
    return cls(media, reasons, limits, groups, adapters)
