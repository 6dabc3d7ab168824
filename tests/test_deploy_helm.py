"""The Helm chart (deploy/helm/kvcache-exporter), linted and rendered offline.

``helm-python-sdk`` runs Helm's own Go code (lint, schema validation, rendering) without a helm
binary or a cluster. Every rendered variant goes through the same checks as the kustomize
manifests (``tests/test_deploy.py``): strict Kubernetes schemas, monitor schemas, flags parsed
by the exporter's CLI, engine/exporter pairing, wiring, hardening and memory. The chart's
defaults must describe the same deployment as the kustomize base and overlays.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from kvcache_exporter.config import load

from .test_deploy import (
    REPO,
    check_render,
    engine_containers,
    exporter_config,
    exporter_containers,
    find,
    k8s_versions,
    kustomize,
    parse_documents,
    validate_all,
)

CHART = REPO / "deploy" / "helm" / "kvcache-exporter"

# Value sets rendered and checked, and the kustomization each corresponds to (if any).
VALUE_SETS: dict[str, tuple[dict[str, Any], str | None]] = {
    "default": ({}, "base"),
    "classic-sidecar": ({"nativeSidecar": False}, "overlays/classic-sidecar"),
    "readyz-gate": ({"readinessProbePath": "/readyz"}, "overlays/readyz-gate"),
    "servicemonitor": (
        {"podMonitor": {"enabled": False}, "serviceMonitor": {"enabled": True}},
        "overlays/servicemonitor",
    ),
    "daemonset": ({"mode": "daemonset"}, "overlays/daemonset"),
    "otlp": (
        {
            "otlp": {
                "endpoint": "http://otel-collector.observability:4317",
                "headersSecret": {"name": "otlp-auth"},
                "resourceAttributes": {"deployment.environment": "production"},
            },
            "sampleRatio": 0.25,
            "log": {"format": "json"},
            "podMonitor": {"labels": {"release": "kube-prometheus-stack"}},
        },
        None,
    ),
    "daemonset-otlp-servicemonitor": (
        {
            "mode": "daemonset",
            "daemonset": {"slots": 4, "basePort": 6000},
            "otlp": {"endpoint": "http://otel-collector:4318", "protocol": "http/protobuf"},
            "podMonitor": {"enabled": False},
            "serviceMonitor": {"enabled": True},
        },
        None,
    ),
    "web-config-tls-basic-auth": (
        {
            "webConfig": {
                "secretName": "kvcache-exporter-web",
                "tls": True,
                "authRequired": True,
                "scrape": {
                    "tlsConfig": {
                        "ca": {"secret": {"name": "kvcache-exporter-web", "key": "ca.crt"}},
                        "serverName": "kvcache-exporter",
                    },
                    "basicAuth": {
                        "username": {"name": "kvcache-scrape", "key": "username"},
                        "password": {"name": "kvcache-scrape", "key": "password"},
                    },
                },
            },
        },
        None,
    ),
    "daemonset-web-config-tls": (
        {
            "mode": "daemonset",
            "webConfig": {
                "secretName": "kvcache-exporter-web",
                "tls": True,
                "scrape": {"tlsConfig": {"insecureSkipVerify": True}},
            },
        },
        None,
    ),
    "sglang": (
        {
            "engine": {
                "name": "sglang",
                "image": "lmsysorg/sglang:v0.5.23",
                "command": ["python3", "-m", "sglang.launch_server"],
                "args": ["--model-path", "Qwen/Qwen2.5-1.5B-Instruct", "--port", "8000"],
                "kvEventsConfig": {"publisher": "zmq", "enable_kv_cache_events": True},
                "eventsPort": 5600,
                "replayPort": 5700,
            },
        },
        None,
    ),
}


def render(values: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The chart's manifests for these values (release "demo" in namespace "llm")."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values, name="demo", namespace="llm")
    text = "\n---\n".join(v for k, v in sorted(out.items()) if k.endswith((".yaml", ".yml")))
    return parse_documents(text)


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_clean(name: str, version: str) -> None:
    """`helm lint --strict` (schema, templates, YAML): nothing above info level."""
    report = helm.lint(CHART, VALUE_SETS[name][0], strict=True, kube_version=f"v{version}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_renders_valid_manifests(name: str, version: str) -> None:
    validate_all(render(VALUE_SETS[name][0]), version)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_renders_consistent_manifests(name: str) -> None:
    """Flags parse with the real CLI, engines pair with exporters, wiring, hardening, memory."""
    check_render(render(VALUE_SETS[name][0]))


def _exporter_setup(docs: Any) -> list[Any]:
    """What must not differ between chart and kustomize: the exporter's parsed configuration,
    where it runs, its probes, resources and security; the engine's event configuration."""
    setups = []
    for workload, container in exporter_containers(docs):
        pod = workload["spec"]["template"]["spec"]
        setups.append(
            {
                "kind": workload["kind"],
                "native": container in pod.get("initContainers", []),
                "config": exporter_config(container),
                **{
                    key: container.get(key)
                    for key in (
                        "ports",
                        "startupProbe",
                        "livenessProbe",
                        "readinessProbe",
                        "resources",
                        "securityContext",
                        "restartPolicy",
                    )
                },
                "pod_security": pod.get("securityContext"),
            }
        )
    for workload, engine, events in engine_containers(docs):
        endpoint = events["endpoint"].replace("demo-kvcache-exporter-events", "SERVICE")
        setups.append(
            {
                "engine": engine["image"],
                "events": {
                    **events,
                    "endpoint": endpoint.replace("kvcache-exporter-events", "SERVICE"),
                },
                "resources": engine["resources"],
                "affinity": workload["spec"]["template"]["spec"].get("affinity") is not None,
            }
        )
    return setups


@pytest.mark.parametrize(
    "name", [n for n, (_, variant) in VALUE_SETS.items() if variant is not None]
)
def test_chart_matches_the_kustomize_manifests(name: str) -> None:
    values, variant = VALUE_SETS[name]
    assert variant is not None
    chart, manifests = render(values), kustomize(variant)
    assert _exporter_setup(chart) == _exporter_setup(manifests)
    kinds = sorted(d["kind"] for d in chart)
    assert sorted({*kinds}) == sorted({d["kind"] for d in manifests})
    for kind in ("PodMonitor", "ServiceMonitor"):
        ours, theirs = find(chart, kind), find(manifests, kind)
        assert [m["spec"].get("podMetricsEndpoints", m["spec"].get("endpoints")) for m in ours] == [
            m["spec"].get("podMetricsEndpoints", m["spec"].get("endpoints")) for m in theirs
        ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}, "choose one"),
        ({"mode": "daemonset", "readinessProbePath": "/readyz"}, "daemonset"),
        ({"engine": {"enabled": False}}, "mode sidecar needs engine.enabled"),
        ({"mode": "dset"}, "/mode"),
        ({"sampleRatio": 2}, "/sampleRatio"),
        ({"otlp": {"protocol": "http/json"}}, "/otlp/protocol"),
        ({"sources": [{"name": "a", "endpoint": "http://x:1"}]}, "/sources/0/endpoint"),
        ({"samplerate": 0.5}, "samplerate"),
        ({"webConfig": {"tls": True}}, "set it"),
        ({"webConfig": {"secretName": "w", "tls": True}}, "scrape.tlsConfig"),
        ({"webConfig": {"secretName": "w", "authRequired": True}}, "credentials"),
        (
            {
                "webConfig": {
                    "secretName": "w",
                    "authRequired": True,
                    "scrape": {"basicAuth": {"username": {"name": "s", "key": "u"}}},
                },
                "readinessProbePath": "/readyz",
            },
            "TCP checks",
        ),
    ],
)
def test_chart_refuses_what_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message.replace("/", ".")):
        render(values)


@pytest.mark.parametrize("name", ["web-config-tls-basic-auth", "daemonset-web-config-tls"])
def test_web_config_reaches_probes_and_monitors(name: str) -> None:
    """The Secret is mounted where --web.config.file points; probes speak HTTPS, or check TCP
    where credentials are required; the monitors scrape with the configured TLS and auth."""
    values = VALUE_SETS[name][0]
    web = values["webConfig"]
    docs = render(values)
    for workload, container in exporter_containers(docs):
        (flag,) = [a for a in container["args"] if a.startswith("--web.config.file=")]
        path = flag.split("=", 1)[1]
        (mount,) = container["volumeMounts"]
        assert path == f"{mount['mountPath']}/web-config.yml"
        pod = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == web["secretName"]
        for other in pod.get("containers", []) + pod.get("initContainers", []):
            if other is not container:
                assert mount["name"] not in {m["name"] for m in other.get("volumeMounts", [])}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]
            if web.get("authRequired"):
                assert set(probe) & {"tcpSocket", "httpGet"} == {"tcpSocket"}
            else:
                assert probe["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = find(docs, "PodMonitor") + find(docs, "ServiceMonitor")
    key = "podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"
    (endpoint,) = monitor["spec"][key]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == web["scrape"]["tlsConfig"]
    assert endpoint.get("basicAuth") == web["scrape"].get("basicAuth")


def test_web_config_standin_is_what_the_exporter_accepts() -> None:
    """The manifests' --web.config.file is parsed with a stand-in file (the Secret's content is
    not in the manifest): it must be a file the exporter takes, so that the flag check runs."""
    from .test_deploy import web_config_standin

    config = load([f"--web.config.file={web_config_standin()}"], environ={})
    assert config.web is not None and config.web.basic_auth is not None
