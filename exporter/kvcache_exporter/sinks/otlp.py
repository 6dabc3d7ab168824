"""OTLP export (SPEC §4): the numbers ``/metrics`` shows, pushed to an OpenTelemetry collector.

One source of truth: every export reads the same :class:`EngineView` snapshots the Prometheus
exposition renders, turns them into ``MetricsData`` of the OpenTelemetry SDK and hands that to
the SDK's OTLP exporter (gRPC or HTTP/protobuf). No SDK instruments record anything, so
nothing is counted twice and an OTLP counter equals its ``/metrics`` counter at the same
moment.

Exports run on their own thread at a fixed interval; each is bounded by the exporter's timeout
(retries included), so a slow or dead collector delays only the next export, never ingestion.
Failures are counted (``kvcache_exporter_otlp_exports_total{result}``) and logged at most once
a minute. :meth:`OTLPSink.stop` sends a final export.

Delta temporality is computed here: each counter and histogram point is the difference from
the last *successful* export (whose time is the point's start), so a failed export loses
nothing: its increments go out with the next one that succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Final, cast

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.version import __version__ as sdk_version

from .. import __version__
from ..catalog import FAMILIES, OTLP_EXPORT_RESULTS, Family, Instrument
from ..pipeline import EngineView
from .otlp_config import OTLPConfig
from .series import HistogramValue, Labels, Series, Value, series

log = logging.getLogger("kvcache_exporter.otlp")

# Every family but build info, whose version is the resource's service.version instead.
OTLP_FAMILIES: Final = tuple(f for f in FAMILIES if f.otel_name is not None)


def otel_name(family: Family) -> str:
    """The OTLP metric name of a family of :data:`OTLP_FAMILIES`."""
    assert family.otel_name is not None
    return family.otel_name


SCOPE: Final = InstrumentationScope("kvcache_exporter", __version__)
DEFAULT_TIMEOUT: Final = 10.0  # the SDK exporters' default, seconds
FAILURE_LOG_INTERVAL: Final = 60.0  # seconds between two "export failed" log lines
# How long stop() waits for the final export: a shutdown should not hang on a slow collector
# (Kubernetes' grace period is 30 s, and the sockets still have to close), and when exports
# were failing anyway one quick attempt is all that is worth waiting for.
FINAL_EXPORT_WAIT: Final = 5.0
FINAL_EXPORT_WAIT_FAILING: Final = 1.0
# OpenTelemetry's namespace for name-based service.instance.id values (semantic conventions).
_INSTANCE_NAMESPACE: Final = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")
# Prometheus histograms have no min/max; None leaves the optional OTLP fields unset (the SDK's
# dataclass types them as float, its encoder accepts None).
_UNSET: Final = cast(float, None)


# --- resource -----------------------------------------------------------------------------------
# (attribute, the OTel-operator style variable, the common Downward-API name used in a pod)
_K8S_ENV: Final = (
    ("k8s.namespace.name", "K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
    ("k8s.pod.name", "K8S_POD_NAME", "POD_NAME"),
    ("k8s.pod.uid", "K8S_POD_UID", "POD_UID"),
    ("k8s.node.name", "K8S_NODE_NAME", "NODE_NAME"),
    ("k8s.container.name", "K8S_CONTAINER_NAME", "CONTAINER_NAME"),
)
_SA_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubernetes_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """``k8s.*`` resource attributes from Downward-API variables (see docs/metrics.md).

    ``K8S_POD_NAME`` and friends count anywhere. The generic names (``POD_NAME``, ``NODE_NAME``,
    …) and the fallbacks (pod name = ``HOSTNAME``, namespace = the service account's) count only
    inside a pod (``KUBERNETES_SERVICE_HOST`` set): elsewhere they often mean something else.
    """
    in_pod = bool(env.get("KUBERNETES_SERVICE_HOST"))
    attrs: dict[str, str] = {}
    for key, specific, generic in _K8S_ENV:
        value = env.get(specific) or (env.get(generic) if in_pod else None)
        if value:
            attrs[key] = value
    if in_pod:
        if "k8s.pod.name" not in attrs and env.get("HOSTNAME"):
            attrs["k8s.pod.name"] = env["HOSTNAME"]
        if "k8s.namespace.name" not in attrs:
            with contextlib.suppress(OSError):  # no service account mounted
                attrs["k8s.namespace.name"] = _SA_NAMESPACE.read_text().strip()
    return attrs


def build_resource(env: Mapping[str, str] | None = None) -> Resource:
    """The exporter's resource: defaults, then ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` over them (the SDK's own detector reads those two)."""
    env = os.environ if env is None else env
    k8s = kubernetes_attributes(env)
    if "k8s.namespace.name" in k8s and "k8s.pod.name" in k8s:
        # The semantic conventions' recipe: stable across restarts of the same container.
        key = ".".join((k8s["k8s.namespace.name"], k8s["k8s.pod.name"],
                        k8s.get("k8s.container.name", "")))  # fmt: skip
        instance = str(uuid.uuid5(_INSTANCE_NAMESPACE, key))
    else:
        instance = str(uuid.uuid4())
    defaults: dict[str, str] = {
        "service.name": "kvcache-exporter",
        "service.version": __version__,
        "service.instance.id": instance,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        **k8s,
    }
    return Resource(defaults).merge(OTELResourceDetector().detect())


# --- the SDK's exporter -------------------------------------------------------------------------
def http_metrics_url(endpoint: str) -> str:
    """``--otlp.endpoint`` is a base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is: for
    http/protobuf the signal path ``/v1/metrics`` is appended unless it is already there."""
    url = urllib.parse.urlsplit(endpoint)
    path = url.path.rstrip("/")
    if not path.endswith("/v1/metrics"):
        path += "/v1/metrics"
    return urllib.parse.urlunsplit(url._replace(path=path))


def make_exporter(config: OTLPConfig) -> MetricExporter:
    """The SDK's OTLP metric exporter for ``config``; what the config leaves unset (None) the
    exporter reads from the standard OTEL_EXPORTER_OTLP_* variables itself."""
    headers = dict(config.headers) if config.headers is not None else None
    if config.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        grpc_compression = {
            "none": grpc.Compression.NoCompression,
            "gzip": grpc.Compression.Gzip,
            "deflate": grpc.Compression.Deflate,
        }
        return GrpcExporter(
            endpoint=config.endpoint,
            headers=headers,
            timeout=config.timeout,
            compression=grpc_compression[config.compression] if config.compression else None,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(
        endpoint=http_metrics_url(config.endpoint) if config.endpoint else None,
        headers=headers,
        timeout=config.timeout,
        compression=Compression(config.compression) if config.compression else None,
    )


class _SDKLogs(logging.Handler):
    """Takes the OpenTelemetry SDK's log records off the root logger.

    The SDK exporters log every failed attempt (a dead collector means a warning per retry,
    unformatted, on stderr). Here the exporter's records go to ``kvcache_exporter.otlp.sdk`` at
    debug level and the last problem is kept for the sink's own rate-limited failure line;
    other SDK records (a malformed OTEL_RESOURCE_ATTRIBUTES, say) keep their level.
    """

    _installed: ClassVar[_SDKLogs | None] = None  # one per process: loggers are global

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last_problem: str | None = None
        self._target = logging.getLogger("kvcache_exporter.otlp.sdk")

    @classmethod
    def install(cls) -> _SDKLogs:
        if cls._installed is None:
            handler = cls()
            sdk = logging.getLogger("opentelemetry")
            sdk.addHandler(handler)
            sdk.propagate = False  # else Python's last-resort handler prints them raw
            cls._installed = handler
        return cls._installed

    def take_problem(self) -> str | None:
        problem, self.last_problem = self.last_problem, None
        return problem

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in a third-party log call
            message = str(record.msg)
        level = record.levelno
        if record.name.startswith("opentelemetry.exporter"):
            if level >= logging.WARNING:
                self.last_problem = message
            level = logging.DEBUG
        self._target.log(level, message, extra={"sdk_logger": record.name})


# --- the sink -----------------------------------------------------------------------------------
class OTLPSink:
    """Exports ``views()`` every ``config.interval`` seconds on its own thread."""

    def __init__(
        self,
        config: OTLPConfig,
        views: Callable[[], Sequence[EngineView]],
        *,
        exporter: MetricExporter | None = None,
        resource: Resource | None = None,
        http_refused: Callable[[], Mapping[str, int] | None] = lambda: None,
    ) -> None:
        self.config = config
        self._views = views
        self._http_refused = http_refused
        self._sdk_logs = _SDKLogs.install()
        self._exporter = exporter if exporter is not None else make_exporter(config)
        self.resource = resource if resource is not None else build_resource()
        self._delta = config.temporality == "delta"
        self._start_ns = time.time_ns()
        self._lock = threading.Lock()
        self._exports = dict.fromkeys(OTLP_EXPORT_RESULTS, 0)
        self._export_lock = threading.Lock()  # one export at a time, whoever calls
        self._last_sent: Series = {}
        self._last_sent_ns = self._start_ns
        self._failures_unlogged = 0
        self._last_failure_log = -FAILURE_LOG_INTERVAL
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        where = config.endpoint or os.environ.get(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        self.endpoint = where or "(SDK default)"
        aggregation = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION")
        if (aggregation or "").strip() == "base2_exponential_bucket_histogram":
            log.warning(
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION ignored: histograms "
                "are exported with their explicit (Prometheus) buckets"
            )

    @property
    def timeout(self) -> float:
        """Seconds one export may take (the SDK exporter's own bound, retries included)."""
        return self.config.timeout if self.config.timeout is not None else DEFAULT_TIMEOUT

    def exports(self) -> dict[str, int]:
        """Exports so far by result (``success``, ``failure``), for ``/metrics``."""
        with self._lock:
            return dict(self._exports)

    # --- building MetricsData ---------------------------------------------------------------
    def metrics_data(self, current: Series, now_ns: int) -> MetricsData:
        """``current`` as OTLP data at ``now_ns``: cumulative since the sink started, or (for
        counters and histograms, in delta mode) since the last successful export."""
        metrics = []
        for family in OTLP_FAMILIES:
            points = current.get(family.name)
            if points:
                data = self._data(family, points, now_ns)
                metrics.append(Metric(otel_name(family), family.help, family.unit, data))
        scope = ScopeMetrics(SCOPE, metrics, "")
        return MetricsData([ResourceMetrics(self.resource, [scope], "")])

    def _data(
        self, family: Family, points: dict[Labels, Value], now_ns: int
    ) -> Sum | Gauge | Histogram:
        keys = dict(family.attributes)
        kind = family.instrument
        delta = self._delta and kind in (Instrument.COUNTER, Instrument.HISTOGRAM)
        before = self._last_sent.get(family.name, {}) if delta else {}
        start = self._last_sent_ns if delta else self._start_ns
        temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
        if kind is Instrument.HISTOGRAM:
            hist_points = []
            for labels, value in points.items():
                assert isinstance(value, HistogramValue)
                earlier = before.get(labels)
                if isinstance(earlier, HistogramValue) and earlier.count <= value.count:
                    value = value.minus(earlier)
                hist_points.append(
                    HistogramDataPoint(
                        attributes={keys[k]: v for k, v in labels},
                        start_time_unix_nano=start,
                        time_unix_nano=now_ns,
                        count=value.count,
                        sum=value.sum,
                        bucket_counts=list(value.counts),
                        explicit_bounds=list(value.bounds),
                        min=_UNSET,
                        max=_UNSET,
                    )
                )
            return Histogram(hist_points, temporality)
        number_points = []
        for labels, value in points.items():
            assert not isinstance(value, HistogramValue)
            earlier = before.get(labels)
            if earlier is not None and not isinstance(earlier, HistogramValue) and earlier <= value:
                value = value - earlier  # a counter that went down restarted: send it whole
            number_points.append(
                NumberDataPoint(
                    attributes={keys[k]: v for k, v in labels},
                    start_time_unix_nano=0 if kind is Instrument.GAUGE else start,
                    time_unix_nano=now_ns,
                    value=value,
                )
            )
        if kind is Instrument.GAUGE:
            return Gauge(number_points)
        return Sum(number_points, temporality, is_monotonic=kind is Instrument.COUNTER)

    # --- exporting --------------------------------------------------------------------------
    def export_once(self) -> bool:
        """Read the views, export them once; True on success. Never raises."""
        with self._export_lock:
            now_ns = time.time_ns()
            current: Series | None = None
            error: str | None = None
            try:
                current = series(self._views(), self.exports(), self._http_refused())
                result = self._exporter.export(
                    self.metrics_data(current, now_ns), timeout_millis=self.timeout * 1000
                )
                ok = result is MetricExportResult.SUCCESS
            except Exception as exc:  # the export thread must survive anything
                ok, error = False, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._exports["success" if ok else "failure"] += 1
            if ok:
                assert current is not None
                self._last_sent, self._last_sent_ns = current, now_ns
                self._sdk_logs.take_problem()
                if self._failing:
                    log.info("OTLP export succeeded again", extra={"endpoint": self.endpoint})
                self._failing = False
                self._failures_unlogged = 0
            else:
                self._failed(error or self._sdk_logs.take_problem() or "export failed")
            return ok

    def _failed(self, error: str) -> None:
        """Log a failure at most once per FAILURE_LOG_INTERVAL (the counter has them all)."""
        self._failing = True
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            log.warning(
                "OTLP export failed",
                extra={
                    "endpoint": self.endpoint,
                    "failures": self._failures_unlogged,
                    "error": error,
                },
            )
            self._last_failure_log = now
            self._failures_unlogged = 0

    def start(self) -> None:
        """Start exporting every ``config.interval`` seconds."""
        self._thread = threading.Thread(target=self._run, name="otlp", daemon=True)
        self._thread.start()
        log.info(
            "OTLP export on",
            extra={
                "endpoint": self.endpoint,
                "protocol": self.config.protocol,
                "interval": self.config.interval,
                "temporality": self.config.temporality,
            },
        )

    def _run(self) -> None:
        interval = self.config.interval
        next_at = time.monotonic() + interval
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):
            self.export_once()
            next_at += interval
            if next_at < time.monotonic():  # an export overran: skip the missed ticks
                next_at = time.monotonic() + interval
        self.export_once()  # the final export, with everything ingested before stop()

    def stop(self, timeout: float | None = None) -> None:
        """Send a final export and shut the exporter down, within ``timeout`` seconds (default:
        the export timeout, at most FINAL_EXPORT_WAIT, or FINAL_EXPORT_WAIT_FAILING while
        exports fail); an export still running then is abandoned."""
        if timeout is not None:
            bound = timeout
        elif self._failing or self._sdk_logs.last_problem is not None:
            # Failing, or the export in flight has already hit an error and is retrying.
            bound = FINAL_EXPORT_WAIT_FAILING
        else:
            bound = min(self.timeout, FINAL_EXPORT_WAIT) + 0.5
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(bound)
            if self._thread.is_alive():
                log.warning(
                    "OTLP final export did not finish in time; abandoned",
                    extra={"endpoint": self.endpoint, "waited": bound},
                )
        # Also interrupts the retry wait of an export still in flight.
        self._exporter.shutdown(timeout_millis=1000)
