"""The status document: what ``/api/v1/status`` serves and the status page shows.

Every number that ``/metrics`` also serves is read from the same walk over the engine views
(:func:`..series.series`) and summed over the labels the page leaves out (groups, reasons), so
page and ``/metrics`` agree when taken from the same views. Each such figure names its sample
and labels (``metric``, ``labels``): the browser test compares them with ``/metrics``. Rates
and the time axis come from each engine's :class:`~..analysis.history.History`.

The schema is in docs/operations.md (``/api/v1/status``) and ``tests/test_sinks_status.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ... import __version__
from ...analysis.anomaly import AnomalyConfig
from ...analysis.history import COUNTERS, HISTORY_SECONDS, SAMPLE_INTERVAL, HistoryWindow
from ...catalog import BY_NAME
from ...collector.histogram import histogram_quantile
from ...pipeline import EngineView
from ...thresholds import THRASH_CRITICAL_RATIO, THRASH_RATIO
from ..series import HistogramValue, Series, series
from . import charts
from .charts import Line, Rule

REFRESH_SECONDS: Final = 5
RATE_SECONDS: Final = 10.0  # the rates shown as numbers: over the last 10 s of history
RATIO_WINDOW: Final = AnomalyConfig().thrash_window_seconds  # as the thrashing alert reads it
MIN_AXIS_SECONDS: Final = 60.0

# The families the page reads, looked up in the catalog (a renamed family fails at import).
RESIDENT: Final = BY_NAME["kvcache_resident_blocks"].name
STORED: Final = BY_NAME["kvcache_blocks_stored_total"].name
REMOVED: Final = BY_NAME["kvcache_blocks_removed_total"].name
RESTORES: Final = BY_NAME["kvcache_block_restores_total"].name
LIFETIME: Final = BY_NAME["kvcache_block_lifetime_seconds"].name
IDLE: Final = BY_NAME["kvcache_block_idle_before_evict_seconds"].name
CAPACITY: Final = BY_NAME["kvcache_whatif_capacity_blocks"].name
AVOIDED: Final = BY_NAME["kvcache_whatif_recomputes_avoided_total"].name
ALERT_ACTIVE: Final = BY_NAME["kvcache_alert_active"].name
SOURCE_UP: Final = BY_NAME["kvcache_exporter_source_up"].name
LAG: Final = BY_NAME["kvcache_exporter_event_lag_seconds"].name
LOST: Final = BY_NAME["kvcache_exporter_batches_lost_total"].name
GAPS: Final = BY_NAME["kvcache_exporter_sequence_gaps_total"].name
DECODE_ERRORS: Final = BY_NAME["kvcache_exporter_decode_errors_total"].name
MESSAGES: Final = BY_NAME["kvcache_exporter_messages_total"].name

Figure = dict[str, Any]


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What the page needs of one engine: its view and its history."""

    view: EngineView
    history: HistoryWindow
    history_bytes: int


# --- formatting ----------------------------------------------------------------------------------
def count_text(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def rate_text(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:,.3g} s" if abs(value) < 1000 else f"{value:,.0f} s"


def figure(
    value: float | None,
    text: str,
    unit: str,
    metric: str | None = None,
    labels: dict[str, str] | None = None,
) -> Figure:
    """A number as shown (``text``, ``unit``) and as served: ``value``, and for a number of
    ``/metrics`` the sample it sums (``metric``) over the series with these ``labels``."""
    out: Figure = {"value": value, "text": text, "unit": unit}
    if metric is not None:
        out["metric"] = metric
        out["labels"] = labels or {}
    return out


def counted(current: Series, family: str, labels: dict[str, str], unit: str) -> Figure:
    """A figure summing a family's series (see :func:`total`)."""
    value = total(current, family, labels)
    return figure(value, count_text(value), unit, family, labels)


# --- reading the series ---------------------------------------------------------------------
def _matching(current: Series, family: str, labels: dict[str, str]) -> list[Any]:
    wanted = labels.items()
    return [v for key, v in current[family].items() if wanted <= dict(key).items()]


def total(current: Series, family: str, labels: dict[str, str]) -> int | float | None:
    """The sum of a family's series whose labels include ``labels``; None when none do."""
    values: list[int | float] = _matching(current, family, labels)
    return sum(values) if values else None


def histogram(current: Series, family: str, labels: dict[str, str]) -> HistogramValue | None:
    """A histogram family's series whose labels include ``labels``, summed bucket by bucket."""
    values: list[HistogramValue] = _matching(current, family, labels)
    if not values:
        return None
    counts = np.sum([v.counts for v in values], axis=0).tolist()
    return HistogramValue(values[0].bounds, tuple(counts), math.fsum(v.sum for v in values))


def _label_values(current: Series, family: str, engine: str, label: str) -> list[str]:
    """Values of ``label`` among an engine's series of a family, in series order."""
    seen: dict[str, None] = {}
    for key in current[family]:
        labels = dict(key)
        if labels.get("engine") == engine:
            seen.setdefault(labels[label], None)
    return list(seen)


# --- history -------------------------------------------------------------------------------------
def _rates(ts: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> list[float | None]:
    """Per sample, the rate since the previous one (None for the first)."""
    if ts.size < 2:
        return [None] * int(ts.size)
    dt = np.diff(ts)
    delta = np.maximum(np.diff(counts), 0)  # never negative, even across a restore
    rates = np.where(dt > 0, delta / np.where(dt > 0, dt, 1), np.nan)
    return [None, *(None if math.isnan(r) else float(r) for r in rates)]


def _trailing(ts: npt.NDArray[np.float64], seconds: float) -> npt.NDArray[np.intp]:
    """Per sample, the index of the oldest sample at most ``seconds`` before it."""
    return np.searchsorted(ts, ts - seconds, side="left")


def _ratio_series(
    ts: npt.NDArray[np.float64], stored: npt.NDArray[np.int64], restores: npt.NDArray[np.int64]
) -> list[float | None]:
    """Restores / stores over the trailing thrashing window, per sample."""
    start = _trailing(ts, RATIO_WINDOW)
    d_stored = stored - stored[start]
    d_restores = restores - restores[start]
    return [
        float(r) / float(s) if s > 0 else None
        for r, s in zip(d_restores.tolist(), d_stored.tolist(), strict=True)
    ]


def _recent_rate(ts: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> float | None:
    if ts.size < 2:
        return None
    first = min(int(np.searchsorted(ts, ts[-1] - RATE_SECONDS, side="left")), ts.size - 2)
    span = float(ts[-1] - ts[first])
    return max(0, int(counts[-1] - counts[first])) / span if span > 0 else None


# --- one medium ---------------------------------------------------------------------------
def _time_axis(
    seconds_ago: Sequence[float],
) -> tuple[tuple[float, float], list[tuple[float, str]], str]:
    """Domain, ticks and title of the time axis: the history shown, in seconds or minutes."""
    span = max(MIN_AXIS_SECONDS, -min(seconds_ago, default=0.0))
    scale, unit = (60.0, "minutes") if span > 180 else (1.0, "seconds")
    marks = charts.ticks(0, span / scale)
    return (-span, 0.0), [(-m * scale, f"{m:g}") for m in marks], f"time, {unit} ago"


def _distribution(
    chart_id: str, title: str, desc: str, x_label: str, hist: HistogramValue | None
) -> tuple[dict[str, Any] | None, charts.Chart]:
    if hist is None:
        return None, charts.bar_chart(chart_id, title, desc, x_label, "blocks", [], [])
    labels = [f"≤{charts.duration(b)}" for b in hist.bounds] + ["more"]
    data = {"bounds": list(hist.bounds), "counts": list(hist.counts), "sum": hist.sum}
    chart = charts.bar_chart(chart_id, title, desc, x_label, "blocks removed", labels, hist.counts)
    return data, chart


def _medium(
    status: EngineStatus, current: Series, medium: str, groups: list[str]
) -> dict[str, Any]:
    view, window = status.view, status.history
    engine = view.name
    where = {"engine": engine, "medium": medium}
    stored = total(current, STORED, where)
    restores = total(current, RESTORES, where)
    capacity = total(current, CAPACITY, where)
    ratio = restores / stored if stored and restores is not None else None
    figures: dict[str, Figure] = {
        "resident_blocks": counted(current, RESIDENT, where, "blocks"),
        "capacity_blocks": counted(current, CAPACITY, where, "blocks")
        if capacity is not None
        else figure(None, "unknown", "blocks"),
        "stored_total": counted(current, STORED, where, "blocks"),
        "removed_total": counted(current, REMOVED, where, "blocks"),
        "restores_total": counted(current, RESTORES, where, "blocks"),
        "restore_ratio": figure(ratio, ratio_text(ratio), "restores / stores"),
    }

    # The history's columns are place ids; this medium's are the places labelled with it.
    places = [view.collector.place_labels(p) for p in range(len(view.collector.places))]
    columns = [p for p in range(min(len(places), window.counts.shape[2])) if places[p][0] == medium]
    ts = window.ts
    now = float(ts[-1]) if ts.size else 0.0
    seconds_ago = (ts - now).tolist()
    by = {name: window.counts[:, k, columns] for k, name in enumerate(COUNTERS)}
    summed = {name: values.sum(axis=1) for name, values in by.items()}
    rates = {name: _rates(ts, summed[name]) for name in ("stored", "removed", "restores")}
    ratios = _ratio_series(ts, summed["stored"], summed["restores"])
    for name in ("stored", "removed", "restores"):
        rate = _recent_rate(ts, summed[name])
        figures[f"{name}_per_second"] = figure(rate, rate_text(rate), "blocks/s")
    resident_by_group = {places[p][1]: by["resident"][:, i].tolist() for i, p in enumerate(columns)}
    history = {
        "seconds_ago": seconds_ago,
        "resident_blocks": resident_by_group,
        "stored_per_second": rates["stored"],
        "removed_per_second": rates["removed"],
        "restores_per_second": rates["restores"],
        "restore_ratio": ratios,
    }

    cid = f"{engine}-{medium}".replace(" ", "_")
    domain, x_ticks, x_label = _time_axis(seconds_ago)
    chart_list = [
        charts.line_chart(
            f"{cid}-resident",
            "Resident blocks",
            f"Blocks resident on {medium} over the last minutes, against the capacity.",
            x_label,
            "blocks",
            [
                Line(f"group {g}" if len(groups) > 1 else "resident", i, seconds_ago, values)
                for i, (g, values) in enumerate(resident_by_group.items())
            ],
            [Rule(False, float(capacity), f"capacity {charts.compact(capacity)}", 3)]
            if capacity
            else [],
            domain,
            x_ticks=x_ticks,
        ),
        charts.line_chart(
            f"{cid}-rates",
            "Blocks per second",
            "Blocks stored, removed and restored (recomputed after removal) per second.",
            x_label,
            "blocks/s",
            [
                Line("stored", 0, seconds_ago, rates["stored"]),
                Line("removed", 1, seconds_ago, rates["removed"]),
                Line("restores", 2, seconds_ago, rates["restores"]),
            ],
            (),
            domain,
            x_ticks=x_ticks,
        ),
        charts.line_chart(
            f"{cid}-ratio",
            "Restore ratio",
            f"Restores / stores over the trailing {RATIO_WINDOW:g} s, with the thrashing "
            f"thresholds ({THRASH_RATIO:g} warning, {THRASH_CRITICAL_RATIO:g} critical).",
            x_label,
            "restores / stores",
            [Line(f"ratio ({RATIO_WINDOW:g} s)", 0, seconds_ago, ratios)],
            [
                Rule(False, THRASH_RATIO, f"warning {THRASH_RATIO:g}", 1),
                Rule(False, THRASH_CRITICAL_RATIO, f"critical {THRASH_CRITICAL_RATIO:g}", 2),
            ],
            domain,
            x_ticks=x_ticks,
        ),
    ]

    lifetime, lifetime_chart = _distribution(
        f"{cid}-lifetime",
        "Block lifetime",
        "Removed blocks by lifetime, stored to removed (sampled blocks).",
        "lifetime, seconds (bucket upper bound)",
        histogram(current, LIFETIME, where),
    )
    idle, idle_chart = _distribution(
        f"{cid}-idle",
        "Idle before evict",
        "Removed blocks by the time from their last access (or store) to their removal.",
        "idle time, seconds (bucket upper bound)",
        histogram(current, IDLE, where),
    )
    chart_list += [lifetime_chart, idle_chart]
    for name, data, family in (("lifetime", lifetime, LIFETIME), ("idle_before_evict", idle, IDLE)):
        count = sum(data["counts"]) if data else None
        figures[f"{name}_count"] = figure(
            count, count_text(count), "blocks", f"{family}_count", where
        )
        p50 = histogram_quantile(data["bounds"], data["counts"], 0.5) if data else None
        figures[f"{name}_p50_seconds"] = figure(p50, seconds_text(p50), "")

    whatif = _whatif(current, where, stored, capacity, figures)
    chart_list.append(_whatif_chart(f"{cid}-whatif", medium, whatif, capacity))
    return {
        "medium": medium,
        "groups": groups,
        "figures": figures,
        "history": history,
        "lifetime_seconds": lifetime,
        "idle_before_evict_seconds": idle,
        "whatif": whatif,
        "charts": chart_list,
    }


def _whatif(
    current: Series,
    where: dict[str, str],
    stored: float | None,
    capacity: float | None,
    figures: dict[str, Figure],
) -> dict[str, Any] | None:
    """The what-if curve: per capacity factor above 1, the recomputation it would have
    avoided; its figures go into ``figures`` as ``recomputes_avoided:FACTOR`` and
    ``recompute_saved_ratio:FACTOR``."""
    points = []
    found = [
        (dict(k), int(v))
        for k, v in current[AVOIDED].items()
        if isinstance(v, int) and where.items() <= dict(k).items()
    ]
    for key, avoided in sorted(found, key=lambda kv: float(kv[0]["capacity_factor"])):
        factor = key["capacity_factor"]
        saved = avoided / stored if stored else None
        points.append(
            {
                "capacity_factor": factor,
                "capacity_blocks": round(float(factor) * capacity) if capacity else None,
                "recomputes_avoided": avoided,
                "recompute_saved_ratio": saved,
            }
        )
        labels = {**where, "capacity_factor": factor}
        figures[f"recomputes_avoided:{factor}"] = figure(
            avoided, count_text(avoided), "blocks", AVOIDED, labels
        )
        figures[f"recompute_saved_ratio:{factor}"] = figure(saved, ratio_text(saved), "of stores")
    return {"capacity_blocks": capacity, "points": points} if points else None


def _whatif_chart(
    chart_id: str, medium: str, whatif: dict[str, Any] | None, capacity: float | None
) -> charts.Chart:
    title = "What-if: a larger cache"
    desc = (
        f"Recomputation a {medium} cache of each size would have avoided, as a share of the "
        "blocks stored; the current size is marked."
    )
    if whatif is None:
        return charts.line_chart(chart_id, title, desc, "", "", [])
    # The current size avoids nothing beyond what it already holds: the curve starts at 0.
    factors = [1.0, *(float(p["capacity_factor"]) for p in whatif["points"])]
    saved = [0.0, *(p["recompute_saved_ratio"] for p in whatif["points"])]
    percent = [None if s is None else 100 * s for s in saved]
    if capacity:
        x_ticks = [(f, charts.compact(f * capacity)) for f in factors if f in (1, 2, 4, 8, 16)]
        x_label = "cache size, blocks (log scale)"
        now = f"now: {charts.compact(capacity)}"
    else:
        x_ticks = [(f, f"{f:g}\u00d7") for f in factors if f in (1, 2, 4, 8, 16)]
        x_label = "cache size, multiples of the current (log scale)"
        now = "now"
    return charts.line_chart(
        chart_id,
        title,
        desc,
        x_label,
        "% of stores avoided",
        [Line("recomputation avoided", 0, factors, percent)],
        [Rule(True, 1.0, now, 5)],
        (factors[0], factors[-1]),
        log_x=True,
        x_ticks=x_ticks,
        y_format=lambda v: f"{v:g}%",
    )


# --- one engine and the whole document ----------------------------------------------------
def _engine(status: EngineStatus, current: Series) -> dict[str, Any]:
    view = status.view
    e = {"engine": view.name}
    up = total(current, SOURCE_UP, e)
    lag = total(current, LAG, e)
    health = {
        "source_up": figure(up, "up" if up else "down", "", SOURCE_UP, e),
        "event_lag_seconds": figure(
            lag, seconds_text(lag), "", LAG if lag is not None else None, e
        ),
        "batches_lost_total": counted(current, LOST, e, "batches"),
        "sequence_gaps_total": counted(current, GAPS, e, "gaps"),
        "decode_errors_total": counted(current, DECODE_ERRORS, e, "errors"),
        "messages_total": counted(current, MESSAGES, e, "messages"),
    }
    alerts = [
        {
            "alert": a.alert,
            "severity": a.level.value,
            "message": a.message,
            "since": a.since,
            "value": a.value,
            "threshold": a.threshold,
            "metric": ALERT_ACTIVE,
            "labels": {**e, "alert": a.alert, "severity": a.level.value},
        }
        for a in sorted(view.alerts_active, key=lambda a: a.alert)
    ]
    media = []
    for medium in _label_values(current, RESIDENT, view.name, "medium"):
        groups = [
            g
            for g in _label_values(current, RESIDENT, view.name, "group")
            if (("engine", view.name), ("medium", medium), ("group", g)) in current[RESIDENT]
        ]
        media.append(_medium(status, current, medium, groups))
    return {
        "engine": view.name,
        "health": health,
        "alerts": alerts,
        "media": media,
        "history_samples": len(status.history),
    }


def layout_key(document: dict[str, Any]) -> str:
    """What decides the page's structure (engines, media, alerts, what-if rows): when it
    changes, the page reloads instead of updating in place."""
    parts = []
    for engine in document["engines"]:
        parts.append(engine["engine"])
        parts += [f"!{a['alert']}:{a['severity']}" for a in engine["alerts"]]
        for medium in engine["media"]:
            parts.append(f"{medium['medium']}[{','.join(medium['figures'])}]")
    return "|".join(parts)


def status_document(engines: Sequence[EngineStatus], now: float) -> dict[str, Any]:
    """The whole status document at wall time ``now``."""
    current = series([s.view for s in engines])
    document: dict[str, Any] = {
        "version": __version__,
        "generated_at": now,
        "refresh_seconds": REFRESH_SECONDS,
        "history": {
            "window_seconds": HISTORY_SECONDS,
            "interval_seconds": SAMPLE_INTERVAL,
            "bytes": sum(s.history_bytes for s in engines),
        },
        "thresholds": {
            "restore_ratio_warning": THRASH_RATIO,
            "restore_ratio_critical": THRASH_CRITICAL_RATIO,
            "restore_ratio_window_seconds": RATIO_WINDOW,
        },
        "engines": [_engine(s, current) for s in engines],
    }
    document["layout"] = layout_key(document)
    return document
