"""A plain, per-event reference of the SPEC §3 semantics, written independently of the
exporter's vectorized collector, for tests to compare against.

A block is a hash in a place, a (medium, KV-cache group) pair: the same hash in two groups or
on two media is two blocks. The engine may hold several physical copies of one block:

- a store of a resident block is one more copy (stored and resident + 1, not an access, its
  life goes on), unless ``hit_reports`` (stores of resident blocks are hits: an access);
- a removal takes one copy away, or leaves exactly ``copies_left`` when the engine says; the
  block's life ends, and its lifecycle is observed, when no copy is left;
- a store of a block whose life ended (and that is still remembered) is a restore;
- ``AllBlocksCleared`` removes every copy of every block.

Counters are kept per place; the per-medium views (``stored[medium]``, ``removed[(medium,
reason)]``, ``resident_count(medium)``, ``hist[name].counts[medium]``) sum a medium's groups.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvcache_exporter.collector.histogram import ACCESS_COUNT_BUCKETS, RESIDENCY_BUCKETS

DEFAULT_GROUP = "0"
BASE_ADAPTER = "base"
HISTOGRAMS = ("lifetime", "idle_before_evict", "reuse_gap", "restore_gap")

Place = tuple[str, str]  # (medium, group)
Key = tuple[int, str, str]  # (hash, medium, group)


@dataclass
class Hist:
    """One histogram per label (a medium, or a place)."""

    bounds: tuple[float, ...]
    counts: dict[Hashable, list[int]] = field(default_factory=dict)
    sums: dict[Hashable, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, label: Hashable, value: float) -> None:
        row = self.counts.setdefault(label, [0] * (len(self.bounds) + 1))
        row[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[label] += value

    def count(self, label: Hashable) -> int:
        return sum(self.counts.get(label, []))

    def row(self, label: Hashable) -> list[int]:
        return self.counts.get(label, [0] * (len(self.bounds) + 1))


@dataclass
class Block:
    """One resident block: when its life began, its last access, and what it holds."""

    stored: float
    last: float
    accesses: int = 0
    copies: int = 1
    tokens: int = 0  # per copy
    adapter: str = BASE_ADAPTER


@dataclass
class PlaceCounts:
    """The counters of one place."""

    stored: int = 0
    accessed: int = 0
    restores: int = 0
    removed: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class ReferenceCollector:
    """Events in, numbers out: one Python object per block, no cleverness.

    Each operation returns what it did to its block: ``new``, ``restore``, ``copy`` (one more
    copy), ``hit`` (an access), ``miss`` (an access of a block not resident), ``uncopy`` (copies
    went, some remain), ``end`` (the last copy went) or ``unknown`` (a removal of a block not
    resident).
    """

    def __init__(self, removed_memory: int = 1_000_000, hit_reports: bool = False) -> None:
        self.hit_reports = hit_reports
        self.resident: dict[Key, Block] = {}  # resident blocks (len: distinct keys)
        self.removed_at: dict[Key, float] = {}  # ended blocks, oldest removal first
        self.removed_memory = removed_memory
        self.places: dict[Place, PlaceCounts] = defaultdict(PlaceCounts)
        self.adapter_stored: dict[tuple[str, str], int] = defaultdict(int)  # (medium, adapter)
        self.adapter_restores: dict[tuple[str, str], int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.unknown_removals = 0
        self.unknown_accesses = 0
        self.clears = 0
        self.hist = {name: Hist(RESIDENCY_BUCKETS) for name in HISTOGRAMS}  # per medium
        self.accesses_before_evict = Hist(ACCESS_COUNT_BUCKETS)
        self.place_hist = {name: Hist(RESIDENCY_BUCKETS) for name in HISTOGRAMS}  # per place
        self.place_accesses_before_evict = Hist(ACCESS_COUNT_BUCKETS)

    # --- per-medium views (sums over a medium's groups) -------------------------------------
    def _per_medium(self, attribute: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (medium, _), counts in self.places.items():
            out[medium] += getattr(counts, attribute)
        return out

    @property
    def stored(self) -> dict[str, int]:
        return self._per_medium("stored")

    @property
    def accessed(self) -> dict[str, int]:
        return self._per_medium("accessed")

    @property
    def restores(self) -> dict[str, int]:
        return self._per_medium("restores")

    @property
    def removed(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for (medium, _), counts in self.places.items():
            for reason, n in counts.removed.items():
                out[(medium, reason)] += n
        return out

    def resident_count(self, medium: str) -> int:
        """Physical blocks on ``medium``: every copy of every resident block."""
        return sum(b.copies for (_, m, _), b in self.resident.items() if m == medium)

    # --- per-place views ---------------------------------------------------------------------
    def place(self, medium: str, group: str = DEFAULT_GROUP) -> PlaceCounts:
        return self.places.get((medium, group), PlaceCounts())

    def resident_at(self, medium: str, group: str = DEFAULT_GROUP) -> int:
        """Physical blocks in a place."""
        return sum(b.copies for (_, m, g), b in self.resident.items() if (m, g) == (medium, group))

    def resident_hashes_at(self, medium: str, group: str = DEFAULT_GROUP) -> int:
        """Distinct resident hashes in a place."""
        return sum(1 for (_, m, g) in self.resident if (m, g) == (medium, group))

    def resident_tokens_at(self, medium: str, group: str = DEFAULT_GROUP) -> int:
        return sum(
            b.copies * b.tokens
            for (_, m, g), b in self.resident.items()
            if (m, g) == (medium, group)
        )

    def adapter_resident(self, medium: str, adapter: str) -> int:
        """Physical blocks on ``medium`` stored for ``adapter``, all groups together."""
        return sum(
            b.copies
            for (_, m, _), b in self.resident.items()
            if (m, b.adapter) == (medium, adapter)
        )

    # --- operations --------------------------------------------------------------------------
    def store(
        self,
        h: int,
        medium: str,
        ts: float,
        group: str = DEFAULT_GROUP,
        tokens: int = 0,
        adapter: str = BASE_ADAPTER,
    ) -> str:
        key = (h, medium, group)
        counts = self.places[(medium, group)]
        block = self.resident.get(key)
        if block is not None:
            if self.hit_reports:
                self.access(h, medium, ts, group)
                return "hit"
            # One more physical copy of the same block: what it holds is the block's.
            block.copies += 1
            counts.stored += 1
            self.adapter_stored[(medium, block.adapter)] += 1
            return "copy"
        counts.stored += 1
        self.adapter_stored[(medium, adapter)] += 1
        outcome = "new"
        if key in self.removed_at:
            outcome = "restore"
            counts.restores += 1
            self.adapter_restores[(medium, adapter)] += 1
            self._observe("restore_gap", key, ts - self.removed_at.pop(key))
        self.resident[key] = Block(ts, ts, tokens=tokens, adapter=adapter)
        return outcome

    def access(self, h: int, medium: str, ts: float, group: str = DEFAULT_GROUP) -> str:
        key = (h, medium, group)
        block = self.resident.get(key)
        if block is None:
            self.unknown_accesses += 1
            return "miss"
        self.places[(medium, group)].accessed += 1
        self._observe("reuse_gap", key, ts - block.last)
        block.last = ts
        block.accesses += 1
        return "hit"

    def remove(
        self,
        h: int,
        medium: str,
        ts: float,
        reason: str = "evicted",
        group: str = DEFAULT_GROUP,
        copies_left: int | None = None,
    ) -> str:
        key = (h, medium, group)
        self.places[(medium, group)].removed[reason] += 1
        block = self.resident.get(key)
        if block is None:
            self.unknown_removals += 1
            return "unknown"
        left = block.copies - 1 if copies_left is None else copies_left
        if left > 0:
            block.copies = left  # the block stays, its life goes on
            return "uncopy"
        del self.resident[key]
        self._end(key, reason, block, ts)
        return "end"

    def clear(self, ts: float) -> None:
        self.clears += 1
        for key, block in list(self.resident.items()):
            self.places[(key[1], key[2])].removed["cleared"] += block.copies
            del self.resident[key]
            self._end(key, "cleared", block, ts)

    def _end(self, key: Key, reason: str, block: Block, ts: float) -> None:
        """A block's last copy is gone: observe its life, remember it for restores."""
        self.ended(key, reason, block, ts)
        self._observe("lifetime", key, ts - block.stored)
        self._observe("idle_before_evict", key, ts - block.last)
        self.accesses_before_evict.observe(key[1], float(block.accesses))
        self.place_accesses_before_evict.observe((key[1], key[2]), float(block.accesses))
        self.removed_at.pop(key, None)
        self.removed_at[key] = ts
        while len(self.removed_at) > self.removed_memory:
            del self.removed_at[next(iter(self.removed_at))]

    def ended(self, key: Key, reason: str, block: Block, ts: float) -> None:
        """Called as each block's life ends (for subclasses that log removals)."""

    def _observe(self, name: str, key: Key, value: float) -> None:
        self.hist[name].observe(key[1], value)
        self.place_hist[name].observe((key[1], key[2]), value)

    # --- the wire ----------------------------------------------------------------------------
    def feed(self, ts: float, events: list[dict[str, object]]) -> list[str]:
        """Apply one decoded batch (events as dicts in the vLLM map form); returns what each
        block row did (``clear`` for an ``AllBlocksCleared``), in order."""
        outcomes: list[str] = []
        for event in events:
            kind = str(event["type"])
            self.events[kind] += 1
            if kind == "AllBlocksCleared":
                self.clear(ts)
                outcomes.append("clear")
                continue
            medium = event.get("medium") or "unknown"
            assert isinstance(medium, str)
            hashes = event.get("block_hashes", [])
            assert isinstance(hashes, list)
            group_idx = event.get("group_idx")
            group = DEFAULT_GROUP if group_idx is None else str(group_idx)
            if kind == "BlockStored":
                tokens = block_tokens(event, len(hashes))
                adapter = adapter_of(event)
                for h, held in zip(hashes, tokens, strict=True):
                    outcomes.append(self.store(h, medium, ts, group, held, adapter))
            elif kind == "BlockRemoved":
                reason = str(event.get("reason") or "evicted")
                left = event.get("remaining_copy_counts")
                if not isinstance(left, list) or len(left) != len(hashes):
                    left = [None] * len(hashes)  # says nothing usable
                for h, copies in zip(hashes, left, strict=True):
                    copies_left = None if copies is None else max(int(copies), 0)
                    outcomes.append(self.remove(h, medium, ts, reason, group, copies_left))
            elif kind == "BlockAccessed":
                for h in hashes:
                    outcomes.append(self.access(h, medium, ts, group))
        return outcomes


def block_tokens(event: dict[str, object], blocks: int) -> list[int]:
    """Tokens each block of a store holds: ``block_size`` each, the last ones fewer where
    ``token_ids`` stop short; without ``block_size``, an equal share of ``token_ids``."""
    token_ids = event.get("token_ids") or []
    assert isinstance(token_ids, list)
    sent = len(token_ids)
    size = event.get("block_size")
    if not isinstance(size, int) or size <= 0:
        size = -(-sent // max(blocks, 1))
    return [min(max(sent - i * size, 0), size) for i in range(blocks)]


def adapter_of(event: dict[str, object]) -> str:
    """The LoRA adapter a store names: ``lora_name``, else ``lora_id``, else the base model."""
    name, lora_id = event.get("lora_name"), event.get("lora_id")
    if isinstance(name, str) and name:
        return name
    if isinstance(lora_id, int) and not isinstance(lora_id, bool):
        return str(lora_id)
    return BASE_ADAPTER
