"""One engine's stages wired together: frames in, the views and exposition the sinks read.

Scripted streams in the vLLM map form, through framing, decoding, the collector and the
exposition: LoRA adapter attribution and its cardinality cap, the two readings of a store of a
resident block (a physical copy, or with ``report-mode=full`` a hit), and groups.
"""

from __future__ import annotations

from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.protocol.encode import frames
from kvcache_exporter.sinks.prometheus import render
from kvcache_exporter.sinks.summary import summarize

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def stored(hashes: list[int], group: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(16 * len(hashes))),
        "block_size": 16,
        "medium": "GPU",
        "group_idx": group,
        **extra,
    }


def removed(hashes: list[int], group: int = 0) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": group}


def run(batches: list[list[dict[str, Any]]], config: CollectorConfig) -> Pipeline:
    pipeline = new_pipeline("vllm", config)
    for seq, events in enumerate(batches):
        payload = msgspec.msgpack.encode([1000.0 + seq, events, 0])
        pipeline.stream.handle(frames("kv-events", seq, payload))
    pipeline.stream.flush()
    return pipeline


def samples(pipeline: Pipeline) -> Samples:
    text = render([pipeline.view()])
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset({"engine": "vllm", **labels}.items()))]


def test_adapters_are_attributed_and_capped() -> None:
    """Each adapter's stores, restores and resident blocks; removals carry no adapter, so the
    block's own is used; beyond --collector.max-adapters, adapters share ``other``."""
    batches = [
        [stored([1, 2], lora_name="alpha"), stored([3], lora_name="beta"), stored([4])],
        [stored([5], lora_name="gamma"), stored([6], lora_name="delta")],
        [removed([1, 3, 5])],
        [stored([1], lora_name="alpha"), stored([5], lora_name="gamma")],  # restores
    ]
    got = samples(run(batches, CollectorConfig(max_adapters=2)))
    gpu = {"medium": "GPU"}
    want = {
        # adapter: (stored, restores, resident)
        "alpha": (3, 1, 2),
        "beta": (1, 0, 0),
        "other": (3, 1, 2),  # gamma and delta, beyond the cap of 2
        "base": (1, 0, 1),
    }
    for adapter, (n_stored, n_restored, n_resident) in want.items():
        labels = {**gpu, "adapter": adapter}
        assert value(got, "kvcache_adapter_blocks_stored_total", **labels) == n_stored, adapter
        assert value(got, "kvcache_adapter_block_restores_total", **labels) == n_restored
        assert value(got, "kvcache_adapter_resident_blocks", **labels) == n_resident, adapter
    adapters = {
        dict(labels)["adapter"] for name, labels in got if name.startswith("kvcache_adapter_")
    }
    assert adapters == set(want)


def test_trtllm_lora_id_names_the_adapter() -> None:
    """An engine that sends only ``lora_id`` (TensorRT-LLM) has its adapters named by it."""
    got = samples(run([[stored([1], lora_id=7, lora_name=None)]], CollectorConfig()))
    assert value(got, "kvcache_adapter_resident_blocks", medium="GPU", adapter="7") == 1


def test_a_store_of_a_resident_block_is_a_copy_by_default_and_a_hit_in_report_mode() -> None:
    """vLLM sends a second physical copy as a store of a resident hash, removed once per copy;
    with ``report-mode=full`` the same store is a hit report and no removal follows."""
    copies = [[stored([1])], [stored([1])], [removed([1])]]
    got = samples(run(copies, CollectorConfig()))
    place = {"medium": "GPU", "group": "0"}
    assert value(got, "kvcache_blocks_stored_total", **place) == 2
    assert value(got, "kvcache_resident_blocks", **place) == 1
    assert value(got, "kvcache_resident_hashes", **place) == 1
    assert value(got, "kvcache_resident_tokens", **place) == 16
    assert value(got, "kvcache_blocks_accessed_total", **place) == 0
    assert value(got, "kvcache_block_lifetime_seconds_count", **place) == 0  # still resident
    assert value(got, "kvcache_exporter_unknown_removals_total") == 0

    hits = [[stored([1])], [stored([1])], [stored([1])]]
    got = samples(run(hits, CollectorConfig(hit_reports=True)))
    assert value(got, "kvcache_blocks_stored_total", **place) == 1
    assert value(got, "kvcache_blocks_accessed_total", **place) == 2
    assert value(got, "kvcache_resident_blocks", **place) == 1
    assert value(got, "kvcache_block_reuse_gap_seconds_count", **place) == 2


def test_the_same_hash_in_two_groups_is_two_blocks() -> None:
    """A hybrid model stores one hash in its sliding-window and its full-attention group: two
    blocks, each with its own counters, and the groups' kinds on ``kvcache_group_info``."""
    sliding = {"kv_cache_spec_kind": "sliding_window", "kv_cache_spec_sliding_window": 128}
    batches = [
        [stored([1, 2], 0, **sliding), stored([1, 2], 1, kv_cache_spec_kind="full_attention")],
        [removed([1], group=0)],
    ]
    pipeline = run(batches, CollectorConfig())
    got = samples(pipeline)
    for group, resident in (("0", 1), ("1", 2)):
        place = {"medium": "GPU", "group": group}
        assert value(got, "kvcache_blocks_stored_total", **place) == 2
        assert value(got, "kvcache_resident_blocks", **place) == resident
    info = {
        (dict(labels)["group"], dict(labels)["kind"], dict(labels)["sliding_window"])
        for name, labels in got
        if name == "kvcache_group_info"
    }
    assert info == {("0", "sliding_window", "128"), ("1", "full_attention", "")}
    summary = summarize(pipeline.view())
    assert summary["groups"] == {
        "0": {"kind": "sliding_window", "sliding_window": "128"},
        "1": {"kind": "full_attention", "sliding_window": None},
    }
    assert summary["media"]["GPU"]["resident_blocks"] == 3  # the pool: both groups
