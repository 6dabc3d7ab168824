"""The page writer writes byte for byte what prometheus_client's encoders write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import Collector

from kvcache_exporter.catalog import FAMILIES, OTLP_EXPORTS, Type
from kvcache_exporter.sinks import textformat
from kvcache_exporter.sinks.prometheus import MetricsPage, metric_families
from kvcache_exporter.sinks.series import HistogramValue, Series, series
from kvcache_exporter.sinks.textformat import OPENMETRICS_EOF, PageWriter, TextFormat

from .test_sinks_prometheus import view_of_vector


class _Families(Collector):
    def __init__(self, current: Series) -> None:
        self._current = current

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._current)


def library_page(current: Series, fmt: TextFormat, escaping: str = UNDERSCORES) -> str:
    """What the library's encoders write for these series (without OpenMetrics' EOF)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(current))
    if fmt is TextFormat.TEXT:
        return generate_latest(registry, escaping=escaping).decode()
    return openmetrics_latest(registry, escaping=escaping).decode().removesuffix(OPENMETRICS_EOF)


def real_series() -> Series:
    views = [view_of_vector("vllm-0.33.0.jsonl"), view_of_vector("sglang-0.5.23.jsonl", "sg")]
    return series(views, {"success": 3, "failure": 1})


@pytest.mark.parametrize("fmt", list(TextFormat))
@pytest.mark.parametrize("escaping", [UNDERSCORES, ALLOWUTF8])
def test_real_engines_page_equals_the_library_encoders(fmt: TextFormat, escaping: str) -> None:
    current = real_series()
    assert sum(map(len, current.values())) > 100  # the vectors populate most families
    writer = PageWriter()
    first = writer.write(current, fmt)
    assert first == library_page(current, fmt, escaping)
    assert writer.write(current, fmt) == first  # from the cached strings


label_values = st.text(min_size=0, max_size=12)  # quotes, backslashes, newlines, any unicode
numbers = st.one_of(
    st.integers(min_value=0, max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e6, 1234567.0, 1e-7, 123456.5, 2.0**53]),
)


@st.composite
def any_series(draw: Any) -> Series:
    """Every family, each with a few series of arbitrary label values and values."""
    out: Series = {}
    bounds = tuple(sorted(draw(st.sets(st.floats(0.001, 1e7), min_size=1, max_size=4))))
    for family in FAMILIES:
        points: dict[Any, Any] = {}
        for _ in range(draw(st.integers(0, 3))):
            labels = tuple((name, draw(label_values)) for name in family.labels)
            if family.type is Type.HISTOGRAM:
                counts = tuple(draw(st.integers(0, 10**9)) for _ in range(len(bounds) + 1))
                points[labels] = HistogramValue(bounds, counts, draw(numbers))
            else:
                points[labels] = draw(numbers)
        out[family.name] = points
    return out


@given(current=any_series(), fmt=st.sampled_from(list(TextFormat)))
@settings(max_examples=150, deadline=None)
def test_any_labels_and_values_equal_the_library_encoders(current: Series, fmt: TextFormat) -> None:
    assert PageWriter().write(current, fmt) == library_page(current, fmt)


def test_the_cache_is_bounded_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(textformat, "CACHE_LIMIT", 10)
    current = real_series()
    writer = PageWriter()
    for _ in range(3):
        assert writer.write(current, TextFormat.TEXT) == library_page(current, TextFormat.TEXT)
        assert len(writer._prefixes) + len(writer._buckets) <= 10 + sum(
            len(points) * 3 for points in current.values()
        )
    writer.write({family.name: {} for family in FAMILIES}, TextFormat.TEXT)
    assert len(writer._prefixes) + len(writer._buckets) == 0  # cleared at the limit


def test_otlp_exports_family_only_while_otlp_is_on() -> None:
    views = [view_of_vector("vllm-0.33.0.jsonl")]
    off = PageWriter().write(series(views, None), TextFormat.TEXT)
    on = PageWriter().write(series(views, {"success": 1}), TextFormat.TEXT)
    assert OTLP_EXPORTS.removesuffix("_total") not in off
    assert f'{OTLP_EXPORTS}{{result="success"}} 1.0' in on


ACCEPT_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.mark.parametrize(
    ("accept", "fmt"),
    [
        (None, TextFormat.TEXT),
        ("text/plain", TextFormat.TEXT),
        ("text/plain;version=1.0.0;escaping=allow-utf-8", TextFormat.TEXT),
        (ACCEPT_OPENMETRICS, TextFormat.OPENMETRICS),
        ("application/openmetrics-text;version=1.0.0;escaping=underscores", TextFormat.OPENMETRICS),
    ],
)
def test_served_page_is_the_families_then_the_process_series(
    accept: str | None, fmt: TextFormat
) -> None:
    views = [view_of_vector("vllm-0.33.0.jsonl")]
    body, content_type = MetricsPage(lambda: views).exposition(accept)
    page = body.decode()
    families = library_page(series(views), fmt)
    assert page.startswith(families)
    rest = page[len(families) :]
    assert "process_cpu_seconds" in rest
    assert "python_info" in rest
    assert "kvcache_" not in rest
    if fmt is TextFormat.OPENMETRICS:
        assert content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert page.endswith(OPENMETRICS_EOF)
        assert page.count(OPENMETRICS_EOF) == 1
    else:
        assert content_type.startswith("text/plain")


def test_name_rewriting_escapings_are_the_library_encoders() -> None:
    """Escaping ``dots`` rewrites every underscore: the writer leaves that to the library."""
    views = [view_of_vector("vllm-0.33.0.jsonl")]
    body, content_type = MetricsPage(lambda: views).exposition(
        "application/openmetrics-text;version=1.0.0;escaping=dots"
    )
    assert "escaping=dots" in content_type
    assert "\nkvcache__events__total{" in body.decode()
    assert "process__cpu__seconds" in body.decode()
