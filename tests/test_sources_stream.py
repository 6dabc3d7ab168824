"""The stream's batches: when the decoder says a batch is due, the stream hands it on, so a
batch is bounded by its rows (compiled decoder) or by its decoded events (the reference),
whatever the number of blocks per event; and nothing is lost or reordered across the cuts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvcache_exporter.protocol.batch import EventBatch, LabelTable
from kvcache_exporter.protocol.compiled import BATCH_ROWS, COMPILED
from kvcache_exporter.protocol.decode import BATCH_EVENTS, PayloadDecoder
from kvcache_exporter.protocol.encode import Removed, Stored, encode_batch, frames
from kvcache_exporter.sources.stream import EventStream


def payloads(blocks_per_event: int, events: int) -> list[bytes]:
    """vLLM payloads of 8 events each: stores of ``blocks_per_event`` fresh blocks, and the
    removal of the blocks stored two payloads before."""
    key = itertools.count(1)
    out, stored = [], []
    for i in range(events // 8):
        batch: list[Stored | Removed] = []
        for _ in range(8):
            hashes = [next(key) for _ in range(blocks_per_event)]
            stored.append(hashes)
            batch.append(Stored(hashes))
        if i >= 2:
            batch.extend(Removed(h) for h in stored[(i - 2) * 8 : (i - 1) * 8])
        out.append(encode_batch(1000.0 + i, batch))
    return out


def run(blocks_per_event: int, events: int) -> tuple[list[EventBatch], EventStream]:
    batches: list[EventBatch] = []
    stream = EventStream(
        "e", batches.append, lambda _ts: None, LabelTable("unknown"), LabelTable("evicted")
    )
    for seq, payload in enumerate(payloads(blocks_per_event, events)):
        stream.handle(frames("kv", seq, payload))
    stream.flush()
    return batches, stream


@pytest.mark.skipif(not COMPILED, reason="the compiled decoder is not built or is disabled")
@pytest.mark.parametrize("blocks_per_event", [1, 16, 256])
def test_compiled_batches_are_bounded_by_rows(blocks_per_event: int) -> None:
    events = 24_000 if blocks_per_event == 1 else 2400  # more rows than one batch holds
    batches, _ = run(blocks_per_event, events)
    per_payload = 16 * blocks_per_event  # 8 stores and 8 removals of that many blocks
    assert len(batches) >= 2
    assert max(map(len, batches)) < BATCH_ROWS + per_payload
    # The rows, end to end, are those of one batch of everything, in order.
    whole = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
    for payload in payloads(blocks_per_event, events):
        whole.feed(payload)
    want = whole.flush()
    for name in ("op", "block_hash", "ts", "medium", "reason"):
        got = np.concatenate([getattr(b, name) for b in batches])
        assert got.tobytes() == getattr(want, name).tobytes(), name


def test_the_reference_is_bounded_by_decoded_events() -> None:
    decoder = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
    fed = 0
    for payload in payloads(256, 8 * 600):
        fed += decoder.feed(payload)
        if decoder.batch_due:
            break
    assert decoder.pending_events == fed
    assert BATCH_EVENTS <= fed < BATCH_EVENTS + 16
