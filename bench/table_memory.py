"""Bytes per tracked block: the collector's block table at any size.

For each size N the bench stores N fresh blocks (batches of 65,536, as a burst reaches the
collector) into a new :class:`BlockLifecycleCollector` and reads:

- **table**: the block table's columns over the tracked blocks (what grows with them);
- **collector**: everything ``kvcache_exporter_collector_bytes`` counts (the eviction log and
  the fixed arrays too);
- **peak**: the most numpy held at once while storing them (tracemalloc), per block: what a
  growth step costs while the old and the new table live side by side;
- **removed**: the same N blocks then removed (they become ghosts, remembered for restores,
  at most ``--collector.removed-memory``): table bytes per remembered key, so the removal
  memory is per distinct removed key.

    python bench/table_memory.py                     # 10k, 1M, 4M and a sweep in between
    python bench/table_memory.py --sizes 10000,1000000,4000000 --sweep 0

Target (issue 15): <= 48 B per tracked block at any table size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

from kvcache_exporter.collector import BlockLifecycleCollector, CollectorConfig
from kvcache_exporter.collector.table import COMPILED
from kvcache_exporter.protocol.batch import OP_REMOVE, OP_STORE, EventBatch

TARGET_BYTES = 48
CHUNK = 65_536


def _apply(collector: BlockLifecycleCollector, op: int, keys: np.ndarray, ts: float) -> None:
    for start in range(0, keys.shape[0], CHUNK):
        chunk = keys[start : start + CHUNK]
        n = chunk.shape[0]
        collector.apply(
            EventBatch(
                op=np.full(n, op, np.uint8),
                block_hash=chunk,
                ts=np.full(n, ts),
                medium=np.ones(n, np.uint8),
                reason=np.zeros(n, np.uint8),
            )
        )


def measure(n: int, removed: bool) -> dict[str, float]:
    keys = np.random.default_rng(n).integers(0, 2**63, size=n, dtype=np.uint64)
    collector = BlockLifecycleCollector(CollectorConfig(removed_memory=1_000_000))
    collector.media.id_of("GPU")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _apply(collector, OP_STORE, keys, 1.0)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    snap = collector.snapshot()
    out = {
        "blocks": n,
        "capacity": collector.table.capacity,
        "load": collector.table.live / collector.table.capacity,
        "table_b": collector.table.nbytes / snap.tracked,
        "collector_b": snap.table_bytes / snap.tracked,
        "peak_b": peak / n,
    }
    if removed:
        _apply(collector, OP_REMOVE, keys, 2.0)
        live = collector.table.live
        out["removed_keys"] = live
        out["removed_b"] = collector.table.nbytes / live
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,1000000,4000000", help="comma-separated N")
    p.add_argument("--sweep", type=int, default=24, help="more sizes, log-spaced 10k..4M")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    named = [int(x) for x in args.sizes.split(",") if x]
    swept = [int(x) for x in np.geomspace(10_000, 4_000_000, args.sweep)] if args.sweep else []
    print(f"block table: {'compiled' if COMPILED else 'numpy reference'}")
    print(
        f"{'blocks':>10} {'capacity':>10} {'load':>5} {'table B':>8} {'collector B':>11} "
        f"{'peak B':>7} {'removed keys':>12} {'B/removed key':>13}"
    )
    rows = []
    for n in sorted({*named, *swept}):
        row = measure(n, removed=n in named)
        rows.append(row)
        removed = (
            f"{row['removed_keys']:>12,.0f} {row['removed_b']:>13.1f}" if "removed_b" in row else ""
        )
        print(
            f"{n:>10,} {row['capacity']:>10,.0f} {row['load']:>5.2f} {row['table_b']:>8.1f} "
            f"{row['collector_b']:>11.1f} {row['peak_b']:>7.1f} {removed}"
        )
    worst = max(r["table_b"] for r in rows)
    verdict = "met" if worst <= TARGET_BYTES else "MISS"
    print(f"worst table bytes per tracked block: {worst:.1f} B (<= {TARGET_BYTES}: {verdict})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if worst <= TARGET_BYTES else 2


if __name__ == "__main__":
    sys.exit(main())
