"""The catalog's families in the Prometheus text formats, written from cached label strings.

``prometheus_client``'s encoders escape and join every label of every sample at every scrape:
about 8 µs a series in text 0.0.4 and 14 µs in OpenMetrics, most of a scrape's cost (at eight
engines on three media, 50 and 110 ms). An engine's label sets hardly ever change between
scrapes, so :class:`PageWriter` formats each series' name and labels once, keeps the string,
and formats only the values — with the library's own float formatter. Family headers are
written by the library's encoders themselves, once. The page is byte for byte what the
library's encoders write for the same families (the tests hold the two equal on every
variant); for the name escapings that rewrite names (``dots``, ``values``) the Prometheus
sink uses the library's encoders instead.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..catalog import FAMILIES, OTLP_EXPORTS, Family
from .series import HistogramValue, Labels, Series

OPENMETRICS_EOF = "# EOF\n"
# The library's functions, typed (they carry no annotations).
_go_float = cast("Callable[[float], str]", floatToGoString)
_openmetrics_latest = cast("Callable[[Collector], bytes]", openmetrics_exposition.generate_latest)
CACHE_LIMIT = 1 << 16
"""Formatted label strings kept at most: label sets are bounded by configuration (engines,
media, groups, adapters, alerts), so this is only a guard against growth without end."""


class TextFormat(enum.Enum):
    """The exposition formats ``/metrics`` negotiates."""

    TEXT = "text 0.0.4"
    OPENMETRICS = "OpenMetrics 1.0"


def bound_label(bound: float) -> str:
    """A bucket bound as ``le`` spells it: ``+Inf``, else the shortest repr (``30.0``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _escape(value: str) -> str:
    """A label value as both formats quote it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_prefix(name: str, labels: Labels) -> str:
    """``name{a="x",b="y"} ``: labels sorted by name, as the library's encoders write them."""
    if not labels:
        return name + " "
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels))
    return f"{name}{{{inner}}} "


class _One(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterator[Metric]:
        yield self._metric


def _header(family: Family, fmt: TextFormat) -> str:
    """The family's ``# HELP`` / ``# TYPE`` lines, written by the library's encoder."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One(Metric(family.base_name, family.help, family.type.value)))
    if fmt is TextFormat.TEXT:
        return generate_latest(registry).decode()
    return _openmetrics_latest(registry).decode().removesuffix(OPENMETRICS_EOF)


class PageWriter:
    """Writes the catalog's families; keeps each series' formatted name and labels."""

    def __init__(self) -> None:
        self._headers = {
            fmt: {family.name: _header(family, fmt) for family in FAMILIES} for fmt in TextFormat
        }
        self._prefixes: dict[tuple[str, Labels], str] = {}
        self._buckets: dict[tuple[str, Labels, tuple[float, ...]], tuple[str, ...]] = {}

    def write(self, current: Series, fmt: TextFormat) -> str:
        """The families of ``current`` in catalog order (without OpenMetrics' ``# EOF``). The
        OTLP exports family is left out while it has none (OTLP export is off)."""
        if len(self._prefixes) + len(self._buckets) > CACHE_LIMIT:
            self._prefixes.clear()
            self._buckets.clear()
        headers = self._headers[fmt]
        out: list[str] = []
        for family in FAMILIES:
            points = current[family.name]
            if family.name == OTLP_EXPORTS and not points:
                continue
            out.append(headers[family.name])
            for labels, value in points.items():
                if isinstance(value, HistogramValue):
                    self._histogram(out, family.name, labels, value)
                else:
                    out.append(self._prefix(family.name, labels) + _go_float(value) + "\n")
        return "".join(out)

    def _prefix(self, name: str, labels: Labels) -> str:
        key = (name, labels)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._prefixes[key] = _sample_prefix(name, labels)
        return prefix

    def _histogram(self, out: list[str], name: str, labels: Labels, value: HistogramValue) -> None:
        key = (name, labels, value.bounds)
        buckets = self._buckets.get(key)
        if buckets is None:
            bounds = (*value.bounds, float("inf"))
            buckets = self._buckets[key] = tuple(
                _sample_prefix(f"{name}_bucket", (*labels, ("le", bound_label(b)))) for b in bounds
            )
        cumulative = 0
        for prefix, count in zip(buckets, value.counts, strict=True):
            cumulative += count
            out.append(prefix + _go_float(cumulative) + "\n")
        out.append(self._prefix(f"{name}_count", labels) + _go_float(cumulative) + "\n")
        out.append(self._prefix(f"{name}_sum", labels) + _go_float(value.sum) + "\n")
