"""What-if benchmark: accuracy against exact simulation, and cost per block event.

1. **Accuracy.** The embedded engine (an LRU prefix cache with vLLM's semantics) serves the
   bundled Mooncake trace at capacity C and at k·C. The exporter's pipeline (framing, decoding,
   collector, what-if model) is fed only the C-run's frames, 4 requests a message, and its
   summary's ``recompute_saved_ratio`` is compared with ``1 - stores(k·C) / stores(C)``; with
   ``--report-hits`` runs, its ``hit_ratio`` with the k·C run's hits / (hits + stores).
   - R = 1, the simulator's own order (a step's removals before its stores) and interleaved
     (each removal right before the store it made room for);
   - R = 0.1: the exporter's sample, and the spread over ``--salts`` other samples (the trace's
     hashes XOR a salt: other hashes, the same workload);
   - R = 0.01 on a long stream: the trace looped ``--loops`` times, fresh hashes each loop.
2. **Cost.** The ingest benchmark's stream (``bench/ingest.py``: the trace looped, 8,000 GPU
   blocks, 8 requests a message, >= 2 M block events), decoded once into the batches the
   exporter applies; the collector's apply and the model's apply timed apart, the model at
   R = 1, 0.1 and 0.01, and the model's memory at the end.

Run: ``python bench/whatif.py`` (about 4 minutes on 2 cores); ``--json FILE`` keeps figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import ingest  # bench/ingest.py: the ingest benchmark's stream and decoding
from kvcache_exporter import logs
from kvcache_exporter.analysis.whatif import WhatIfConfig, WhatIfModel
from kvcache_exporter.collector import BlockLifecycleCollector
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
    spread_hash,
)
from kvcache_exporter.offline import OfflinePipeline
from kvcache_exporter.protocol.batch import EventBatch
from kvcache_exporter.protocol.encode import (
    Accessed,
    Event,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    frames,
)
from kvcache_exporter.sinks.summary import summarize

AVOIDED = (1.25, 1.5, 2.0, 4.0, 8.0)
ALL = (0.25, 0.5, 0.75, 1.0, *AVOIDED)


def exact(requests: Sequence[Request], capacity: int) -> tuple[int, int]:
    """(GPU blocks stored, GPU blocks hit) on a cache of ``capacity`` blocks."""
    simulator = PrefixCacheSimulator(capacity, report_hits=True)
    stored = accessed = 0
    for request in requests:
        for event in simulator.step(request):
            if isinstance(event, Stored):
                stored += len(event.block_hashes)
            elif isinstance(event, Accessed):
                accessed += len(event.block_hashes)
    return stored, accessed


def interleaved(events: list[Event]) -> list[Event]:
    removals = [e for e in events if isinstance(e, Removed)]
    out: list[Event] = [e for e in events if isinstance(e, Accessed)]
    for stored in (e for e in events if isinstance(e, Stored)):
        for block in stored.block_hashes:
            if removals:
                out.append(removals.pop(0))
            out.append(Stored([block], medium=stored.medium))
    return out + removals


def estimate(
    requests: Sequence[Request],
    capacity: int,
    ratio: float,
    report_hits: bool = False,
    interleave: bool = False,
) -> dict[str, Any]:
    """The exporter's what-if summary for GPU, fed only the ``capacity`` run's frames."""
    pipeline = OfflinePipeline(whatif=WhatIfConfig(sample_ratio=ratio, max_ghosts=1_000_000))
    simulator = PrefixCacheSimulator(capacity, report_hits=report_hits)
    pending: list[Event] = []
    for n, request in enumerate(requests, start=1):
        events = simulator.step(request)
        pending += interleaved(events) if interleave else events
        if n % 4 == 0 or n == len(requests):
            payload = encode_batch(request.timestamp_s, pending, WireForm.VLLM)
            pipeline.feed("sim", frames("", (n - 1) // 4, payload), request.timestamp_s)
            pending = []
    (view,) = pipeline.views()
    whatif: dict[str, Any] = summarize(view)["media"]["GPU"]["whatif"]
    return whatif


def errors(
    requests: Sequence[Request], capacity: int, whatif: dict[str, Any], hits: bool
) -> dict[str, tuple[float, float]]:
    """Per factor: (exact, estimated)."""
    stored = exact(requests, capacity)[0]
    out: dict[str, tuple[float, float]] = {}
    for factor in ALL if hits else AVOIDED:
        s, a = exact(requests, round(factor * capacity))
        row = whatif["factors"][f"{factor:g}"]
        if hits:
            out[f"{factor:g}"] = (a / (a + s), row["hit_ratio"])
        else:
            out[f"{factor:g}"] = (1 - s / stored, row["recompute_saved_ratio"])
    return out


def salted(requests: Sequence[Request], salt: int) -> list[Request]:
    mask = spread_hash([salt])[0]
    return [Request(r.timestamp_s, r.hash_ids ^ mask) for r in requests]


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    trace = list(read_mooncake(bundled_trace_path()))
    c = args.capacity
    results: dict[str, Any] = {}
    for name, ratio, interleave in (
        ("R=1 grouped", 1.0, False),
        ("R=1 interleaved", 1.0, True),
        ("R=0.1", 0.1, False),
    ):
        whatif = estimate(trace, c, ratio, interleave=interleave)
        results[name] = errors(trace, c, whatif, hits=False)
        print(f"  {name}: done", file=sys.stderr)
    results["hits R=1"] = errors(trace, c, estimate(trace, c, 1.0, report_hits=True), hits=True)
    results["hits R=0.1"] = errors(trace, c, estimate(trace, c, 0.1, report_hits=True), hits=True)
    spread: dict[str, list[float]] = {f"{f:g}": [] for f in AVOIDED}
    for salt in range(1, args.salts + 1):
        requests = salted(trace, salt)
        for factor, (want, got) in errors(requests, c, estimate(requests, c, 0.1), False).items():
            spread[factor].append(got - want)
    results["R=0.1 over salts"] = spread
    print("  salts: done", file=sys.stderr)
    long = list(
        repeat_requests(lambda: iter(trace), args.loops, fresh_hashes=True)
    )  # the looped trace, new hashes each loop
    results["R=0.01 long"] = errors(long, c, estimate(long, c, 0.01), hits=False)
    results["long stream references"] = sum(len(r) for r in long)
    return results


def cost(args: argparse.Namespace) -> dict[str, Any]:
    data = ingest.build_stream(
        argparse.Namespace(
            time_scale=1.0,
            min_block_events=args.min_block_events,
            gpu_blocks=8000,
            requests_per_batch=8,
            report_hits=False,
        )
    )
    labels = ingest._labels()
    batches: list[EventBatch] = []
    ingest._feed(ingest._stream(batches.append, labels), data.messages)
    rows = sum(len(b) for b in batches)
    out: dict[str, Any] = {"block_events": data.block_events, "batches": len(batches)}
    collector = BlockLifecycleCollector(None, *labels)
    residents = []
    t0 = time.perf_counter()
    for batch in batches:
        collector.apply(batch)
        residents.append(collector.resident.copy())  # what the model is given after each
    out["collector_ns_per_row"] = (time.perf_counter() - t0) / rows * 1e9
    for ratio in (1.0, 0.1, 0.01):
        times = []
        for _ in range(args.repeat):
            model = WhatIfModel(WhatIfConfig(sample_ratio=ratio), labels[0])
            t0 = time.perf_counter()
            for batch, resident in zip(batches, residents, strict=True):
                model.apply(batch, resident)
            snapshot = model.snapshot()  # applies what waits in the buffer
            times.append(time.perf_counter() - t0)
        out[f"R={ratio:g}"] = {
            "ns_per_row": statistics.median(times) / rows * 1e9,
            "bytes": snapshot.nbytes,
            "ghosts": sum(m.ghosts for m in snapshot.media.values()),
        }
        print(f"  cost R={ratio:g}: done", file=sys.stderr)
    return out


def render(acc: dict[str, Any] | None, cost_figures: dict[str, Any] | None) -> Iterator[str]:
    if acc is not None:
        yield "| factor | exact | R=1 grouped | R=1 interleaved | R=0.1 | R=0.01 (long) |"
        yield "| --- | --- | --- | --- | --- | --- |"
        for factor in (f"{f:g}" for f in AVOIDED):
            want = acc["R=1 grouped"][factor][0]
            cells = [f"{acc[k][factor][1]:.4f} ({acc[k][factor][1] - acc[k][factor][0]:+.4f})"
                     for k in ("R=1 grouped", "R=1 interleaved", "R=0.1")]  # fmt: skip
            long_want, long_got = acc["R=0.01 long"][factor]
            yield (f"| {factor} | {want:.4f} | {' | '.join(cells)} | {long_got:.4f} "
                   f"({long_got - long_want:+.4f}) |")  # fmt: skip
        yield ""
        yield "| factor | exact hit ratio | R=1 | R=0.1 |"
        yield "| --- | --- | --- | --- |"
        for factor in (f"{f:g}" for f in ALL):
            want, got1 = acc["hits R=1"][factor]
            got01 = acc["hits R=0.1"][factor][1]
            yield (f"| {factor} | {want:.4f} | {got1:.4f} ({got1 - want:+.4f}) | "
                   f"{got01:.4f} ({got01 - want:+.4f}) |")  # fmt: skip
        yield ""
        yield "R=0.1 over other samples (salts): error mean / rms / max |error| per factor"
        for factor, errs in acc["R=0.1 over salts"].items():
            e = np.array(errs)
            yield (f"  {factor}: {e.mean():+.4f} / {np.sqrt((e ** 2).mean()):.4f} / "
                   f"{np.abs(e).max():.4f} over {e.size}")  # fmt: skip
        yield f"long stream: {acc['long stream references']:,} block references"
    if cost_figures is not None:
        yield ""
        yield (f"cost on {cost_figures['block_events']:,} block events, "
               f"{cost_figures['batches']} batches: collector apply "
               f"{cost_figures['collector_ns_per_row']:.0f} ns/row")  # fmt: skip
        for ratio in ("R=1", "R=0.1", "R=0.01"):
            f = cost_figures[ratio]
            yield (f"  what-if {ratio}: {f['ns_per_row']:.0f} ns/row, {f['bytes'] / 1e6:.2f} MB, "
                   f"{f['ghosts']:,} ghosts")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--capacity", type=int, default=4000, help="C, in blocks")
    parser.add_argument("--salts", type=int, default=10, help="other samples at R = 0.1")
    parser.add_argument("--loops", type=int, default=30, help="trace loops of the long stream")
    parser.add_argument("--min-block-events", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed model runs (median)")
    parser.add_argument("--skip", default="", help="accuracy,cost")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    logs.setup("error")  # the looped trace raises the thrashing alert; not news here
    skip = set(args.skip.split(","))
    acc = None if "accuracy" in skip else accuracy(args)
    cost_figures = None if "cost" in skip else cost(args)
    for line in render(acc, cost_figures):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"accuracy": acc, "cost": cost_figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
