"""The metric catalog, and everything that names a family held to it: the docs, the
dashboards, the Prometheus rules and the exposition itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.catalog import ATTRIBUTES, BY_NAME, FAMILIES, Instrument, Type

ROOT = Path(__file__).resolve().parent.parent
# A family name where it is a metric, not part of a recording rule's name (level:metric:ops).
NAME = re.compile(r"(?<![:\w])kvcache_[a-z_]*[a-z]")
SUFFIXES = ("_bucket", "_count", "_sum")


def test_families_are_well_formed() -> None:
    """Unique names; counters end in _total and are OTLP Counters; histograms have buckets;
    every label has an OTLP attribute; the OTLP names are unique too."""
    assert len(BY_NAME) == len(FAMILIES)
    otel = [f.otel_name for f in FAMILIES if f.otel_name is not None]
    assert len(set(otel)) == len(otel)
    for family in FAMILIES:
        assert re.fullmatch(r"kvcache_[a-z_]+", family.name), family.name
        assert family.name.endswith("_total") == (family.type is Type.COUNTER), family.name
        assert (family.buckets is not None) == (family.type is Type.HISTOGRAM), family.name
        if family.type is Type.COUNTER:
            assert family.instrument is Instrument.COUNTER, family.name
        for label in family.labels:
            # build info is no OTLP metric (its version is the resource's service.version)
            build_info = family.name == "kvcache_exporter_build_info"
            assert label in ATTRIBUTES or build_info, (family.name, label)
        assert family.help.endswith(".") and "\n" not in family.help, family.name


def catalog_name(token: str) -> str | None:
    """The family a name in a query or a doc stands for (a sample suffix stripped), or None."""
    for candidate in (token, *(token.removesuffix(s) for s in SUFFIXES if token.endswith(s))):
        if candidate in BY_NAME:
            return candidate
    return None


def named_in(path: Path) -> set[str]:
    return set(NAME.findall(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    "path",
    [
        *sorted((ROOT / "grafana" / "dashboards").glob("*.json")),
        *sorted((ROOT / "deploy" / "prometheus").glob("*.yaml")),
        *sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yaml")),
    ],
    ids=lambda p: p.name,
)
def test_dashboards_and_rules_name_only_catalog_families(path: Path) -> None:
    unknown = {token for token in named_in(path) if catalog_name(token) is None}
    assert not unknown, f"{path.name} names families the catalog does not have: {unknown}"


def test_docs_list_every_family_with_its_labels_and_type() -> None:
    """docs/metrics.md has a row per family — ``name{labels}`` in catalog order, and its
    type — and names no family the catalog lacks."""
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for family in FAMILIES:
        kind = "gauge" if family.type is Type.INFO else family.type.value
        row = f"| `{family.name}{{{','.join(family.labels)}}}` | {kind} |"
        assert row in docs, row
    # The exporter's own prefix, and the name the Collector's Prometheus translation gives
    # kvcache.exporter.collector.memory (the docs explain it), are not families.
    prose = {"kvcache_exporter", "kvcache_exporter_collector_memory_bytes"}
    unknown = {t for t in NAME.findall(docs) if catalog_name(t) is None} - prose
    assert not unknown, f"docs/metrics.md names families the catalog lacks: {unknown}"


def test_exposition_has_each_family_with_the_catalog_help() -> None:
    """Every family of /metrics is the catalog's, with its help and type."""
    from kvcache_exporter.sinks.prometheus import render

    from .test_sinks_prometheus import view_of_vector

    text = render([view_of_vector("vllm-0.33.0.jsonl")], {"success": 1, "failure": 0})
    families = {fam.name: fam for fam in text_string_to_metric_families(text)}
    for family in FAMILIES:
        parsed = families[family.name if family.type is Type.INFO else family.base_name]
        assert parsed.documentation == family.help, family.name
        assert parsed.type == ("gauge" if family.type is Type.INFO else family.type.value)
