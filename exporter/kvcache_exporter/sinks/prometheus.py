"""``/metrics``: the catalog's families from the engine snapshots, and the process series.

No ``prometheus_client`` metric object sits on the ingest path. At scrape time the engines'
snapshots are walked once (:func:`.series.series`); :class:`.textformat.PageWriter` writes
their families, and the library's process, platform and GC collectors (the exporter's own CPU,
memory and open files) follow through the library's encoder. The format is the library's
choice from the scraper's ``Accept`` header: text 0.0.4 or OpenMetrics 1.0.

:class:`SnapshotCollector` yields the same families as a ``prometheus_client`` custom
collector (the library's documented way to export numbers another system aggregated): it is
the reference the writer is tested against, and serves the name escapings the writer leaves
to the library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import exposition as text_exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector

from ..catalog import FAMILIES, OTLP_EXPORTS
from ..pipeline import EngineView
from .series import HistogramValue, Series, series
from .textformat import PageWriter, TextFormat, bound_label

Views = Callable[[], Sequence[EngineView]]
OTLPExports = Callable[[], Mapping[str, int] | None]
HTTPRefusals = Callable[[], Mapping[str, int] | None]

# Escapings under which the catalog's names (all in the legacy character set) are written
# unchanged; the others rewrite every name with an underscore.
_VERBATIM_ESCAPINGS = (openmetrics_exposition.UNDERSCORES, openmetrics_exposition.ALLOWUTF8)


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


def _add_histogram(
    metric: Metric, name: str, labels: dict[str, str], value: HistogramValue
) -> None:
    cumulative = 0
    for bound, count in zip((*value.bounds, float("inf")), value.counts, strict=True):
        cumulative += count
        metric.add_sample(f"{name}_bucket", {**labels, "le": bound_label(bound)}, cumulative)
    metric.add_sample(f"{name}_count", labels, cumulative)
    metric.add_sample(f"{name}_sum", labels, value.sum)


class SnapshotCollector(Collector):
    """Yields the catalog's families from fresh engine snapshots at every scrape."""

    def __init__(
        self,
        views: Views,
        otlp_exports: OTLPExports | None = None,
        http_refused: HTTPRefusals | None = None,
    ) -> None:
        self._views = views
        self._otlp_exports = otlp_exports or (lambda: None)
        self._http_refused = http_refused or (lambda: None)

    def series(self) -> Series:
        """Every series of the catalog's families, now."""
        return series(self._views(), self._otlp_exports(), self._http_refused())

    def collect(self) -> Iterator[Metric]:
        return metric_families(self.series())


def _process_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    registry = registry or CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _writer_format(encoder: Callable[..., bytes]) -> TextFormat | None:
    """The format the page writer writes for this library encoder, or None where only the
    library's encoder writes what was asked (a name-rewriting escaping, OpenMetrics > 1.0)."""
    function = encoder.func if isinstance(encoder, partial) else encoder
    keywords: dict[str, Any] = encoder.keywords if isinstance(encoder, partial) else {}
    if keywords.get("escaping", openmetrics_exposition.UNDERSCORES) not in _VERBATIM_ESCAPINGS:
        return None
    if function is text_exposition.generate_latest:
        return TextFormat.TEXT
    if function is openmetrics_exposition.generate_latest:
        return TextFormat.OPENMETRICS if keywords.get("version", "1.0.0") == "1.0.0" else None
    return None


class MetricsPage:
    """What ``/metrics`` serves: the engines' families, then the exporter's own
    ``process_*`` and ``python_*`` series."""

    def __init__(
        self,
        views: Views,
        otlp_exports: OTLPExports | None = None,
        http_refused: HTTPRefusals | None = None,
    ) -> None:
        self._families = SnapshotCollector(views, otlp_exports, http_refused)
        self._process = _process_registry()
        self._writer = PageWriter()
        # Everything in one registry, for the library's encoders where the writer does not go.
        self._everything = CollectorRegistry(auto_describe=False)
        self._everything.register(self._families)
        _process_registry(self._everything)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scrape: OpenMetrics 1.0 when ``accept`` asks for
        it, else the text format 0.0.4."""
        encoder, content_type = text_exposition.choose_encoder(accept or "")
        fmt = _writer_format(encoder)
        if fmt is None:
            return encoder(self._everything), content_type
        page = self._writer.write(self._families.series(), fmt)
        return page.encode() + encoder(self._process), content_type


def render(views: Sequence[EngineView], otlp_exports: Mapping[str, int] | None = None) -> str:
    """The engines' families as text 0.0.4, without the process series: what ``analyze``
    and the library print."""
    return PageWriter().write(series(views, otlp_exports), TextFormat.TEXT)
