"""Checkpoints: what is written reads back into the same numbers; bad files are set aside."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np

from kvcache_exporter.analysis.whatif import WhatIfConfig
from kvcache_exporter.checkpoint import CheckpointStore, capture, restore
from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.collector.table import RESIDENT
from kvcache_exporter.engine import PrefixCacheSimulator, bundled_trace_path, read_mooncake
from kvcache_exporter.offline import simulate_frames
from kvcache_exporter.pipeline import Pipeline, new_pipeline

from .streams import read_stream

FRAMES = list(
    simulate_frames(
        islice(read_mooncake(bundled_trace_path()), 600),
        PrefixCacheSimulator(2000, 500, report_hits=True),
    )
)


def fed(name: str, frames: list[tuple[float, list[bytes]]]) -> Pipeline:
    pipeline = new_pipeline(name, CollectorConfig())
    for ts, message in frames:
        pipeline.stream.handle(message, ts)
    pipeline.stream.flush()
    return pipeline


def numbers(pipeline: Pipeline) -> list[object]:
    snap = pipeline.collector.snapshot()
    stats = pipeline.stream.stats
    return [
        snap.media, snap.reasons, snap.stored.tolist(), snap.removed.tolist(),
        snap.accessed.tolist(), snap.restores.tolist(), snap.resident.tolist(), snap.tracked,
        # Sums are float totals accumulated batch by batch: equal up to summation order.
        [(h.counts.tolist(), np.round(h.sums, 6).tolist()) for h in snap.histograms.values()],
        stats.messages, stats.sequence_gaps, dict(pipeline.stream.decoder.stats.events),
        pipeline.stream.decoder.stats.tokens_stored,
        snap.groups, snap.places, snap.adapters, snap.resident_hashes.tolist(),
        snap.resident_tokens.tolist(), snap.adapter_stored.tolist(),
        snap.adapter_resident.tolist(), snap.unknown_removals,
        dict(pipeline.stream.decoder.stats.groups),
    ]  # fmt: skip


def whatif_numbers(pipeline: Pipeline) -> dict[int, object]:
    assert pipeline.whatif is not None
    return {
        medium: (
            m.capacity, m.avoided, m.hits, m.sampled_stores, m.sampled_restores,
            m.sampled_hits, m.ghosts, m.sample_ratio, m.sampled_blocks,
            None if m.distance is None else (m.distance.bounds, m.distance.counts.tolist()),
        )
        for medium, m in pipeline.whatif.snapshot().media.items()
    }  # fmt: skip


def test_a_restored_engine_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    """Half the stream, a checkpoint, a fresh pipeline restored from it, the other half: the
    numbers equal those of one pipeline that saw the whole stream (restores of blocks removed
    before the checkpoint included, so the remembered removals came back too)."""
    half = len(FRAMES) // 2
    first = fed("vllm", FRAMES[:half])
    store = CheckpointStore(tmp_path)
    store.save(capture([first]))
    assert first.stream.applied_through == half - 1

    resumed = new_pipeline("vllm", CollectorConfig())
    checkpoint = store.load()
    assert checkpoint is not None
    restore([resumed], checkpoint, store)
    for ts, message in FRAMES[half:]:
        resumed.stream.handle(message, ts)
    resumed.stream.flush()

    whole = fed("vllm", FRAMES)
    assert numbers(resumed) == numbers(whole)
    assert whatif_numbers(resumed) == whatif_numbers(whole)
    assert whatif_numbers(whole)  # the what-if has figures on every medium
    assert resumed.stream.stats.sequence_gaps == 0  # it knew where it was
    got = resumed.collector.eviction_records()
    want = whole.collector.eviction_records()
    assert np.array_equal(got.block_hash, want.block_hash)


def test_a_whatif_whose_rate_has_fallen_continues_exactly(tmp_path: Path) -> None:
    """A budget far below the stream's hashes: the checkpoint holds the lowered threshold,
    the sampled hashes and their orders, and the resumed model goes on as the whole one."""
    config = WhatIfConfig(max_sampled_blocks=1500)
    half = len(FRAMES) // 2

    def pipeline() -> Pipeline:
        return new_pipeline("vllm", CollectorConfig(), whatif_config=config)

    first = pipeline()
    for ts, message in FRAMES[:half]:
        first.stream.handle(message, ts)
    first.stream.flush()
    store = CheckpointStore(tmp_path)
    store.save(capture([first]))
    resumed = pipeline()
    checkpoint = store.load()
    assert checkpoint is not None
    restore([resumed], checkpoint, store)
    whole = pipeline()
    for ts, message in FRAMES[:half]:
        whole.stream.handle(message, ts)
    whole.stream.flush()  # cut where the first one was: the same batches
    for target in (resumed, whole):
        for ts, message in FRAMES[half:]:
            target.stream.handle(message, ts)
        target.stream.flush()
    assert whatif_numbers(resumed) == whatif_numbers(whole)
    assert all(m[7] < 1.0 for m in whatif_numbers(whole).values())  # the rate fell


def test_a_whatif_state_from_other_settings_starts_the_whatif_empty(tmp_path: Path) -> None:
    """The collector continues; the what-if, asked other questions now, starts over."""
    first = fed("vllm", FRAMES[: len(FRAMES) // 2])
    store = CheckpointStore(tmp_path)
    store.save(capture([first]))
    other = new_pipeline(
        "vllm", CollectorConfig(), whatif_config=WhatIfConfig(capacity_factors=(1.5, 3.0))
    )
    checkpoint = store.load()
    assert checkpoint is not None
    restore([other], checkpoint, store)
    assert numbers(other)[2] == numbers(first)[2]  # stored counts continued
    assert other.whatif is not None and not other.whatif.snapshot().media
    assert store.path.exists()  # not set aside


def test_a_hybrid_engine_continues_with_its_groups_and_copies(tmp_path: Path) -> None:
    """vLLM 0.33's own hybrid stream, checkpointed half-way: the groups, their kinds, the
    physical copies of hashes resident at the checkpoint (removed after it, once per copy)
    and every per-place counter continue as in one pass, with no unknown removal."""
    frames = [(1.0, message) for message in read_stream("hybrid")]
    half = 3651  # a moment when 162 hashes have two physical copies
    first = fed("vllm", frames[:half])
    table = first.collector.table
    assert np.count_nonzero((table.state == RESIDENT) & (table.copies > 1)) > 100
    store = CheckpointStore(tmp_path)
    store.save(capture([first]))
    resumed = new_pipeline("vllm", CollectorConfig())
    checkpoint = store.load()
    assert checkpoint is not None
    restore([resumed], checkpoint, store)
    for ts, message in frames[half:]:
        resumed.stream.handle(message, ts)
    resumed.stream.flush()
    assert numbers(resumed) == numbers(fed("vllm", frames))
    assert resumed.collector.snapshot().unknown_removals == 0
    assert len(resumed.collector.snapshot().places) == 2


def test_the_sequence_continues_so_a_gap_since_the_checkpoint_is_seen(tmp_path: Path) -> None:
    first = fed("vllm", FRAMES[:100])
    store = CheckpointStore(tmp_path)
    store.save(capture([first]))
    resumed = new_pipeline("vllm", CollectorConfig())
    checkpoint = store.load()
    assert checkpoint is not None
    restore([resumed], checkpoint, store)
    for ts, message in FRAMES[150:160]:  # 100..149 never arrive
        resumed.stream.handle(message, ts)
    resumed.stream.flush()
    assert resumed.stream.stats.sequence_gaps == 1
    assert resumed.stream.stats.batches_lost == 50


def test_corrupt_checkpoint_is_set_aside_not_fatal(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.path.write_bytes(b"not a zip file")
    assert store.load() is None
    assert not store.path.exists()
    assert len(list(tmp_path.glob("checkpoint.npz.bad-*"))) == 1


def test_checkpoint_from_another_configuration_is_set_aside(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(capture([fed("vllm", FRAMES[:50])]))
    other = new_pipeline("vllm", CollectorConfig(sample_ratio=0.5))
    checkpoint = store.load()
    assert checkpoint is not None
    restore([other], checkpoint, store)
    assert int(other.collector.snapshot().stored.sum()) == 0
    assert len(list(tmp_path.glob("checkpoint.npz.bad-*"))) == 1


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for _ in range(3):
        store.save(capture([fed("vllm", FRAMES[:20])]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_handshake_failures_persist_and_other_versions_checkpoints_restore(
    tmp_path: Path,
) -> None:
    """The handshake failure counters come back; a checkpoint of an earlier version (without
    them) or of a later one (with a stats field this one does not know) restores the rest,
    nothing set aside. The counters sit apart from "stats", which earlier versions read whole."""
    first = fed("vllm", FRAMES[:50])
    first.stream.stats.handshake_failures["auth"] = 3
    store = CheckpointStore(tmp_path)
    checkpoint = capture([first])
    entry = checkpoint.meta["engines"]["vllm"]
    assert "handshake_failures" not in entry["stats"] and "connections" not in entry["stats"]

    resumed = new_pipeline("vllm", CollectorConfig())
    restore([resumed], checkpoint, store)
    assert resumed.stream.stats.handshake_failures == {"auth": 3, "protocol": 0, "closed": 0}

    del entry["handshake_failures"]  # as an earlier version wrote it
    entry["stats"]["frames_from_the_future"] = 7  # as a later version might
    older = new_pipeline("vllm", CollectorConfig())
    restore([older], checkpoint, store)
    assert older.stream.stats.handshake_failures == {"auth": 0, "protocol": 0, "closed": 0}
    assert older.stream.stats.messages == first.stream.stats.messages == 50
    assert not list(tmp_path.glob("checkpoint.npz.bad-*"))
