"""``/metrics`` through ``prometheus_client``: a custom collector over the engine snapshots.

No ``prometheus_client`` metric object sits on the ingest path: at scrape time the collector
takes one snapshot per engine, walks them once (:func:`.series.series`) and yields the
catalog's families — the library's documented way to export numbers another system already
aggregated. The registry also holds the library's process, platform and GC collectors (the
exporter's own CPU, memory and open files), and the library's encoders write text 0.0.4 or
OpenMetrics 1.0, as the scraper's ``Accept`` header asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..catalog import FAMILIES, OTLP_EXPORTS
from ..pipeline import EngineView
from .series import HistogramValue, Series, series

Views = Callable[[], Sequence[EngineView]]
OTLPExports = Callable[[], Mapping[str, int] | None]


def metric_families(current: Series) -> Iterator[Metric]:
    """The catalog's families, in order, with ``current``'s samples. The OTLP exports family
    is left out while it has none (OTLP export is off)."""
    for family in FAMILIES:
        points = current[family.name]
        if family.name == OTLP_EXPORTS and not points:
            continue
        metric = Metric(family.base_name, family.help, family.type.value)
        for labels, value in points.items():
            names = dict(labels)
            if isinstance(value, HistogramValue):
                _add_histogram(metric, family.name, names, value)
            else:  # catalog names carry the suffix their type's samples have (_total, _info)
                metric.add_sample(family.name, names, value)
        yield metric


def _bound(bound: float) -> str:
    """A bucket bound as ``le`` spells it: ``+Inf``, else the shortest repr (``30.0``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _add_histogram(
    metric: Metric, name: str, labels: dict[str, str], value: HistogramValue
) -> None:
    cumulative = 0
    for bound, count in zip((*value.bounds, float("inf")), value.counts, strict=True):
        cumulative += count
        metric.add_sample(f"{name}_bucket", {**labels, "le": _bound(bound)}, cumulative)
    metric.add_sample(f"{name}_count", labels, cumulative)
    metric.add_sample(f"{name}_sum", labels, value.sum)


class SnapshotCollector(Collector):
    """Yields the catalog's families from fresh engine snapshots at every scrape."""

    def __init__(self, views: Views, otlp_exports: OTLPExports | None = None) -> None:
        self._views = views
        self._otlp_exports = otlp_exports or (lambda: None)

    def collect(self) -> Iterator[Metric]:
        return metric_families(series(self._views(), self._otlp_exports()))


def new_registry(views: Views, otlp_exports: OTLPExports | None = None) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the engines' families, and the exporter's own
    ``process_*`` and ``python_*`` series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(views, otlp_exports))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The body and content type for a scrape: OpenMetrics 1.0 when ``accept`` asks for it,
    else the text format 0.0.4."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def render(views: Sequence[EngineView], otlp_exports: Mapping[str, int] | None = None) -> str:
    """The engines' families as text 0.0.4, without the process series: what ``analyze``
    and the library print."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: views, lambda: otlp_exports))
    return generate_latest(registry).decode()
