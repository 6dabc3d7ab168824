"""Flags, environment variables and the YAML config file (SPEC §5), merged and validated.

Precedence, lowest first: built-in defaults, ``--config.file``, ``KVCACHE_EXPORTER_*``
environment variables, command-line flags. Every bad value is reported as one line that
names where it came from; the CLI turns it into exit code 2 before anything starts.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import yaml

from . import __version__
from .analysis.monitor import MonitorConfig
from .analysis.whatif import (
    DEFAULT_DISTANCE_BUCKETS,
    DEFAULT_FACTORS,
    DEFAULT_MAX_GHOSTS,
    DEFAULT_SAMPLE_RATIO,
    WhatIfConfig,
    validate_factors,
)
from .collector import CollectorConfig
from .collector.histogram import ACCESS_COUNT_BUCKETS, RESIDENCY_BUCKETS, validate_buckets
from .curve import (
    CurveKeyError,
    CurveRole,
    client_role,
    curve_available,
    load_allowed_keys,
    load_key_pair,
    load_public_key,
    server_role,
)
from .protocol.batch import DEFAULT_MAX_ADAPTERS, MAX_ADAPTERS
from .sinks.http import parse_listen_address
from .sinks.otlp_config import (
    OTLP_COMPRESSIONS,
    OTLP_DEFAULT_INTERVAL,
    OTLP_HISTOGRAM_AGGREGATIONS,
    OTLP_PROTOCOLS,
    OTLP_TEMPORALITIES,
    OTLPConfig,
)
from .sinks.webconfig import WebConfig, WebConfigError, load_web_config
from .sources.spec import SourceSpec, SourceSpecError

ENV_PREFIX: Final = "KVCACHE_EXPORTER_"
DEFAULT_SOURCE: Final = "engine=tcp://127.0.0.1:5557"
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
LOG_FORMATS: Final = ("logfmt", "json")


class ConfigError(ValueError):
    """A configuration problem, already phrased as the one line the user sees."""


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    """Everything the exporter process needs, validated."""

    sources: tuple[SourceSpec, ...]
    listen_address: str = ":9477"
    telemetry_path: str = "/metrics"
    web: WebConfig | None = None
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text}")
    return value


def _adapters(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ADAPTERS:
        raise ValueError(f"must be in 1..{MAX_ADAPTERS}, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be zero or more, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {text}")
    return value


def _ratio_or_zero(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1] (0 turns it off), got {text}")
    return value


def _factors(text: str) -> tuple[float, ...]:
    return validate_factors([float(part) for part in text.split(",") if part.strip()])


def _multiples(text: str) -> tuple[float, ...]:
    bounds = _buckets(text)
    if bounds[0] <= 0:
        raise ValueError("bounds are multiples of the capacity and must be positive")
    return bounds


def _seconds(text: str) -> float:
    value = float(text.removesuffix("s"))
    if not 0.0 < value < 86_400:
        raise ValueError(f"must be a positive number of seconds, got {text}")
    return value


def _buckets(text: str) -> tuple[float, ...]:
    return validate_buckets([float(part) for part in text.split(",") if part.strip()])


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return text

    return check


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def _listen(text: str) -> str:
    parse_listen_address(text)
    return text


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text}")
    return text


def _identity(text: str) -> str:
    return text


def _otlp_endpoint(text: str) -> str:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {text!r}")
    return text


def _headers(text: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key2=value2`` with percent-encoded values, as in OTEL_EXPORTER_OTLP_HEADERS
    (parsed strictly here: a flag with a typo should fail, not silently drop a header)."""
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not item.strip():
            continue
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE[,KEY=VALUE...], got {item.strip()!r}")
        pairs.append((key.strip().lower(), urllib.parse.unquote(value.strip())))
    return tuple(pairs)


def _aggregation(text: str) -> str:
    if _choice(OTLP_HISTOGRAM_AGGREGATIONS)(text) == "exponential":
        # Base-2 exponential buckets cannot be derived exactly from the collector's explicit
        # buckets; they need the raw values, which this version's collector does not keep.
        raise ValueError(
            "exponential histograms are not available in this version (the collector keeps "
            "explicit buckets only); use explicit"
        )
    return text


@dataclass(frozen=True, slots=True)
class _Option:
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


OPTIONS: Final = (
    _Option("--web.listen-address", _listen, ":9477", "address to serve HTTP on", "[HOST]:PORT"),
    _Option("--web.telemetry-path", _path, "/metrics", "path of the metrics page", "PATH"),
    _Option("--web.config.file", _existing_file, None,
            "exporter-toolkit web config (TLS, basic auth)", "FILE"),
    _Option("--otlp.endpoint", _otlp_endpoint, None,
            "OTLP collector endpoint, e.g. http://127.0.0.1:4317 (off when unset; default "
            "OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT)", "URL"),
    _Option("--otlp.protocol", _choice(OTLP_PROTOCOLS), None,
            "grpc or http/protobuf (default OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL, else grpc)",
            "PROTO"),
    _Option("--otlp.interval", _seconds, None,
            "seconds between OTLP exports (default OTEL_METRIC_EXPORT_INTERVAL, else 15)",
            "SECONDS"),
    _Option("--otlp.headers", _headers, None,
            "request headers KEY=VALUE,... (default OTEL_EXPORTER_OTLP_[METRICS_]HEADERS)",
            "HEADERS"),
    _Option("--otlp.compression", _choice(OTLP_COMPRESSIONS), None,
            "none, gzip or deflate (default OTEL_EXPORTER_OTLP_[METRICS_]COMPRESSION)", "ALG"),
    _Option("--otlp.timeout", _seconds, None,
            "seconds one export may take, retries included (default "
            "OTEL_EXPORTER_OTLP_[METRICS_]TIMEOUT, else 10)", "SECONDS"),
    _Option("--otlp.temporality", _choice(OTLP_TEMPORALITIES), None,
            "cumulative or delta (default OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, "
            "else cumulative)", "TEMPORALITY"),
    _Option("--otlp.histogram-aggregation", _aggregation, "explicit",
            "explicit (the Prometheus buckets); exponential is not available yet", "AGG"),
    _Option("--collector.sample-ratio", _ratio, 1.0,
            "fraction of block hashes whose lifecycle is tracked, in (0, 1]", "RATIO"),
    _Option("--collector.max-tracked-blocks", _positive_int, 4_000_000,
            "most resident blocks held per engine; stores beyond are counted, not tracked", "N"),
    _Option("--collector.max-adapters", _adapters, DEFAULT_MAX_ADAPTERS,
            "LoRA adapters labelled by name per engine; blocks of any further adapter are "
            "counted under adapter=\"other\"", "N"),
    _Option("--collector.removed-memory", _non_negative_int, 1_000_000,
            "removed hashes remembered per engine to recognise restores", "N"),
    _Option("--collector.duration-buckets", _buckets, RESIDENCY_BUCKETS,
            "bucket bounds in seconds for lifetime/idle/reuse/restore histograms", "B1,B2,..."),
    _Option("--collector.access-buckets", _buckets, ACCESS_COUNT_BUCKETS,
            "bucket bounds for accesses-before-evict", "B1,B2,..."),
    _Option("--whatif.sample-ratio", _ratio_or_zero, DEFAULT_SAMPLE_RATIO,
            "fraction of block hashes the cache-size what-if follows, in [0, 1]; 0 turns it "
            "off", "RATIO"),
    _Option("--whatif.max-ghosts", _positive_int, DEFAULT_MAX_GHOSTS,
            "most sampled removed blocks the what-if remembers per engine and medium", "N"),
    _Option("--whatif.capacity-factors", _factors, DEFAULT_FACTORS,
            "cache sizes to compare, as multiples of the capacity (those above 1 for "
            "recomputation avoided; all for the hit-ratio curve)", "F1,F2,..."),
    _Option("--whatif.distance-buckets", _multiples, DEFAULT_DISTANCE_BUCKETS,
            "reuse-distance bucket bounds, as multiples of the capacity", "M1,M2,..."),
    _Option("--source.receive-hwm", _positive_int, 200_000,
            "ZeroMQ receive high-water mark per source, in messages", "N"),
    _Option("--source.curve.key-file", _existing_file, None,
            "the exporter's CURVE key pair (a ZeroMQ secret certificate, NAME.key_secret) for "
            "sources with curve.engine-key= or curve.allow=", "FILE"),
    _Option("--storage.path", _identity, None,
            "folder for periodic checkpoints; restarts continue from them (off when unset)",
            "DIR"),
    _Option("--storage.interval", _seconds, 30.0, "seconds between checkpoints", "SECONDS"),
    _Option("--log.level", _choice(LOG_LEVELS), "info", "debug, info, warn or error", "LEVEL"),
    _Option("--log.format", _choice(LOG_FORMATS), "logfmt", "logfmt or json", "FORMAT"),
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
        "capacity[.MEDIUM]=N, curve.engine-key=FILE, curve.allow=DIR "
        f"(repeatable; default {DEFAULT_SOURCE})",
    )
    parser.add_argument("--config.file", dest="config_file", metavar="FILE", help="YAML config")
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.key, metavar=opt.metavar, help=opt.help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _load_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config.file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config.file {path}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config.file {path}: expected a mapping of flag names to values")
    known = {opt.key for opt in OPTIONS} | {"source"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"--config.file {path}: unknown key {unknown[0]!r}")
    return data


def _file_sources(value: object, path: str) -> list[str]:
    """The config file's sources as ``--source`` texts. A mapping's keys besides name and
    endpoint become its options (nested mappings as dotted names: ``capacity: {GPU: N}`` is
    ``capacity.GPU=N``, ``curve: {allow: DIR}`` is ``curve.allow=DIR``; ``bind: true`` is
    ``bind``), so an unknown key is refused like an unknown option, never ignored."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and "name" in item and "endpoint" in item:
            options = []
            for key, option in item.items():
                # None, false and "" say "not set" (an empty replay or topic always did).
                unset = option is None or option is False or option == ""
                if key in ("name", "endpoint") or unset:
                    continue
                if option is True:
                    options.append(str(key))
                elif isinstance(option, Mapping):
                    options += [f"{key}.{sub}={v}" for sub, v in option.items()]
                else:
                    options.append(f"{key}={option}")
            texts.append(",".join([f"{item['name']}={item['endpoint']}", *options]))
        else:
            raise ConfigError(
                f"--config.file {path}: source: expected 'NAME=ENDPOINT' or a mapping "
                "with name and endpoint"
            )
    return texts


def load(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ExporterConfig:
    """Parse and validate; raises :class:`ConfigError` with a one-line message."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(list(argv)))
    config_file = args.pop("config_file") or env.get(ENV_PREFIX + "CONFIG_FILE")
    file_values = _load_file(config_file) if config_file else {}

    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw: object = None
        where = ""
        if args.get(opt.key) is not None:
            raw, where = args[opt.key], opt.flag
        elif env.get(opt.env):
            raw, where = env[opt.env], opt.env
        elif opt.key in file_values:
            raw, where = file_values[opt.key], f"--config.file {config_file}: {opt.key}"
        if raw is None:
            values[opt.key] = opt.default
            continue
        text = ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)
        try:
            values[opt.key] = opt.convert(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    source_texts: list[str]
    if args.get("source"):
        source_texts, where = args["source"], "--source"
    elif env.get(ENV_PREFIX + "SOURCE"):
        source_texts = re.split(r"[;\s]+", env[ENV_PREFIX + "SOURCE"].strip())
        where = ENV_PREFIX + "SOURCE"
    elif "source" in file_values:
        source_texts = _file_sources(file_values["source"], str(config_file))
        where = f"--config.file {config_file}"
    else:
        source_texts, where = [DEFAULT_SOURCE], "default source"
    try:
        sources = tuple(SourceSpec.parse(text) for text in source_texts)
    except SourceSpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: source name {duplicates[0]!r} given twice")
    curve = _curve_roles(sources, values["source.curve.key-file"])
    storage_path = values["storage.path"]
    if storage_path is not None:
        try:
            _check_writable(Path(storage_path))
        except OSError as exc:
            raise ConfigError(f"--storage.path {storage_path}: {exc.strerror or exc}") from None
    web_config = None
    if values["web.config.file"] is not None:
        try:
            web_config = load_web_config(values["web.config.file"])
        except WebConfigError as exc:
            raise ConfigError(f"--web.config.file {values['web.config.file']}: {exc}") from None

    return ExporterConfig(
        sources=sources,
        listen_address=values["web.listen-address"],
        telemetry_path=values["web.telemetry-path"],
        web=web_config,
        otlp=_otlp(values, env),
        collector=CollectorConfig(
            sample_ratio=values["collector.sample-ratio"],
            max_tracked_blocks=values["collector.max-tracked-blocks"],
            removed_memory=values["collector.removed-memory"],
            max_adapters=values["collector.max-adapters"],
            duration_buckets=values["collector.duration-buckets"],
            access_buckets=values["collector.access-buckets"],
        ),
        whatif=WhatIfConfig(
            sample_ratio=values["whatif.sample-ratio"],
            max_ghosts=values["whatif.max-ghosts"],
            capacity_factors=values["whatif.capacity-factors"],
            distance_buckets=values["whatif.distance-buckets"],
        ),
        receive_hwm=values["source.receive-hwm"],
        curve=curve,
        storage_path=storage_path,
        storage_interval=values["storage.interval"],
        log_level=values["log.level"],
        log_format=values["log.format"],
    )


def _check_writable(directory: Path) -> None:
    """Create ``--storage.path`` if needed and prove a file can be written there (OSError if
    not). Here, not in checkpoint.py, so that reading flags does not load the pipeline."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
        pass


def _curve_roles(sources: Sequence[SourceSpec], key_file: str | None) -> dict[str, CurveRole]:
    """The exporter's CURVE role per source that asks for one, with every key file read and
    checked now, so that a bad one stops the start-up instead of silencing a source."""
    curve_sources = [spec for spec in sources if spec.uses_curve]
    if not curve_sources:
        if key_file is not None:
            raise ConfigError(
                f"--source.curve.key-file {key_file}: no source uses CURVE "
                "(add curve.engine-key= or curve.allow= to a --source)"
            )
        return {}
    if not curve_available():
        raise ConfigError(
            f"source {curve_sources[0].name}: this libzmq was built without CURVE support"
        )
    if key_file is None:
        raise ConfigError(
            f"source {curve_sources[0].name}: CURVE needs the exporter's own key pair "
            "(--source.curve.key-file NAME.key_secret; make one with 'kvcache-exporter keygen')"
        )
    try:
        _, secret = load_key_pair(key_file)
    except CurveKeyError as exc:
        raise ConfigError(f"--source.curve.key-file {exc}") from None
    roles = {}
    for spec in curve_sources:
        try:
            if spec.curve_engine_key is not None:
                roles[spec.name] = client_role(secret, load_public_key(spec.curve_engine_key))
            else:
                assert spec.curve_allow is not None
                allowed = load_allowed_keys(spec.curve_allow)
                roles[spec.name] = server_role(secret, spec.name, allowed)
        except CurveKeyError as exc:
            option = "curve.engine-key" if spec.curve_engine_key else "curve.allow"
            raise ConfigError(f"source {spec.name}: {option} {exc}") from None
    return roles


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


def _otlp(values: Mapping[str, Any], env: Mapping[str, str]) -> OTLPConfig | None:
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
                interval = _seconds(str(float(found[1]) / 1000.0))  # the variable is in ms
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
