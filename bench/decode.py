"""Decode-stage benchmark: the msgspec reference against the compiled decoder, same run.

Two streams: the synthetic one of ``bench/ingest.py`` (the bundled Mooncake trace through the
simulated engine, vLLM map form) and a recorded vLLM 0.33 stream (default: the hybrid model's,
``tests/fixtures/streams``). Each decoder reads every payload in memory and is flushed as
:class:`EventStream` flushes the reference (every ``BATCH_EVENTS`` pending events); no framing,
no sequence checks, no ZeroMQ. Both are flushed at the same points so that their batches can be
compared column by column before anything is printed. Block events are rows of stores,
removals and accesses.

Run: ``python bench/decode.py`` (about half a minute); ``--repeat N`` runs each N times and
reports the median.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Final

import ingest
from kvcache_exporter.protocol.batch import OP_CLEAR, LabelTable
from kvcache_exporter.protocol.compiled import CompiledPayloadDecoder, Walker
from kvcache_exporter.protocol.decode import BATCH_EVENTS, PayloadDecoder

RECORDED: Final = (
    Path(__file__).parent.parent / "tests/fixtures/streams/vllm-0.33.0-hybrid.frames.gz"
)


def recorded_payloads(path: Path) -> list[bytes]:
    """Every third frame (the payload) of a ``*.frames.gz`` recording (see tests/streams.py)."""
    data, frames, offset = gzip.decompress(path.read_bytes()), [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        frames.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return frames[2::3]


def run(decoder: PayloadDecoder, payloads: list[bytes]) -> tuple[float, int, str]:
    """Seconds, block events and a digest of every batch."""
    digest, block_events = hashlib.sha256(), 0
    started = time.perf_counter()
    batches = []
    for payload in payloads:
        decoder.feed(payload)
        if decoder.pending_events >= BATCH_EVENTS:
            batches.append(decoder.flush())
    batches.append(decoder.flush())
    seconds = time.perf_counter() - started
    for batch in batches:
        block_events += int((batch.op != OP_CLEAR).sum())
        for column in (batch.op, batch.block_hash, batch.ts, batch.medium, batch.group):
            digest.update(column.tobytes())
        for column in (batch.adapter, batch.tokens, batch.copies_left, batch.reason):
            digest.update(column.tobytes())
    return seconds, block_events, digest.hexdigest()


def measure(name: str, payloads: list[bytes], repeat: int) -> None:
    figures = {}
    digests = set()
    for label, make in (
        ("reference", PayloadDecoder),
        ("compiled", CompiledPayloadDecoder),
    ):
        times = []
        for _ in range(repeat):
            seconds, block_events, digest = run(
                make(LabelTable("unknown"), LabelTable("evicted")), payloads
            )
            times.append(seconds)
            digests.add(digest)
        figures[label] = (statistics.median(times), block_events)
    if len(digests) != 1:
        raise SystemExit(f"{name}: the two decoders' batches differ")
    (ref_s, n), (com_s, _) = figures["reference"], figures["compiled"]
    size = sum(map(len, payloads))
    print(f"{name}: {len(payloads):,} payloads, {size / 1e6:.1f} MB, {n:,} block events")
    for label, (seconds, _) in figures.items():
        per_s = n / seconds
        print(f"  {label:<9} {per_s / 1e6:6.2f} M block events/s  {seconds * 1e3:8.1f} ms")
    print(f"  compiled / reference: {ref_s / com_s:.1f}x; identical batches")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--min-block-events", type=int, default=2_000_000)
    p.add_argument("--recorded", type=Path, default=RECORDED)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if Walker is None:
        print("the compiled decoder is not built (no C compiler at install)", file=sys.stderr)
        return 1
    stream = ingest.build_stream(
        ingest.parse_args(["--min-block-events", str(args.min_block_events)])
    )
    measure("synthetic (bench/ingest.py)", [m[2] for m in stream.messages], args.repeat)
    measure(args.recorded.name, recorded_payloads(args.recorded), args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
