"""The text exposition: valid for promtool, and the numbers the collector holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.collector import BlockLifecycleCollector
from kvcache_exporter.pipeline import EngineView
from kvcache_exporter.protocol.decode import PayloadDecoder
from kvcache_exporter.sinks.prometheus import render
from kvcache_exporter.sources.stream import SourceStats

VECTORS = Path(__file__).parent / "fixtures" / "vectors"


def view_of_vector(name: str, engine: str = "vllm") -> EngineView:
    collector = BlockLifecycleCollector()
    decoder = PayloadDecoder(collector.media, collector.reasons)
    for line in (VECTORS / name).read_text().splitlines()[1:]:
        frames = [bytes.fromhex(h) for h in json.loads(line)["frames_hex"]]
        decoder.feed(frames[2])
    collector.apply(decoder.flush())
    return EngineView(
        name=engine,
        collector=collector.snapshot(),
        source=SourceStats(messages=5, connections=1),
        events=dict(decoder.stats.events),
        decode_errors={"msgpack": 2},
        unknown_fields=0,
        tokens_stored=decoder.stats.tokens_stored,
        sample_ratio=1.0,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_promtool_accepts_the_exposition(promtool: str) -> None:
    text = render(
        [view_of_vector("vllm-0.33.0.jsonl"), view_of_vector("sglang-0.5.23.jsonl", "sg")]
    )
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_match_the_vector_script() -> None:
    got = samples(render([view_of_vector("vllm-0.33.0.jsonl")]))

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"engine": "vllm", **labels}.items())))]

    assert value("kvcache_blocks_stored_total", medium="GPU", group="0") == 3
    assert value("kvcache_blocks_stored_total", medium="CPU", group="0") == 1
    assert value("kvcache_blocks_stored_total", medium="unknown", group="0") == 1
    assert value("kvcache_blocks_removed_total", medium="GPU", group="0", reason="evicted") == 3
    assert value("kvcache_blocks_removed_total", medium="GPU", group="0", reason="cleared") == 1
    assert value("kvcache_blocks_removed_total", medium="CPU", group="0", reason="cleared") == 1
    assert value("kvcache_resident_blocks", medium="unknown", group="0") == 1
    assert value("kvcache_cache_clears_total") == 1
    assert value("kvcache_exporter_unknown_removals_total") == 1
    assert value("kvcache_events_total", type="BlockStored") == 4
    assert value("kvcache_exporter_decode_errors_total", reason="msgpack") == 2
    assert value("kvcache_block_lifetime_seconds_count", medium="GPU", group="0") == 3
    assert value("kvcache_block_lifetime_seconds_sum", medium="GPU", group="0") == 2.5
    assert value("kvcache_block_lifetime_seconds_bucket", medium="GPU", group="0", le="1.0") == 2
    assert value("kvcache_stored_tokens_total") == 80
    assert value("kvcache_exporter_source_up") == 1


def test_every_catalog_name_this_core_feeds_is_present() -> None:
    text = render([view_of_vector("vllm-0.33.0.jsonl")])
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "kvcache_events", "kvcache_blocks_stored", "kvcache_blocks_removed",
        "kvcache_blocks_accessed", "kvcache_block_restores", "kvcache_cache_clears",
        "kvcache_resident_blocks", "kvcache_tracked_blocks", "kvcache_block_lifetime_seconds",
        "kvcache_block_idle_before_evict_seconds", "kvcache_block_reuse_gap_seconds",
        "kvcache_block_restore_gap_seconds", "kvcache_block_accesses_before_evict",
        "kvcache_exporter_build_info", "kvcache_exporter_messages",
        "kvcache_exporter_decode_errors", "kvcache_exporter_sequence_gaps",
        "kvcache_exporter_batches_lost", "kvcache_exporter_batches_replayed",
        "kvcache_exporter_last_event_timestamp_seconds", "kvcache_exporter_source_up",
        "kvcache_exporter_sample_ratio", "kvcache_exporter_unknown_removals",
    ):  # fmt: skip
        assert name in names, name


def test_label_values_are_escaped() -> None:
    """A label value with a quote, a backslash and a newline reads back as it was."""
    name = 'a"b\\c\nd'
    got = samples(render([view_of_vector("vllm-0.33.0.jsonl", engine=name)]))
    assert got[("kvcache_exporter_source_up", (("engine", name),))] == 1
