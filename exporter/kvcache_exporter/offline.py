"""The exporter's pipeline without sockets: recordings and traces analysed offline.

Frames go through the same :class:`EventStream` and collector as on the live path, so
``kvcache-exporter analyze`` prints the numbers the live exporter would have served.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis.whatif import WhatIfConfig
from .collector import CollectorConfig
from .pipeline import EngineView, Pipeline, new_pipeline
from .protocol.encode import Event, WireForm, encode_batch, frames
from .sinks.prometheus import render
from .sinks.summary import summarize
from .sources.recording import RecordingReader

if TYPE_CHECKING:  # only named in signatures: the simulator stays unloaded until one is made
    from .engine import PrefixCacheSimulator, Request

FORMATS = ("text", "json", "csv", "prometheus")


class OfflinePipeline:
    """Per-source collectors fed with recorded or generated frames."""

    def __init__(
        self, config: CollectorConfig | None = None, whatif: WhatIfConfig | None = None
    ) -> None:
        self.config = config or CollectorConfig()
        self.whatif = whatif or WhatIfConfig()
        self._engines: dict[str, Pipeline] = {}

    def feed(self, source: str, message: list[bytes], arrival: float) -> None:
        engine = self._engines.get(source)
        if engine is None:
            engine = self._engines[source] = new_pipeline(
                source, self.config, whatif_config=self.whatif
            )
        engine.stream.handle(message, arrival)

    def views(self) -> list[EngineView]:
        result = []
        for pipeline in self._engines.values():
            pipeline.stream.flush()
            result.append(pipeline.view(with_patterns=True))
        return result


def analyze_recording(
    path: str | Path, config: CollectorConfig | None = None, whatif: WhatIfConfig | None = None
) -> tuple[list[EngineView], bool]:
    """Replay a recording through the pipeline; also says whether the file ended in a cut."""
    pipeline = OfflinePipeline(config, whatif)
    reader = RecordingReader(path)
    for message in reader:
        pipeline.feed(message.source, message.frames, message.arrival)
    return pipeline.views(), reader.truncated


def simulate_frames(
    requests: Iterable[Request],
    simulator: PrefixCacheSimulator,
    form: WireForm = WireForm.VLLM,
    requests_per_batch: int = 1,
    start_time: float = 0.0,
    topic: str = "kv-events",
) -> Iterable[tuple[float, list[bytes]]]:
    """The frames an engine would publish for these requests, with their engine times."""
    seq = 0
    pending: list[Event] = []
    in_batch = 0
    first: float | None = None
    ts = start_time
    for request in requests:
        if first is None:
            first = request.timestamp_s
        ts = start_time + request.timestamp_s - first
        pending.extend(simulator.step(request))
        in_batch += 1
        if in_batch >= requests_per_batch and pending:
            yield ts, frames(topic, seq, encode_batch(ts, pending, form))
            seq += 1
            pending, in_batch = [], 0
    if pending:
        yield ts, frames(topic, seq, encode_batch(ts, pending, form))


def analyze_trace(
    requests: Iterable[Request],
    simulator: PrefixCacheSimulator,
    config: CollectorConfig | None = None,
    name: str = "trace",
    whatif: WhatIfConfig | None = None,
) -> list[EngineView]:
    pipeline = OfflinePipeline(config, whatif)
    for ts, message in simulate_frames(requests, simulator):
        pipeline.feed(name, message, ts)
    return pipeline.views()


def format_views(views: list[EngineView], fmt: str) -> str:
    """The summary as ``text``, ``json``, ``csv`` or the ``prometheus`` exposition."""
    if fmt == "prometheus":
        return render(views)
    summaries = [summarize(v) for v in views]
    if fmt == "json":
        return json.dumps({"engines": summaries}, indent=2) + "\n"
    rows = list(_flatten(summaries))
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["engine", "medium", "metric", "value"])
        writer.writerows(rows)
        return buffer.getvalue()
    lines = []
    for engine, medium, metric, value in rows:
        if metric.startswith("whatif."):
            continue  # shown as a table below
        where = f"{engine}/{medium}" if medium else engine
        lines.append(f"{where:<16} {metric:<40} {_human(value)}")
    lines.extend(_whatif_tables(summaries))
    return "\n".join(lines) + "\n"


def _whatif_tables(summaries: list[dict[str, Any]]) -> Iterable[str]:
    """Per engine and medium, what larger (and smaller) caches would have done."""
    for summary in summaries:
        for medium, entry in summary["media"].items():
            whatif = entry.get("whatif")
            if whatif is None or not whatif["factors"]:
                continue
            capacity = whatif["capacity_blocks"]
            yield ""
            yield (
                f"what-if {summary['engine']}/{medium}: capacity "
                f"{capacity if capacity else 'not known yet'} blocks "
                f"({whatif['capacity_source']}), sample ratio {whatif['sample_ratio']:.3g} "
                f"({whatif['sampled']['blocks']} of at most {whatif['sampled']['max_blocks']} "
                "hashes)"
            )
            yield f"  {'cache':>7}  {'blocks':>10}  {'recomputation saved':>19}  {'hit ratio':>9}"
            for factor, row in whatif["factors"].items():
                blocks = row["capacity_blocks"]
                yield (
                    f"  {factor + 'x':>7}  {blocks if blocks else '-':>10}  "
                    f"{_percent(row.get('recompute_saved_ratio')):>19}  "
                    f"{_percent(row.get('hit_ratio')):>9}"
                )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class PlotError(Exception):
    """The chart cannot be drawn (matplotlib missing, or the file cannot be written)."""


def plot_whatif(views: list[EngineView], path: str | Path) -> int:
    """Draw recomputation saved (and, where hits are reported, hit ratio) against cache size
    for every engine and medium into a PNG; returns the number of curves drawn.

    Needs matplotlib (the ``plot`` extra); raises :class:`PlotError` without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'kvcache-exporter[plot]'") from None
    figure, axes = plt.subplots(figsize=(8, 5))
    curves = 0
    for summary in (summarize(v) for v in views):
        for medium, entry in summary["media"].items():
            factors = (entry.get("whatif") or {}).get("factors", {})
            where = f"{summary['engine']}/{medium}"
            for key, label, style in (
                ("recompute_saved_ratio", "recomputation saved", "-"),
                ("hit_ratio", "hit ratio", "--"),
            ):
                points = [
                    (float(f), row[key]) for f, row in factors.items() if row.get(key) is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axes.plot(
                        xs, [100 * y for y in ys], style, marker="o", label=f"{where} {label}"
                    )
                    curves += 1
    axes.set_xscale("log", base=2)
    ticks = sorted({float(f) for v in views if v.whatif is not None for f in v.whatif.factors})
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.minorticks_off()
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel(
        "cache size, in multiples k of the capacity C (k also reads as C + a CPU tier of (k-1) C)"
    )
    axes.set_ylabel("% of blocks stored (saved) / of references (hit ratio)")
    axes.set_title("Recomputation saved vs cache size")
    axes.grid(True, which="both", alpha=0.3)
    if curves:
        axes.legend()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise PlotError(f"--plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
    return curves


def _human(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _flatten(summaries: list[dict[str, Any]]) -> Iterable[tuple[str, str, str, Any]]:
    for summary in summaries:
        engine = summary["engine"]
        for key in ("tracked_blocks", "cache_clears_total", "unknown_removals_total"):
            yield engine, "", key, summary[key]
        for key, value in summary["events_total"].items():
            yield engine, "", f"events_total[{key}]", value
        for key, value in summary["decode_errors_total"].items():
            yield engine, "", f"decode_errors_total[{key}]", value
        for medium, entry in summary["media"].items():
            for key, value in _leaves(entry):
                yield engine, medium, key, value
        for series, trend in summary["trends"].items():
            yield engine, "", f"trend.{series}", f"{trend['direction_name']} {trend['slope']:.6g}/s"
        for alert in summary["alerts"]["active"]:
            yield engine, "", f"alert.{alert['alert']}", f"{alert['severity']}: {alert['message']}"
        for key, value in _leaves(summary.get("access_patterns", {})):
            yield engine, "", f"access_patterns.{key}", value


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
