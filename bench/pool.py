"""Pool index benchmark: its cost per block event at 1, 8 and 64 engines, against the same run
without it, and its memory per distinct resident key.

The bundled Mooncake trace, looped ``--loops`` times (the same hashes each pass, so later
passes meet what earlier ones left), is served round-robin by N simulated replicas (an LRU
prefix cache of ``--gpu-blocks`` blocks each; replica i serves requests i, i + N, …), 8
requests a message in vLLM's map form. Each replica's messages are decoded once into the
batches its pipeline applies; then, in one process and the same order (round-robin over the
replicas' batches), the pipelines are fed twice: without a pool (the baseline: collector and
monitor) and with every engine in one pool, alternately ``--repeats`` times, the fastest of
each counting. Reported per block event: the pipelines' time in
both runs, and the index's own time (its ``admit`` and ``follow``, timed apart); the resident
elsewhere share; the index's bytes per distinct resident key at the end.

Run: ``python bench/pool.py`` (about a minute on 2 cores); ``--json FILE`` keeps figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from kvcache_exporter import logs
from kvcache_exporter.analysis.pool import PoolIndex, PoolMember
from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
)
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.protocol.batch import EventBatch
from kvcache_exporter.protocol.encode import encode_batch

REQUESTS_PER_MESSAGE = 8


def replica_payloads(engines: int, loops: int, gpu_blocks: int) -> list[list[bytes]]:
    """Each replica's messages (payloads), round-robin over the looped trace."""
    requests: list[Request] = list(
        repeat_requests(lambda: read_mooncake(bundled_trace_path()), loops)
    )
    out: list[list[bytes]] = []
    for i in range(engines):
        sim = PrefixCacheSimulator(gpu_blocks, 0)
        mine = list(islice(requests, i, None, engines))
        payloads = []
        for k in range(0, len(mine), REQUESTS_PER_MESSAGE):
            chunk = mine[k : k + REQUESTS_PER_MESSAGE]
            events = [e for r in chunk for e in sim.step(r)]
            if events:
                payloads.append(encode_batch(chunk[-1].timestamp_s, events))
        out.append(payloads)
    return out


def decoded(pipelines: Sequence[Pipeline], payloads: list[list[bytes]]) -> list[list[EventBatch]]:
    """Each replica's batches, decoded with its pipeline's label tables."""
    batches = []
    for pipeline, mine in zip(pipelines, payloads, strict=True):
        decoder = pipeline.stream.decoder
        engine_batches = []
        for payload in mine:
            decoder.feed(payload)
            engine_batches.append(decoder.flush())
        batches.append(engine_batches)
    return batches


def timed(method: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(*args)
        finally:
            spent[0] += time.perf_counter() - t0

    return wrapper


def run(engines: int, payloads: list[list[bytes]], with_pool: bool) -> dict[str, Any]:
    pool = PoolIndex("bench") if with_pool else None
    pipelines = [new_pipeline(f"e{i}", CollectorConfig(), pool=pool) for i in range(engines)]
    batches = decoded(pipelines, payloads)
    index_s = [0.0]
    for pipeline in pipelines:
        member = pipeline.pool
        if isinstance(member, PoolMember):
            member.admit = timed(member.admit, index_s)  # type: ignore[method-assign]
            member.follow = timed(member.follow, index_s)  # type: ignore[method-assign]
    rows = sum(len(b) for mine in batches for b in mine)
    longest = max(len(mine) for mine in batches)
    t0 = time.perf_counter()
    for k in range(longest):
        for pipeline, mine in zip(pipelines, batches, strict=True):
            if k < len(mine):
                pipeline.apply(mine[k])
    total = time.perf_counter() - t0
    figures: dict[str, Any] = {
        "engines": engines,
        "block_events": rows,
        "pipelines_s": total,
        "ns_per_event": total / rows * 1e9,
    }
    if pool is not None:
        snap = pool.snapshot()
        stored = sum(int(e.stored.sum()) for e in snap.engines)
        elsewhere = sum(int(e.elsewhere.sum()) for e in snap.engines)
        distinct = int(snap.distinct.sum())
        figures |= {
            "index_s": index_s[0],
            "index_ns_per_event": index_s[0] / rows * 1e9,
            "resident_elsewhere_share": elsewhere / stored if stored else 0.0,
            "distinct_keys": distinct,
            "duplicate_keys": int(snap.duplicate.sum()),
            "index_bytes": snap.nbytes,
            "bytes_per_key": snap.nbytes / distinct if distinct else 0.0,
        }
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="1,8,64", help="pool sizes (default 1,8,64)")
    parser.add_argument("--loops", type=int, default=4, help="passes over the trace")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--gpu-blocks", type=int, default=2000, help="blocks per replica")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logs.setup("error", "logfmt")  # the thrashing alerts of a small cache are not news here
    results = []
    for engines in (int(n) for n in args.engines.split(",")):
        payloads = replica_payloads(engines, args.loops, args.gpu_blocks)
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(args.repeats):  # alternated, so that neither run is always the warmer
            for with_pool in (False, True):
                runs[with_pool].append(run(engines, payloads, with_pool))
        off = min(runs[False], key=lambda r: r["pipelines_s"])
        on = min(runs[True], key=lambda r: r["pipelines_s"])
        results.append({"off": off, "on": on})
        print(
            f"{engines:3d} engines  {on['block_events']:9,d} block events   "
            f"pipelines {off['ns_per_event']:6.0f} ns/event without the index, "
            f"{on['ns_per_event']:6.0f} with (+{on['ns_per_event'] - off['ns_per_event']:.0f})   "
            f"index alone {on['index_ns_per_event']:5.0f} ns/event   "
            f"resident elsewhere {on['resident_elsewhere_share']:6.1%}   "
            f"{on['distinct_keys']:,d} keys, {on['bytes_per_key']:.1f} B/key",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
