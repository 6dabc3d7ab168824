"""Real OTLP metric receivers for tests, built from the official ``opentelemetry-proto`` stubs.

- :class:`GrpcReceiver`: a ``grpc.server`` serving the generated ``MetricsService``.
- :class:`HttpReceiver`: an ``http.server`` answering ``POST /v1/metrics`` with a binary
  ``ExportMetricsServiceRequest`` body (gzip or deflate content encoding included).

Both keep every request they accept. :func:`flatten` turns a request into plain data and
:func:`as_samples` turns that into Prometheus samples (through the exporter's documented
name mapping), so a test can compare what arrived with a ``/metrics`` scrape.
"""

from __future__ import annotations

import gzip
import math
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as service_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2

from kvcache_exporter.catalog import BY_NAME
from kvcache_exporter.sinks.otlp import OTLP_FAMILIES

Request = service_pb2.ExportMetricsServiceRequest
Attrs = frozenset[tuple[str, Any]]
LabelSet = frozenset[tuple[str, str]]
Samples = dict[tuple[str, LabelSet], float]


@dataclass(frozen=True)
class Received:
    """One accepted export request and how it came."""

    request: Any  # ExportMetricsServiceRequest
    arrived: float  # time.monotonic()
    headers: dict[str, str]
    content_encoding: str | None = None


class _Store:
    """Requests received so far, with a condition to wait on."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._cond = threading.Condition()

    def add(self, received: Received) -> None:
        with self._cond:
            self.requests.append(received)
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return len(self.requests)

    def wait_for(self, count: int, timeout: float) -> Received:
        """Until at least ``count`` requests arrived; the ``count``-th (1-based)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for OTLP request #{count} "
                        f"({len(self.requests)} arrived)"
                    )
                self._cond.wait(left)
            return self.requests[count - 1]

    def last(self) -> Received:
        with self._cond:
            return self.requests[-1]


class GrpcReceiver(service_grpc.MetricsServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC metrics endpoint on 127.0.0.1 (``port`` 0: any free port)."""

    def __init__(self, port: int = 0) -> None:
        self.store = _Store()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        service_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{port}")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: Any, context: Any) -> Any:  # the generated stub's name
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.store.add(Received(request, time.monotonic(), headers, headers.get("grpc-encoding")))
        return service_pb2.ExportMetricsServiceResponse()

    def close(self) -> None:
        self.server.stop(grace=None).wait(5)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/metrics":
            self._answer(404, b"not found", "text/plain")
            return
        encoding = self.headers.get("Content-Encoding")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = Request()
        try:
            request.ParseFromString(body)
        except Exception:
            self._answer(400, b"not an ExportMetricsServiceRequest", "text/plain")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.store.add(Received(request, time.monotonic(), headers, encoding))
        response = service_pb2.ExportMetricsServiceResponse().SerializeToString()
        self._answer(200, response, "application/x-protobuf")


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, store: _Store) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.store = store


class HttpReceiver:
    """An OTLP/HTTP (protobuf) metrics endpoint on 127.0.0.1: ``POST /v1/metrics``."""

    def __init__(self, port: int = 0) -> None:
        self.store = _Store()
        self.server = _HttpServer(port, self.store)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


Receiver = GrpcReceiver | HttpReceiver
RECEIVERS: dict[str, Callable[[int], Receiver]] = {
    "grpc": GrpcReceiver,
    "http/protobuf": HttpReceiver,
}


# --- reading what arrived -----------------------------------------------------------------------
def any_value(value: Any) -> Any:
    """A protobuf ``AnyValue`` as a Python value (strings, numbers, booleans)."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class HistPoint:
    """An explicit-bucket histogram point as sent."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int
    has_min_max: bool
    start: int
    time: int


@dataclass
class MetricOut:
    """One OTLP metric as received: kind (``sum``, ``gauge``, ``histogram``, …),
    temporality, monotonicity and points keyed by their attributes."""

    name: str
    unit: str
    description: str
    kind: str
    temporality: int | None = None
    monotonic: bool | None = None
    points: dict[Attrs, Any] = field(default_factory=dict)
    starts: dict[Attrs, int] = field(default_factory=dict)
    times: dict[Attrs, int] = field(default_factory=dict)


@dataclass
class Flat:
    """A request as plain data: resource attributes, scope and metrics by name."""

    resource: dict[str, Any]
    scope: tuple[str, str]
    metrics: dict[str, MetricOut]


def flatten(request: Any) -> Flat:
    """The single resource and scope of an export from this exporter, as plain data."""
    assert len(request.resource_metrics) == 1, "one resource per export"
    rm = request.resource_metrics[0]
    assert len(rm.scope_metrics) == 1, "one scope per export"
    sm = rm.scope_metrics[0]
    metrics: dict[str, MetricOut] = {}
    for metric in sm.metrics:
        kind = metric.WhichOneof("data")
        data = getattr(metric, kind)
        out = MetricOut(metric.name, metric.unit, metric.description, kind)
        assert metric.name not in metrics, f"metric {metric.name} sent twice"
        if kind in ("sum", "histogram", "exponential_histogram"):
            out.temporality = int(data.aggregation_temporality)
        if kind == "sum":
            out.monotonic = bool(data.is_monotonic)
        for point in data.data_points:
            attrs: Attrs = frozenset(attributes(point.attributes).items())
            assert attrs not in out.points, f"{metric.name}: two points with {set(attrs)}"
            if kind in ("sum", "gauge"):
                number = point.WhichOneof("value")
                out.points[attrs] = point.as_int if number == "as_int" else point.as_double
            elif kind == "histogram":
                out.points[attrs] = HistPoint(
                    tuple(point.explicit_bounds),
                    tuple(point.bucket_counts),
                    point.sum,
                    point.count,
                    point.HasField("min") or point.HasField("max"),
                    point.start_time_unix_nano,
                    point.time_unix_nano,
                )
            else:
                raise AssertionError(f"{metric.name}: unexpected data kind {kind}")
            out.starts[attrs] = point.start_time_unix_nano
            out.times[attrs] = point.time_unix_nano
        metrics[metric.name] = out
    return Flat(attributes(rm.resource.attributes), (sm.scope.name, sm.scope.version), metrics)


def _fmt(value: float) -> str:
    """A bucket bound as ``/metrics`` writes its ``le`` label."""
    return "+Inf" if math.isinf(value) else repr(float(value))


def as_samples(flat: Flat) -> Samples:
    """What ``/metrics`` would show for these OTLP metrics (cumulative ones), through the
    exporter's name and attribute mapping: histograms become ``_bucket``/``_sum``/``_count``."""
    by_name = {inst.otel_name: inst for inst in OTLP_FAMILIES}
    samples: Samples = {}
    for name, metric in flat.metrics.items():
        inst = by_name[name]
        labels_of = {attr: label for label, attr in inst.attributes}
        for attrs, point in metric.points.items():
            labels = frozenset((labels_of[k], str(v)) for k, v in attrs)
            if isinstance(point, HistPoint):
                cumulative = 0
                for bound, count in zip([*point.bounds, math.inf], point.counts, strict=True):
                    cumulative += count
                    le = labels | {("le", _fmt(bound))}
                    samples[(inst.name + "_bucket", le)] = float(cumulative)
                samples[(inst.name + "_sum", labels)] = float(point.sum)
                samples[(inst.name + "_count", labels)] = float(point.count)
            else:
                samples[(inst.name, labels)] = float(point)
    return samples


def prometheus_name(otlp_name: str) -> str:
    return next(inst.name for inst in OTLP_FAMILIES if inst.otel_name == otlp_name)


def otlp_name(prometheus: str) -> str:
    return BY_NAME[prometheus].otel_name


# The protobuf enum values, for assertions that read well.
CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
