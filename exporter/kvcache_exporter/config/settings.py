"""What loading the configuration produces: :class:`ExporterConfig`, or a :class:`ConfigError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..analysis.monitor import MonitorConfig
from ..analysis.whatif import WhatIfConfig
from ..collector import CollectorConfig
from ..curve import CurveRole
from ..sinks.http import HTTPLimits
from ..sinks.otlp_config import OTLPConfig
from ..sinks.webconfig import WebConfig
from ..sources.spec import SourceSpec


class ConfigError(ValueError):
    """A configuration problem, already phrased as the one line the user sees."""


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    """Everything the exporter process needs, validated."""

    sources: tuple[SourceSpec, ...]
    listen_address: str = ":9477"
    telemetry_path: str = "/metrics"
    web: WebConfig | None = None
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)
    otlp: OTLPConfig | None = None  # None: OTLP export is off
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    whatif: WhatIfConfig = field(default_factory=WhatIfConfig)  # capacities: per source
    receive_hwm: int = 200_000
    curve: Mapping[str, CurveRole] = field(default_factory=dict)  # by source name
    storage_path: str | None = None
    storage_interval: float = 30.0
    log_level: str = "info"
    log_format: str = "logfmt"
