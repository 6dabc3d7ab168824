"""The shipped deployment: Kubernetes manifests (kustomize), the Dockerfile, offline.

No cluster, no image build and no network peer are available, so this checks what can be checked
without them, with the real tools where they exist:

- ``kubectl kustomize`` builds the base and every overlay (the otlp overlay, which mounts
  ``deploy/otel-collector/config.yaml``, with ``--load-restrictor LoadRestrictionsNone``);
- every built-in resource passes ``kubernetes-validate --strict`` for the oldest Kubernetes the
  native sidecar needs (1.29), 1.31 and the newest the validator knows; the Prometheus Operator
  monitors pass a schema written here from the operator's CRD for the fields they may use;
- the exporter's flags in every manifest and in the image's ``CMD`` parse with the exporter's own
  ``config.load``, and each engine's event endpoint pairs with an exporter source (one binds, the
  other connects, same port);
- Services, monitors, probes and NetworkPolicies point at ports and pods that exist;
- the exporter runs hardened, with resources that cover its bounded state;
- ``hadolint`` passes the Dockerfile, and the image's install commands, run as written, produce a
  working install that writes no file while it serves.

The Helm chart is checked in ``tests/test_deploy_helm.py`` with the same functions.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from kvcache_exporter import __version__
from kvcache_exporter.config import ConfigError, ExporterConfig, load
from kvcache_exporter.config.options import ENV_PREFIX, OPTIONS
from kvcache_exporter.sources.spec import SourceSpec

from .conftest import free_port

REPO = Path(__file__).resolve().parent.parent
KUSTOMIZE_ROOT = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COLLECTOR_CONFIG = REPO / "deploy" / "otel-collector" / "config.yaml"

EXPORTER_IMAGE = "kvcache-exporter"
METRICS_PORT_NAME = "kvcache-metrics"
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
MONITOR_KINDS = ("PodMonitor", "ServiceMonitor")

# Every kustomization shipped, and whether it needs files outside its folder.
VARIANTS: dict[str, bool] = {
    "base": False,
    "overlays/classic-sidecar": False,
    "overlays/readyz-gate": False,
    "overlays/servicemonitor": False,
    "overlays/daemonset": False,
    "overlays/otlp": True,
}
SIDECAR_VARIANTS = [v for v in VARIANTS if v != "overlays/daemonset"]


# --- tools -------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """A command-line tool from the test extra (installed next to this interpreter). Missing is
    a skip on a developer machine but a failure in CI, where `.[test]` installs it."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        message = f"{name} not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def k8s_versions() -> list[str]:
    """1.29 (native sidecars on by default), 1.31, and the newest the validator knows."""
    newest = kubernetes_validate.major_minor(kubernetes_validate.latest_version())
    return sorted({"1.29", "1.31", newest}, key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# --- rendering ---------------------------------------------------------------------------------
def parse_documents(text: str) -> tuple[dict[str, Any], ...]:
    """The non-empty YAML documents of a stream."""
    return tuple(doc for doc in yaml.safe_load_all(text) if doc)


@functools.cache
def kustomize(variant: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of one shipped kustomization (cached: the output is read-only)."""
    command = [tool("kubectl"), "kustomize", str(KUSTOMIZE_ROOT / variant)]
    if VARIANTS[variant]:
        command[2:2] = ["--load-restrictor", "LoadRestrictionsNone"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {variant}: {result.stderr}"
    return parse_documents(result.stdout)


def find(docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> list[Any]:
    """Resources of ``kind`` (and ``name``) in a render."""
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def workloads(docs: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def containers(pod_spec: Mapping[str, Any]) -> list[Any]:
    """Init containers (native sidecars among them) and containers of a pod spec."""
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def image_name(image: str) -> str:
    """``registry/path/name:tag@digest`` -> ``name``."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def exporter_containers(docs: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any]]:
    """(workload, container) for every kvcache-exporter container in a render."""
    return [
        (w, c)
        for w in workloads(docs)
        for c in containers(w["spec"]["template"]["spec"])
        if image_name(c["image"]) == EXPORTER_IMAGE
    ]


# --- the exporter's command line ----------------------------------------------------------------
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's variables as the exporter would see them. Downward-API fields get a
    stand-in value; values from Secrets or ConfigMaps are the user's and are left out, but
    their names must be variables the exporter reads."""
    known = {opt.env for opt in OPTIONS} | {ENV_PREFIX + "SOURCE", ENV_PREFIX + "CONFIG_FILE"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if name.startswith(ENV_PREFIX):
            assert name in known, f"{container['name']}: the exporter does not read {name}"
        if "value" in item:
            env[name] = _VAR_REF.sub(lambda m: env.get(m[1], m[0]), item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[name] = f"<{name}>"
    return env


def exporter_argv(container: Mapping[str, Any]) -> list[str]:
    """The arguments the image's ENTRYPOINT (``kvcache-exporter``) receives, with Kubernetes'
    ``$(VAR)`` references expanded as the kubelet does."""
    assert container.get("command") in (None, ["kvcache-exporter"]), container.get("command")
    env = container_env(container)
    return [_VAR_REF.sub(lambda m: env.get(m[1], m[0]), arg) for arg in container.get("args", [])]


@functools.cache
def web_config_standin() -> str:
    """A valid web config file (basic auth) standing in for one mounted from a Secret, whose
    content a manifest does not show."""
    import bcrypt  # a dependency of the exporter's --web.config.file support

    folder = Path(tempfile.mkdtemp(prefix="kvcache-web-config-"))
    atexit.register(shutil.rmtree, folder, True)
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
    (folder / "web-config.yml").write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    return str(folder / "web-config.yml")


def mounted_web_config(container: Mapping[str, Any], path: str) -> None:
    """``--web.config.file`` must name a file in a read-only volume of the container."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"--web.config.file {path} is not in a mounted volume"
    assert mounts[0].get("readOnly") is True


def exporter_config(container: Mapping[str, Any]) -> ExporterConfig:
    """Parse a manifest's exporter flags and environment with the exporter's real CLI loader.
    A ``--web.config.file`` must be mounted; a valid stand-in replaces its unseen content."""
    argv = exporter_argv(container)
    for i, arg in enumerate(argv):
        if arg.startswith("--web.config.file="):
            mounted_web_config(container, arg.split("=", 1)[1])
            argv[i] = f"--web.config.file={web_config_standin()}"
    try:
        return load(argv, environ=container_env(container))
    except ConfigError as exc:
        pytest.fail(f"{container['name']}: kvcache-exporter refuses {argv}: {exc}")


def listen_port(config: ExporterConfig) -> int:
    return int(config.listen_address.rsplit(":", 1)[1])


def tcp_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def tcp_host(endpoint: str) -> str:
    return endpoint[len("tcp://") :].rsplit(":", 1)[0]


# --- engines -----------------------------------------------------------------------------------
def kv_events_config(container: Mapping[str, Any]) -> dict[str, Any] | None:
    """vLLM's / SGLang's ``--kv-events-config`` JSON from a container's args, if any."""
    args = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(args):
        if arg == "--kv-events-config":
            value: dict[str, Any] = json.loads(args[i + 1])
            return value
        if arg.startswith("--kv-events-config="):
            value = json.loads(arg.split("=", 1)[1])
            return value
    return None


def engine_binds(endpoint: str) -> bool:
    """The engines' own rule (vLLM and SGLang ``ZmqEventPublisher``): a substring test, so
    ``tcp://*:5557`` binds and ``tcp://0.0.0.0:5557`` connects."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def engine_containers(docs: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any, dict[str, Any]]]:
    """(workload, container, kv-events config) for every engine publishing KV events."""
    found = []
    for w in workloads(docs):
        for c in containers(w["spec"]["template"]["spec"]):
            events = kv_events_config(c)
            if events is not None:
                found.append((w, c, events))
    return found


# --- selectors and ports -----------------------------------------------------------------------
def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels / matchExpressions, or a Service's plain map)."""
    if not selector:
        return False  # an empty selector would select everything: never what a manifest means
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pods_selected(docs: Sequence[Mapping[str, Any]], selector: Mapping[str, Any]) -> list[Any]:
    """Workloads whose pod template labels the selector matches."""
    return [
        w
        for w in workloads(docs)
        if selector_matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def container_ports(workload: Mapping[str, Any]) -> list[Any]:
    return [p for c in containers(workload["spec"]["template"]["spec"]) for p in c.get("ports", [])]


def resolve_port(workload: Mapping[str, Any], port: int | str) -> int | None:
    """A container port of the workload's pods, by number or name; None if it has none such."""
    for p in container_ports(workload):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    return None


def check_wiring(docs: Sequence[Mapping[str, Any]]) -> None:
    """Services, monitors and probes point at pods and ports that exist."""
    for svc in find(docs, "Service"):
        selected = pods_selected(docs, svc["spec"]["selector"])
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for w in selected:
                target = port.get("targetPort", port["port"])
                assert resolve_port(w, target) is not None, (
                    f"Service {svc['metadata']['name']} port {port['name']}: {w['kind']} "
                    f"{w['metadata']['name']} has no container port {target}"
                )
    for mon in find(docs, "PodMonitor"):
        selected = pods_selected(docs, mon["spec"]["selector"])
        assert selected, f"PodMonitor {mon['metadata']['name']} selects no pod"
        for endpoint in mon["spec"]["podMetricsEndpoints"]:
            for w in selected:
                names = {p.get("name") for p in container_ports(w)}
                assert endpoint["port"] in names, f"PodMonitor port {endpoint['port']} not in {w}"
    for mon in find(docs, "ServiceMonitor"):
        services = [
            s
            for s in find(docs, "Service")
            if selector_matches(mon["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        assert services, f"ServiceMonitor {mon['metadata']['name']} selects no Service"
        for endpoint in mon["spec"]["endpoints"]:
            assert any(
                endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services
            )
    for w in workloads(docs):
        for c in containers(w["spec"]["template"]["spec"]):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                assert action is not None, f"{c['name']} {kind}: httpGet or tcpSocket expected"
                own = {p.get("name") for p in c.get("ports", [])} | {
                    p["containerPort"] for p in c.get("ports", [])
                }
                assert action["port"] in own, f"{c['name']} {kind} probes a port it lacks"


def _policy_admits_port(rule: Mapping[str, Any], port: int, workload: Mapping[str, Any]) -> bool:
    if "ports" not in rule:
        return True
    for p in rule["ports"]:
        number = p.get("port")
        if number is None:
            return True
        if isinstance(number, str):
            number = resolve_port(workload, number)
        if number is not None and number <= port <= p.get("endPort", number):
            return True
    return False


def admitting_rules(
    docs: Sequence[Mapping[str, Any]], workload: Mapping[str, Any], port: int
) -> list[Any] | None:
    """The ingress rules admitting ``port`` of the workload's pods, or None when no
    NetworkPolicy selects them (all traffic allowed)."""
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    policies = [
        p
        for p in find(docs, "NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return None
    return [
        rule
        for p in policies
        for rule in p["spec"].get("ingress", [])
        if _policy_admits_port(rule, port, workload)
    ]


# --- Prometheus Operator monitors ---------------------------------------------------------------
# A schema for the fields a PodMonitor / ServiceMonitor of this project may use, written from the
# monitoring.coreos.com/v1 CRDs (prometheus-operator): the same names, types, patterns and
# required fields; unknown fields are refused, as `kubectl apply` with the CRD installed would
# (strict field validation). Fields not listed here are not used by these manifests.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": _STRINGS,
                },
            },
        },
    },
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {
            "enum": [
                *("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep"),
                *("lowercase", "uppercase", "keepequal", "dropequal"),
                *("Replace", "Keep", "Drop", "HashMod", "LabelMap", "LabelDrop", "LabelKeep"),
                *("Lowercase", "Uppercase", "KeepEqual", "DropEqual"),
            ]
        },
        "modulus": {"type": "integer"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": _STRINGS,
        "targetLabel": {"type": "string"},
    },
}
_SECRET_KEY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["key"],
    "properties": {
        "name": {"type": "string"},
        "key": {"type": "string"},
        "optional": {"type": "boolean"},
    },
}
_SECRET_OR_CONFIGMAP = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"secret": _SECRET_KEY, "configMap": _SECRET_KEY},
}
_TLS_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ca": _SECRET_OR_CONFIGMAP,
        "cert": _SECRET_OR_CONFIGMAP,
        "keySecret": _SECRET_KEY,
        "serverName": {"type": "string"},
        "insecureSkipVerify": {"type": "boolean"},
        "minVersion": {"enum": ["TLS10", "TLS11", "TLS12", "TLS13"]},
        "maxVersion": {"enum": ["TLS10", "TLS11", "TLS12", "TLS13"]},
    },
}
_BASIC_AUTH = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"username": _SECRET_KEY, "password": _SECRET_KEY},
}
_ENDPOINT_FIELDS = {
    "tlsConfig": _TLS_CONFIG,
    "basicAuth": _BASIC_AUTH,
    "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "params": {"type": "object", "additionalProperties": _STRINGS},
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
    "enableHttp2": {"type": "boolean"},
    "followRedirects": {"type": "boolean"},
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": _STRINGS},
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_COMMON_SPEC = {
    "selector": _LABEL_SELECTOR,
    "namespaceSelector": _NAMESPACE_SELECTOR,
    "jobLabel": {"type": "string"},
    "podTargetLabels": _STRINGS,
    "sampleLimit": {"type": "integer", "minimum": 0},
    "targetLimit": {"type": "integer", "minimum": 0},
}


def _monitor_schema(kind: str, endpoints_key: str, endpoint_extra: dict[str, Any]) -> Any:
    spec_extra: dict[str, Any] = {"targetLabels": _STRINGS} if kind == "ServiceMonitor" else {}
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", endpoints_key],  # the CRD requires selector only
                "additionalProperties": False,
                "properties": {
                    **_COMMON_SPEC,
                    **spec_extra,
                    endpoints_key: {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {**_ENDPOINT_FIELDS, **endpoint_extra},
                        },
                    },
                },
            },
        },
    }


_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": {"type": "integer"},
                            "labels": {"type": "object"},
                            "partial_response_strategy": {"type": "string"},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}

MONITOR_SCHEMAS: dict[str, Any] = {
    "PodMonitor": _monitor_schema(
        "PodMonitor",
        "podMetricsEndpoints",
        {
            "port": {"type": "string"},
            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
        },
    ),
    "ServiceMonitor": _monitor_schema(
        "ServiceMonitor",
        "endpoints",
        {"port": {"type": "string"}, "targetPort": {"type": ["integer", "string"]}},
    ),
}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|y|w|d|h|m|s)", duration))


def check_monitor(doc: Mapping[str, Any]) -> None:
    """Schema, plus what the operator refuses beyond it: a scrape timeout longer than the
    interval."""
    jsonschema.validate(doc, MONITOR_SCHEMAS[doc["kind"]])
    key = "podMetricsEndpoints" if doc["kind"] == "PodMonitor" else "endpoints"
    for endpoint in doc["spec"][key]:
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def validate_all(docs: Sequence[Mapping[str, Any]], version: str) -> None:
    """Every resource against its schema: built-in kinds with kubernetes-validate --strict,
    the monitors with the schema above. Any other kind is an error, never a silent skip."""
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in MONITOR_KINDS:
            check_monitor(doc)
            continue
        if doc["kind"] == "PrometheusRule":
            jsonschema.validate(doc, PROMETHEUS_RULE_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(dict(doc), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} invalid for Kubernetes {version}: {exc.message} at {exc.path}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {doc['apiVersion']} in Kubernetes {version}")


# --- hardening and sizing ----------------------------------------------------------------------
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1,
    "m": 0.001,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    match = _QUANTITY.match(str(value))
    assert match, f"unreadable quantity {value!r}"
    return float(match[1]) * _FACTORS[match[2]]


def check_hardened(workload: Mapping[str, Any], container: Mapping[str, Any]) -> None:
    """Non-root numeric user, no privilege escalation, read-only root, no capabilities,
    RuntimeDefault seccomp, no API token, requests and limits for CPU and memory."""
    pod = workload["spec"]["template"]["spec"]
    sc = container.get("securityContext", {})
    where = f"{workload['kind']}/{workload['metadata']['name']} {container['name']}"
    assert sc.get("runAsNonRoot") is True, where
    assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("privileged", False) is False, where
    assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
    assert not sc.get("capabilities", {}).get("add"), where
    seccomp = sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}, where
    assert pod.get("automountServiceAccountToken") is False, where
    assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
    resources = container.get("resources", {})
    for key in ("cpu", "memory"):
        request = resources.get("requests", {}).get(key)
        limit = resources.get("limits", {}).get(key)
        assert request is not None and limit is not None, f"{where}: {key} request and limit"
        assert quantity(request) <= quantity(limit), f"{where}: {key} request above limit"


# Memory the exporter may reach, from docs/performance.md (bench/ingest.py, bench/table_memory.py)
# and a measurement of the idle process (docs/deployment.md, "Resources"): the blocks hash table
# holds resident blocks and remembered removals (one slot per distinct removed key, no queue of
# removals), 37 B a slot at load 0.78-0.85, and while it grows the old table (about 44 B an
# entry) lives beside the new (about 48 B an entry) and the rebuild's index arrays (about 24 B an
# entry): 160 B an entry is kept as the bound.
IDLE_BYTES = 45 * 2**20
TABLE_PEAK_BYTES_PER_ENTRY = 160


def worst_case_memory(config: ExporterConfig) -> float:
    """The most the exporter's state can take with these flags, every engine at its bounds."""
    entries = config.collector.max_tracked_blocks + config.collector.removed_memory
    return IDLE_BYTES + len(config.sources) * entries * TABLE_PEAK_BYTES_PER_ENTRY


def check_exporter_container(
    docs: Sequence[Mapping[str, Any]], workload: Mapping[str, Any], container: Mapping[str, Any]
) -> ExporterConfig:
    """Flags parse; port, probes and memory agree with them; hardened. Returns the config."""
    config = exporter_config(container)
    check_hardened(workload, container)
    port = listen_port(config)
    named = [p for p in container["ports"] if p.get("name") == METRICS_PORT_NAME]
    assert [p["containerPort"] for p in named] == [port], "metrics port != --web.listen-address"
    assert config.telemetry_path == "/metrics"
    secured = any(a.startswith("--web.config.file=") for a in exporter_argv(container))
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert kind in container, f"{container['name']}: no {kind}"
        if "tcpSocket" in container[kind]:
            # Only where a web config may demand credentials the kubelet cannot give.
            assert secured, f"{kind}: a TCP check where /healthz could be asked"
            assert container[kind]["tcpSocket"]["port"] in (METRICS_PORT_NAME, port)
            continue
        get = container[kind]["httpGet"]
        assert get["port"] in (METRICS_PORT_NAME, port)
        assert get["path"] in ("/healthz", "/readyz")
        assert get.get("scheme", "HTTP") == "HTTP" or secured
    # /readyz waits for the engine, which a native sidecar's startup holds back: a deadlock.
    for kind in ("startupProbe", "livenessProbe"):
        assert container[kind].get("httpGet", {"path": "/healthz"})["path"] == "/healthz"
    limit = quantity(container["resources"]["limits"]["memory"])
    assert worst_case_memory(config) <= limit, (
        f"{container['name']}: up to {worst_case_memory(config) / 2**20:.0f} MiB with these "
        f"flags, limit {limit / 2**20:.0f} MiB"
    )
    rules = admitting_rules(docs, workload, port)
    assert rules is not None, "no NetworkPolicy guards the metrics port"
    assert rules, "the NetworkPolicy admits nobody to the metrics port"
    for rule in rules:
        assert rule.get("from"), "the metrics port is open to every peer"
    return config


def check_pairing(docs: Sequence[Mapping[str, Any]]) -> None:
    """Every engine's event endpoint meets an exporter source: one side binds, the other
    connects to the same port (over loopback in the pod, or through a node-local Service)."""
    engines = engine_containers(docs)
    assert engines, "no engine publishes KV events"
    for workload, _engine, events in engines:
        endpoint = events["endpoint"]
        assert events.get("enable_kv_cache_events") is True and events.get("publisher") == "zmq"
        pod = workload["spec"]["template"]["spec"]
        sidecars = [c for c in containers(pod) if image_name(c["image"]) == EXPORTER_IMAGE]
        if engine_binds(endpoint):
            # Same pod: the exporter connects to the engine's ports over loopback.
            assert endpoint.startswith("tcp://*:"), "an engine in a pod binds tcp://*:PORT"
            (sidecar,) = sidecars
            sources = exporter_config(sidecar).sources
            wanted = [s for s in sources if tcp_port(s.endpoint) == tcp_port(endpoint)]
            assert len(wanted) == 1, f"no source for the engine's port in {sources}"
            (source,) = wanted
            assert not source.binds and tcp_host(source.endpoint) in ("127.0.0.1", "localhost")
            if "replay_endpoint" in events:
                assert engine_binds(events["replay_endpoint"])  # vLLM always binds it
                assert source.replay is not None
                assert tcp_port(source.replay) == tcp_port(events["replay_endpoint"])
                assert tcp_port(source.replay) != tcp_port(source.endpoint)
        else:
            # The engine connects out: to a Service in front of exporters that bind that port.
            assert not sidecars, "an engine that connects out has no sidecar to connect to"
            host, port = tcp_host(endpoint), tcp_port(endpoint)
            (svc,) = find(docs, "Service", host)
            local = svc["spec"].get("internalTrafficPolicy") == "Local"
            assert local, "engines must reach the exporter on their own node"
            (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
            targets = pods_selected(docs, svc["spec"]["selector"])
            assert targets
            for target in targets:
                target_port = resolve_port(target, svc_port.get("targetPort", port))
                (exporter,) = [
                    c
                    for c in containers(target["spec"]["template"]["spec"])
                    if image_name(c["image"]) == EXPORTER_IMAGE
                ]
                bound = [s for s in exporter_config(exporter).sources if s.binds]
                assert target_port in {tcp_port(s.endpoint) for s in bound}
                rules = admitting_rules(docs, target, target_port or 0)
                assert rules, "the exporter's event port admits nobody"
                labels = workload["spec"]["template"]["metadata"]["labels"]
                for rule in rules:
                    peers = rule.get("from", [])
                    assert peers and all(
                        "podSelector" in peer and selector_matches(peer["podSelector"], labels)
                        for peer in peers
                    ), "the event ports admit only the engines"


def check_render(docs: Sequence[Mapping[str, Any]]) -> list[ExporterConfig]:
    """Everything above that does not depend on the variant."""
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate resources"
    check_wiring(docs)
    check_pairing(docs)
    found = exporter_containers(docs)
    assert found, "no kvcache-exporter container"
    configs = [check_exporter_container(docs, w, c) for w, c in found]
    engine_pods = [w for w, _, _ in engine_containers(docs)]
    for w in engine_pods:
        rules = admitting_rules(docs, w, 5557)
        events = [c for _, c, e in engine_containers([w]) if engine_binds(e["endpoint"])]
        if events:  # the engine binds its event and replay ports: loopback only
            assert rules is not None and not rules, "engine event ports reachable from outside"
    if len(find(docs, "PodMonitor")) + len(find(docs, "ServiceMonitor")) != 1:
        pytest.fail("exactly one monitor: a PodMonitor and a ServiceMonitor would scrape twice")
    return configs


# === tests: kustomize ==========================================================================
def test_every_kustomization_is_checked() -> None:
    shipped = {
        str(path.parent.relative_to(KUSTOMIZE_ROOT))
        for path in KUSTOMIZE_ROOT.rglob("kustomization.yaml")
    }
    assert shipped == set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kustomize_builds(variant: str) -> None:
    docs = kustomize(variant)
    assert exporter_containers(docs)
    if VARIANTS[variant]:  # documented: it needs the load restrictor lifted
        result = subprocess.run(
            [tool("kubectl"), "kustomize", str(KUSTOMIZE_ROOT / variant)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode != 0 and "is not in or below" in result.stderr


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kustomize_output_validates_strictly(variant: str, version: str) -> None:
    validate_all(kustomize(variant), version)


def test_validation_catches_mistakes() -> None:
    """The checks bite: a misspelt container field, a wrong type, a monitor without selector
    or with a bad interval are all refused."""
    docs = kustomize("base")
    (deployment,) = find(docs, "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)
    (monitor,) = find(docs, "PodMonitor")
    mutations: list[Callable[[Any], object]] = [
        lambda m: m["spec"].pop("selector"),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"),
        lambda m: m["spec"]["podMetricsEndpoints"][0].update(targetPort=9477),
        lambda m: m["spec"].update(selectors={}),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(monitor)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            check_monitor(broken)
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricsEndpoints"][0].update(interval="5s", scrapeTimeout="10s")
    with pytest.raises(AssertionError):
        check_monitor(broken)


def deploy_manifests() -> list[Path]:
    """Every YAML file under deploy/ that holds Kubernetes objects, outside the Helm chart
    (its templates are not YAML until rendered; tests/test_deploy_helm.py renders them)."""
    found = []
    for path in sorted((REPO / "deploy").rglob("*.y*ml")):
        if "helm" in path.relative_to(REPO).parts:
            continue
        docs = parse_documents(path.read_text())
        if any(isinstance(d, dict) and {"apiVersion", "kind"} <= d.keys() for d in docs):
            found.append(path)
    return found


@pytest.mark.parametrize("version", k8s_versions())
def test_every_manifest_file_in_deploy_validates(version: str) -> None:
    """Each file on its own, kustomizations excepted (they are built above): what a user may
    `kubectl apply -f` directly, whoever wrote it."""
    paths = deploy_manifests()
    assert REPO / "deploy/kubernetes/base/engine-deployment.yaml" in paths
    for path in paths:
        docs = [d for d in parse_documents(path.read_text()) if d["kind"] != "Kustomization"]
        validate_all(docs, version)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_are_consistent(variant: str) -> None:
    """Flags parse with the real CLI; engines and exporters pair; ports, probes, policies,
    hardening and memory limits agree."""
    check_render(kustomize(variant))


def test_wiring_checks_catch_mistakes() -> None:
    """A wrong source port, a policy open to all, a readiness-blocking startup probe and an
    undersized limit are each caught."""
    base = kustomize("base")

    def mutated(change: Any) -> list[Any]:
        docs = copy.deepcopy(list(base))
        change(docs)
        return docs

    def sidecar(docs: list[Any]) -> Any:
        return find(docs, "Deployment")[0]["spec"]["template"]["spec"]["initContainers"][0]

    cases = [
        lambda d: sidecar(d)["args"].__setitem__(0, "--source=vllm=tcp://127.0.0.1:6000"),
        lambda d: sidecar(d)["args"].__setitem__(0, "--source=vllm=tcp://*:5557"),
        lambda d: sidecar(d)["args"].append("--collector.sample-ratio=2"),
        lambda d: sidecar(d)["args"].append("--collector.max-tracked-blocks=4000000"),
        lambda d: sidecar(d)["ports"][0].__setitem__("containerPort", 9000),
        lambda d: sidecar(d)["startupProbe"]["httpGet"].__setitem__("path", "/readyz"),
        lambda d: sidecar(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
        lambda d: sidecar(d)["resources"]["limits"].pop("memory"),
        lambda d: find(d, "NetworkPolicy")[0]["spec"]["ingress"][0].pop("from"),
        lambda d: find(d, "NetworkPolicy")[0]["spec"]["ingress"][1].pop("ports"),
        lambda d: find(d, "Service")[0]["spec"]["ports"][0].__setitem__("targetPort", 9000),
        lambda d: find(d, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].update(port="x"),
    ]
    missed = []
    for i, change in enumerate(cases):
        try:
            check_render(mutated(change))
        except (AssertionError, pytest.fail.Exception):
            continue
        missed.append(i)
    assert not missed, f"mutations not caught: {missed}"


def _exporter(variant: str) -> tuple[Any, Any]:
    (found,) = exporter_containers(kustomize(variant))
    return found


def test_native_sidecar_and_classic_container_are_the_same_exporter() -> None:
    workload, native = _exporter("base")
    pod = workload["spec"]["template"]["spec"]
    assert native in pod["initContainers"] and native["restartPolicy"] == "Always"
    classic_workload, classic = _exporter("overlays/classic-sidecar")
    classic_pod = classic_workload["spec"]["template"]["spec"]
    assert "initContainers" not in classic_pod and classic in classic_pod["containers"]
    assert "restartPolicy" not in classic
    assert classic == {k: v for k, v in native.items() if k != "restartPolicy"}


def test_readiness_follows_healthz_unless_opted_into_the_gate() -> None:
    """A not-ready sidecar takes its engine pod out of every Service: only the readyz-gate
    overlay lets the exporter's connection decide the pod's readiness."""
    for variant in VARIANTS:
        _, container = _exporter(variant)
        path = container["readinessProbe"]["httpGet"]["path"]
        assert path == ("/readyz" if variant == "overlays/readyz-gate" else "/healthz"), variant


def test_otlp_overlay_reaches_the_collector() -> None:
    docs = kustomize("overlays/otlp")
    _, container = _exporter("overlays/otlp")
    config = exporter_config(container)
    assert config.otlp is not None and config.otlp.endpoint is not None
    url = config.otlp.endpoint
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    (svc,) = find(docs, "Service", host)
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    (collector,) = pods_selected(docs, svc["spec"]["selector"])
    target = resolve_port(collector, svc_port["targetPort"])
    (configmap,) = find(docs, "ConfigMap")
    assert configmap["data"]["config.yaml"] == COLLECTOR_CONFIG.read_text()
    received = yaml.safe_load(configmap["data"]["config.yaml"])["receivers"]["otlp"]["protocols"]
    protocol = config.otlp.protocol
    key = "grpc" if protocol == "grpc" else "http"
    assert received[key]["endpoint"].endswith(f":{target}")
    pod = collector["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] in mounts]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    flag = next(a for a in pod["containers"][0]["args"] if a.startswith("--config="))
    assert flag == f"--config={mounts[volume['name']]}/config.yaml"
    env = container_env(container)
    assert {"K8S_NAMESPACE_NAME", "K8S_POD_NAME", "K8S_NODE_NAME"} <= set(env)


def test_daemonset_subscribes_to_several_engines() -> None:
    docs = kustomize("overlays/daemonset")
    ((workload, container),) = exporter_containers(docs)
    assert workload["kind"] == "DaemonSet"
    sources = exporter_config(container).sources
    assert len(sources) >= 2 and all(s.binds for s in sources)
    ports = sorted(tcp_port(s.endpoint) for s in sources)
    assert ports == list(range(ports[0], ports[0] + len(ports))), "rank k publishes on port + k"
    (svc,) = find(docs, "Service", "kvcache-exporter-events")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == ports
    for _, engine, _ in engine_containers(docs):
        assert image_name(engine["image"]) != EXPORTER_IMAGE
    (monitor,) = find(docs, "PodMonitor")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in relabel


# === tests: the image ==========================================================================
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (each starting with FROM)."""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        if not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        stages[-1].append((keyword, rest))
    return args, stages


def _from_image(rest: str, args: Mapping[str, str]) -> str:
    image = rest.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


def _exec_form(stage: Sequence[tuple[str, str]], keyword: str) -> list[str] | None:
    values = [rest for kw, rest in stage if kw == keyword]
    if not values:
        return None
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{keyword} must be in exec form"
    return [str(item) for item in parsed]


def _env(stage: Sequence[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _run(stage: Sequence[tuple[str, str]], needle: str) -> str:
    (command,) = [rest for kw, rest in stage if kw == "RUN" and needle in rest]
    return command


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    """No finding at any level, with inline ignore pragmas disabled; and the linter does find
    the mistakes it should (an unpinned base, a root user), so a pass means something."""
    hadolint = tool("hadolint")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}

    def lint(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [hadolint, "--no-color", "--disable-ignore-pragma", "-t", "style", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
            check=False,
        )

    result = lint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN pip install kvcache-exporter\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout


def test_dockerfile_contract() -> None:
    """Pinned slim base for both stages, wheels built in the first, a numeric non-root user,
    the metrics port, the console script as entrypoint, no bytecode writes, and the same
    install as the README's (`pip install .` resolves what `pip wheel .` builds)."""
    args, stages = dockerfile_stages()
    assert len(stages) == 2
    build, runtime = stages
    for stage in stages:
        image = _from_image(stage[0][1], args)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", image), image
    assert re.fullmatch(r"\S+\s+AS\s+build", build[0][1], re.IGNORECASE)
    wheel = _run(build, "pip wheel")
    assert wheel.split()[-1] == "." and "--wheel-dir /wheels" in wheel
    assert "pip install ." in (REPO / "README.md").read_text()
    install = _run(runtime, "pip install")
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    assert "--no-index" in install and "/wheels/kvcache_exporter-*.whl" in install
    assert not [rest for kw, rest in runtime if kw == "COPY" and "--from" not in rest]
    (user,) = [rest for kw, rest in runtime if kw == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), user
    assert [kw for kw, _ in runtime].index("USER") > max(
        i for i, (kw, _) in enumerate(runtime) if kw == "RUN"
    )
    assert ("EXPOSE", "9477") in runtime
    assert _exec_form(runtime, "ENTRYPOINT") == ["kvcache-exporter"]
    assert _env(runtime).get("PYTHONDONTWRITEBYTECODE") == "1"


def test_image_default_command_parses() -> None:
    """ENTRYPOINT + CMD is a command line the exporter accepts, serving on the exposed port."""
    _, stages = dockerfile_stages()
    cmd = _exec_form(stages[-1], "CMD") or []
    config = load(cmd, environ={})
    assert listen_port(config) == 9477


def _dockerignored(path: str, patterns: Sequence[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a pattern matching a
    folder matches what is inside."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern.replace("**/", "\0")).replace("\0", "(?:.*/)?")
        if any(re.match(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerignore_sends_what_the_build_copies_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    _, stages = dockerfile_stages()
    copied = [
        src
        for stage in stages
        for kw, rest in stage
        if kw == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    ]
    assert copied
    for src in copied:
        files = (
            [src]
            if (REPO / src).is_file()
            else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
        )
        assert files, src
        for file in files:
            assert not _dockerignored(file, patterns), f"{file} is copied but ignored"
    for path in (".git/HEAD", "tests/test_deploy.py", "build/lib/x.py", ".venv/bin/python",
                 "deploy/kubernetes/base/kustomization.yaml",
                 "exporter/kvcache_exporter/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert _dockerignored(path, patterns), f"{path} would be sent to the daemon"


# --- the image's install, run as written --------------------------------------------------------
@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the Dockerfile's two install commands as written, with its ENV, on a copy of the
    build context: ``/src`` and ``/wheels`` are folders here, and a fresh virtual environment
    stands in for the runtime image's interpreter. Returns that environment's ``bin``."""
    _, (build, runtime) = dockerfile_stages()
    root = tmp_path_factory.mktemp("image")
    src, wheels = root / "src", root / "wheels"
    patterns = dockerignore_patterns()
    for kw, rest in build:
        if kw != "COPY":
            continue
        *sources, _ = rest.split()
        for source in sources:
            origin = REPO / source
            if origin.is_file():
                src.mkdir(exist_ok=True)
                shutil.copy2(origin, src / source)
            else:
                shutil.copytree(
                    origin,
                    src / source,
                    ignore=lambda d, names: [
                        n
                        for n in names
                        if _dockerignored(str((Path(d) / n).relative_to(REPO)), patterns)
                    ],
                )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    for stage, command, cwd, python_bin in (
        (build, _run(build, "pip wheel"), src, Path(sys.executable).parent),
        (runtime, _run(runtime, "pip install"), root, venv / "bin"),
    ):
        command = re.sub(r"--mount=\S+\s*", "", command).replace("/wheels", str(wheels))
        env = {**os.environ, **_env(stage), "PATH": f"{python_bin}{os.pathsep}{os.environ['PATH']}"}
        env.pop("PIP_REQUIRE_VIRTUALENV", None)
        result = subprocess.run(
            ["sh", "-ec", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return venv / "bin"


@pytest.mark.e2e
def test_image_install_steps_give_a_working_exporter(image_install: Path) -> None:
    _, stages = dockerfile_stages()
    entrypoint = _exec_form(stages[-1], "ENTRYPOINT")
    assert entrypoint is not None
    script = image_install / entrypoint[0]
    assert script.exists(), "the console script is not installed"
    assert not (image_install / "pip").exists(), "pip is left in the image"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.split() == ["kvcache-exporter", __version__]
    compiled = subprocess.run(
        [str(image_install / "python"), "-c", "from kvcache_exporter.protocol import compiled; "
         "print(compiled.COMPILED)"],
        capture_output=True, text=True, timeout=60, check=False, env={},
    )  # fmt: skip
    assert compiled.stdout.strip() == "True", "the wheel lacks the compiled decode stage"
    bad = subprocess.run(
        [str(script), "--collector.sample-ratio=3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "--collector.sample-ratio" in bad.stderr


# Records every attempt to create or change a file; printed as one line on exit.
_AUDIT_HOOK = """
import atexit, os, sys
_writes = []
_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.truncate", "os.symlink",
           "os.link", "os.chmod", "os.chown", "os.utime", "tempfile.mkstemp", "tempfile.mkdtemp",
           "shutil.copyfile", "shutil.move", "shutil.rmtree"}
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & _FLAGS:
            _writes.append((event, str(path)))
    elif event in _EVENTS:
        _writes.append((event, str(args[0])))
sys.addaudithook(_hook)
atexit.register(lambda: print("AUDIT-WRITES", _writes, file=sys.__stderr__, flush=True))
"""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@contextlib.contextmanager
def _serving(argv: list[str], env: Mapping[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.e2e
def test_installed_exporter_writes_no_file(image_install: Path, tmp_path: Path) -> None:
    """With the image's environment, the installed console script serves, ingests events and
    exports OTLP (to a closed port) without creating or changing a single file: it runs on a
    read-only root filesystem."""
    from kvcache_exporter.publisher import KVEventPublisher

    _, stages = dockerfile_stages()
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_AUDIT_HOOK)
    env = {
        "PATH": os.environ["PATH"],
        **_env(stages[-1]),
        "PYTHONPATH": str(hook_dir),
        "HOME": "/nonexistent",
    }
    events, http = free_port(), free_port()
    argv = [
        str(image_install / "kvcache-exporter"),
        f"--source=vllm=tcp://127.0.0.1:{events}",
        f"--web.listen-address=127.0.0.1:{http}",
        "--otlp.endpoint=http://127.0.0.1:1",
        "--otlp.interval=0.2",
    ]
    base = f"http://127.0.0.1:{http}"
    with KVEventPublisher(f"tcp://127.0.0.1:{events}", bind=True) as pub, _serving(argv, env) as p:
        deadline = time.monotonic() + 30
        stored, batch = 0.0, 0
        while time.monotonic() < deadline and stored < 3:
            assert p.poll() is None, p.communicate()[1]
            with contextlib.suppress(OSError):
                if _get(base + "/readyz")[0] == 200:
                    batch += 1
                    pub.stored([batch * 16 + k for k in range(3)], medium="GPU")
                    pub.publish()
                    metrics = _get(base + "/metrics")[1]
                    stored = sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in metrics.splitlines()
                        if line.startswith("kvcache_blocks_stored_total{")
                    )
            time.sleep(0.1)
        assert stored >= 3, "the exporter did not ingest the events"
        for path in ("/", "/healthz", "/api/v1/summary", "/api/v1/export?format=csv"):
            assert _get(base + path)[0] == 200, path
        time.sleep(0.5)  # a few OTLP export attempts
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=20)
    assert p.returncode == 0, stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("AUDIT-WRITES")]
    assert line == "AUDIT-WRITES []", line


def test_source_spec_rule_matches_the_engines_for_shipped_endpoints() -> None:
    """The pairing check relies on the engines' substring rule and the exporter's host rule
    agreeing for the endpoint forms the manifests use."""
    for endpoint in ("tcp://*:5557", "tcp://127.0.0.1:5557", "tcp://kvcache-exporter-events:5557"):
        assert SourceSpec.parse(f"e={endpoint}").binds == engine_binds(endpoint)
