"""The OTLP sink: the same numbers as /metrics, OTLP conventions, temporality, failures, config.

Engines here are real pipelines fed in-process with the simulator's batches (no sockets), so
every family has non-trivial numbers; exports go through the SDK's real encoder, and to real
gRPC and HTTP receivers built from the official ``opentelemetry-proto`` stubs.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter import __version__
from kvcache_exporter.analysis.whatif import DEFAULT_DISTANCE_BUCKETS
from kvcache_exporter.catalog import BY_NAME, Instrument
from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.config import ConfigError, load
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
)
from kvcache_exporter.pipeline import EngineView, Pipeline, new_pipeline
from kvcache_exporter.protocol.encode import Event, WireForm, encode_batch, frames
from kvcache_exporter.sinks.otlp import (
    OTLP_FAMILIES,
    OTLPSink,
    build_resource,
    http_metrics_url,
    kubernetes_attributes,
)
from kvcache_exporter.sinks.otlp_config import OTLPConfig
from kvcache_exporter.sinks.prometheus import render
from kvcache_exporter.sinks.series import LIFECYCLE_FAMILIES, series

from .conftest import free_port
from .e2e.conftest import Samples, parse_samples
from .otlp_receivers import (
    CUMULATIVE,
    DELTA,
    Flat,
    GrpcReceiver,
    HistPoint,
    HttpReceiver,
    as_samples,
    flatten,
)
from .test_sinks_prometheus import view_of_vector

ROOT = Path(__file__).resolve().parent.parent
START_TS = 1_760_000_000.0
BUILD_INFO = "kvcache_exporter_build_info"
NO_OTEL: dict[str, str] = {}


# --- engines fed in-process ---------------------------------------------------------------------
@functools.cache
def simulated_batches(requests: int = 1500) -> tuple[tuple[float, tuple[Event, ...]], ...]:
    """The simulator's batches for the first ``requests`` trace requests (GPU + CPU tiers,
    hits reported: stores, accesses, evictions, offloads and restores all happen)."""
    batches: list[tuple[float, tuple[Event, ...]]] = []

    class Keep:
        def send_batch(self, ts: float, events: Any) -> int:
            batches.append((ts, tuple(events)))
            return 1

    simulator = PrefixCacheSimulator(2000, 1000, report_hits=True)
    engine = SimulatedEngine(simulator, Keep(), speed=0, requests_per_batch=4, start_time=START_TS)
    engine.run(read_mooncake(bundled_trace_path()), limit=requests)
    return tuple(batches)


class Fed:
    """A real pipeline and the next batch to feed it."""

    def __init__(self, name: str = "sim") -> None:
        self.pipeline: Pipeline = new_pipeline(name, CollectorConfig())
        self.sent = 0

    def feed(self, count: int | None = None) -> None:
        """Feed the next ``count`` simulator batches (all the rest when None)."""
        batches = simulated_batches()
        end = len(batches) if count is None else min(len(batches), self.sent + count)
        for ts, events in batches[self.sent : end]:
            payload = encode_batch(ts, events, WireForm.VLLM)
            self.pipeline.stream.handle(frames("", self.sent, payload))
            self.sent += 1
        self.pipeline.stream.flush()

    def views(self) -> list[EngineView]:
        return [self.pipeline.view()]


@pytest.fixture(scope="module")
def fed() -> Fed:
    engine = Fed()
    engine.feed()
    return engine


class FakeExporter(MetricExporter):
    """Keeps what it is given; answers from ``results`` (an exception is raised)."""

    def __init__(self, results: Sequence[MetricExportResult | Exception] = ()) -> None:
        super().__init__()
        self.sent: list[MetricsData] = []
        self.times: list[float] = []  # time.monotonic() of each export call
        self.results = list(results)
        self.shut_down = threading.Event()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.sent.append(metrics_data)
        self.times.append(time.monotonic())
        result = self.results.pop(0) if self.results else MetricExportResult.SUCCESS
        if isinstance(result, Exception):
            raise result
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shut_down.set()


def config(**overrides: Any) -> OTLPConfig:
    base: dict[str, Any] = {"endpoint": "http://127.0.0.1:1", "interval": 60.0, "timeout": 1.0}
    return OTLPConfig(**{**base, **overrides})


def flat_of(data: MetricsData) -> Flat:
    """MetricsData through the SDK's own protobuf encoder, read back as plain data."""
    return flatten(encode_metrics(data))


def scrape(views: Sequence[EngineView], exports: dict[str, int] | None) -> Samples:
    samples = parse_samples(render(views, exports))
    return {key: value for key, value in samples.items() if key[0] != BUILD_INFO}


# --- one source of truth ------------------------------------------------------------------------
def test_otlp_carries_exactly_the_series_of_metrics(fed: Fed) -> None:
    """Every sample ``/metrics`` renders (two engines: a simulated one and a recorded vLLM
    vector with decode errors and an ``unknown`` medium), and nothing else, arrives in OTLP
    with the same value, once mapped back through the documented names."""
    views = [*fed.views(), view_of_vector("vllm-0.33.0.jsonl")]
    exports = {"success": 7, "failure": 2}
    sink = OTLPSink(config(), lambda: views, exporter=FakeExporter())
    data = sink.metrics_data(series(views, exports), time.time_ns())
    got = as_samples(flat_of(data))
    want = scrape(views, exports)
    assert got.keys() == want.keys()
    assert got == want
    # the comparison is not vacuous: every kind of number is there
    families = {name for name, _ in got}
    for family in (
        "kvcache_block_restores_total", "kvcache_blocks_accessed_total",
        "kvcache_block_lifetime_seconds_bucket", "kvcache_exporter_decode_errors_total",
        "kvcache_alerts_total", "kvcache_exporter_otlp_exports_total",
    ):  # fmt: skip
        assert family in families, family
    stored = {k: v for k, v in got.items() if k[0] == "kvcache_blocks_stored_total"}
    assert min(stored.values()) > 0 and len(stored) >= 4


def test_every_metrics_family_has_an_otlp_mapping(fed: Fed) -> None:
    """The OTLP catalog covers every family of the exposition (build_info becomes the
    resource's service.version), so a family added to /metrics cannot be forgotten here."""
    text = render([*fed.views(), view_of_vector("vllm-0.33.0.jsonl")], {"success": 0})
    families = {f.name for f in text_string_to_metric_families(text)}
    mapped = {  # the parser names a counter family without its _total
        inst.name.removesuffix("_total") if inst.instrument is Instrument.COUNTER else inst.name
        for inst in OTLP_FAMILIES
    }
    assert families == mapped | {BUILD_INFO}
    assert len({inst.otel_name for inst in OTLP_FAMILIES}) == len(OTLP_FAMILIES)


def collector_prometheus_name(name: str, unit: str, kind: Instrument) -> str:
    """The OpenTelemetry Collector's Prometheus name for an OTLP metric (its default
    translation: dots to underscores, unit suffix unless present, ``_total`` on monotonic
    sums), enough of it for the units used here."""
    units = {"s": "seconds", "By": "bytes", "1": "ratio" if kind is Instrument.GAUGE else ""}
    out = name.replace(".", "_")
    suffix = "" if unit.startswith("{") else units.get(unit, unit)
    if suffix and not out.endswith("_" + suffix):
        out += "_" + suffix
    if kind is Instrument.COUNTER:
        out += "_total"
    return out


def test_names_follow_opentelemetry_conventions() -> None:
    """Dotted lower-case names in the ``kvcache.`` namespace, no ``_total``, UCUM units (or
    ``{annotations}``), namespaced attributes; and through the Collector's Prometheus
    translation each name comes back as its /metrics name (one documented exception)."""
    for inst in OTLP_FAMILIES:
        assert re.fullmatch(r"kvcache(\.[a-z][a-z0-9_]*)+", inst.otel_name), inst.otel_name
        assert not inst.otel_name.endswith("_total") and not inst.otel_name.endswith("seconds")
        assert inst.unit in ("s", "By", "1", "") or re.fullmatch(r"\{[a-z]+\}", inst.unit)
        for _, attr in inst.attributes:
            assert attr.startswith("kvcache.") or attr == "error.type", attr
        assert (inst.instrument is Instrument.COUNTER) == inst.name.endswith("_total")
        translated = collector_prometheus_name(inst.otel_name, inst.unit, inst.instrument)
        if inst.name != "kvcache_exporter_collector_bytes":
            assert translated == inst.name, inst.otel_name
    assert BY_NAME["kvcache_blocks_stored_total"].otel_name == "kvcache.blocks.stored"
    assert BY_NAME["kvcache_blocks_stored_total"].unit == "{block}"
    assert BY_NAME["kvcache_block_lifetime_seconds"].otel_name == "kvcache.block.lifetime"
    assert BY_NAME["kvcache_block_lifetime_seconds"].unit == "s"


def test_kinds_units_temporality_and_resource_when_cumulative(fed: Fed) -> None:
    """Counters are monotonic cumulative sums since the sink started, up-down counters
    non-monotonic sums, histograms cumulative with the Prometheus bounds and no min/max."""
    exporter = FakeExporter()
    sink = OTLPSink(config(), fed.views, exporter=exporter)
    assert sink.export_once()
    flat = flat_of(exporter.sent[0])
    assert flat.scope == ("kvcache_exporter", __version__)
    assert flat.resource["service.name"] == "kvcache-exporter"
    assert flat.resource["service.version"] == __version__
    assert uuid.UUID(flat.resource["service.instance.id"])
    view = fed.views()[0]
    present = series(fed.views(), sink.exports())
    for inst in OTLP_FAMILIES:
        if not present[inst.name]:  # no series now (no alert active, say): no metric
            assert inst.otel_name not in flat.metrics
            continue
        metric = flat.metrics[inst.otel_name]
        assert (metric.unit, metric.description) == (inst.unit, inst.help)
        if inst.instrument is Instrument.GAUGE:
            assert metric.kind == "gauge"
            continue
        assert metric.temporality == CUMULATIVE
        assert set(metric.starts.values()) == {sink._start_ns}
        if inst.instrument is Instrument.HISTOGRAM:
            assert metric.kind == "histogram"
            for point in metric.points.values():
                assert isinstance(point, HistPoint) and not point.has_min_max
                assert point.count == sum(point.counts)
                key = next((k for k, fam in LIFECYCLE_FAMILIES if fam == inst.name), None)
                if key is not None:
                    assert point.bounds == view.collector.histograms[key].bounds
                else:  # reuse distances: bounds are multiples of the medium's capacity
                    assert view.whatif is not None
                    capacities = {m.capacity for m in view.whatif.media.values()}
                    assert any(
                        point.bounds == tuple(b * c for b in DEFAULT_DISTANCE_BUCKETS)
                        for c in capacities
                    )
        else:
            assert metric.kind == "sum"
            assert metric.monotonic is (inst.instrument is Instrument.COUNTER)
    place = frozenset(
        {("kvcache.engine", "sim"), ("kvcache.medium", "GPU"), ("kvcache.group", "0")}
    )
    gpu = view.collector.place("GPU")
    assert gpu is not None
    assert flat.metrics["kvcache.blocks.stored"].points[place] == int(view.collector.stored[gpu])


# --- delta temporality --------------------------------------------------------------------------
def test_delta_exports_add_up_to_the_cumulative_numbers() -> None:
    """In delta mode each counter and histogram point covers the time since the last
    successful export (its start time); a failed export loses nothing, the next success
    carries its increments; the deltas sum to exactly what /metrics shows. Up-down counters
    and gauges stay as they are."""
    engine = Fed("delta")
    exporter = FakeExporter(
        [
            MetricExportResult.SUCCESS,
            MetricExportResult.FAILURE,
            ConnectionError("collector gone"),
            MetricExportResult.SUCCESS,
            MetricExportResult.SUCCESS,
        ]
    )
    sink = OTLPSink(config(temporality="delta"), engine.views, exporter=exporter)
    outcomes = []
    for chunk in (150, 100, 100, 100, None):
        engine.feed(chunk)
        outcomes.append(sink.export_once())
    assert outcomes == [True, False, False, True, True]
    assert sink.exports() == {"success": 3, "failure": 2}

    flats = [flat_of(data) for data in exporter.sent]
    successful = [flats[i] for i in (0, 3, 4)]
    totals: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
    for flat in successful:
        for metric in flat.metrics.values():
            inst = next(i for i in OTLP_FAMILIES if i.otel_name == metric.name)
            if inst.instrument in (Instrument.COUNTER, Instrument.HISTOGRAM):
                assert metric.temporality == DELTA
            elif inst.instrument is Instrument.UPDOWN:
                assert metric.temporality == CUMULATIVE and metric.monotonic is False
            for attrs, point in metric.points.items():
                key = (metric.name, attrs)
                if inst.instrument not in (Instrument.COUNTER, Instrument.HISTOGRAM):
                    totals[key] = point  # the latest value
                elif isinstance(point, HistPoint):
                    before = totals.get(key)
                    counts = (
                        point.counts
                        if before is None
                        else tuple(a + b for a, b in zip(before.counts, point.counts, strict=True))
                    )
                    total_sum = point.sum + (before.sum if before is not None else 0.0)
                    totals[key] = HistPoint(
                        point.bounds, counts, total_sum, sum(counts), False, 0, 0
                    )
                else:
                    totals[key] = totals.get(key, 0) + point
    # start times chain: each delta starts where the previous successful export ended
    stored = "kvcache.blocks.stored"
    ends = [next(iter(flat.metrics[stored].times.values())) for flat in successful]
    starts = [next(iter(flat.metrics[stored].starts.values())) for flat in successful]
    assert starts[1:] == ends[:-1] and starts[0] == sink._start_ns

    last = flats[-1]
    accumulated = Flat(last.resource, last.scope, {})
    for name, metric in last.metrics.items():
        metric.points = {attrs: totals[(name, attrs)] for attrs in metric.points}
        accumulated.metrics[name] = metric
    got = as_samples(accumulated)
    exported_before_last = {"success": 2, "failure": 2}  # what the last export carried
    want = scrape(engine.views(), exported_before_last)
    sums = {k for k in want if k[0].endswith("_sum")}
    assert {k: v for k, v in got.items() if k not in sums} == {
        k: v for k, v in want.items() if k not in sums
    }
    for key in sums:  # float sums of differences: equal up to rounding
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
    gpu = frozenset({("engine", "delta"), ("medium", "GPU"), ("group", "0")})
    assert want[("kvcache_blocks_stored_total", gpu)] > 0  # not vacuous


# --- failures, the thread, stop -----------------------------------------------------------------
def test_failures_are_counted_and_logged_at_most_once_a_minute(
    fed: Fed, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = FakeExporter([MetricExportResult.FAILURE] * 3 + [RuntimeError("boom")])
    sink = OTLPSink(config(), fed.views, exporter=exporter)
    with caplog.at_level(logging.INFO, logger="kvcache_exporter.otlp"):
        for _ in range(4):
            assert not sink.export_once()
        assert sink.export_once()
    assert sink.exports() == {"success": 1, "failure": 4}
    failed = [r for r in caplog.records if r.getMessage() == "OTLP export failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    recovered = [r for r in caplog.records if r.getMessage() == "OTLP export succeeded again"]
    assert len(recovered) == 1
    text = render(fed.views(), sink.exports())
    assert 'kvcache_exporter_otlp_exports_total{result="failure"} 4' in text
    assert 'kvcache_exporter_otlp_exports_total{result="success"} 1' in text
    assert "kvcache_exporter_otlp_exports_total" not in render(fed.views())


def test_the_thread_exports_every_interval_and_once_more_on_stop(fed: Fed) -> None:
    exporter = FakeExporter()
    sink = OTLPSink(config(interval=0.1), fed.views, exporter=exporter)
    started = time.monotonic()
    sink.start()
    deadline = started + 5
    while len(exporter.sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    periodic = len(exporter.sent)
    elapsed = time.monotonic() - started
    assert periodic >= 3 and elapsed >= 0.3  # every 0.1 s, not faster
    stopping = time.monotonic()
    sink.stop()
    assert time.monotonic() - stopping < 2.0
    assert exporter.times[-1] >= stopping  # the final export, sent by stop()
    after = len(exporter.sent)
    time.sleep(0.25)
    assert len(exporter.sent) == after  # and nothing after stop() returned
    assert exporter.shut_down.is_set()


class HangingExporter(FakeExporter):
    """An export that never returns until the exporter is shut down (a dead collector with a
    very long timeout)."""

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.sent.append(metrics_data)
        self.shut_down.wait(30)
        return MetricExportResult.FAILURE


def test_stop_is_bounded_when_an_export_hangs(fed: Fed) -> None:
    exporter = HangingExporter()
    sink = OTLPSink(config(interval=0.05), fed.views, exporter=exporter)
    sink.start()
    time.sleep(0.2)  # the first export is hanging now
    started = time.monotonic()
    sink.stop(timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert exporter.shut_down.is_set()


def test_an_unreachable_collector_fails_within_the_timeout(fed: Fed) -> None:
    """The real gRPC and HTTP exporters against a closed port: each export gives up within
    its timeout, and is counted as a failure."""
    for protocol in ("grpc", "http/protobuf"):
        port = free_port()  # nothing listens there
        sink = OTLPSink(
            config(endpoint=f"http://127.0.0.1:{port}", protocol=protocol, timeout=0.5),
            fed.views,
        )
        started = time.monotonic()
        assert not sink.export_once()
        assert time.monotonic() - started < 3.0, protocol
        assert sink.exports()["failure"] == 1
        sink.stop(timeout=1)


# --- real receivers -----------------------------------------------------------------------------
@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[GrpcReceiver | HttpReceiver]:
    server = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    yield server
    server.close()


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_real_receivers_get_the_numbers_headers_and_encoding(
    fed: Fed, receiver: GrpcReceiver | HttpReceiver, compression: str
) -> None:
    protocol = "grpc" if isinstance(receiver, GrpcReceiver) else "http/protobuf"
    sink = OTLPSink(
        config(
            endpoint=receiver.endpoint,
            protocol=protocol,
            compression=compression,
            headers=(("x-tenant", "team a"),),
        ),
        fed.views,
    )
    assert sink.export_once()
    received = receiver.store.wait_for(1, 5)
    assert received.headers.get("x-tenant") == "team a"
    if protocol == "http/protobuf":
        assert received.content_encoding == (None if compression == "none" else "gzip")
    got = as_samples(flatten(received.request))
    assert got == scrape(fed.views(), {"success": 0, "failure": 0})
    sink.stop(timeout=2)


def test_standard_environment_alone_configures_the_export(
    fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_* and OTEL_METRIC_EXPORT_INTERVAL alone turn export on; the SDK
    exporter reads endpoint, headers and compression itself (and appends /v1/metrics)."""
    server = HttpReceiver()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": server.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_METRIC_EXPORT_INTERVAL": "2500",
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
            "OTEL_SERVICE_NAME": "kv-sidecar",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        cfg = load([], environ=env).otlp
        assert cfg == OTLPConfig(
            endpoint=None, protocol="http/protobuf", interval=2.5, temporality="delta"
        )
        sink = OTLPSink(cfg, fed.views)
        assert sink.export_once()
        received = server.store.wait_for(1, 5)
        assert received.headers["authorization"] == "Bearer abc"
        assert received.content_encoding == "gzip"
        assert flatten(received.request).resource["service.name"] == "kv-sidecar"
        sink.stop(timeout=2)
    finally:
        server.close()


# --- resource -----------------------------------------------------------------------------------
def test_resource_defaults_and_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    plain = build_resource({}).attributes
    assert plain["service.name"] == "kvcache-exporter"
    assert plain["service.version"] == __version__
    assert uuid.UUID(str(plain["service.instance.id"])).version == 4
    assert not any(str(k).startswith("k8s.") for k in plain)

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=x")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "kv")
    attrs = build_resource({}).attributes
    assert attrs["service.name"] == "kv"  # OTEL_SERVICE_NAME beats OTEL_RESOURCE_ATTRIBUTES
    assert attrs["deployment.environment"] == "prod"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=fixed")
    assert build_resource({}).attributes["service.instance.id"] == "fixed"


def test_kubernetes_attributes_and_a_stable_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    pod = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "POD_NAME": "vllm-0",
        "POD_NAMESPACE": "inference",
        "NODE_NAME": "node-7",
        "K8S_CONTAINER_NAME": "kvcache-exporter",
    }
    assert kubernetes_attributes(pod) == {
        "k8s.namespace.name": "inference",
        "k8s.pod.name": "vllm-0",
        "k8s.node.name": "node-7",
        "k8s.container.name": "kvcache-exporter",
    }
    first = build_resource(pod).attributes["service.instance.id"]
    assert first == build_resource(pod).attributes["service.instance.id"]
    assert uuid.UUID(str(first)).version == 5
    # generic names mean nothing outside a pod; the K8S_* ones always count
    assert kubernetes_attributes({"POD_NAME": "x", "HOSTNAME": "h"}) == {}
    assert kubernetes_attributes({"K8S_POD_NAME": "p"}) == {"k8s.pod.name": "p"}
    assert (
        kubernetes_attributes({"KUBERNETES_SERVICE_HOST": "1", "HOSTNAME": "h"}).get("k8s.pod.name")
        == "h"
    )


# --- configuration ------------------------------------------------------------------------------
def test_otlp_is_off_unless_an_endpoint_is_configured() -> None:
    assert load([], environ={}).otlp is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert load([], environ=endpoint).otlp == OTLPConfig()
    assert load([], environ={**endpoint, "OTEL_SDK_DISABLED": "true"}).otlp is None
    assert load([], environ={**endpoint, "OTEL_METRICS_EXPORTER": "none"}).otlp is None
    assert load([], environ={**endpoint, "OTEL_METRICS_EXPORTER": "otlp,console"}).otlp
    # an explicit setting of this program wins over the SDK switches
    flag = ["--otlp.endpoint", "http://c:4317"]
    assert load(flag, environ={"OTEL_METRICS_EXPORTER": "none"}).otlp is not None


def test_otlp_flags_and_their_precedence_over_standard_variables(tmp_path: Path) -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
    }
    argv = [
        "--otlp.endpoint", "https://otel.example:4317",
        "--otlp.protocol", "grpc",
        "--otlp.interval", "5s",
        "--otlp.headers", "api-key=a%3Db, x-org = 1",
        "--otlp.compression", "gzip",
        "--otlp.timeout", "2.5",
        "--otlp.temporality", "cumulative",
    ]  # fmt: skip
    assert load(argv, environ=otel).otlp == OTLPConfig(
        endpoint="https://otel.example:4317",
        protocol="grpc",
        interval=5.0,
        headers=(("api-key", "a=b"), ("x-org", "1")),
        compression="gzip",
        timeout=2.5,
        temporality="cumulative",
    )
    # without flags the standard variables apply; lowmemory means delta here
    env = {**otel, "KVCACHE_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    cfg = load([], environ=env).otlp
    assert cfg is not None
    assert (cfg.protocol, cfg.interval, cfg.temporality) == ("http/protobuf", 60.0, "delta")
    low = {**env, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "LowMemory"}
    assert load([], environ=low).otlp == OTLPConfig(
        endpoint="http://c:4318", protocol="http/protobuf", interval=60.0, temporality="delta"
    )
    # the config file, too, beats the standard variables
    file = tmp_path / "c.yaml"
    file.write_text("otlp.endpoint: http://f:4317\notlp.temporality: cumulative\n")
    cfg = load(["--config.file", str(file)], environ=otel).otlp
    assert cfg is not None and (cfg.endpoint, cfg.temporality) == ("http://f:4317", "cumulative")


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--otlp.endpoint", "127.0.0.1:4317"], {}, "--otlp.endpoint"),
        (["--otlp.endpoint", "tcp://x:1"], {}, "http://HOST:PORT"),
        (["--otlp.protocol", "http/json"], {}, "--otlp.protocol"),
        (["--otlp.headers", "novalue"], {}, "--otlp.headers"),
        (["--otlp.compression", "zstd"], {}, "--otlp.compression"),
        (["--otlp.temporality", "lowmemory"], {}, "--otlp.temporality"),
        (["--otlp.timeout", "0"], {}, "--otlp.timeout"),
        (["--otlp.histogram-aggregation", "exponential"], {}, "explicit buckets only"),
        (
            ["--otlp.endpoint", "http://c:1"],
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            ["--otlp.endpoint", "http://c:1"],
            {"OTEL_METRIC_EXPORT_INTERVAL": "soon"},
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
        (
            ["--otlp.endpoint", "http://c:1"],
            {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes"},
            "TEMPORALITY_PREFERENCE",
        ),
    ],
)
def test_bad_otlp_settings_are_one_line_errors(
    argv: list[str], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv, environ=env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_explicit_histograms_are_accepted() -> None:
    cfg = load(["--otlp.endpoint", "http://c:1", "--otlp.histogram-aggregation", "explicit"], {})
    assert cfg.otlp is not None and cfg.otlp.histogram_aggregation == "explicit"


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://c:4318", "http://c:4318/v1/metrics"),
        ("http://c:4318/", "http://c:4318/v1/metrics"),
        ("https://c/otlp", "https://c/otlp/v1/metrics"),
        ("http://c:4318/v1/metrics", "http://c:4318/v1/metrics"),
    ],
)
def test_http_endpoint_gets_the_signal_path(base: str, url: str) -> None:
    assert http_metrics_url(base) == url


# --- documentation ------------------------------------------------------------------------------
def test_docs_map_every_prometheus_name_to_its_otlp_name() -> None:
    """docs/metrics.md has a row per family: Prometheus name, OTLP name, instrument, unit and
    attributes exactly as the sink sends them."""
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for inst in OTLP_FAMILIES:
        attrs = ", ".join(f"`{attr}`" for _, attr in inst.attributes)
        unit = f"`{inst.unit}`" if inst.unit else "—"
        row = f"| `{inst.name}` | `{inst.otel_name}` | {inst.instrument.value} | {unit} | {attrs} |"
        assert row in docs, row
    assert "`kvcache_exporter_build_info`" in docs and "`service.version`" in docs
