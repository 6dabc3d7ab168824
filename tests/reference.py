"""A plain, per-event reference of the SPEC §3 semantics, written independently of the
exporter's vectorized collector, for tests to compare against."""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from kvcache_exporter.collector.histogram import ACCESS_COUNT_BUCKETS, RESIDENCY_BUCKETS


@dataclass
class Hist:
    bounds: tuple[float, ...]
    counts: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, medium: str, value: float) -> None:
        row = self.counts.setdefault(medium, [0] * (len(self.bounds) + 1))
        row[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[medium] += value

    def count(self, medium: str) -> int:
        return sum(self.counts.get(medium, []))


@dataclass
class Block:
    stored: float
    last: float
    accesses: int = 0


class ReferenceCollector:
    """Events in, numbers out: one Python object per block, no cleverness."""

    def __init__(self, removed_memory: int = 1_000_000) -> None:
        self.resident: dict[tuple[int, str], Block] = {}
        self.removed_at: dict[tuple[int, str], float] = {}
        self.removed_memory = removed_memory
        self.stored: dict[str, int] = defaultdict(int)
        self.accessed: dict[str, int] = defaultdict(int)
        self.restores: dict[str, int] = defaultdict(int)
        self.removed: dict[tuple[str, str], int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.unknown_removals = 0
        self.clears = 0
        self.hist = {
            name: Hist(RESIDENCY_BUCKETS)
            for name in ("lifetime", "idle_before_evict", "reuse_gap", "restore_gap")
        }
        self.accesses_before_evict = Hist(ACCESS_COUNT_BUCKETS)

    def resident_count(self, medium: str) -> int:
        return sum(1 for (_, m) in self.resident if m == medium)

    def store(self, h: int, medium: str, ts: float) -> None:
        key = (h, medium)
        block = self.resident.get(key)
        if block is not None:
            self.access(h, medium, ts)
            return
        self.stored[medium] += 1
        if key in self.removed_at:
            self.restores[medium] += 1
            self.hist["restore_gap"].observe(medium, ts - self.removed_at.pop(key))
        self.resident[key] = Block(ts, ts)

    def access(self, h: int, medium: str, ts: float) -> None:
        block = self.resident.get((h, medium))
        if block is None:
            return
        self.accessed[medium] += 1
        self.hist["reuse_gap"].observe(medium, ts - block.last)
        block.last = ts
        block.accesses += 1

    def remove(self, h: int, medium: str, ts: float, reason: str = "evicted") -> None:
        key = (h, medium)
        self.removed[(medium, reason)] += 1
        block = self.resident.pop(key, None)
        if block is None:
            self.unknown_removals += 1
            return
        self._observe_removal(medium, ts, block)
        self._remember(key, ts)

    def clear(self, ts: float) -> None:
        self.clears += 1
        for key, block in list(self.resident.items()):
            self.removed[(key[1], "cleared")] += 1
            self._observe_removal(key[1], ts, block)
            self._remember(key, ts)
        self.resident.clear()

    def _observe_removal(self, medium: str, ts: float, block: Block) -> None:
        self.hist["lifetime"].observe(medium, ts - block.stored)
        self.hist["idle_before_evict"].observe(medium, ts - block.last)
        self.accesses_before_evict.observe(medium, float(block.accesses))

    def _remember(self, key: tuple[int, str], ts: float) -> None:
        self.removed_at.pop(key, None)
        self.removed_at[key] = ts
        while len(self.removed_at) > self.removed_memory:
            del self.removed_at[next(iter(self.removed_at))]

    def feed(self, ts: float, events: list[dict[str, object]]) -> None:
        """Apply one decoded batch (events as dicts in the vLLM map form)."""
        for event in events:
            kind = str(event["type"])
            self.events[kind] += 1
            medium = event.get("medium") or "unknown"
            assert isinstance(medium, str)
            hashes = event.get("block_hashes", [])
            assert isinstance(hashes, list)
            if kind == "BlockStored":
                for h in hashes:
                    self.store(h, medium, ts)
            elif kind == "BlockRemoved":
                reason = str(event.get("reason") or "evicted")
                for h in hashes:
                    self.remove(h, medium, ts, reason)
            elif kind == "BlockAccessed":
                for h in hashes:
                    self.access(h, medium, ts)
            elif kind == "AllBlocksCleared":
                self.clear(ts)
