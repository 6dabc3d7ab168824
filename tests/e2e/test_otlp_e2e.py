"""OTLP end to end: the real exporter process, fed over real ZeroMQ, pushing to real receivers.

The receivers are a gRPC ``MetricsService`` server and an HTTP ``/v1/metrics`` server built
from the official ``opentelemetry-proto`` stubs (``tests/otlp_receivers.py``). Once the stream
is ingested the numbers are static, so an export taken after that must equal a ``/metrics``
scrape — names, units, attributes, resource, counters, gauges, histogram buckets and sums — for
both transports and both temporalities (for delta: the received deltas add up to it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvcache_exporter.catalog import Instrument
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
)
from kvcache_exporter.publisher import KVEventPublisher
from kvcache_exporter.sinks.otlp import OTLP_FAMILIES

from ..conftest import free_port
from ..otlp_receivers import (
    CUMULATIVE,
    DELTA,
    Flat,
    GrpcReceiver,
    HistPoint,
    HttpReceiver,
    Receiver,
    as_samples,
    flatten,
)
from .conftest import ExporterProcess, Samples, select, value, wait_for

pytestmark = pytest.mark.e2e

START_TS = 1_760_000_000.0
REQUESTS = 1200  # enough for CPU offloads, hits, restores and evictions on both tiers
ENGINE = "vllm"
EXPORTS = "kvcache_exporter_otlp_exports_total"
BUILD_INFO = "kvcache_exporter_build_info"
BY_NAME = {inst.otel_name: inst for inst in OTLP_FAMILIES}


@pytest.fixture(autouse=True)
def no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets configures OTLP: drop OTEL_* from the environment the exporter
    process inherits."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)


@pytest.fixture
def receivers() -> Iterator[Callable[[str, int], Receiver]]:
    """Starts receivers (``grpc`` or ``http/protobuf``, on a port, 0 for any); all are closed
    at the end."""
    started: list[Receiver] = []

    def start(protocol: str, port: int = 0) -> Receiver:
        receiver: Receiver = GrpcReceiver(port) if protocol == "grpc" else HttpReceiver(port)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.close()


@contextlib.contextmanager
def engine_publisher() -> Iterator[tuple[KVEventPublisher, int]]:
    port = free_port()
    with KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True) as publisher:
        yield publisher, port


def publish(publisher: KVEventPublisher) -> int:
    """The first REQUESTS trace requests through an LRU cache with a CPU tier and hit
    reporting, as fast as possible; the number of batches sent."""
    simulator = PrefixCacheSimulator(1500, 800, report_hits=True)
    engine = SimulatedEngine(
        simulator, publisher, speed=0, requests_per_batch=4, start_time=START_TS
    )
    return engine.run(read_mooncake(bundled_trace_path()), limit=REQUESTS).batches


def ingest(exporter: ExporterProcess, publisher: KVEventPublisher) -> Samples:
    """Publish the stream once the exporter is subscribed; the /metrics scrape after all of it
    was ingested (static from then on)."""
    exporter.wait_ready()
    time.sleep(0.3)  # ZeroMQ slow joiner: let the subscription reach the publisher
    batches = publish(publisher)
    return exporter.wait_ingested({ENGINE: batches})


def export_after(receiver: Receiver, timeout: float = 10.0) -> int:
    """The number of the second export to arrive from now: its snapshot was certainly taken
    after this moment (the first may have been in flight already)."""
    count = receiver.store.count() + 2
    receiver.store.wait_for(count, timeout)
    return count


def accumulate(flats: list[Flat]) -> Flat:
    """Delta exports summed into cumulative values (gauges and up-down counters: the latest)."""
    total: dict[str, dict[Any, Any]] = {}
    for flat in flats:
        for name, metric in flat.metrics.items():
            kind = BY_NAME[name].instrument
            points = total.setdefault(name, {})
            for attrs, point in metric.points.items():
                before = points.get(attrs)
                if kind not in (Instrument.COUNTER, Instrument.HISTOGRAM) or before is None:
                    points[attrs] = point
                elif isinstance(point, HistPoint):
                    counts = tuple(a + b for a, b in zip(before.counts, point.counts, strict=True))
                    points[attrs] = HistPoint(
                        point.bounds, counts, before.sum + point.sum, sum(counts), False, 0, 0
                    )
                else:
                    points[attrs] = before + point
    last = flats[-1]
    for name, metric in last.metrics.items():
        metric.points = {attrs: total[name][attrs] for attrs in metric.points}
    return last


def assert_matches_scrape(flat: Flat, scraped: Samples, temporality: int) -> None:
    """What arrived equals /metrics: every series, every value (histogram sums to 1e-9 when
    they are sums of deltas), plus OTLP metadata (units, kinds, temporality, resource)."""
    (version,) = [dict(labels)["version"] for name, labels in scraped if name == BUILD_INFO]
    assert flat.resource["service.version"] == version
    assert flat.scope == ("kvcache_exporter", version)
    for name, metric in flat.metrics.items():
        inst = BY_NAME[name]
        assert metric.unit == inst.unit, name
        if inst.instrument is Instrument.GAUGE:
            assert metric.kind == "gauge", name
            continue
        assert metric.kind == ("histogram" if inst.instrument is Instrument.HISTOGRAM else "sum"), (
            name
        )
        want = CUMULATIVE if inst.instrument is Instrument.UPDOWN else temporality
        assert metric.temporality == want, name
        if metric.kind == "sum":
            assert metric.monotonic is (inst.instrument is Instrument.COUNTER), name
    assert flat.metrics["kvcache.blocks.stored"].unit == "{block}"
    assert flat.metrics["kvcache.block.lifetime"].unit == "s"

    got = as_samples(flat)
    # OTLP carries the catalog's families; the process's own series are /metrics' alone.
    want = {
        k: v
        for k, v in scraped.items()
        if k[0] not in (BUILD_INFO, EXPORTS) and k[0].startswith("kvcache_")
    }
    sent_exports = {k: v for k, v in got.items() if k[0] == EXPORTS}
    got = {k: v for k, v in got.items() if k[0] != EXPORTS}
    assert got.keys() == want.keys()
    floats = {k for k in want if k[0].endswith("_sum")} if temporality == DELTA else set()
    assert {k: v for k, v in got.items() if k not in floats} == {
        k: v for k, v in want.items() if k not in floats
    }
    for key in floats:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
    # the export counter it carried counts the exports before it (cumulative either way)
    assert set(sent_exports) == {
        (EXPORTS, frozenset({("result", "success")})),
        (EXPORTS, frozenset({("result", "failure")})),
    }
    # not vacuous: the stream exercised every path
    for medium in ("GPU", "CPU"):
        labels = {"engine": ENGINE, "medium": medium, "group": "0"}
        for family in ("kvcache_blocks_stored_total", "kvcache_block_restores_total"):
            assert value(want, family, **labels) > 0, (family, medium)
        assert value(want, "kvcache_block_lifetime_seconds_count", **labels) > 0
    assert value(want, "kvcache_blocks_accessed_total", engine=ENGINE, medium="GPU", group="0") > 0


# --- the numbers, both transports, both temporalities -------------------------------------------
CASES = [
    pytest.param("grpc", "cumulative", "flags", None, id="grpc-cumulative"),
    pytest.param("http/protobuf", "cumulative", "flags", "gzip", id="http-cumulative-gzip"),
    pytest.param("grpc", "delta", "flags", "gzip", id="grpc-delta-gzip"),
    pytest.param("http/protobuf", "delta", "env", "gzip", id="http-delta-gzip-env-only"),
]


@pytest.mark.parametrize(("protocol", "temporality", "configured_by", "compression"), CASES)
def test_otlp_equals_metrics(
    receivers: Callable[[str, int], Receiver],  # first: they outlive the exporter
    start_exporter: Callable[..., ExporterProcess],
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    temporality: str,
    configured_by: str,
    compression: str | None,
) -> None:
    """After ingestion, an export equals the /metrics scrape (delta: the sum of all deltas
    received). One case is configured by the standard OTEL_* variables alone."""
    receiver = receivers(protocol, 0)
    with engine_publisher() as (publisher, port):
        args = ["--source", f"{ENGINE}=tcp://127.0.0.1:{port}"]
        if configured_by == "flags":
            args += [
                "--otlp.endpoint", receiver.endpoint,
                "--otlp.protocol", protocol,
                "--otlp.interval", "0.5",
                "--otlp.temporality", temporality,
            ]  # fmt: skip
            if compression is not None:
                args += ["--otlp.compression", compression]
        else:
            for key, setting in {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_COMPRESSION": compression or "none",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-scope-orgid=kv",
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": temporality,
                "OTEL_METRIC_EXPORT_INTERVAL": "500",
                "OTEL_SERVICE_NAME": "kv-sidecar",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,k8s.pod.name=p-0",
            }.items():
                monkeypatch.setenv(key, setting)
        exporter = start_exporter(*args)
        scraped = ingest(exporter, publisher)
        count = export_after(receiver)

    requests = receiver.store.requests[:count]
    flats = [flatten(r.request) for r in requests]
    want = DELTA if temporality == "delta" else CUMULATIVE
    flat = accumulate(flats) if temporality == "delta" else flats[-1]
    assert_matches_scrape(flat, scraped, want)
    wait_for(  # the receiver answers before the exporter counts the success
        lambda: value(exporter.scrape(), EXPORTS, result="success") >= count,
        5,
        f"{count} successful exports counted",
    )
    assert value(exporter.scrape(), EXPORTS, result="failure") == 0

    resource = flat.resource
    if configured_by == "env":
        assert resource["service.name"] == "kv-sidecar"
        assert resource["deployment.environment.name"] == "test"
        assert resource["k8s.pod.name"] == "p-0"
        assert requests[-1].headers["x-scope-orgid"] == "kv"
    else:
        assert resource["service.name"] == "kvcache-exporter"
    assert resource["service.instance.id"]
    if protocol == "http/protobuf":
        assert {r.content_encoding for r in requests} == {compression}


# --- a collector that is down, then up ----------------------------------------------------------
def test_collector_down_then_up(
    receivers: Callable[[str, int], Receiver],  # first: they outlive the exporter
    start_exporter: Callable[..., ExporterProcess],
) -> None:
    """With nothing listening at the endpoint, ingestion still keeps pace and the failures are
    counted; once a receiver appears on that port, exports succeed with the right numbers."""
    otlp_port = free_port()
    with engine_publisher() as (publisher, port):
        exporter = start_exporter(
            "--source", f"{ENGINE}=tcp://127.0.0.1:{port}",
            "--otlp.endpoint", f"http://127.0.0.1:{otlp_port}",
            "--otlp.interval", "0.3",
            "--otlp.timeout", "0.5",
        )  # fmt: skip
        exporter.wait_ready()
        time.sleep(0.3)
        published = time.monotonic()
        batches = publish(publisher)
        publish_s = time.monotonic() - published
        scraped = exporter.wait_ingested({ENGINE: batches})
        ingest_s = time.monotonic() - published
        # ingestion keeps pace: done within moments of the last batch, exports failing meanwhile
        assert ingest_s < publish_s + 5.0, (publish_s, ingest_s)
        wait_for(
            lambda: value(exporter.scrape(), EXPORTS, result="failure") >= 3,
            10,
            "three failed exports",
        )
        assert value(exporter.scrape(), EXPORTS, result="success") == 0
        assert "OTLP export failed" in exporter.log_text()

        receiver = receivers("grpc", otlp_port)
        count = export_after(receiver, timeout=15)
        failures = value(exporter.scrape(), EXPORTS, result="failure")
        assert value(exporter.scrape(), EXPORTS, result="success") >= 2
        flat = flatten(receiver.store.requests[count - 1].request)
        assert_matches_scrape(flat, scraped, CUMULATIVE)
        sent_failures = flat.metrics["kvcache.exporter.otlp.exports"].points[
            frozenset({("kvcache.export.result", "failure")})
        ]
        assert 3 <= sent_failures <= failures
        # the failure log is rate-limited: one line for all those failures
        assert exporter.log_text().count("OTLP export failed") == 1
        assert "OTLP export succeeded again" in exporter.log_text()


# --- shutdown -----------------------------------------------------------------------------------
def test_sigterm_sends_a_final_export(
    receivers: Callable[[str, int], Receiver],  # first: they outlive the exporter
    start_exporter: Callable[..., ExporterProcess],
) -> None:
    """With a long interval no export happens on its own; SIGTERM sends one, with everything
    ingested, and the process then exits 0 promptly."""
    receiver = receivers("http/protobuf", 0)
    with engine_publisher() as (publisher, port):
        exporter = start_exporter(
            "--source", f"{ENGINE}=tcp://127.0.0.1:{port}",
            "--otlp.endpoint", receiver.endpoint,
            "--otlp.protocol", "http/protobuf",
            "--otlp.interval", "300",
        )  # fmt: skip
        scraped = ingest(exporter, publisher)
        assert receiver.store.count() == 0
        started = time.monotonic()
        exporter.proc.send_signal(signal.SIGTERM)
        assert exporter.proc.wait(10) == 0
        assert time.monotonic() - started < 3.0
    assert receiver.store.count() == 1
    flat = flatten(receiver.store.requests[0].request)
    assert_matches_scrape(flat, scraped, CUMULATIVE)
    assert select(scraped, EXPORTS) == {
        frozenset({("result", "success")}): 0,
        frozenset({("result", "failure")}): 0,
    }
