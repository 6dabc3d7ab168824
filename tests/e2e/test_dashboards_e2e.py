"""The committed dashboards and rules against a real Prometheus scraping the real exporter.

One stack for the module: ``kvcache-exporter`` with two sources and OTLP export on, a real
Prometheus (Debian's package) scraping it every second and evaluating the committed rules
every second, and an embedded engine feeding it:

- ``sim``: an LRU prefix cache far too small for a synthetic chat workload (400 GPU blocks,
  800 CPU blocks, hits reported), stamped with the wall clock - it thrashes, so recomputation,
  restores, hits and every lifecycle histogram have data, and both media appear;
- ``noisy``: a publisher that sends a few unreadable messages, so decode errors have a series
  (the family is empty until the first error);
- ``hybrid``: vLLM 0.33's own event stream of a hybrid-attention model (a sliding-window group
  "0" and a full-attention group "1" in one GPU pool, ``tests/fixtures/streams``), replayed
  40 times faster than it was recorded and restamped with the wall clock - so the KV-cache
  group panels and the per-group rules have two groups to tell apart;
- OTLP export to a port where nothing listens, so ``kvcache_exporter_otlp_exports_total`` has
  both results (``failure`` counting) - the family exists only while OTLP export is on.

The rules are loaded as committed, except that every alert's ``for`` is cut to a few seconds
(a test copy) so the test need not wait ten minutes. Then every query of every panel of every
dashboard - template variables resolved through the Prometheus API the way Grafana does and
substituted in Grafana's multi-value format, ``$__rate_interval`` and ``$__range`` as Grafana
computes them for a 1 s scrape interval - must return data, every recording rule must evaluate
to data, ``KVCacheThrashing`` must reach ``firing``, and the alerts for problems this stack
does not have must stay silent. The per-group panels must show both groups of ``hybrid``, and
the pool-level rules one series for its pool.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
import zmq

from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    SimulatedEngine,
    WorkloadConfig,
    synthetic_workload,
)
from kvcache_exporter.publisher import Event, KVEventPublisher

from ..conftest import free_port, require_binary
from ..streams import load_truth, read_stream
from .conftest import ExporterProcess, LoggedProcess, http_get, managed, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "prometheus_rules.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "prometheus_alerts.yaml"

JOB = "kvcache-exporter"
SCRAPE_INTERVAL_S = 1
# Grafana: $__rate_interval = max($__interval + scrape interval, 4 x scrape interval), with
# $__interval at most a step of 1 s here.
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_S}s"
TEST_FOR = "3s"

HYBRID_SPEED = 40.0
"""The hybrid stream's engine time runs this many times faster than the wall clock (its 1,022 s
take about 26 s)."""

FIRING = ("KVCacheThrashing", "KVCacheDecodeErrors")
"""Alerts this stack must fire: the cache thrashes, and ``noisy`` sends garbage."""
SILENT = (
    "KVCacheEvictionStorm",
    "KVCacheResidencyCollapse",
    "KVCacheExporterDown",
    "KVCacheExporterAbsent",
    "KVCacheSourceDown",
    "KVCacheEventsLost",
    "KVCacheEventStreamStalled",
    "KVCacheExporterLagging",
)
"""Alerts for problems this stack does not have: neither pending nor firing."""


class WallClockSink:
    """Publishes each batch stamped with the wall clock, so ``time() - last ts`` is the real
    age of the newest event (the simulated engine would stamp trace time)."""

    def __init__(self, publisher: KVEventPublisher) -> None:
        self.publisher = publisher

    def send_batch(self, ts: float, events: Iterable[Event]) -> int:
        return self.publisher.send_batch(time.time(), events)


def send_garbage(socket: zmq.Socket[bytes], stop: threading.Event) -> None:
    """Sends a message that is not ``[topic, seq, payload]`` every half second until ``stop``
    (the only user of ``socket`` once started)."""
    while not stop.wait(0.5):
        socket.send_multipart([b"not a KV event batch"])


def replay_restamped(
    socket: zmq.Socket[bytes], messages: list[list[bytes]], stop: threading.Event
) -> None:
    """Sends ``messages`` (``[topic, seq, payload]``, a vLLM stream) on ``socket``, an XPUB,
    once a subscriber has subscribed (so no message is lost to the slow joiner and no
    sequence gap appears), each at its engine time divided by ``HYBRID_SPEED`` after the
    first, with its batch ``ts`` replaced by the wall clock at sending (so the event lag is
    real). Stops early on ``stop``; the only user of ``socket`` once started."""
    while not socket.poll(100, zmq.POLLIN):
        if stop.is_set():
            return
    socket.recv()  # the subscription
    batches = [(topic, seq, msgspec.msgpack.decode(payload)) for topic, seq, payload in messages]
    start, first = time.monotonic(), float(batches[0][2][0])
    for topic, seq, batch in batches:
        delay = start + (float(batch[0]) - first) / HYBRID_SPEED - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        batch[0] = time.time()
        socket.send_multipart([topic, seq, msgspec.msgpack.encode(batch)])


class RulesPrometheus(LoggedProcess):
    """Prometheus scraping the exporter and evaluating rule files every second."""

    def __init__(self, binary: str, workdir: Path, exporter_port: int, rules: list[Path]) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                        "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(path) for path in rules],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                        }
                    ],
                }
            )
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        super().__init__("prometheus", argv, workdir / "prometheus.log")

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a successful Prometheus API answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{path} {params}: {body}"
        return answer["data"]

    def wait_ready(self, timeout: float = 20.0) -> None:
        url = f"http://127.0.0.1:{self.port}/-/ready"
        try:
            wait_for(lambda: http_get(url)[0] == 200, timeout, "Prometheus /-/ready")
        except AssertionError as exc:
            raise self.fail(str(exc)) from None

    def has(self, promql: str) -> bool:
        """Whether an instant query at now has a result."""
        return bool(self.api("query", query=promql)["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Alerts of that name from ``/api/v1/alerts`` (pending or firing)."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]


@dataclass
class Stack:
    prometheus: RulesPrometheus
    exporter: ExporterProcess
    started: float
    """Wall clock when Prometheus began scraping: the dashboards' time range starts here."""

    def range_seconds(self) -> int:
        return math.ceil(time.time() - self.started)


def rules_for_test(workdir: Path) -> list[Path]:
    """The committed rule files, alerts' ``for`` cut to ``TEST_FOR``."""
    alerts = yaml.safe_load(ALERTS.read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    copy = workdir / "prometheus_alerts.yaml"
    copy.write_text(yaml.safe_dump(alerts, sort_keys=False))
    return [RULES, copy]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("dashboards")
    sim_port, noisy_port, dead_port = free_port(), free_port(), free_port()
    hybrid_port = free_port()
    stop = threading.Event()
    with contextlib.ExitStack() as cleanup:
        noisy: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        cleanup.callback(noisy.close, 0)
        noisy.bind(f"tcp://127.0.0.1:{noisy_port}")
        hybrid: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
        cleanup.callback(hybrid.close, 0)
        hybrid.setsockopt(zmq.SNDHWM, 0)  # queue without limit: nothing dropped
        hybrid.bind(f"tcp://127.0.0.1:{hybrid_port}")
        publisher = KVEventPublisher(f"tcp://127.0.0.1:{sim_port}", bind=True)
        cleanup.callback(publisher.close)

        exporter = ExporterProcess(
            [
                "--source",
                f"sim=tcp://127.0.0.1:{sim_port}",
                "--source",
                f"noisy=tcp://127.0.0.1:{noisy_port}",
                "--source",
                f"hybrid=tcp://127.0.0.1:{hybrid_port}",
                "--otlp.endpoint",
                f"http://127.0.0.1:{dead_port}",
                "--otlp.interval",
                "1",
                "--otlp.timeout",
                "1",
                # Every restore feeds the what-if model, so its panel has data at once.
                "--whatif.sample-ratio",
                "1",
            ],
            workdir / "exporter.log",
        )
        cleanup.enter_context(managed(exporter))
        exporter.wait_serving()
        exporter.wait_ready()

        prometheus = RulesPrometheus(binary, workdir, exporter.port, rules_for_test(workdir))
        cleanup.enter_context(managed(prometheus))
        started = time.time()
        prometheus.wait_ready()
        # Every counter's first sample is taken before anything happens, so increases over
        # the dashboards' time range see the whole run.
        wait_for(lambda: prometheus.has(f'up{{job="{JOB}"}} == 1'), 20, "the first scrape", 0.2)

        time.sleep(0.3)  # the exporter's subscriptions reach both publishers
        # Garbage twice a second: a counter series that appears with its first error has no
        # increase yet, so the errors must go on for rate() to see them.
        sender = threading.Thread(target=send_garbage, args=(noisy, stop), daemon=True)
        sender.start()
        cleanup.callback(sender.join, 5.0)
        cleanup.callback(stop.set)  # (exit runs callbacks last first: stop, then join)
        replayer = threading.Thread(
            target=replay_restamped, args=(hybrid, read_stream("hybrid"), stop), daemon=True
        )
        replayer.start()
        cleanup.callback(replayer.join, 5.0)
        cleanup.callback(stop.set)

        engine = SimulatedEngine(
            PrefixCacheSimulator(400, 800, report_hits=True),
            WallClockSink(publisher),
            speed=1.0,
        )
        requests = synthetic_workload(WorkloadConfig(rate=100.0, num_requests=None, seed=0))
        thread = threading.Thread(
            target=engine.run, args=(requests,), kwargs={"stop": stop}, daemon=True
        )
        thread.start()
        cleanup.callback(thread.join, 5.0)
        cleanup.callback(stop.set)

        # What the slowest panels need: Prometheus' thrashing alert firing, the exporter's own
        # anomaly alert and trend fits (10 s of engine time) scraped. Asked as range queries,
        # as Grafana does: a series that appeared less than a step ago is not in one yet.
        ready = Stack(prometheus, exporter, started)
        for promql, what in (
            ('ALERTS{alertname="KVCacheThrashing", alertstate="firing"}', "KVCacheThrashing"),
            ("kvcache_alert_active", "an exporter anomaly alert"),
            ("kvcache_trend_direction", "the exporter's trends"),
            ("rate(kvcache_exporter_decode_errors_total[1m]) > 0", "decode errors"),
            *(
                (
                    f'{GROUP_LIFETIME}{{engine="hybrid", group="{group}", quantile="0.5"}}',
                    f"hybrid group {group} lifetimes",
                )
                for group in ("0", "1")
            ),
        ):
            try:
                wait_for(in_range(ready, promql), 60, what, step=0.5)
            except AssertionError as exc:
                raise prometheus.fail(str(exc)) from None
        yield ready


GROUP_LIFETIME = "engine_medium_group:kvcache_block_lifetime_seconds:histogram_quantile5m"


# --- Grafana's side of a query -----------------------------------------------------------------
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def regex_value(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus regex matcher: each value
    regex-escaped (and the backslash escaped again for the PromQL string), joined in a group."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}'])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(text: str, variables: dict[str, str], stack: Stack) -> str:
    builtins = {"__rate_interval": RATE_INTERVAL, "__range": f"{stack.range_seconds()}s"}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in builtins:
            return builtins[name]
        assert name in variables, f"unknown variable ${name} in {text}"
        return variables[name]

    return VARIABLE.sub(value, text)


def resolve_variables(dashboard: dict[str, Any], stack: Stack) -> dict[str, list[str]]:
    """Every query variable's values, in order (later ones depend on earlier ones), as the
    Prometheus data source finds them: label values of a series selector."""
    values: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            assert variable["query"] == "prometheus"
            continue
        assert variable["type"] == "query", variable
        match = LABEL_VALUES.match(variable["query"])
        assert match, f"variable {variable['name']}: not label_values(...)"
        done = {name: regex_value(found) for name, found in values.items()}
        selector = interpolate(match["selector"], done, stack)
        found = stack.prometheus.api(
            f"label/{match['label']}/values",
            **{"match[]": selector, "start": str(stack.started), "end": str(time.time())},
        )
        assert found, f"variable {variable['name']}: no values for {selector}"
        values[variable["name"]] = sorted(found)
    return values


def has_data(result: dict[str, Any]) -> bool:
    """At least one finite sample in an instant or range query's answer."""
    if result["resultType"] == "vector":
        samples = [s["value"] for s in result["result"]]
    else:
        samples = [v for series in result["result"] for v in series["values"]]
    return any(math.isfinite(float(v)) for _, v in samples)


def run_query(stack: Stack, expr: str, instant: bool) -> dict[str, Any]:
    """The query as Grafana sends it: instant at now, or a range over the run."""
    now = time.time()
    if instant:
        data: dict[str, Any] = stack.prometheus.api("query", query=expr, time=str(now))
    else:
        data = stack.prometheus.api(
            "query_range", query=expr, start=str(stack.started), end=str(now), step="1"
        )
    return data


def in_range(stack: Stack, expr: str) -> Callable[[], bool]:
    """A check that a range query over the run has data."""
    return lambda: has_data(run_query(stack, expr, instant=False))


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        for target in panel["targets"]:
            yield f"{panel['title']} [{target['refId']}]", target
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", {"expr": annotation["expr"], "instant": False}


# --- the tests ---------------------------------------------------------------------------------
def test_thrashing_fires_and_the_rest_stays_silent(stack: Stack) -> None:
    for name in FIRING:
        states = [a["state"] for a in stack.prometheus.alerts(name)]
        assert "firing" in states, f"{name}: {states}"
    thrashing = {a["labels"]["engine"] for a in stack.prometheus.alerts("KVCacheThrashing")}
    assert "sim" in thrashing and thrashing <= {"sim", "hybrid"}, thrashing  # 2,000 blocks
    assert {a["labels"]["engine"] for a in stack.prometheus.alerts("KVCacheDecodeErrors")} == {
        "noisy"
    }
    for name in SILENT:
        assert stack.prometheus.alerts(name) == [], name


def test_every_rule_evaluates_without_error(stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    committed = [
        rule
        for path in (RULES, ALERTS)
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) == len(committed)
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert broken == []


def test_every_recording_rule_has_data(stack: Stack) -> None:
    missing = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            labels = ", ".join(f'{k}="{v}"' for k, v in rule.get("labels", {}).items())
            selector = f"{rule['record']}{{{labels}}}"
            if not has_data(run_query(stack, selector, instant=True)):
                missing.append(selector)
    assert missing == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data(stack: Stack, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    values = resolve_variables(dashboard, stack)
    if "medium" in values:
        assert values["medium"] == ["CPU", "GPU"]
    assert set(values["engine"]) == {"hybrid", "noisy", "sim"}
    if "group" in values:
        assert values["group"] == ["0", "1"]
    variables = {name: regex_value(found) for name, found in values.items()}
    empty = []
    checked = 0
    for where, target in panel_targets(dashboard):
        expr = interpolate(target["expr"], variables, stack)
        assert "$" not in expr, f"{where}: {expr}"
        checked += 1
        if not has_data(run_query(stack, expr, bool(target.get("instant")))):
            empty.append(f"{where}: {expr}")
    assert checked > 10
    assert empty == [], "panels without data:\n" + "\n".join(empty)


def row_targets(dashboard: dict[str, Any], row_title: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, target) of every panel under the row ``row_title``."""
    current = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        elif current == row_title:
            for target in panel["targets"]:
                yield f"{panel['title']} [{target['refId']}]", target


def test_group_panels_tell_the_groups_of_a_hybrid_engine_apart(stack: Stack) -> None:
    """With Engine = hybrid, every query of the *KV-cache groups* row has a series for each
    of its two groups, and the groups table says what they are (vLLM's own truth file)."""
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "kvcache-overview.json").read_text())
    values = resolve_variables(dashboard, stack)
    variables = {name: regex_value(found) for name, found in values.items()}
    variables["engine"] = regex_value(["hybrid"])
    checked = 0
    for where, target in row_targets(dashboard, "KV-cache groups"):
        if where.startswith("Reuse gap"):
            continue  # needs hit reports, and vLLM reports none by default (nor this stream)
        expr = interpolate(target["expr"], variables, stack)
        result = run_query(stack, expr, bool(target.get("instant")))["result"]
        groups = {series["metric"].get("group") for series in result}
        assert groups == {"0", "1"}, f"{where}: groups {groups} in {expr}"
        checked += 1
    assert checked >= 8
    info = stack.prometheus.api("query", query='kvcache_group_info{engine="hybrid"}')["result"]
    # an empty label value is no label in Prometheus: "no sliding window" has none
    kinds = {
        (s["metric"]["group"], s["metric"]["kind"], s["metric"].get("sliding_window", ""))
        for s in info
    }
    want = {
        (
            str(g["group_idx"]),
            g["kind"],
            "" if g["sliding_window"] is None else str(g["sliding_window"]),
        )
        for g in load_truth("hybrid")["groups"]
    }
    assert kinds == want


def test_pool_rules_give_one_series_per_pool(stack: Stack) -> None:
    """The hybrid engine's two groups share one GPU pool: each ``engine_medium:`` rule has one
    series for it, without ``group``; the ``engine_medium_group:`` quantiles one per group."""
    for record in (
        "engine_medium:kvcache_blocks_stored:rate5m",
        "engine_medium:kvcache_block_restore_ratio:ratio_rate5m",
        'engine_medium:kvcache_block_lifetime_seconds:histogram_quantile5m{quantile="0.5"}',
    ):
        selector = (
            record.replace("}", ', engine="hybrid"}')
            if "{" in record
            else (record + '{engine="hybrid"}')
        )
        result = stack.prometheus.api("query", query=selector)["result"]
        assert [s["metric"].get("group") for s in result] == [None], f"{selector}: {result}"
        assert result[0]["metric"]["medium"] == "GPU"
    result = stack.prometheus.api(
        "query", query=f'{GROUP_LIFETIME}{{engine="hybrid", quantile="0.5"}}'
    )["result"]
    assert sorted(s["metric"]["group"] for s in result) == ["0", "1"]
