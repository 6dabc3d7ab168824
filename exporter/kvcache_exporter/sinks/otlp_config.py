"""What the OTLP sink is told to do: its settings, free of the OpenTelemetry SDK (which the
sink imports only when OTLP export is on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

OTLP_PROTOCOLS: Final = ("grpc", "http/protobuf")
OTLP_COMPRESSIONS: Final = ("none", "gzip", "deflate")
OTLP_TEMPORALITIES: Final = ("cumulative", "delta")
OTLP_HISTOGRAM_AGGREGATIONS: Final = ("explicit", "exponential")
OTLP_DEFAULT_INTERVAL: Final = 15.0


@dataclass(frozen=True, slots=True)
class OTLPConfig:
    """OTLP export settings. ``None`` fields are left to the OpenTelemetry SDK's exporter,
    which reads the standard ``OTEL_EXPORTER_OTLP_[METRICS_]*`` variables itself."""

    endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT
    protocol: str = "grpc"
    interval: float = OTLP_DEFAULT_INTERVAL
    headers: tuple[tuple[str, str], ...] | None = None
    compression: str | None = None
    timeout: float | None = None  # seconds
    temporality: str = "cumulative"
    histogram_aggregation: str = "explicit"
