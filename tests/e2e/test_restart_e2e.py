"""Losing nothing across the exporter's own death: checkpoint + replay, with real processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest

from kvcache_exporter.analysis.whatif import WhatIfConfig
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
)
from kvcache_exporter.offline import OfflinePipeline
from kvcache_exporter.protocol.encode import WireForm, encode_batch, frames
from kvcache_exporter.publisher import Event, KVEventPublisher
from kvcache_exporter.sinks.prometheus import render

from ..conftest import free_port
from ..reference import ReferenceCollector
from .conftest import ExporterProcess, as_map, parse_samples, select, value

pytestmark = pytest.mark.e2e
OFFLINE_WHATIF = WhatIfConfig(max_sampled_blocks=4096)


class RecordingSink:
    """Forwards batches to the publisher and keeps them for the reference."""

    def __init__(self, publisher: KVEventPublisher) -> None:
        self.publisher = publisher
        self.batches: list[tuple[float, list[Event]]] = []

    def send_batch(self, ts: float, events: list[Event]) -> int:
        self.batches.append((ts, events))
        return self.publisher.send_batch(ts, events)


def test_killed_mid_stream_and_restarted_every_counter_equals_the_whole_stream(
    start_exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    """The exporter checkpoints, is SIGKILLed while the engine keeps publishing, and comes
    back: it continues from the checkpoint and replays what it missed (including what it had
    applied after the last checkpoint), so every counter equals the reference of the whole
    stream — nothing lost, nothing counted twice."""
    port, replay = free_port(), free_port()
    requests: list[Request] = list(islice(read_mooncake(bundled_trace_path()), 1500))
    storage = tmp_path / "state"
    flags = [
        "--source", f"vllm=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{replay}",
        "--storage.path", str(storage), "--storage.interval", "0.3",
        # A budget the stream passes: the checkpoint holds a rate that has fallen.
        "--whatif.max-sampled-blocks", str(OFFLINE_WHATIF.max_sampled_blocks),
    ]  # fmt: skip
    simulator = PrefixCacheSimulator(3000, 500, report_hits=True)
    with KVEventPublisher(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay}", bind=True
    ) as publisher:
        sink = RecordingSink(publisher)
        engine = SimulatedEngine(simulator, sink, speed=0, requests_per_batch=2, start_time=1e6)

        first = start_exporter(*flags)
        first.wait_ready()
        time.sleep(0.3)
        engine.run(requests[:500])
        first.wait_ingested({"vllm": len(sink.batches)})
        time.sleep(1.0)  # a checkpoint or three
        engine.run(requests[500:800])  # some of this lands after the last checkpoint
        time.sleep(0.1)
        first.proc.kill()  # SIGKILL: no final checkpoint, no goodbye
        first.proc.wait()
        assert (storage / "checkpoint.npz").exists()

        engine.run(requests[800:1100])  # published while no exporter listens

        second = start_exporter(*flags)
        second.wait_ready()
        time.sleep(0.3)
        engine.run(requests[1100:])
        total = len(sink.batches)

        deadline = time.monotonic() + 30
        samples = second.scrape()
        ref = ReferenceCollector()
        for ts, events in sink.batches:
            ref.feed(ts, [as_map(event) for event in events])
        want = sum(ref.stored.values())
        while time.monotonic() < deadline:
            samples = second.scrape()
            got = sum(select(samples, "kvcache_blocks_stored_total", engine="vllm").values())
            if got == want:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        samples = second.scrape()

    assert "continuing from checkpoint" in second.log_text()
    assert value(samples, "kvcache_exporter_batches_lost_total", engine="vllm") == 0
    assert value(samples, "kvcache_exporter_batches_replayed_total", engine="vllm") > 0
    assert total == len(sink.batches)
    for medium in ("GPU", "CPU"):
        labels = {"engine": "vllm", "medium": medium, "group": "0"}
        assert value(samples, "kvcache_blocks_stored_total", **labels) == ref.stored[medium]
        assert value(samples, "kvcache_blocks_accessed_total", **labels) == ref.accessed[medium]
        assert value(samples, "kvcache_block_restores_total", **labels) == ref.restores[medium]
        assert value(samples, "kvcache_resident_blocks", **labels) == ref.resident_count(medium)
        assert (
            value(samples, "kvcache_blocks_removed_total", reason="evicted", **labels)
            == ref.removed[(medium, "evicted")]
        )
        assert value(samples, "kvcache_block_lifetime_seconds_count", **labels) == ref.hist[
            "lifetime"
        ].count(medium)
    assert value(samples, "kvcache_exporter_unknown_removals_total", engine="vllm") == 0

    # The what-if model continued from the checkpoint too: its counters equal those of one
    # uninterrupted run over the whole stream, cut into other batches (the rate falls at fixed
    # counts of sampled rows, wherever the batches end).
    uninterrupted = OfflinePipeline(whatif=OFFLINE_WHATIF)
    for seq, (ts, events) in enumerate(sink.batches):
        payload = encode_batch(ts, events, WireForm.VLLM)
        uninterrupted.feed("vllm", frames("", seq, payload), ts)
    want_whatif = {
        key: v for key, v in parse_samples(render(uninterrupted.views())).items() if is_whatif(key)
    }
    got_whatif = {key: v for key, v in samples.items() if is_whatif(key)}
    assert value(samples, "kvcache_whatif_recomputes_avoided_total", engine="vllm",
                 medium="GPU", capacity_factor="2") > 0  # fmt: skip
    assert got_whatif == want_whatif
    assert value(samples, "kvcache_whatif_sample_ratio", engine="vllm", medium="GPU") < 1.0


def is_whatif(key: tuple[str, frozenset[tuple[str, str]]]) -> bool:
    return key[0].startswith(("kvcache_whatif_", "kvcache_block_reuse_distance_blocks"))
