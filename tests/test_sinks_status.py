"""The status document (``/api/v1/status``), its charts and the page at ``/``.

A scripted two-tier LRU workload that thrashes, through a real pipeline: the document's
schema, its figures against the ``/metrics`` exposition of the same views, its rates against
the history, every chart holding data, and the page as a static snapshot (no script run).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from html.parser import HTMLParser
from typing import Any

import jsonschema
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.analysis.whatif import WhatIfConfig
from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.protocol.encode import frames
from kvcache_exporter.sinks.http import links_html
from kvcache_exporter.sinks.prometheus import render
from kvcache_exporter.sinks.status import EngineStatus, StatusPage, charts
from kvcache_exporter.sinks.status.document import RATE_SECONDS, status_document
from kvcache_exporter.sinks.status.page import render_page
from kvcache_exporter.sinks.status.svg import render as render_svg
from kvcache_exporter.thresholds import THRASH_CRITICAL_RATIO, THRASH_RATIO

STEPS = 60
GPU, CPU, CYCLE = 8, 8, 20

FIGURE = {
    "type": "object",
    "required": ["value", "text", "unit"],
    "properties": {
        "value": {"type": ["number", "null"]},
        "text": {"type": "string"},
        "unit": {"type": "string"},
        "metric": {"type": "string", "pattern": "^kvcache_"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "dependentRequired": {"metric": ["labels"]},
    "additionalProperties": False,
}
SERIES = {"type": "array", "items": {"type": ["number", "null"]}}
HISTOGRAM = {
    "type": ["object", "null"],
    "required": ["bounds", "counts", "sum"],
    "properties": {
        "bounds": {"type": "array", "items": {"type": "number"}},
        "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "sum": {"type": "number"},
    },
}
CHART = {
    "type": "object",
    "required": ["id", "title", "desc", "width", "height", "points", "items"],
    "properties": {
        "points": {"type": "integer", "minimum": 0},
        "items": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"properties": {"t": {"const": "path"}}, "required": ["t", "d", "c"]},
                    {
                        "properties": {"t": {"const": "text"}},
                        "required": ["t", "x", "y", "s", "c", "a"],
                    },
                    {
                        "properties": {"t": {"const": "rect"}},
                        "required": ["t", "x", "y", "w", "h", "c", "s"],
                    },
                ]
            },
        },
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "version",
        "generated_at",
        "refresh_seconds",
        "history",
        "thresholds",
        "engines",
        "layout",
    ],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "string"},
        "generated_at": {"type": "number"},
        "refresh_seconds": {"type": "integer", "minimum": 1},
        "layout": {"type": "string"},
        "history": {
            "type": "object",
            "required": ["window_seconds", "interval_seconds", "bytes"],
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "thresholds": {
            "type": "object",
            "required": [
                "restore_ratio_warning",
                "restore_ratio_critical",
                "restore_ratio_window_seconds",
            ],
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "engines": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["engine", "health", "alerts", "media", "history_samples"],
                "additionalProperties": False,
                "properties": {
                    "engine": {"type": "string"},
                    "history_samples": {"type": "integer", "minimum": 0},
                    "health": {
                        "type": "object",
                        "required": [
                            "source_up",
                            "event_lag_seconds",
                            "batches_lost_total",
                            "sequence_gaps_total",
                            "decode_errors_total",
                            "messages_total",
                        ],
                        "additionalProperties": FIGURE,
                    },
                    "alerts": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "alert",
                                "severity",
                                "message",
                                "since",
                                "value",
                                "threshold",
                                "metric",
                                "labels",
                            ],
                            "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
                        },
                    },
                    "media": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "medium",
                                "groups",
                                "figures",
                                "history",
                                "lifetime_seconds",
                                "idle_before_evict_seconds",
                                "whatif",
                                "charts",
                            ],
                            "additionalProperties": False,
                            "properties": {
                                "medium": {"type": "string"},
                                "groups": {"type": "array", "items": {"type": "string"}},
                                "figures": {
                                    "type": "object",
                                    "required": [
                                        "resident_blocks",
                                        "capacity_blocks",
                                        "stored_total",
                                        "removed_total",
                                        "restores_total",
                                        "restore_ratio",
                                        "stored_per_second",
                                        "removed_per_second",
                                        "restores_per_second",
                                        "lifetime_count",
                                        "lifetime_p50_seconds",
                                        "idle_before_evict_count",
                                        "idle_before_evict_p50_seconds",
                                    ],
                                    "additionalProperties": FIGURE,
                                },
                                "history": {
                                    "type": "object",
                                    "required": [
                                        "seconds_ago",
                                        "resident_blocks",
                                        "stored_per_second",
                                        "removed_per_second",
                                        "restores_per_second",
                                        "restore_ratio",
                                    ],
                                    "additionalProperties": False,
                                    "properties": {
                                        "seconds_ago": {
                                            "type": "array",
                                            "items": {"type": "number", "maximum": 0},
                                        },
                                        "resident_blocks": {
                                            "type": "object",
                                            "additionalProperties": SERIES,
                                        },
                                        "stored_per_second": SERIES,
                                        "removed_per_second": SERIES,
                                        "restores_per_second": SERIES,
                                        "restore_ratio": SERIES,
                                    },
                                },
                                "lifetime_seconds": HISTOGRAM,
                                "idle_before_evict_seconds": HISTOGRAM,
                                "whatif": {
                                    "type": ["object", "null"],
                                    "required": ["capacity_blocks", "points"],
                                    "properties": {
                                        "points": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "required": [
                                                    "capacity_factor",
                                                    "capacity_blocks",
                                                    "recomputes_avoided",
                                                    "recompute_saved_ratio",
                                                ],
                                            },
                                        }
                                    },
                                },
                                "charts": {"type": "array", "items": CHART},
                            },
                        },
                    },
                },
            },
        },
    },
}


def stored(hashes: list[int], medium: str) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(16 * len(hashes))),
        "block_size": 16,
        "medium": medium,
    }


def removed(hashes: list[int], medium: str) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def thrashing_pipeline() -> Pipeline:
    """A GPU LRU of 8 blocks over a cycle of 20 hashes (every reference a miss, so every
    store after the first cycle a restore), its evictions kept by a CPU LRU of 8 that
    thrashes too. One batch a second, the history sampled after each (as the ingest tick
    does)."""
    whatif = WhatIfConfig(sample_ratio=1.0, capacity=(("GPU", GPU), ("CPU", CPU)))
    pipeline = new_pipeline("vllm", CollectorConfig(), whatif_config=whatif)
    gpu: OrderedDict[int, None] = OrderedDict()
    cpu: OrderedDict[int, None] = OrderedDict()
    for step in range(STEPS):
        events = []
        for ref in (2 * step % CYCLE, (2 * step + 1) % CYCLE):
            if ref in gpu:
                gpu.move_to_end(ref)
                continue
            if len(gpu) == GPU:
                victim, _ = gpu.popitem(last=False)
                events.append(removed([victim], "GPU"))
                if victim not in cpu:
                    if len(cpu) == CPU:
                        events.append(removed([cpu.popitem(last=False)[0]], "CPU"))
                    cpu[victim] = None
                    events.append(stored([victim], "CPU"))
            gpu[ref] = None
            events.append(stored([ref], "GPU"))
        payload = msgspec.msgpack.encode([1000.0 + step, events, 0])
        pipeline.stream.handle(frames("kv-events", step, payload))
        pipeline.stream.flush()
        pipeline.history.record(float(step), pipeline.collector.place_counts())
    return pipeline


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return thrashing_pipeline()


def statuses(pipeline: Pipeline) -> list[EngineStatus]:
    history = pipeline.history
    return [EngineStatus(pipeline.view(), history.window(), history.nbytes)]


def exposition(status: list[EngineStatus]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = render([s.view for s in status])
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def summed(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, labels: dict[str, str]
) -> float:
    matching = [v for (n, key), v in samples.items() if n == name and set(labels.items()) <= key]
    assert matching, (name, labels)
    return sum(matching)


def all_figures(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure by its page key (as the page's ``data-key``)."""
    out = {}
    for engine in document["engines"]:
        out |= {f"{engine['engine']}||{n}": f for n, f in engine["health"].items()}
        for medium in engine["media"]:
            prefix = f"{engine['engine']}|{medium['medium']}|"
            out |= {prefix + n: f for n, f in medium["figures"].items()}
    return out


def test_the_document_matches_its_schema_and_survives_json(pipeline: Pipeline) -> None:
    document = status_document(statuses(pipeline), now=1234.5)
    jsonschema.validate(document, SCHEMA)
    assert json.loads(json.dumps(document)) == document  # plain JSON types only
    assert document["thresholds"]["restore_ratio_warning"] == THRASH_RATIO
    assert document["thresholds"]["restore_ratio_critical"] == THRASH_CRITICAL_RATIO
    (engine,) = document["engines"]
    assert [m["medium"] for m in engine["media"]] == ["GPU", "CPU"]
    assert engine["history_samples"] == STEPS


def test_every_figure_of_metrics_equals_the_exposition_of_the_same_views(
    pipeline: Pipeline,
) -> None:
    status = statuses(pipeline)
    document = status_document(status, now=0.0)
    samples = exposition(status)
    compared = 0
    for key, fig in all_figures(document).items():
        if "metric" in fig:
            assert fig["value"] == summed(samples, fig["metric"], fig["labels"]), key
            compared += 1
    assert compared >= 2 * 12  # two media's counters, what-if rows and the health figures
    gpu = document["engines"][0]["media"][0]["figures"]
    assert gpu["resident_blocks"]["value"] == GPU
    assert gpu["capacity_blocks"]["value"] == GPU
    ratio = gpu["restores_total"]["value"] / gpu["stored_total"]["value"]
    assert gpu["restore_ratio"]["value"] == ratio and ratio > THRASH_CRITICAL_RATIO


def test_rates_and_ratio_come_from_the_history(pipeline: Pipeline) -> None:
    status = statuses(pipeline)
    document = status_document(status, now=0.0)
    gpu = document["engines"][0]["media"][0]
    window = status[0].history
    place = status[0].view.collector.place("GPU")
    assert place is not None
    # Two references a step, both misses once the cycle wraps: 2 stores/s on the GPU.
    assert gpu["figures"]["stored_per_second"]["value"] == pytest.approx(2.0)
    assert gpu["figures"]["removed_per_second"]["value"] == pytest.approx(2.0)
    assert gpu["figures"]["restores_per_second"]["value"] == pytest.approx(2.0)
    history = gpu["history"]
    assert len(history["seconds_ago"]) == STEPS and history["seconds_ago"][-1] == 0
    assert history["stored_per_second"][0] is None  # no rate before the second sample
    assert history["stored_per_second"][-1] == pytest.approx(2.0)
    # Over the trailing minute: all but the first cycle's 20 stores are restores.
    assert history["restore_ratio"][-1] == pytest.approx((2 * (STEPS - 1) - 18) / (2 * (STEPS - 1)))
    assert history["resident_blocks"] == {"0": window.counts[:, 3, place].tolist()}
    assert RATE_SECONDS < STEPS


def test_every_chart_holds_data_and_the_thresholds_are_drawn(pipeline: Pipeline) -> None:
    document = status_document(statuses(pipeline), now=0.0)
    for medium in document["engines"][0]["media"]:
        kinds = {c["id"].rsplit("-", 1)[1]: c for c in medium["charts"]}
        assert set(kinds) == {"resident", "rates", "ratio", "lifetime", "idle", "whatif"}
        for chart in medium["charts"]:
            assert chart["points"] > 0, chart["id"]
            assert any(i["t"] in ("path", "rect") and "s0" in i["c"] for i in chart["items"])
        labels = [i["s"] for i in kinds["ratio"]["items"] if i["t"] == "text"]
        assert (
            f"warning {THRASH_RATIO:g}" in labels
            and f"critical {THRASH_CRITICAL_RATIO:g}" in labels
        )
        assert any(
            s.startswith("now")
            for s in (i["s"] for i in kinds["whatif"]["items"] if i["t"] == "text")
        )
        assert any(
            s.startswith("capacity")
            for s in (i["s"] for i in kinds["resident"]["items"] if i["t"] == "text")
        )


def test_an_empty_exporter_renders_without_data() -> None:
    pipeline = new_pipeline("idle", CollectorConfig())
    document = status_document(statuses(pipeline), now=0.0)
    jsonschema.validate(document, SCHEMA)
    assert document["engines"][0]["media"] == []
    page = render_page(document, links_html("/metrics"))
    assert "No blocks seen yet" in page and 'href="/metrics"' in page
    empty = charts.line_chart("c", "T", "D", "x", "y", [])
    assert empty["points"] == 0 and "no data yet" in render_svg(empty)


class _Elements(HTMLParser):
    """Every element with a data-key, and every chart's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.keyed: dict[str, dict[str, str | None]] = {}
        self.charts: list[dict[str, str | None]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-key" in found:
            self.keyed[str(found["data-key"])] = found
        if tag == "svg":
            self.charts.append(found)
        if tag == "script":
            self.scripts += 1


def test_the_page_is_a_complete_static_snapshot(pipeline: Pipeline) -> None:
    status = statuses(pipeline)
    document = status_document(status, now=0.0)
    page = render_page(document, links_html("/metrics"))
    parsed = _Elements()
    parsed.feed(page)
    chart_ids = [c["id"] for m in document["engines"][0]["media"] for c in m["charts"]]
    assert [c["id"] for c in parsed.charts] == chart_ids
    assert all(int(str(c["data-points"])) > 0 for c in parsed.charts)
    for key, fig in all_figures(document).items():
        element = parsed.keyed[key]
        assert element["data-value"] == (
            ""
            if fig["value"] is None
            else repr(fig["value"])
            if isinstance(fig["value"], float)
            else str(fig["value"])
        )
        if "metric" in fig:
            assert element["data-metric"] == fig["metric"]
            assert json.loads(str(element["data-labels"])) == fig["labels"]
    assert parsed.scripts == 1 and "<noscript>" in page
    assert 'href="/api/v1/status"' in page  # the link list stays, below
    assert "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )  # nothing fetched off-site


def test_status_page_routes_render_fresh_documents(pipeline: Pipeline) -> None:
    clock = iter([10.0, 20.0])
    page = StatusPage(lambda: statuses(pipeline), links_html("/metrics"), clock=lambda: next(clock))
    body, content_type = page.json({})
    assert content_type == "application/json" and json.loads(body)["generated_at"] == 10.0
    body, content_type = page.html({})
    assert content_type.startswith("text/html") and b'data-value="20.0"' in body


def test_svg_escapes_text_from_the_wire() -> None:
    chart = charts.line_chart(
        "c", "<T>", "D&", "x", "y", [charts.Line("<script>", 0, [0, 1], [1, 2])]
    )
    svg = render_svg(chart)
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&amp;" in svg


def test_ticks_are_nice_and_cover_the_range() -> None:
    assert charts.ticks(0, 4000) == [0, 1000, 2000, 3000, 4000]
    assert charts.ticks(0, 0.65) == [0, 0.2, 0.4, 0.6]
    assert charts.compact(1500) == "1.5k" and charts.compact(2_000_000) == "2M"
    assert charts.duration(0.001) == "1ms" and charts.duration(1800) == "30m"
