"""Flags, environment variables and the YAML config file (SPEC §5), merged and validated.

Precedence, lowest first: built-in defaults, ``--config.file``, ``KVCACHE_EXPORTER_*``
environment variables, command-line flags. Every bad value is reported as one line that
names where it came from; the CLI turns it into exit code 2 before anything starts.

:func:`load` merges them here; :mod:`.options` is the option table and parser, :mod:`.values`
the converters of flag text, :mod:`.checks` the start-up checks on files and keys,
:mod:`.otlp_env` the OTLP settings with the ``OTEL_*`` variables, and :mod:`.settings` what
comes out (:class:`ExporterConfig`, or :class:`ConfigError`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..analysis.whatif import WhatIfConfig
from ..collector import CollectorConfig
from ..sinks.http import HTTPLimits
from ..sinks.webconfig import WebConfigError, load_web_config
from ..sources.spec import MAX_POOL_ENGINES, SourceSpec, SourceSpecError
from .checks import check_writable, curve_roles
from .options import DEFAULT_SOURCE, ENV_PREFIX, OPTIONS, build_parser
from .otlp_env import otlp_config
from .settings import ConfigError, ExporterConfig

__all__ = ["ConfigError", "ExporterConfig", "load"]


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
    for pool, count in sorted(Counter(s.pool for s in sources).items()):
        if count > MAX_POOL_ENGINES:
            raise ConfigError(
                f"{where}: pool {pool!r} has {count} sources, at most {MAX_POOL_ENGINES} "
                "(run one exporter per model pool)"
            )
    curve = curve_roles(sources, values["source.curve.key-file"])
    storage_path = values["storage.path"]
    if storage_path is not None:
        try:
            check_writable(Path(storage_path))
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
        http_limits=HTTPLimits(
            max_requests=values["web.max-requests"],
            max_connections=values["web.max-connections"],
            read_header_timeout=values["web.read-header-timeout"],
            idle_timeout=values["web.idle-timeout"],
            max_header_bytes=values["web.max-header-bytes"],
        ),
        otlp=otlp_config(values, env),
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
            max_sampled_blocks=values["whatif.max-sampled-blocks"],
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
