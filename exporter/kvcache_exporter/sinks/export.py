"""``/api/v1/export``: the lifecycle records of recently removed blocks, as JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..pipeline import EngineRecords

FORMATS: Final = ("json", "csv")
COLUMNS: Final = (
    "engine",
    "block_hash",
    "medium",
    "group",
    "reason",
    "stored_at",
    "last_access_at",
    "removed_at",
    "lifetime_seconds",
    "idle_seconds",
    "accesses",
    "prefix_depth",
)


class ExportRequestError(ValueError):
    """A bad query parameter; the message is the 400 body."""


@dataclass(frozen=True, slots=True)
class ExportRequest:
    format: str = "json"
    engine: str | None = None
    limit: int | None = None

    @classmethod
    def parse(cls, query: dict[str, list[str]], engines: Sequence[str]) -> ExportRequest:
        """Validate ``format``, ``engine`` and ``limit``; anything else is an error."""
        unknown = sorted(set(query) - {"format", "engine", "limit"})
        if unknown:
            raise ExportRequestError(f"unknown parameter {unknown[0]!r} (format, engine, limit)")
        values = {key: items[-1] for key, items in query.items()}
        fmt = values.get("format", "json")
        if fmt not in FORMATS:
            raise ExportRequestError(f"format must be json or csv, not {fmt!r}")
        engine = values.get("engine")
        if engine is not None and engine not in engines:
            raise ExportRequestError(f"no engine {engine!r} (have: {', '.join(engines)})")
        limit: int | None = None
        if "limit" in values:
            text = values["limit"]
            if not text.isdigit() or int(text) < 1:
                raise ExportRequestError(f"limit must be a positive integer, not {text!r}")
            limit = int(text)
        return cls(fmt, engine, limit)


def rows(engines: Iterable[EngineRecords], limit: int | None) -> Iterable[dict[str, Any]]:
    """One dict per removal, newest ``limit`` per engine, oldest first."""
    for entry in engines:
        rec = entry.records
        start = 0 if limit is None else max(0, len(rec) - limit)
        for i in range(start, len(rec)):
            stored, last, removed = (
                float(rec.stored_at[i]),
                float(rec.last_access_at[i]),
                float(rec.removed_at[i]),
            )
            medium, group = entry.places[int(rec.medium[i])]
            yield {
                "engine": entry.engine,
                "block_hash": f"{int(rec.block_hash[i]):016x}",
                "medium": medium,
                "group": group,
                "reason": entry.reasons[int(rec.reason[i])],
                "stored_at": stored,
                "last_access_at": last,
                "removed_at": removed,
                "lifetime_seconds": removed - stored,
                "idle_seconds": removed - last,
                "accesses": int(rec.accesses[i]),
                "prefix_depth": int(rec.prefix_depth[i]) or None,
            }


def render_export(
    request: ExportRequest, engines: Sequence[EngineRecords], summaries: list[dict[str, Any]]
) -> tuple[bytes, str]:
    """The body and content type for an export request."""
    chosen = [e for e in engines if request.engine in (None, e.engine)]
    records = list(rows(chosen, request.limit))
    if request.format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue().encode(), "text/csv; charset=utf-8"
    body = {
        "engines": [s for s in summaries if request.engine in (None, s["engine"])],
        "evictions": records,
    }
    return json.dumps(body).encode(), "application/json"
