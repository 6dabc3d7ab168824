"""What-if benchmark: accuracy against exact simulation, cost per block event, and scale.

1. **Accuracy.** The embedded engine (an LRU prefix cache with vLLM's semantics) serves the
   bundled Mooncake trace at capacity C and at k·C. The exporter's pipeline (framing, decoding,
   collector, what-if model) is fed only the C-run's frames, 4 requests a message, and its
   summary's ``recompute_saved_ratio`` is compared with ``1 - stores(k·C) / stores(C)``; with
   ``--report-hits`` runs, its ``hit_ratio`` with the k·C run's hits / (hits + stores).
   - the defaults (fixed-size sampling: every hash until 65,536 per medium);
   - fixed rates, no budget: R = 1, the simulator's own order (a step's removals before its
     stores) and interleaved (each removal right before the store it made room for); R = 0.1,
     and its spread over ``--salts`` other samples (the trace's hashes XOR a salt: other
     hashes, the same workload);
   - a long stream, the trace looped ``--loops`` times with fresh hashes each loop: the
     defaults, against a fixed R = 0.01 (the default before fixed-size sampling).
2. **Cost.** The ingest benchmark's stream (``bench/ingest.py``: the trace looped, 8,000 GPU
   blocks, 8 requests a message, >= 2 M block events), decoded once into the batches the
   exporter applies; the collector's apply and the model's apply timed apart, the model at
   the defaults and at fixed R = 1, 0.1 and 0.01, and the model's memory at the end.
3. **Scale.** Workloads of 10 thousand, 1 million and 100 million distinct hashes
   (``--scale-keys``) fed to the model alone: each batch of 4,096 references draws hashes
   uniformly from the workload's keys, stores them and removes the blocks stored a capacity
   earlier (FIFO, a quarter of the keys, at most 4 M blocks); two references per key, at
   least 4 M block events. The defaults against a fixed R = 0.01, same batches, same run: time
   per block event, the model's memory (``WhatIfSnapshot.nbytes``) at the end and at its
   peak, the sampled hashes and the rate they settled at.

Run: ``python bench/whatif.py`` (about 8 minutes on 2 cores); ``--json FILE`` keeps figures;
``--skip accuracy,cost,scale`` leaves parts out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
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
from kvcache_exporter.protocol.batch import OP_REMOVE, OP_STORE, EventBatch, LabelTable
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
NO_BUDGET = 2**62
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


def fixed(ratio: float) -> WhatIfConfig:
    """A fixed sampling rate, no budget (and ghosts remembered far beyond the horizon)."""
    return WhatIfConfig(sample_ratio=ratio, max_sampled_blocks=NO_BUDGET, max_ghosts=1_000_000)


def estimate(
    requests: Sequence[Request],
    capacity: int,
    config: WhatIfConfig,
    report_hits: bool = False,
    interleave: bool = False,
) -> dict[str, Any]:
    """The exporter's what-if summary for GPU, fed only the ``capacity`` run's frames."""
    pipeline = OfflinePipeline(whatif=config)
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
    for name, config, interleave in (
        ("defaults", args.defaults, False),
        ("R=1 grouped", fixed(1.0), False),
        ("R=1 interleaved", fixed(1.0), True),
        ("R=0.1", fixed(0.1), False),
    ):
        whatif = estimate(trace, c, config, interleave=interleave)
        results[name] = errors(trace, c, whatif, hits=False)
        print(f"  {name}: done", file=sys.stderr)
    hits = {"hits R=1": fixed(1.0), "hits R=0.1": fixed(0.1)}
    for name, config in hits.items():
        results[name] = errors(trace, c, estimate(trace, c, config, report_hits=True), True)
    spread: dict[str, list[float]] = {f"{f:g}": [] for f in AVOIDED}
    for salt in range(1, args.salts + 1):
        requests = salted(trace, salt)
        estimated = estimate(requests, c, fixed(0.1))
        for factor, (want, got) in errors(requests, c, estimated, False).items():
            spread[factor].append(got - want)
    results["R=0.1 over salts"] = spread
    print("  salts: done", file=sys.stderr)
    long = list(
        repeat_requests(lambda: iter(trace), args.loops, fresh_hashes=True)
    )  # the looped trace, new hashes each loop
    for name, config in (("defaults long", args.defaults), ("R=0.01 long", fixed(0.01))):
        whatif = estimate(long, c, config)
        results[name] = errors(long, c, whatif, hits=False)
        results[f"{name} sample"] = {
            "ratio": whatif["sample_ratio"],
            "blocks": whatif["sampled"]["blocks"],
        }
        print(f"  {name}: done", file=sys.stderr)
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
    configs = {"defaults": args.defaults, **{f"R={r:g}": fixed(r) for r in (1.0, 0.1, 0.01)}}
    for name, config in configs.items():
        times = []
        for _ in range(args.repeat):
            model = WhatIfModel(config, labels[0])
            t0 = time.perf_counter()
            for batch, resident in zip(batches, residents, strict=True):
                model.apply(batch, resident)
            snapshot = model.snapshot()  # applies what waits in the buffer
            times.append(time.perf_counter() - t0)
        out[name] = {
            "ns_per_row": statistics.median(times) / rows * 1e9,
            "bytes": snapshot.nbytes,
            "ghosts": sum(m.ghosts for m in snapshot.media.values()),
        }
        print(f"  cost {name}: done", file=sys.stderr)
    return out


# --- 3. scale ------------------------------------------------------------------------------
SCALE_BATCH = 4096
MAX_SCALE_CAPACITY = 4_000_000


@dataclass
class ScaleRun:
    config: str
    keys: int
    block_events: int
    ns_per_event: float
    model_bytes: int
    peak_model_bytes: int
    sampled_blocks: int
    sample_ratio: float


def scale_batches(keys: int, references: int, seed: int) -> Iterator[EventBatch]:
    """Stores of uniformly drawn hashes, each batch removing the blocks stored a capacity of
    references before (FIFO)."""
    rng = np.random.default_rng(seed)
    capacity = max(16, min(MAX_SCALE_CAPACITY, keys // 4))
    ring = np.zeros(capacity, np.uint64)
    stored = 0
    while stored < references:
        n = min(SCALE_BATCH, references - stored)
        fresh = rng.integers(0, keys, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        positions = (stored + np.arange(n)) % capacity
        evicted = ring[positions[stored + np.arange(n) >= capacity]]
        ring[positions] = fresh
        op = np.concatenate(
            [np.full(evicted.size, OP_REMOVE, np.uint8), np.full(n, OP_STORE, np.uint8)]
        )
        rows = int(op.shape[0])
        yield EventBatch(
            op=op,
            block_hash=np.concatenate([evicted, fresh]),
            ts=np.full(rows, float(stored // SCALE_BATCH)),
            medium=np.ones(rows, np.uint8),
            reason=np.zeros(rows, np.uint8),
        )
        stored += n


def scale_one(name: str, config: WhatIfConfig, keys: int, args: argparse.Namespace) -> ScaleRun:
    media = LabelTable("unknown")
    media.id_of("GPU")
    model = WhatIfModel(config, media)
    resident = np.zeros(media.capacity, np.int64)
    resident[1] = max(16, min(MAX_SCALE_CAPACITY, keys // 4))
    events, peak, elapsed = 0, 0, 0.0
    references = max(2 * keys, args.min_block_events // 2)
    for i, batch in enumerate(scale_batches(keys, references, seed=1)):
        t0 = time.perf_counter()
        model.apply(batch, resident)
        if i % 256 == 0:
            peak = max(peak, model.snapshot().nbytes)
        elapsed += time.perf_counter() - t0
        events += len(batch)
    t0 = time.perf_counter()
    snapshot = model.snapshot()
    elapsed += time.perf_counter() - t0
    medium = snapshot.media[1]
    return ScaleRun(
        config=name,
        keys=keys,
        block_events=events,
        ns_per_event=elapsed / events * 1e9,
        model_bytes=snapshot.nbytes,
        peak_model_bytes=max(peak, snapshot.nbytes),
        sampled_blocks=medium.sampled_blocks,
        sample_ratio=medium.sample_ratio,
    )


def scale(args: argparse.Namespace) -> list[ScaleRun]:
    runs = []
    for keys in (int(k) for k in args.scale_keys.split(",") if k):
        for name, config in (("defaults", args.defaults), ("R=0.01", fixed(0.01))):
            runs.append(scale_one(name, config, keys, args))
            print(f"  scale {keys:,} {name}: done", file=sys.stderr)
    return runs


def cell(figures: dict[str, Any], factor: str) -> str:
    want, got = figures[factor]
    return f"{got:.4f} ({got - want:+.4f})"


def render(acc: dict[str, Any] | None, cost_figures: dict[str, Any] | None,
           scale_runs: list[ScaleRun] | None) -> Iterator[str]:  # fmt: skip
    if acc is not None:
        short = ("defaults", "R=1 grouped", "R=1 interleaved", "R=0.1")
        yield f"| factor | exact | {' | '.join(short)} |"
        yield "| --- | --- |" + " --- |" * len(short)
        for factor in (f"{f:g}" for f in AVOIDED):
            want = acc["R=1 grouped"][factor][0]
            yield f"| {factor} | {want:.4f} | {' | '.join(cell(acc[k], factor) for k in short)} |"
        yield ""
        refs = acc["long stream references"]
        yield f"long stream ({refs:,} block references): defaults against a fixed R = 0.01"
        yield "| factor | exact | defaults | R=0.01 |"
        yield "| --- | --- | --- | --- |"
        for factor in (f"{f:g}" for f in AVOIDED):
            want = acc["defaults long"][factor][0]
            yield (f"| {factor} | {want:.4f} | {cell(acc['defaults long'], factor)} | "
                   f"{cell(acc['R=0.01 long'], factor)} |")  # fmt: skip
        sample = acc["defaults long sample"]
        yield f"  defaults settled at R = {sample['ratio']:.4f}, {sample['blocks']:,} hashes"
        yield ""
        yield "| factor | exact hit ratio | R=1 | R=0.1 |"
        yield "| --- | --- | --- | --- |"
        for factor in (f"{f:g}" for f in ALL):
            want = acc["hits R=1"][factor][0]
            yield (f"| {factor} | {want:.4f} | {cell(acc['hits R=1'], factor)} | "
                   f"{cell(acc['hits R=0.1'], factor)} |")  # fmt: skip
        yield ""
        yield "R=0.1 over other samples (salts): error mean / rms / max |error| per factor"
        for factor, errs in acc["R=0.1 over salts"].items():
            e = np.array(errs)
            yield (f"  {factor}: {e.mean():+.4f} / {np.sqrt((e ** 2).mean()):.4f} / "
                   f"{np.abs(e).max():.4f} over {e.size}")  # fmt: skip
    if cost_figures is not None:
        yield ""
        yield (f"cost on {cost_figures['block_events']:,} block events, "
               f"{cost_figures['batches']} batches: collector apply "
               f"{cost_figures['collector_ns_per_row']:.0f} ns/row")  # fmt: skip
        for name in ("defaults", "R=1", "R=0.1", "R=0.01"):
            f = cost_figures[name]
            yield (f"  what-if {name}: {f['ns_per_row']:.0f} ns/row, {f['bytes'] / 1e6:.2f} MB, "
                   f"{f['ghosts']:,} ghosts")  # fmt: skip
    if scale_runs is not None:
        yield ""
        yield ("| keys | config | block events | ns / event | model MB (peak) | sampled hashes "
               "| rate | bytes / sampled hash |")  # fmt: skip
        yield "| --- | --- | --- | --- | --- | --- | --- | --- |"
        for r in scale_runs:
            yield (f"| {r.keys:,} | {r.config} | {r.block_events:,} | {r.ns_per_event:.0f} | "
                   f"{r.model_bytes / 1e6:.2f} ({r.peak_model_bytes / 1e6:.2f}) | "
                   f"{r.sampled_blocks:,} | {r.sample_ratio:.4f} | "
                   f"{r.model_bytes / max(1, r.sampled_blocks):.0f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--capacity", type=int, default=4000, help="C, in blocks")
    parser.add_argument("--salts", type=int, default=10, help="other samples at R = 0.1")
    parser.add_argument("--loops", type=int, default=30, help="trace loops of the long stream")
    parser.add_argument("--min-block-events", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed model runs (median)")
    parser.add_argument("--scale-keys", default="10000,1000000,100000000")
    parser.add_argument(
        "--budget",
        type=int,
        default=WhatIfConfig().max_sampled_blocks,
        help="--whatif.max-sampled-blocks of the 'defaults' rows (the shipped default)",
    )
    parser.add_argument("--skip", default="", help="accuracy,cost,scale")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    args.defaults = WhatIfConfig(max_sampled_blocks=args.budget)
    logs.setup("error")  # the looped trace raises the thrashing alert; not news here
    skip = set(args.skip.split(","))
    acc = None if "accuracy" in skip else accuracy(args)
    cost_figures = None if "cost" in skip else cost(args)
    scale_runs = None if "scale" in skip else scale(args)
    for line in render(acc, cost_figures, scale_runs):
        print(line)
    if args.json:
        figures = {"accuracy": acc, "cost": cost_figures,
                   "scale": [asdict(r) for r in scale_runs or []]}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
