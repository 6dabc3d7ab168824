"""The example OpenTelemetry Collector configuration (deploy/otel-collector/config.yaml).

No Collector can run here, so this checks what can be checked offline: the pipelines only name
defined components, the OTLP receiver listens on the standard ports, both destinations are
wired, and the Prometheus pipeline renames every attribute the exporter sends back to its
/metrics label.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kvcache_exporter.sinks.otlp import OTLP_FAMILIES

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "otel-collector" / "config.yaml"


def load() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def test_pipelines_name_only_defined_components() -> None:
    config = load()
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"metrics/prometheus", "metrics/otlp"}
    for name, pipeline in pipelines.items():
        assert name.split("/")[0] == "metrics"
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{name}: {section} {component} undefined"
    used = {c for p in pipelines.values() for s in p.values() for c in s}
    for section in ("receivers", "processors", "exporters"):
        unused = set(config[section]) - used
        assert not unused, f"{section} defined but unused: {unused}"
    exporters = {e.split("/")[0] for p in pipelines.values() for e in p["exporters"]}
    assert exporters == {"prometheusremotewrite", "otlp", "debug"}


def test_otlp_receiver_listens_on_the_standard_ports() -> None:
    protocols = load()["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")


def test_prometheus_pipeline_renames_every_attribute_back_to_its_label() -> None:
    """Every (label, attribute) pair of the catalog has a `set(attributes[label], ...)` and a
    `delete_key(attributes, attribute)`; `error.type` only for the decode-error metric."""
    config = load()
    pipeline = config["service"]["pipelines"]["metrics/prometheus"]["processors"]
    assert pipeline.index("deltatocumulative") < pipeline.index("transform/prometheus-labels")
    (block,) = config["processors"]["transform/prometheus-labels"]["metric_statements"]
    assert block["context"] == "datapoint"
    statements: list[str] = block["statements"]
    pairs = {(label, attr) for inst in OTLP_FAMILIES for label, attr in inst.attributes}
    for label, attr in pairs:
        setter = f'set(attributes["{label}"], attributes["{attr}"])'
        deleter = f'delete_key(attributes, "{attr}")'
        assert any(s.startswith(setter) for s in statements), setter
        assert any(s.startswith(deleter) for s in statements), deleter
    scoped = [s for s in statements if "error.type" in s]
    decode_errors = next(
        i.otel_name for i in OTLP_FAMILIES if any(a == "error.type" for _, a in i.attributes)
    )
    assert scoped and all(s.endswith(f'where metric.name == "{decode_errors}"') for s in scoped)
    for statement in statements:  # the two OTTL shapes used, nothing mistyped
        assert re.fullmatch(
            r'(set\(attributes\["[a-z_]+"\], attributes\["[a-z._]+"\]\)'
            r'|delete_key\(attributes, "[a-z._]+"\))( where metric\.name == "[a-z._]+")?',
            statement,
        ), statement
