"""An LRU prefix cache with vLLM's semantics, emitting the KV events an engine would send.

:class:`PrefixCacheSimulator` serves one request at a time (a request arrives, is computed and
finishes before the next; there is no batching or preemption):

1. It hits the longest prefix of its block hashes resident on the GPU tier. With a CPU tier,
   the blocks that continue that prefix on CPU are hits too ("CPU hits"): they are loaded back,
   i.e. stored on GPU again. The CPU keeps its copy.
2. The remaining blocks are computed. Together with the loaded ones they are stored on GPU as
   one ``BlockStored`` per request (``parent_block_hash`` = the block before them, or None).
   Should a later block of the request still be resident while an earlier one is not, the
   resident one is reused and the new blocks form one ``BlockStored`` per contiguous run.
3. To make room, the GPU tier evicts least-recently-used blocks first, each as its own
   ``BlockRemoved`` (medium GPU). With a CPU tier, an evicted block is first offloaded: the
   CPU evicts its own LRU block if full (``BlockRemoved`` medium CPU), stores the block
   (``BlockStored`` medium CPU, one hash), and only then does the GPU drop it. A block the CPU
   already holds is just refreshed there.
4. Blocks of the request being served are never evicted to make room for it. A request longer
   than the whole GPU tier caches only its first ``gpu_blocks`` blocks; the rest is computed
   and not kept (counted in :attr:`SimulatorStats.uncached_blocks`).
5. When it finishes, its blocks become the most recently used, in reverse order: like vLLM,
   which frees a finished request's blocks tail first, a sequence loses its tail before its
   head.

With ``report_hits``, hits are reported as ``BlockAccessed`` (medium GPU for GPU hits, CPU for
CPU hits) before anything else the request causes. :meth:`PrefixCacheSimulator.reset` sends
``AllBlocksCleared`` and empties both tiers.

:class:`SimulatedEngine` drives a simulator over a request stream and publishes the events,
one batch per request (or per ``requests_per_batch``), paced in real time, faster, or as fast
as possible.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from ..protocol.encode import Accessed, Cleared, Event, Removed, Stored
from .trace import Request

__all__ = [
    "EngineRunStats",
    "EventSink",
    "PrefixCacheSimulator",
    "SimulatedEngine",
    "SimulatorStats",
]

GPU = "GPU"
CPU = "CPU"


@dataclass(slots=True)
class SimulatorStats:
    """Block counts since the simulator was made (a reset does not zero them)."""

    requests: int = 0
    blocks_referenced: int = 0
    gpu_hit_blocks: int = 0
    cpu_hit_blocks: int = 0
    uncached_blocks: int = 0
    stored_gpu: int = 0
    stored_cpu: int = 0
    evicted_gpu: int = 0
    evicted_cpu: int = 0
    clears: int = 0

    @property
    def hit_ratio(self) -> float:
        """Referenced blocks that were hits on either tier."""
        hits = self.gpu_hit_blocks + self.cpu_hit_blocks
        return hits / self.blocks_referenced if self.blocks_referenced else 0.0

    @property
    def gpu_hit_ratio(self) -> float:
        return self.gpu_hit_blocks / self.blocks_referenced if self.blocks_referenced else 0.0


class PrefixCacheSimulator:
    """A GPU prefix cache of ``gpu_blocks`` blocks with an optional CPU tier (module docstring).

    ``block_size`` is the tokens per block written in ``BlockStored`` (engines send the block's
    token ids; these are zeros, as the exporter only counts them).
    """

    def __init__(
        self,
        gpu_blocks: int,
        cpu_blocks: int = 0,
        report_hits: bool = False,
        *,
        block_size: int = 16,
    ) -> None:
        if gpu_blocks < 1:
            raise ValueError(f"gpu_blocks must be >= 1, not {gpu_blocks}")
        if cpu_blocks < 0:
            raise ValueError(f"cpu_blocks must be >= 0, not {cpu_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {block_size}")
        self.gpu_blocks = gpu_blocks
        self.cpu_blocks = cpu_blocks
        self.report_hits = report_hits
        self.block_size = block_size
        self.stats = SimulatorStats()
        # hash -> parent hash, least recently used first. The parent travels with a block
        # offloaded to CPU, so its BlockStored there names it as the engine would.
        self._gpu: OrderedDict[int, int | None] = OrderedDict()
        self._cpu: OrderedDict[int, int | None] = OrderedDict()

    @property
    def resident_gpu(self) -> int:
        return len(self._gpu)

    @property
    def resident_cpu(self) -> int:
        return len(self._cpu)

    def gpu_lru(self) -> list[int]:
        """GPU-resident hashes, least recently used (next to be evicted) first."""
        return list(self._gpu)

    def cpu_lru(self) -> list[int]:
        """CPU-resident hashes, least recently used first."""
        return list(self._cpu)

    def reset(self) -> list[Event]:
        """Empty both tiers; the engine says so with one ``AllBlocksCleared``."""
        self._gpu.clear()
        self._cpu.clear()
        self.stats.clears += 1
        return [Cleared()]

    def step(self, request: Request | Sequence[int]) -> list[Event]:
        """Serve one request; its events in the order they happen."""
        if isinstance(request, Request):
            hashes: list[int] = request.hash_ids.tolist()
        else:
            hashes = [int(h) for h in request]
        if len(set(hashes)) != len(hashes):
            hashes = list(dict.fromkeys(hashes))  # a block is cached once per request
        stats = self.stats
        stats.requests += 1
        stats.blocks_referenced += len(hashes)
        cached = hashes[: self.gpu_blocks]
        stats.uncached_blocks += len(hashes) - len(cached)
        gpu, cpu = self._gpu, self._cpu
        count = len(cached)

        gpu_hits = 0
        while gpu_hits < count and cached[gpu_hits] in gpu:
            gpu_hits += 1
        prefix_end = gpu_hits
        if cpu:
            while prefix_end < count and cached[prefix_end] in cpu:
                cpu.move_to_end(cached[prefix_end])
                prefix_end += 1
        stats.gpu_hit_blocks += gpu_hits
        stats.cpu_hit_blocks += prefix_end - gpu_hits

        events: list[Event] = []
        if self.report_hits:
            if gpu_hits:
                events.append(Accessed(cached[:gpu_hits], GPU))
            if prefix_end > gpu_hits:
                events.append(Accessed(cached[gpu_hits:prefix_end], CPU))

        missing = [k for k in range(gpu_hits, count) if cached[k] not in gpu]
        overflow = len(gpu) + len(missing) - self.gpu_blocks
        if overflow > 0:
            # Make the request's own resident blocks most recent, so eviction cannot reach
            # them: it takes ``overflow`` <= len(gpu) - (resident blocks of this request).
            touch = gpu.move_to_end
            for h in cached:
                if h in gpu:
                    touch(h)
            for _ in range(overflow):
                self._evict_gpu(*gpu.popitem(last=False), events)

        if missing:
            self._store_gpu(cached, missing, events)

        touch = gpu.move_to_end
        for h in reversed(cached):
            touch(h)
        return events

    def _store_gpu(self, cached: list[int], missing: list[int], events: list[Event]) -> None:
        """Store the blocks at positions ``missing``: one ``BlockStored`` per contiguous run."""
        gpu = self._gpu
        block_size = self.block_size
        start = 0
        while start < len(missing):
            stop = start + 1
            while stop < len(missing) and missing[stop] == missing[stop - 1] + 1:
                stop += 1
            first, last = missing[start], missing[stop - 1]
            for k in range(first, last + 1):
                gpu[cached[k]] = cached[k - 1] if k else None
            blocks = cached[first : last + 1]
            events.append(
                Stored(
                    blocks,
                    cached[first - 1] if first else None,
                    token_count=block_size * len(blocks),
                    block_size=block_size,
                    medium=GPU,
                )
            )
            self.stats.stored_gpu += len(blocks)
            start = stop

    def _evict_gpu(self, block: int, parent: int | None, events: list[Event]) -> None:
        cpu = self._cpu
        if self.cpu_blocks:
            if block in cpu:
                cpu.move_to_end(block)
            else:
                if len(cpu) >= self.cpu_blocks:
                    victim, _ = cpu.popitem(last=False)
                    events.append(Removed([victim], CPU))
                    self.stats.evicted_cpu += 1
                cpu[block] = parent
                events.append(
                    Stored(
                        [block],
                        parent,
                        token_count=self.block_size,
                        block_size=self.block_size,
                        medium=CPU,
                    )
                )
                self.stats.stored_cpu += 1
        events.append(Removed([block], GPU))
        self.stats.evicted_gpu += 1


class EventSink(Protocol):
    """Where a simulated engine sends its batches (a :class:`KVEventPublisher` is one)."""

    def send_batch(self, ts: float, events: Iterable[Event]) -> int: ...


@dataclass(slots=True)
class EngineRunStats:
    """What one :meth:`SimulatedEngine.run` did."""

    requests: int = 0
    batches: int = 0
    events: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    wall_s: float = 0.0
    stopped: bool = False


class SimulatedEngine:
    """Drives a :class:`PrefixCacheSimulator` over requests and publishes what it emits.

    The engine clock of a batch (its ``ts``) is ``start_time`` (default: the wall clock when
    :meth:`run` starts) plus the request's trace time since the first request, whatever the
    pacing, so lifetimes and gaps measured from the stream are the trace's own. ``speed`` paces
    the sending: 1 in real time, N for N times faster, 0 as fast as possible. A batch holds
    the events of up to ``requests_per_batch`` requests (it is sent early when the engine is
    about to wait); requests that cause no event send nothing.
    """

    def __init__(
        self,
        simulator: PrefixCacheSimulator,
        sink: EventSink,
        *,
        speed: float = 1.0,
        requests_per_batch: int = 1,
        start_time: float | None = None,
    ) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0, not {speed}")
        if requests_per_batch < 1:
            raise ValueError(f"requests_per_batch must be >= 1, not {requests_per_batch}")
        self.simulator = simulator
        self.sink = sink
        self.speed = speed
        self.requests_per_batch = requests_per_batch
        self.start_time = start_time

    def run(
        self,
        requests: Iterable[Request],
        *,
        stop: threading.Event | None = None,
        limit: int | None = None,
    ) -> EngineRunStats:
        """Serve ``requests`` (at most ``limit``) until they end or ``stop`` is set."""
        result = EngineRunStats()
        base_ts = time.time() if self.start_time is None else self.start_time
        wall0 = time.monotonic()
        trace0: float | None = None
        pending: list[Event] = []
        in_batch = 0
        ts = base_ts

        def flush() -> None:
            nonlocal pending, in_batch
            if pending:
                self.sink.send_batch(ts, pending)
                result.batches += 1
                result.events += len(pending)
                if result.first_ts is None:
                    result.first_ts = ts
                result.last_ts = ts
            pending, in_batch = [], 0

        for request in requests if limit is None else islice(requests, limit):
            if stop is not None and stop.is_set():
                result.stopped = True
                break
            if trace0 is None:
                trace0 = request.timestamp_s
            offset = request.timestamp_s - trace0
            if self.speed > 0:
                delay = wall0 + offset / self.speed - time.monotonic()
                if delay > 0:
                    flush()  # what is ready goes out before the engine idles
                    if stop is not None:
                        if stop.wait(delay):
                            result.stopped = True
                            break
                    else:
                        time.sleep(delay)
            ts = base_ts + offset
            pending.extend(self.simulator.step(request))
            in_batch += 1
            result.requests += 1
            if in_batch >= self.requests_per_batch:
                flush()
        flush()
        result.wall_s = time.monotonic() - wall0
        return result
