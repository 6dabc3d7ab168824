"""The exporter's options: one table of flags, and the argparse parser built from it.

Each :class:`Option` gives its flag, the ``KVCACHE_EXPORTER_*`` variable and config-file key
derived from it, its converter (:mod:`.values`), default and help, so the three sources cannot
drift apart; ``--source`` and ``--config.file`` are parsed by :func:`~kvcache_exporter.config.load`
itself.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from .. import __version__
from ..analysis.whatif import (
    DEFAULT_DISTANCE_BUCKETS,
    DEFAULT_FACTORS,
    DEFAULT_MAX_GHOSTS,
    DEFAULT_MAX_SAMPLED_BLOCKS,
    DEFAULT_SAMPLE_RATIO,
    MIN_SAMPLED_BLOCKS,
)
from ..collector.histogram import ACCESS_COUNT_BUCKETS, RESIDENCY_BUCKETS
from ..protocol.batch import DEFAULT_MAX_ADAPTERS
from ..sinks.http import HTTPLimits
from ..sinks.otlp_config import OTLP_COMPRESSIONS, OTLP_PROTOCOLS, OTLP_TEMPORALITIES
from .settings import ConfigError, ExporterConfig
from .values import (
    adapter_count,
    any_text,
    at_least,
    buckets,
    capacity_factors,
    capacity_multiples,
    choice,
    existing_file,
    listen_address,
    non_negative_int,
    otlp_aggregation,
    otlp_endpoint,
    otlp_headers,
    positive_int,
    ratio,
    ratio_or_zero,
    seconds,
    url_path,
)

ENV_PREFIX: Final = "KVCACHE_EXPORTER_"
_HTTP: Final = HTTPLimits()
DEFAULT_SOURCE: Final = "engine=tcp://127.0.0.1:5557"
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
LOG_FORMATS: Final = ("logfmt", "json")


@dataclass(frozen=True, slots=True)
class Option:
    """One flag; its ``KVCACHE_EXPORTER_*`` variable and config-file key follow from its name."""

    flag: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = ""

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--")

    @property
    def env(self) -> str:
        return ENV_PREFIX + re.sub(r"[.-]", "_", self.key).upper()


_EXPORTER: Final = ExporterConfig(sources=())  # its defaults are the flags' defaults

OPTIONS: Final = (
    Option("--web.listen-address", listen_address, _EXPORTER.listen_address,
           "address to serve HTTP on", "[HOST]:PORT"),
    Option("--web.telemetry-path", url_path, _EXPORTER.telemetry_path,
           "path of the metrics page", "PATH"),
    Option("--web.config.file", existing_file, None,
           "exporter-toolkit web config (TLS, basic auth)", "FILE"),
    Option("--web.max-requests", non_negative_int, _HTTP.max_requests,
           "most requests served at once by worker threads (metrics, readiness, API); "
           "beyond it a 503 at once; 0: no limit", "N"),
    Option("--web.max-connections", positive_int, _HTTP.max_connections,
           "most open HTTP connections; new ones beyond it are closed at once", "N"),
    Option("--web.read-header-timeout", seconds, _HTTP.read_header_timeout,
           "seconds a request line and headers (and a TLS handshake) may take to arrive",
           "SECONDS"),
    Option("--web.idle-timeout", seconds, _HTTP.idle_timeout,
           "seconds a kept-alive connection may wait for its next request, or a response "
           "for its client to read", "SECONDS"),
    Option("--web.max-header-bytes", at_least(1024), _HTTP.max_header_bytes,
           "longest request line (414 beyond), and most bytes of header lines (431 beyond)",
           "BYTES"),
    Option("--otlp.endpoint", otlp_endpoint, None,
           "OTLP collector endpoint, e.g. http://127.0.0.1:4317 (off when unset; default "
           "OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT)", "URL"),
    Option("--otlp.protocol", choice(OTLP_PROTOCOLS), None,
           "grpc or http/protobuf (default OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL, else grpc)",
           "PROTO"),
    Option("--otlp.interval", seconds, None,
           "seconds between OTLP exports (default OTEL_METRIC_EXPORT_INTERVAL, else 15)",
           "SECONDS"),
    Option("--otlp.headers", otlp_headers, None,
           "request headers KEY=VALUE,... (default OTEL_EXPORTER_OTLP_[METRICS_]HEADERS)",
           "HEADERS"),
    Option("--otlp.compression", choice(OTLP_COMPRESSIONS), None,
           "none, gzip or deflate (default OTEL_EXPORTER_OTLP_[METRICS_]COMPRESSION)", "ALG"),
    Option("--otlp.timeout", seconds, None,
           "seconds one export may take, retries included (default "
           "OTEL_EXPORTER_OTLP_[METRICS_]TIMEOUT, else 10)", "SECONDS"),
    Option("--otlp.temporality", choice(OTLP_TEMPORALITIES), None,
           "cumulative or delta (default OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, "
           "else cumulative)", "TEMPORALITY"),
    Option("--otlp.histogram-aggregation", otlp_aggregation, "explicit",
           "explicit (the Prometheus buckets); exponential is not available yet", "AGG"),
    Option("--collector.sample-ratio", ratio, 1.0,
           "fraction of block hashes whose lifecycle is tracked, in (0, 1]", "RATIO"),
    Option("--collector.max-tracked-blocks", positive_int, 4_000_000,
           "most resident blocks held per engine; stores beyond are counted, not tracked", "N"),
    Option("--collector.max-adapters", adapter_count, DEFAULT_MAX_ADAPTERS,
           "LoRA adapters labelled by name per engine; blocks of any further adapter are "
           "counted under adapter=\"other\"", "N"),
    Option("--collector.removed-memory", non_negative_int, 1_000_000,
           "removed hashes remembered per engine to recognise restores", "N"),
    Option("--collector.duration-buckets", buckets, RESIDENCY_BUCKETS,
           "bucket bounds in seconds for lifetime/idle/reuse/restore histograms", "B1,B2,..."),
    Option("--collector.access-buckets", buckets, ACCESS_COUNT_BUCKETS,
           "bucket bounds for accesses-before-evict", "B1,B2,..."),
    Option("--whatif.sample-ratio", ratio_or_zero, DEFAULT_SAMPLE_RATIO,
           "highest fraction of block hashes the cache-size what-if follows, in [0, 1] "
           "(--whatif.max-sampled-blocks lowers it); 0 turns the what-if off", "RATIO"),
    Option("--whatif.max-sampled-blocks", at_least(MIN_SAMPLED_BLOCKS),
           DEFAULT_MAX_SAMPLED_BLOCKS,
           "most block hashes the what-if follows per engine and medium, resident and "
           "removed: beyond it the sampling rate falls (about 100 bytes each)", "N"),
    Option("--whatif.max-ghosts", positive_int, DEFAULT_MAX_GHOSTS,
           "most sampled removed blocks the what-if remembers per engine and medium", "N"),
    Option("--whatif.capacity-factors", capacity_factors, DEFAULT_FACTORS,
           "cache sizes to compare, as multiples of the capacity (those above 1 for "
           "recomputation avoided; all for the hit-ratio curve)", "F1,F2,..."),
    Option("--whatif.distance-buckets", capacity_multiples, DEFAULT_DISTANCE_BUCKETS,
           "reuse-distance bucket bounds, as multiples of the capacity", "M1,M2,..."),
    Option("--source.receive-hwm", positive_int, _EXPORTER.receive_hwm,
           "ZeroMQ receive high-water mark per source, in messages", "N"),
    Option("--source.curve.key-file", existing_file, None,
           "the exporter's CURVE key pair (a ZeroMQ secret certificate, NAME.key_secret) for "
           "sources with curve.engine-key= or curve.allow=", "FILE"),
    Option("--storage.path", any_text, None,
           "folder for periodic checkpoints; restarts continue from them (off when unset)",
           "DIR"),
    Option("--storage.interval", seconds, _EXPORTER.storage_interval,
           "seconds between checkpoints", "SECONDS"),
    Option("--log.level", choice(LOG_LEVELS), _EXPORTER.log_level,
           "debug, info, warn or error", "LEVEL"),
    Option("--log.format", choice(LOG_FORMATS), _EXPORTER.log_format,
           "logfmt or json", "FORMAT"),
)  # fmt: skip


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (the exporter convention)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser(prog: str = "kvcache-exporter") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Prometheus/OTLP exporter for LLM inference engines' KV-cache events.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG_IN_UPPER_SNAKE_CASE> "
        "or as a key of the --config.file YAML.",
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="NAME=ENDPOINT[,OPTION...]",
        help="an engine's event endpoint, with options replay=EP, topic=PREFIX, bind, "
        "capacity[.MEDIUM]=N, curve.engine-key=FILE, curve.allow=DIR, report-mode=full, "
        f"pool=NAME (repeatable; default {DEFAULT_SOURCE})",
    )
    parser.add_argument("--config.file", dest="config_file", metavar="FILE", help="YAML config")
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.key, metavar=opt.metavar, help=opt.help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser
