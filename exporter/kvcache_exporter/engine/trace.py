"""Request traces: what a simulated engine is asked to serve.

A :class:`Request` is an arrival time and the request's prefix block hashes, in order. The
bundled trace is the Mooncake FAST'25 synthetic workload (see ``data/README.md``); its block
ids are small integers, so :func:`spread_hash` maps them bijectively over 64 bits to look like
the hashes an engine sends (and to exercise hash-sampled tracking the way real hashes do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Request",
    "bundled_trace_path",
    "read_mooncake",
    "repeat_requests",
    "spread_hash",
    "unspread_hash",
]

U64Array = npt.NDArray[np.uint64]

# splitmix64 (Steele, Lea, Flood 2014): a golden-ratio increment, then the finalizer. Every
# step is a bijection on 64-bit words, so distinct ids stay distinct hashes.
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MUL1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MUL2: Final = np.uint64(0x94D049BB133111EB)
# Multiplicative inverses mod 2^64, for unspread_hash.
_INV1: Final = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_INV2: Final = np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))


@dataclass(frozen=True, slots=True)
class Request:
    """One request: arrival time (seconds from the trace start) and prefix block hashes.

    ``hash_ids`` are the request's full prompt blocks in order: requests sharing the first k
    hashes can share k blocks of prefix cache.
    """

    timestamp_s: float
    hash_ids: U64Array
    input_length: int = 0
    output_length: int = 0

    def __len__(self) -> int:
        return int(self.hash_ids.shape[0])


def spread_hash(ids: npt.ArrayLike) -> U64Array:
    """Map small block ids bijectively over 64 bits (splitmix64), vectorized."""
    z = np.asarray(ids, dtype=np.uint64) + _GOLDEN  # uint64 arrays wrap silently, as wanted
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def _unxorshift(z: U64Array, shift: int) -> U64Array:
    s = np.uint64(shift)
    out = z.copy()
    for _ in range(64 // shift):
        out = z ^ (out >> s)
    return out


def unspread_hash(hashes: npt.ArrayLike) -> U64Array:
    """The inverse of :func:`spread_hash` (for debugging and tests)."""
    z = np.asarray(hashes, dtype=np.uint64)
    z = _unxorshift(z, 31) * _INV2
    z = _unxorshift(z, 27) * _INV1
    return np.asarray(_unxorshift(z, 30) - _GOLDEN, dtype=np.uint64)


def bundled_trace_path() -> Path:
    """The bundled Mooncake synthetic trace (3,993 requests over about 17 minutes)."""
    resource = files("kvcache_exporter.engine") / "data" / "mooncake_synthetic_trace.jsonl"
    # The package is installed as plain files (setuptools, no zip), so this is a real path.
    return Path(str(resource))


def _parse_line(line: str, where: str) -> Request:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    timestamp = record.get("timestamp")
    hash_ids = record.get("hash_ids")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"{where}: 'timestamp' (milliseconds) must be a number")
    if not np.isfinite(timestamp) or timestamp < 0:
        raise ValueError(f"{where}: 'timestamp' must be finite and >= 0, got {timestamp}")
    if not isinstance(hash_ids, list) or not all(
        type(h) is int and 0 <= h < 1 << 64 for h in hash_ids
    ):
        raise ValueError(f"{where}: 'hash_ids' must be a list of non-negative 64-bit integers")
    return Request(
        timestamp_s=timestamp / 1000.0,
        hash_ids=spread_hash(np.array(hash_ids, dtype=np.uint64)),
        input_length=_int_field(record, "input_length", where),
        output_length=_int_field(record, "output_length", where),
    )


def _int_field(record: dict[str, Any], name: str, where: str) -> int:
    value = record.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name!r} must be a non-negative integer")
    return value


def read_mooncake(path: str | os.PathLike[str]) -> Iterator[Request]:
    """Requests of a Mooncake-format JSONL trace, in file order.

    Each line is ``{"timestamp": ms, "hash_ids": [...], "input_length": n,
    "output_length": n}``; timestamps become seconds and ids are spread with
    :func:`spread_hash`. Blank lines are skipped; a bad line raises ``ValueError`` naming the
    file and line number.
    """
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield _parse_line(line, f"{os.fspath(path)}:{lineno}")


def repeat_requests(
    make: Callable[[], Iterable[Request]],
    times: int | None = None,
    *,
    gap_s: float = 1.0,
    fresh_hashes: bool = False,
) -> Iterator[Request]:
    """Play a trace ``times`` times (forever with None), each pass after the last one's end.

    Timestamps keep growing across passes (``gap_s`` between them). With ``fresh_hashes``,
    each pass after the first gets its own block hashes (XOR with a per-pass salt), as if new
    users sent the same workload; otherwise later passes can hit blocks the earlier left.
    """
    offset = 0.0
    passes = 0
    while times is None or passes < times:
        salt = np.uint64(0) if not fresh_hashes else spread_hash([passes])[0]
        last = 0.0
        empty = True
        for request in make():
            empty = False
            last = request.timestamp_s
            hashes = request.hash_ids ^ salt if passes and fresh_hashes else request.hash_ids
            yield Request(
                offset + request.timestamp_s, hashes, request.input_length, request.output_length
            )
        if empty:
            return
        offset += last + gap_s
        passes += 1
