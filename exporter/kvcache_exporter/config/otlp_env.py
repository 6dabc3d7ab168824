"""OTLP export settings: this program's options merged with the standard ``OTEL_*`` variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..sinks.otlp_config import OTLP_DEFAULT_INTERVAL, OTLP_PROTOCOLS, OTLPConfig
from .settings import ConfigError
from .values import seconds


def _otel_env(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of these standard variables that is set and not blank: (name, value)."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _otlp_enabled_by_env(env: Mapping[str, str]) -> bool:
    """An OTEL_* endpoint turns export on, unless the SDK is disabled or the metrics exporter
    is set to something other than otlp (OTEL_METRICS_EXPORTER=none, for example)."""
    if not _otel_env(env, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    return not exporters or "otlp" in [e.strip() for e in exporters.split(",")]


def otlp_config(values: Mapping[str, Any], env: Mapping[str, str]) -> OTLPConfig | None:
    """OTLP settings, or None when no endpoint is configured anywhere.

    This program's own settings (flag, KVCACHE_EXPORTER_* variable, config file) beat the
    standard OTEL_* variables, which are often injected fleet-wide. Endpoint, headers,
    compression and timeout left unset here are read by the SDK's exporter from OTEL_*; the
    variables the SDK exporters do not read (protocol, interval, temporality) are read here.
    """
    if values["otlp.endpoint"] is None and not _otlp_enabled_by_env(env):
        return None
    protocol = values["otlp.protocol"]
    if protocol is None:
        found = _otel_env(env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = found[1] if found else "grpc"
        if protocol not in OTLP_PROTOCOLS:
            assert found is not None
            raise ConfigError(
                f"{found[0]}: {protocol!r} is not supported; use grpc or http/protobuf"
            )
    interval = values["otlp.interval"]
    if interval is None:
        found = _otel_env(env, "OTEL_METRIC_EXPORT_INTERVAL")
        interval = OTLP_DEFAULT_INTERVAL
        if found:
            try:
                interval = seconds(str(float(found[1]) / 1000.0))  # the variable is in ms
            except ValueError:
                raise ConfigError(
                    f"{found[0]}: expected a positive number of milliseconds, got {found[1]!r}"
                ) from None
    temporality = values["otlp.temporality"]
    if temporality is None:
        found = _otel_env(env, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        preference = found[1].lower() if found else "cumulative"
        if preference not in ("cumulative", "delta", "lowmemory"):
            assert found is not None
            raise ConfigError(
                f"{found[0]}: expected cumulative, delta or lowmemory, got {found[1]!r}"
            )
        # Every counter and histogram here is a synchronous instrument in SDK terms, for
        # which lowmemory means delta (up-down counters stay cumulative either way).
        temporality = "cumulative" if preference == "cumulative" else "delta"
    return OTLPConfig(
        endpoint=values["otlp.endpoint"],
        protocol=protocol,
        interval=interval,
        headers=values["otlp.headers"],
        compression=values["otlp.compression"],
        timeout=values["otlp.timeout"],
        temporality=temporality,
        histogram_aggregation=values["otlp.histogram-aggregation"],
    )
