"""The Prometheus rules of ``deploy/prometheus``: generated, valid, unit-tested, documented.

``promtool`` does the checking (``check rules``, ``check config``, ``test rules``); these tests
also make sure every alert has a unit test that fires it and one that keeps it silent, every
recording rule has a unit test, every metric the rules read is one the exporter serves, and
every alert has its runbook section.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "prometheus_rules.yaml"
ALERTS = RULES_DIR / "prometheus_alerts.yaml"
OPERATOR = RULES_DIR / "kube-prometheus" / "prometheusrule.yaml"
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.test.yaml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"


_CATALOG_ROW = re.compile(
    r"^\| `(kvcache_\w+)(?:\{[^`]*\})?` \| (counter|gauge|histogram) \|", re.MULTILINE
)


def served_metric_names() -> set[str]:
    """Every sample name ``docs/metrics.md`` documents as served on ``/metrics``: the catalog
    tables' families, histograms with their suffixes. Dashboards and rules may read only these
    (besides Prometheus' own series and recorded ones), so a renamed metric fails a test
    instead of leaving a panel empty."""
    names: set[str] = set()
    for name, kind in _CATALOG_ROW.findall(METRICS_DOC.read_text()):
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(name)
    return names


def load_generator() -> ModuleType:
    """``deploy/prometheus/generate.py`` (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "kvcache_rules_generate", RULES_DIR / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def groups(path: Path) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    return loaded


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in groups(path) for rule in group["rules"]]


def alert_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def expr_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("promql_expr_test", [])
    ]


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    generator = load_generator()
    rendered: dict[str, str] = generator.render()
    assert set(rendered) == {
        "prometheus_rules.yaml",
        "prometheus_alerts.yaml",
        "kube-prometheus/prometheusrule.yaml",
        "kube-prometheus/kustomization.yaml",
    }
    for name, text in rendered.items():
        assert (RULES_DIR / name).read_text() == text, f"{name} is stale: run {generator.__file__}"
    generator.main(["--out", str(tmp_path)])
    for name in rendered:
        assert (tmp_path / name).read_bytes() == (RULES_DIR / name).read_bytes()


def test_site_settings_reach_the_rules() -> None:
    generator = load_generator()
    config = generator.Config(
        job_selector='job="monitoring/vllm"', runbook_base="https://wiki.example/runbooks"
    )
    text = generator.render(config)["prometheus_alerts.yaml"]
    assert 'absent(up{job="monitoring/vllm"})' in text
    assert "runbook_url: https://wiki.example/runbooks#kvcachethrashing" in text


def test_promtool_checks_the_rules_and_the_example_config(promtool: str) -> None:
    for path in (RULES, ALERTS):
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [promtool, "check", "config", str(RULES_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS
    result = subprocess.run(
        [promtool, "test", "rules", *map(str, UNIT_TESTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_rule_holds_the_same_groups(promtool: str, tmp_path: Path) -> None:
    resource = yaml.safe_load(OPERATOR.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == groups(RULES) + groups(ALERTS)
    extracted = tmp_path / "operator.rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": resource["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_and_stays_silent_in_a_unit_test() -> None:
    cases = alert_tests()
    for rule in rules(ALERTS):
        name, severity = rule["alert"], rule["labels"]["severity"]
        fired = [
            expected["exp_labels"]
            for case in cases
            if case["alertname"] == name
            for expected in case.get("exp_alerts") or []
        ]
        assert any(labels.get("severity") == severity for labels in fired), (
            f"no unit test fires {name} at {severity}"
        )
        assert any(case["alertname"] == name and not case.get("exp_alerts") for case in cases), (
            f"no unit test keeps {name} silent"
        )


def test_every_recording_rule_has_a_unit_test() -> None:
    tested: dict[str, set[str]] = {}
    for case in expr_tests():
        for sample in case.get("exp_samples") or []:
            match = re.match(r"([\w:]+)\{(.*)\}", sample["labels"])
            assert match, sample
            quantile = re.search(r'quantile="([^"]+)"', match[2])
            tested.setdefault(match[1], set()).add(quantile[1] if quantile else "")
    for rule in rules(RULES):
        expected = rule.get("labels", {}).get("quantile", "")
        assert expected in tested.get(rule["record"], set()), (
            f"no unit test of {rule['record']} {rule.get('labels', '')}"
        )


def test_alert_conventions() -> None:
    generator = load_generator()
    anchors = {
        heading.strip().lower()
        for heading in re.findall(r"^## (\w+)\s*$", RUNBOOKS.read_text(), re.MULTILINE)
    }
    for rule in rules(ALERTS):
        name = rule["alert"]
        assert re.fullmatch(r"KVCache[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}
        assert annotations["summary"] and len(annotations["description"]) > 60
        assert annotations["runbook_url"] == f"{generator.Config.runbook_base}#{name.lower()}"
        assert name.lower() in anchors, f"docs/runbooks.md has no section '## {name}'"
    assert anchors >= {r["alert"].lower() for r in rules(ALERTS)}


def test_runbooks_have_a_section_per_alert_and_no_other() -> None:
    sections = re.findall(r"^## (KVCache\w+)\s*$", RUNBOOKS.read_text(), re.MULTILINE)
    names = sorted({rule["alert"] for rule in rules(ALERTS)})
    assert sorted(sections) == names
    for section in RUNBOOKS.read_text().split("\n## ")[1:]:
        if section.startswith("KVCache"):
            for part in ("**Meaning.**", "**Likely causes.**", "**Check.**", "**Change.**"):
                assert part in section, f"{section.splitlines()[0]}: no {part}"


def metric_names(expr: str) -> set[str]:
    """The exporter's metrics and the recorded series an expression reads: every identifier
    outside strings that starts with ``kvcache_`` or has a colon (no label or function does)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_strings)
    return {n for n in names if n.startswith("kvcache_") or ":" in n}


def test_rules_read_only_served_metrics_or_recorded_series() -> None:
    served = served_metric_names()
    recorded = {rule["record"] for rule in rules(RULES)}
    for rule in rules(RULES) + rules(ALERTS):
        for name in metric_names(rule["expr"]):
            assert name in served or name in recorded, (
                f"{rule.get('record') or rule.get('alert')} reads {name}, which /metrics does not "
                "serve (docs/metrics.md) and no rule records"
            )


def test_recording_rule_names_follow_the_convention() -> None:
    """``level:metric:operation``; the level is the pool (``engine_medium``), for quantiles
    only the KV-cache group (``engine_medium_group``), or a fleet pool's medium
    (``pool_medium``)."""
    for rule in rules(RULES):
        level, metric, operation = rule["record"].split(":")
        assert level in {"engine_medium", "engine_medium_group", "pool_medium"}, rule["record"]
        assert metric.startswith("kvcache_") and operation
        if level == "engine_medium_group":
            assert operation == "histogram_quantile5m", rule["record"]


_GROUPED_ROW = re.compile(
    r"^\| `(kvcache_\w+)\{([^}`]*)\}` \| (counter|gauge|histogram) \|", re.MULTILINE
)


def grouped_metric_names() -> set[str]:
    """Sample names of the families ``docs/metrics.md`` lists with a ``group`` label."""
    names: set[str] = set()
    for name, labels, kind in _GROUPED_ROW.findall(METRICS_DOC.read_text()):
        if "group" not in [label.strip() for label in labels.split(",")]:
            continue
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(name)
    return names


_SUM_GROUPS_AWAY = re.compile(r"sum without \(group(?:, \w+)*\) \((?:rate\()?$")


def test_pool_rules_sum_the_groups_away() -> None:
    """Every read of a family with a ``group`` label in an ``engine_medium:`` rule is wrapped
    in ``sum without (group …)``, so the result is one series per pool and vector matches with
    other pool-level series (``and``, ``/``) do not come out empty; ``engine_medium_group:``
    rules keep the group."""
    grouped = grouped_metric_names()
    assert {"kvcache_blocks_stored_total", "kvcache_block_lifetime_seconds_bucket"} <= grouped
    assert "kvcache_whatif_hits_total" not in grouped
    for rule in rules(RULES):
        level = rule["record"].split(":")[0]
        for match in re.finditer(r"\b(kvcache_\w+)", rule["expr"]):
            if match[1] not in grouped:
                continue
            wrapped = bool(_SUM_GROUPS_AWAY.search(rule["expr"][: match.start()]))
            if level == "engine_medium":
                assert wrapped, f"{rule['record']}: {match[1]} keeps its group: {rule['expr']}"
            else:
                assert not wrapped and "without (group" not in rule["expr"], rule["record"]


def test_every_histogram_has_quantiles_per_pool_and_per_group() -> None:
    recorded = {(r["record"], r["labels"]["quantile"]) for r in rules(RULES) if "labels" in r}
    generator = load_generator()
    for histogram in generator.HISTOGRAMS:
        for level in ("engine_medium", "engine_medium_group"):
            for q in generator.QUANTILES:
                assert (f"{level}:{histogram}:histogram_quantile5m", q) in recorded


def test_residency_is_judged_per_group_and_thrashing_per_pool() -> None:
    by_name = {rule["alert"]: rule for rule in rules(ALERTS)}
    collapse = by_name["KVCacheResidencyCollapse"]
    assert "engine_medium_group:kvcache_block_lifetime_seconds" in collapse["expr"]
    assert "engine_medium:" not in collapse["expr"]
    for text in collapse["annotations"].values():
        if "$labels" in text:
            assert "{{ $labels.group }}" in text
    for name in ("KVCacheThrashing", "KVCacheEvictionStorm"):
        assert "engine_medium_group:" not in by_name[name]["expr"]
        assert "$labels.group" not in str(by_name[name]["annotations"])


@pytest.mark.parametrize("path", [RULES, ALERTS], ids=["rules", "alerts"])
def test_groups_leave_the_interval_to_prometheus(path: Path) -> None:
    """No group interval: Prometheus' evaluation_interval (kube-prometheus: 30 s) applies."""
    assert all("interval" not in group for group in groups(path))
