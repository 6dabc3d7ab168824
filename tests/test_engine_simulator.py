"""The simulated engine: traces, the synthetic workload, the LRU prefix cache and its events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    SimulatedEngine,
    WorkloadConfig,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
    spread_hash,
    synthetic_workload,
    unspread_hash,
)
from kvcache_exporter.publisher import (
    END_SEQ,
    Accessed,
    Cleared,
    Event,
    KVEventPublisher,
    Removed,
    Stored,
    encode_batch,
)

BS = 16


def gpu_store(blocks: list[int], parent: int | None = None) -> Stored:
    return Stored(blocks, parent, token_count=BS * len(blocks), block_size=BS, medium="GPU")


def cpu_store(block: int, parent: int | None = None) -> Stored:
    return Stored([block], parent, token_count=BS, block_size=BS, medium="CPU")


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    return list(read_mooncake(bundled_trace_path()))


# --- traces -----------------------------------------------------------------------------------
def test_bundled_trace_reads(trace: list[Request]) -> None:
    assert len(trace) == 3993
    assert trace[0].timestamp_s == 0.0 and trace[2].timestamp_s == pytest.approx(0.040)
    assert 1000 < trace[-1].timestamp_s < 1100  # about 17 minutes
    assert sum(map(len, trace)) == 121_877
    distinct = np.unique(np.concatenate([r.hash_ids for r in trace]))
    assert len(distinct) == 43_924
    assert distinct.dtype == np.uint64 and int(distinct.max()) > 1 << 62  # spread over 64 bits
    assert unspread_hash(trace[0].hash_ids).tolist() == list(range(79))
    assert trace[0].input_length == 40160 and trace[0].output_length == 6


def test_spread_hash_is_a_bijection() -> None:
    extremes = np.array([(1 << 64) - 1, 1 << 63], dtype=np.uint64)
    ids = np.concatenate([np.arange(50_000, dtype=np.uint64), extremes])
    spread = spread_hash(ids)
    assert len(np.unique(spread)) == len(ids)
    assert np.array_equal(unspread_hash(spread), ids)
    assert spread_hash([7]).tolist() == spread_hash(np.array([7], dtype=np.uint64)).tolist()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"hash_ids": [1]}', "timestamp"),
        ('{"timestamp": -5, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": 5, "hash_ids": [1, -2]}', "hash_ids"),
        ('{"timestamp": 5, "hash_ids": [1.5]}', "hash_ids"),
        ('{"timestamp": 5, "hash_ids": 3}', "hash_ids"),
        ('{"timestamp": 5, "hash_ids": [], "input_length": "x"}', "input_length"),
    ],
)
def test_bad_trace_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "hash_ids": [1, 2]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"t\.jsonl:3: .*{message}"):
        list(read_mooncake(path))


def test_repeat_requests_offsets_time_and_can_salt_hashes() -> None:
    base = [Request(0.0, spread_hash([1, 2])), Request(2.0, spread_hash([1, 3]))]
    same = list(repeat_requests(lambda: base, 2, gap_s=1.0))
    assert [r.timestamp_s for r in same] == [0.0, 2.0, 3.0, 5.0]
    assert np.array_equal(same[2].hash_ids, base[0].hash_ids)
    fresh = list(repeat_requests(lambda: base, 3, gap_s=1.0, fresh_hashes=True))
    assert np.array_equal(fresh[0].hash_ids, base[0].hash_ids)
    assert fresh[2].hash_ids[0] == fresh[3].hash_ids[0]  # shared prefixes stay shared
    firsts = {int(r.hash_ids[0]) for r in fresh}
    assert len(firsts) == 3  # but each pass has its own
    assert list(repeat_requests(lambda: [], None)) == []


# --- synthetic workload -------------------------------------------------------------------
def test_synthetic_workload_is_seeded_and_shaped() -> None:
    config = WorkloadConfig(num_requests=3000, rate=20.0, seed=7)
    first = list(synthetic_workload(config))
    again = list(synthetic_workload(config))
    assert len(first) == 3000
    assert all(
        a.timestamp_s == b.timestamp_s and np.array_equal(a.hash_ids, b.hash_ids)
        for a, b in zip(first, again, strict=True)
    )
    other = list(synthetic_workload(WorkloadConfig(num_requests=3000, rate=20.0, seed=8)))
    assert any(
        not np.array_equal(a.hash_ids, b.hash_ids) for a, b in zip(first, other, strict=True)
    )

    times = np.array([r.timestamp_s for r in first])
    assert np.all(np.diff(times) > 0)
    assert 3000 / times[-1] == pytest.approx(20.0, rel=0.1)  # Poisson at the given rate
    # Shared system prompts: few distinct first blocks; multi-turn: prompts extend earlier ones.
    assert len({int(r.hash_ids[0]) for r in first}) <= config.system_prompts
    seen = {r.hash_ids.tobytes() for r in first}
    extends = sum(r.hash_ids[:-1].tobytes() in seen for r in first)  # one-block messages
    assert extends > 0
    sim = PrefixCacheSimulator(4000)
    for request in first:
        sim.step(request)
    assert 0.3 < sim.stats.hit_ratio < 0.99
    with pytest.raises(ValueError, match="rate"):
        WorkloadConfig(rate=0)
    with pytest.raises(ValueError, match="turns"):
        WorkloadConfig(turns=(3, 1))


def test_synthetic_workload_can_be_endless() -> None:
    stream = synthetic_workload(WorkloadConfig(num_requests=None))
    assert len([next(stream) for _ in range(20_000)]) == 20_000


# --- the prefix cache, by hand ----------------------------------------------------------------
def test_hits_stores_and_lru_evictions() -> None:
    sim = PrefixCacheSimulator(4, block_size=BS)
    assert sim.step([1, 2, 3]) == [gpu_store([1, 2, 3])]
    assert sim.gpu_lru() == [3, 2, 1]  # a finished request frees its tail first
    assert sim.step([1, 2, 4]) == [gpu_store([4], 2)]
    assert sim.gpu_lru() == [3, 4, 2, 1]
    # Full: the two least recently used go, each in its own event, before the store.
    assert sim.step([5, 6]) == [Removed([3]), Removed([4]), gpu_store([5, 6])]
    assert sim.step([1, 7]) == [Removed([2]), gpu_store([7], 1)]
    assert sim.gpu_lru() == [6, 5, 7, 1]
    assert sim.step([1, 7]) == []  # all hits, nothing to say without report_hits
    s = sim.stats
    assert (s.requests, s.blocks_referenced, s.gpu_hit_blocks) == (5, 12, 5)
    assert (s.stored_gpu, s.evicted_gpu, s.cpu_hit_blocks) == (7, 3, 0)
    assert s.hit_ratio == pytest.approx(5 / 12)


def test_report_hits_comes_first() -> None:
    sim = PrefixCacheSimulator(3, report_hits=True, block_size=BS)
    assert sim.step([1, 2]) == [gpu_store([1, 2])]
    assert sim.step([1, 2, 3]) == [Accessed([1, 2]), gpu_store([3], 2)]
    assert sim.step([1, 4]) == [Accessed([1]), Removed([3]), gpu_store([4], 1)]


def test_the_request_never_evicts_its_own_blocks() -> None:
    sim = PrefixCacheSimulator(4, block_size=BS)
    sim.step([1, 2])
    sim.step([3])
    sim.step([4])
    assert sim.gpu_lru() == [2, 1, 3, 4]  # the request's hits are the LRU blocks
    assert sim.step([1, 2, 5, 6]) == [Removed([3]), Removed([4]), gpu_store([5, 6], 2)]


def test_a_request_longer_than_the_gpu_caches_its_head() -> None:
    sim = PrefixCacheSimulator(3, block_size=BS)
    sim.step([7, 8, 9])
    events = sim.step([1, 2, 3, 4, 5])
    assert events == [Removed([9]), Removed([8]), Removed([7]), gpu_store([1, 2, 3])]
    assert sim.stats.uncached_blocks == 2
    assert sim.step([1, 2, 3, 4, 5]) == []  # the head hits, the tail is never kept
    assert sim.stats.gpu_hit_blocks == 3 and sim.resident_gpu == 3


def test_resident_blocks_after_a_miss_are_reused() -> None:
    sim = PrefixCacheSimulator(10, block_size=BS)
    sim.step([2])
    assert sim.step([1, 2, 3]) == [gpu_store([1]), gpu_store([3], 2)]
    assert sim.step([5, 5, 6]) == [gpu_store([5, 6])]  # a repeated hash is one block


def test_cpu_tier_offload_load_back_and_evict() -> None:
    sim = PrefixCacheSimulator(2, cpu_blocks=2, report_hits=True, block_size=BS)
    assert sim.step([1, 2]) == [gpu_store([1, 2])]
    # GPU full: 2 (the tail) is offloaded, copy before free, then 3 is stored.
    assert sim.step([3]) == [cpu_store(2, 1), Removed([2]), gpu_store([3])]
    # 1 hits on GPU, 2 continues the prefix on CPU: loaded back (stored on GPU again).
    assert sim.step([1, 2]) == [
        Accessed([1]),
        Accessed([2], "CPU"),
        cpu_store(3),
        Removed([3]),
        gpu_store([2], 1),
    ]
    assert sim.cpu_lru() == [2, 3]
    # 2 is evicted again; the CPU has it already: refreshed, not stored twice.
    assert sim.step([4]) == [Removed([2]), gpu_store([4])]
    assert sim.cpu_lru() == [3, 2]
    # 1 goes to a full CPU: the CPU's LRU block (3) leaves first.
    assert sim.step([5]) == [Removed([3], "CPU"), cpu_store(1), Removed([1]), gpu_store([5])]
    s = sim.stats
    assert (s.gpu_hit_blocks, s.cpu_hit_blocks, s.stored_cpu, s.evicted_cpu) == (1, 1, 3, 1)
    assert (s.stored_gpu, s.evicted_gpu) == (6, 4)


def test_reset_clears_both_tiers() -> None:
    sim = PrefixCacheSimulator(2, cpu_blocks=2, block_size=BS)
    sim.step([1, 2])
    sim.step([3])
    assert sim.reset() == [Cleared()]
    assert sim.resident_gpu == sim.resident_cpu == 0 and sim.stats.clears == 1
    assert sim.step([1, 2]) == [gpu_store([1, 2])]  # everything misses again


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="gpu_blocks"):
        PrefixCacheSimulator(0)
    with pytest.raises(ValueError, match="cpu_blocks"):
        PrefixCacheSimulator(1, -1)


# --- the bundled trace, checked against the stream itself -------------------------------------
def check_stream(
    requests: list[Request], gpu_blocks: int, cpu_blocks: int = 0
) -> tuple[PrefixCacheSimulator, int, int]:
    """Run the trace; check every event against residency rebuilt from the events alone.

    Returns the simulator and the GPU and CPU hits counted from the stream.
    """
    sim = PrefixCacheSimulator(gpu_blocks, cpu_blocks, report_hits=True)
    gpu: set[int] = set()
    cpu: set[int] = set()
    gpu_hits = cpu_hits = 0
    for request in requests:
        hashes = request.hash_ids.tolist()
        cached = hashes[:gpu_blocks]
        expect_gpu = 0
        while expect_gpu < len(cached) and cached[expect_gpu] in gpu:
            expect_gpu += 1
        expect_cpu = expect_gpu
        while expect_cpu < len(cached) and cached[expect_cpu] in cpu:
            expect_cpu += 1
        offloaded: set[int] = set()
        seen_store = False
        for event in sim.step(request):
            if isinstance(event, Accessed):
                assert not seen_store
                if event.medium == "GPU":
                    assert list(event.block_hashes) == cached[:expect_gpu]
                    gpu_hits += len(event.block_hashes)
                else:
                    assert list(event.block_hashes) == cached[expect_gpu:expect_cpu]
                    cpu_hits += len(event.block_hashes)
            elif isinstance(event, Removed):
                (block,) = event.block_hashes
                if event.medium == "GPU":
                    assert block in gpu and block not in cached
                    gpu.remove(block)
                else:
                    assert block in cpu
                    cpu.remove(block)
            elif isinstance(event, Stored):
                if event.medium == "GPU":
                    seen_store = True
                    blocks = [int(h) for h in event.block_hashes]
                    start = cached.index(blocks[0])
                    assert blocks == cached[start : start + len(blocks)]
                    assert event.parent_block_hash == (cached[start - 1] if start else None)
                    assert not gpu & set(blocks)
                    gpu.update(blocks)
                else:
                    (block,) = event.block_hashes
                    assert block in gpu and block not in cpu  # copied out before the free
                    cpu.add(block)
                    offloaded.add(block)
                assert event.token_count == event.block_size * len(event.block_hashes)
            else:
                raise AssertionError(f"unexpected {event!r}")
            assert len(gpu) <= gpu_blocks and len(cpu) <= cpu_blocks
        assert set(cached) <= gpu  # the whole (cacheable) request is resident afterwards
        assert not offloaded & gpu
    assert (gpu_hits, cpu_hits) == (sim.stats.gpu_hit_blocks, sim.stats.cpu_hit_blocks)
    assert len(gpu) == sim.resident_gpu and len(cpu) == sim.resident_cpu
    return sim, gpu_hits, cpu_hits


def test_bundled_trace_hit_ratio_and_invariants(trace: list[Request]) -> None:
    start = time.perf_counter()
    sim, gpu_hits, _ = check_stream(trace, 4000)
    assert time.perf_counter() - start < 5  # the simulator alone takes well under 0.2 s
    assert gpu_hits / sim.stats.blocks_referenced == pytest.approx(0.23, abs=0.02)
    assert sim.stats.stored_gpu + gpu_hits == sim.stats.blocks_referenced
    assert sim.stats.evicted_gpu == sim.stats.stored_gpu - 4000


def test_bundled_trace_with_a_cpu_tier(trace: list[Request]) -> None:
    sim, gpu_hits, cpu_hits = check_stream(trace[:1500], 1000, cpu_blocks=3000)
    assert cpu_hits > 0 and sim.stats.evicted_cpu > 0
    assert (gpu_hits + cpu_hits) / sim.stats.blocks_referenced > sim.stats.gpu_hit_ratio


def test_simulator_is_fast(trace: list[Request]) -> None:
    sim = PrefixCacheSimulator(4000, 8000, report_hits=True)
    start = time.perf_counter()
    for request in trace:
        sim.step(request)
    assert time.perf_counter() - start < 1.5


# --- the engine: pacing and publishing ----------------------------------------------------
class ListSink:
    """Keeps the batches (the real publisher is tested below and in test_publisher.py)."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[Event]]] = []
        self.sent_at: list[float] = []

    def send_batch(self, ts: float, events: Iterable[Event]) -> int:
        self.batches.append((ts, list(events)))
        self.sent_at.append(time.monotonic())
        return len(self.batches) - 1


def small_requests() -> list[Request]:
    return [Request(10.0 + 0.05 * i, spread_hash([i, 100 + i])) for i in range(5)]


def test_engine_paces_in_trace_time_and_stamps_engine_time() -> None:
    sink = ListSink()
    engine = SimulatedEngine(PrefixCacheSimulator(100), sink, speed=2.0, start_time=5000.0)
    began = time.monotonic()
    result = engine.run(small_requests())
    # 0.2 s of trace at 2x: about 0.1 s of wall time.
    assert sink.sent_at[-1] - began >= 0.095
    assert result.wall_s < 2
    assert [ts for ts, _ in sink.batches] == pytest.approx([5000.0 + 0.05 * i for i in range(5)])
    assert (result.requests, result.batches, result.events) == (5, 5, 5)
    assert result.first_ts == 5000.0 and result.last_ts == pytest.approx(5000.2)


def test_engine_batches_requests_and_skips_empty_ones() -> None:
    sink = ListSink()
    requests = small_requests()
    requests.insert(2, requests[1])  # an all-hit request: no events
    engine = SimulatedEngine(PrefixCacheSimulator(100), sink, speed=0, requests_per_batch=2)
    result = engine.run(requests)
    assert result.requests == 6 and result.events == 5
    assert [len(events) for _, events in sink.batches] == [2, 1, 2]


def test_engine_stops_on_request() -> None:
    stop = threading.Event()
    sink = ListSink()
    requests = [Request(60.0 * i, spread_hash([i])) for i in range(3)]
    engine = SimulatedEngine(PrefixCacheSimulator(10), sink, speed=1.0)
    threading.Timer(0.1, stop.set).start()
    result = engine.run(requests, stop=stop)
    assert result.stopped and result.requests == 1 and result.wall_s < 5
    assert (
        SimulatedEngine(PrefixCacheSimulator(10), sink, speed=0).run(requests, limit=2).requests
        == 2
    )


def test_engine_publishes_the_trace_through_zeromq(trace: list[Request]) -> None:
    requests = trace[:300]
    with KVEventPublisher("tcp://*:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        engine = SimulatedEngine(
            PrefixCacheSimulator(2000, report_hits=True, block_size=512), pub, speed=0,
            start_time=1_700_000_000.0,
        )  # fmt: skip
        result = engine.run(requests)
        endpoint = pub.replay_last_endpoint
        assert endpoint is not None
        dealer: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got: list[list[bytes]] = []
        try:
            dealer.connect(endpoint)
            dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            while not got or got[-1][2] != END_SEQ:
                assert dealer.poll(5000)
                got.append(dealer.recv_multipart())
        finally:
            dealer.close()
    batches = got[:-1]
    assert len(batches) == result.batches
    assert [int.from_bytes(b[2], "big") for b in batches] == list(range(result.batches))
    # The same requests through a fresh simulator give the same bytes: one batch per request
    # that had events, stamped with its trace time.
    reference = PrefixCacheSimulator(2000, report_hits=True, block_size=512)
    expected: list[bytes] = []
    for request in requests:
        events = reference.step(request)
        if events:
            ts = 1_700_000_000.0 + request.timestamp_s - requests[0].timestamp_s
            expected.append(encode_batch(ts, events))
    assert [b[3] for b in batches] == expected
    stored: Any = msgspec.msgpack.decode(batches[0][3])[1][0]
    assert stored["type"] == "BlockStored" and stored["block_size"] == 512
