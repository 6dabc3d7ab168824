"""The Grafana dashboards of ``grafana/``: generated from code, complete, and consistent with
what the exporter serves and the rules record.

The end-to-end test (``tests/e2e/test_dashboards_e2e.py``) runs every query against a real
Prometheus; these check the committed files themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_prometheus_rules import (
    RULES,
    grouped_metric_names,
    metric_names,
    rules,
    served_metric_names,
)

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DOCS = ROOT / "docs" / "dashboards.md"
PYPROJECT = ROOT / "pyproject.toml"

SDK_PIN = "grafana-foundation-sdk==1769699379!11.6.0"
SCHEMA_VERSION = 41
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval"}
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "ALERTS"}
UIDS = {"kvcache-overview", "kvcache-exporter-health"}


def require_sdk() -> None:
    """The generator needs the pinned SDK (the ``test`` extra). Missing is a skip on a
    developer machine but a failure in CI."""
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        message = f"{SDK_PIN} not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target, annotation and variable query."""
    found = [
        (f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels(dashboard) for t in p["targets"]
    ]
    found += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"]]
    found += [
        (f"variable {v['name']}", v["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    return found


@pytest.fixture(params=DASHBOARD_FILES, ids=[p.stem for p in DASHBOARD_FILES])
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return load(path)


# --- generated, byte for byte ------------------------------------------------------------------
def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    require_sdk()
    from grafana import generate

    rendered = generate.render()
    assert {f"dashboards/{p.name}" for p in DASHBOARD_FILES} == {
        name for name in rendered if name.startswith("dashboards/")
    }
    assert generate.main(["--out", str(tmp_path)]) == 0
    for name in rendered:
        assert (tmp_path / name).read_bytes() == (GRAFANA / name).read_bytes(), (
            f"grafana/{name} is stale: run python -m grafana.generate"
        )
    assert generate.main(["--check"]) == 0


def test_check_mode_finds_a_stale_file(tmp_path: Path) -> None:
    require_sdk()
    from grafana import generate

    assert generate.main(["--check", "--out", str(tmp_path)]) == 1
    generate.write(tmp_path)
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    path = tmp_path / "dashboards" / DASHBOARD_FILES[0].name
    path.write_text(path.read_text().replace('"title"', '"titel"', 1))
    assert generate.stale(tmp_path) == [f"dashboards/{path.name}"]


def test_the_sdk_is_pinned_to_a_current_schema() -> None:
    assert f'"{SDK_PIN}"' in PYPROJECT.read_text()
    for path in DASHBOARD_FILES:
        assert load(path)["schemaVersion"] == SCHEMA_VERSION


# --- every panel complete ----------------------------------------------------------------------
def test_dashboards_have_stable_unique_uids() -> None:
    assert {load(p)["uid"] for p in DASHBOARD_FILES} == UIDS


def test_every_panel_has_a_description_and_a_unit(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert len(panel.get("description", "")) >= 120, f"{panel['title']}: short description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"]["unit"], panel["title"]
            assert panel["options"]["cellValues"]["unit"], panel["title"]
            assert panel["options"]["calculate"] is False
            assert all(t.get("format") == "heatmap" for t in panel["targets"])


def test_panels_have_ids_titles_and_a_layout_without_overlap(dashboard: dict[str, Any]) -> None:
    every = dashboard["panels"]
    assert [p["id"] for p in every] == list(range(1, len(every) + 1))
    titles = [p["title"] for p in every]
    assert len(titles) == len(set(titles))
    cells: set[tuple[int, int]] = set()
    for panel in every:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    reference = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(dashboard):
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == reference for t in panel["targets"]), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == reference


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    expected = ["datasource", "job", "instance", "engine"]
    if dashboard["uid"] == "kvcache-overview":
        expected += ["medium", "group"]
    assert list(variables) == expected
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in expected[1:]:
        variable = variables[name]
        assert variable["multi"] and variable["includeAll"], name
        # "All" must send the values found, not ".*": scrape_duration_seconds and up exist for
        # every target of the Prometheus.
        assert "allValue" not in variable, name
        assert variable["current"]["value"] == ["$__all"]
        assert re.fullmatch(r"label_values\(.+, " + name + r"\)", variable["query"]), name


def test_queries_use_only_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | BUILTIN_VARIABLES
    for where, expr in expressions(dashboard):
        used = {a or b for a, b in re.findall(r"\$(?:\{(\w+)\}|(\w+))", expr)}
        assert used <= defined, f"{where}: undefined {used - defined}"


def test_panels_filter_by_the_variables(dashboard: dict[str, Any]) -> None:
    """Every exporter series a panel reads is narrowed to the selected job and instance (and
    engine and medium where the series has them)."""
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            if "ALERTS{" in expr:
                continue  # an absent exporter's alert has no job or instance to filter on
            selectors = re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)
            assert selectors, f"{panel['title']}: {expr}"
            for _, matchers in selectors:
                assert 'job=~"$job"' in matchers, f"{panel['title']}: {expr}"
                assert 'instance=~"$instance"' in matchers, f"{panel['title']}: {expr}"


SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}")
AGGREGATION = re.compile(r"\b(?:sum|min|max|avg|count|topk|bottomk|quantile)\b\s*(?:by|without|\()")


def has_group_label(name: str) -> bool:
    """Whether a series a panel reads carries the KV-cache ``group`` label: a block-level
    family of ``docs/metrics.md``, or a per-group recorded series (``engine_medium:`` rules
    sum the groups away)."""
    return name in grouped_metric_names() or name.startswith("engine_medium_group:")


def test_the_group_variable_filters_only_series_with_a_group() -> None:
    """Raw block-level series and per-group rules are narrowed to ``$group``; pool-level
    rules, what-if and adapter families, which have no ``group`` label, never are (a
    ``group=~"0"`` matcher would select nothing of them). A block-level series divided into a
    pool-level one (the what-if's share of stores) is the whole pool's, summed by engine and
    medium: the groups of a medium share the pool the what-if models."""
    dashboard = load(GRAFANA / "dashboards" / "kvcache-overview.json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["group"]["query"].startswith("label_values(kvcache_group_info{")
    filtered = unfiltered = pooled = 0
    for where, expr in expressions(dashboard):
        if where.startswith("variable"):
            continue
        selectors = SELECTOR.findall(expr)
        with_pool_level = any(
            not has_group_label(n) and n.startswith("kvcache_") for n, _ in selectors
        )
        for name, matchers in selectors:
            if not has_group_label(name):
                assert "group" not in matchers, f"{where}: {name} has no group label"
                unfiltered += 1
            elif 'group=~"$group"' in matchers:
                filtered += 1
            else:
                assert with_pool_level, f"{where}: {name} ignores $group"
                assert f"sum by (engine, medium) (rate({name}{{{matchers}}}" in expr, where
                pooled += 1
    assert filtered > 10 and unfiltered > 5 and pooled == 1


def test_legends_name_the_group_of_per_group_series(dashboard: dict[str, Any]) -> None:
    """A series that keeps its ``group`` (a raw block-level series, not aggregated, or one
    aggregated ``by`` the group) says which group it is in its legend."""
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            if target.get("format") in {"table", "heatmap"}:
                continue
            reads_groups = any(has_group_label(n) for n, _ in SELECTOR.findall(expr))
            keeps_group = re.search(r"\bby \([^)]*\bgroup\b", expr) or (
                reads_groups and not AGGREGATION.search(expr)
            )
            if keeps_group:
                assert "{{group}}" in target.get("legendFormat", ""), (
                    f"{panel['title']} [{target['refId']}]: legend without {{{{group}}}}"
                )


def test_every_series_is_served_or_recorded(dashboard: dict[str, Any]) -> None:
    served = served_metric_names()
    recorded = {rule["record"] for rule in rules(RULES)}
    for where, expr in expressions(dashboard):
        for name in metric_names(expr) | set(re.findall(r"\b(?:scrape_\w+)\b", expr)):
            assert name in served | recorded | PROMETHEUS_SERIES, (
                f"{where}: {name} is neither on /metrics (docs/metrics.md) nor recorded"
            )


def test_overview_uses_every_recorded_ratio_and_quantile() -> None:
    """The recording rules exist for the dashboards: each ratio and quantile is shown."""
    text = (GRAFANA / "dashboards" / "kvcache-overview.json").read_text()
    for rule in rules(RULES):
        if rule["record"].endswith(("ratio_rate5m", "histogram_quantile5m")):
            assert rule["record"] in text, rule["record"]


def test_issue_panels_are_there() -> None:
    overview = {p["title"] for p in panels(load(GRAFANA / "dashboards" / "kvcache-overview.json"))}
    health = {
        p["title"] for p in panels(load(GRAFANA / "dashboards" / "kvcache-exporter-health.json"))
    }
    assert {
        "Resident blocks by medium and engine",
        "Stores, removals and restores",
        "Restore ratio (recomputation)",
        "Hit rate",
        "Block lifetime p50 / p90 / p99",
        "Block lifetime distribution",
        "Idle before evict p50 / p90 / p99",
        "Idle before evict distribution",
        "Reuse gap p50 / p90 / p99",
        "Reuse gap distribution",
        "Restore gap p50 / p90 / p99",
        "Restore gap distribution",
        "Accesses before evict p50 / p90 / p99",
        "Exporter anomaly alerts",
        "Prometheus alerts firing",
        "Exporter alerts raised in the time range",
        "Trend direction",
        "Trend slope",
        "Groups: kind and sliding window",
        "Block lifetime per group",
        "Idle before evict per group",
        "Resident blocks and hashes per group",
        "Resident tokens per group",
        "Resident blocks by adapter",
        "Stores and restores by adapter",
        "Restore ratio by adapter",
    } <= overview
    assert {
        "Sources up",
        "Messages per second",
        "Decode errors by reason",
        "Sequence gaps",
        "Batches replayed and lost",
        "Event lag",
        "Scrape duration",
        "OTLP exports by result",
    } <= health


def test_docs_describe_every_panel() -> None:
    text = DOCS.read_text()
    for path in DASHBOARD_FILES:
        assert f"grafana/dashboards/{path.name}" in text
        for panel in panels(load(path)):
            assert panel["title"] in text, f"docs/dashboards.md does not mention '{panel['title']}'"


# --- provisioning --------------------------------------------------------------------------------
def test_provisioning_files() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/kvcache-exporter.yaml").read_text()
    )
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    kustomization = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(f"dashboards/{p.name}" for p in DASHBOARD_FILES)
    assert kustomization["generatorOptions"]["labels"] == {"grafana_dashboard": "1"}
