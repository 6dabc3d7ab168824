"""Converters from a flag's text to its value, each raising ``ValueError`` with the reason.

The option table (:mod:`.options`) names one per flag; the same converter reads the flag, its
``KVCACHE_EXPORTER_*`` variable and its config-file key, so the three accept the same values.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from ..analysis.whatif import validate_factors
from ..collector.histogram import validate_buckets
from ..protocol.batch import MAX_ADAPTERS
from ..sinks.http import parse_listen_address
from ..sinks.otlp_config import OTLP_HISTOGRAM_AGGREGATIONS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """A converter for integers of at least ``minimum``."""

    def check(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {text}")
        return value

    return check


def adapter_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ADAPTERS:
        raise ValueError(f"must be in 1..{MAX_ADAPTERS}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be zero or more, got {text}")
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {text}")
    return value


def ratio_or_zero(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1] (0 turns it off), got {text}")
    return value


def capacity_factors(text: str) -> tuple[float, ...]:
    return validate_factors([float(part) for part in text.split(",") if part.strip()])


def capacity_multiples(text: str) -> tuple[float, ...]:
    bounds = buckets(text)
    if bounds[0] <= 0:
        raise ValueError("bounds are multiples of the capacity and must be positive")
    return bounds


def seconds(text: str) -> float:
    value = float(text.removesuffix("s"))
    if not 0.0 < value < 86_400:
        raise ValueError(f"must be a positive number of seconds, got {text}")
    return value


def buckets(text: str) -> tuple[float, ...]:
    return validate_buckets([float(part) for part in text.split(",") if part.strip()])


def choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return text

    return check


def url_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def listen_address(text: str) -> str:
    parse_listen_address(text)
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text}")
    return text


def any_text(text: str) -> str:
    return text


def otlp_endpoint(text: str) -> str:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {text!r}")
    return text


def otlp_headers(text: str) -> tuple[tuple[str, str], ...]:
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


def otlp_aggregation(text: str) -> str:
    if choice(OTLP_HISTOGRAM_AGGREGATIONS)(text) == "exponential":
        # Base-2 exponential buckets cannot be derived exactly from the collector's explicit
        # buckets; they need the raw values, which this version's collector does not keep.
        raise ValueError(
            "exponential histograms are not available in this version (the collector keeps "
            "explicit buckets only); use explicit"
        )
    return text
