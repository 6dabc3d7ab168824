"""The collector summary served as JSON on ``/api/v1/summary``."""

from __future__ import annotations

from typing import Any

from ..analysis.whatif import factor_label
from ..collector.histogram import HistogramSnapshot, histogram_quantile
from ..pipeline import EngineView
from .series import LIFECYCLE_FAMILIES


def quantile(hist: HistogramSnapshot, row: int, q: float) -> float | None:
    """Bucket-interpolated quantile of one row, as PromQL's histogram_quantile computes it."""
    return histogram_quantile(hist.bounds, hist.counts[row], q)


def whatif_summary(
    view: EngineView, medium_id: int, stored: int, accessed: int
) -> dict[str, Any] | None:
    """A medium's capacity what-if (docs/whatif.md): per capacity factor, the recomputation a
    cache that many times as large would have avoided (as a share of the ``stored`` blocks)
    and, where hits are reported (``accessed``), the hit ratio it would have had."""
    if view.whatif is None or medium_id not in view.whatif.media:
        return None
    w = view.whatif.media[medium_id]
    references = stored + accessed
    avoided = dict(zip(view.whatif.avoided_factors, w.avoided, strict=True))
    factors: dict[str, Any] = {}
    for factor, hits in zip(view.whatif.factors, w.hits, strict=True):
        if factor < 1.0 and not accessed:
            continue  # with no hits reported a smaller cache is not measured
        entry: dict[str, Any] = {
            "capacity_blocks": round(factor * w.capacity) if w.capacity else None
        }
        if factor in avoided:
            entry["recomputes_avoided"] = avoided[factor]
            entry["recompute_saved_ratio"] = avoided[factor] / stored if stored else None
        if accessed:
            measured = references and (factor >= 1.0 or w.distances_known)
            entry["hit_ratio"] = hits / references if measured else None
        factors[factor_label(factor)] = entry
    distance = w.distance
    return {
        "capacity_blocks": w.capacity or None,
        "capacity_source": "configured" if w.capacity_configured else "observed",
        "sample_ratio": w.sample_ratio,
        "sampled": {
            "blocks": w.sampled_blocks,
            "max_blocks": view.whatif.max_sampled_blocks,
            "stores": w.sampled_stores,
            "restores": w.sampled_restores,
            "hits": w.sampled_hits,
            "ghosts": w.ghosts,
        },
        "factors": factors,
        "reuse_distance_blocks": None
        if distance is None
        else {
            "count": int(distance.counts[0].sum()),
            "sum": float(distance.sums[0]),
            **{f"p{int(q * 100)}": quantile(distance, 0, q) for q in (0.5, 0.9, 0.99)},
        },
    }


def summarize(view: EngineView) -> dict[str, Any]:
    snap = view.collector
    stored_m = snap.per_medium(snap.stored)
    resident_m = snap.per_medium(snap.resident)
    removed_m = snap.per_medium(snap.removed)
    accessed_m = snap.per_medium(snap.accessed)
    restores_m = snap.per_medium(snap.restores)
    hists = {
        key: HistogramSnapshot(
            snap.histograms[key].bounds,
            snap.per_medium(snap.histograms[key].counts),
            snap.per_medium(snap.histograms[key].sums),
        )
        for key, _ in LIFECYCLE_FAMILIES
    }
    media: dict[str, Any] = {}
    for i, name in enumerate(snap.media):
        stored = int(stored_m[i])
        entry: dict[str, Any] = {
            "resident_blocks": int(resident_m[i]),
            "stored_total": stored,
            "removed_total": {
                r: int(removed_m[i, j]) for j, r in enumerate(snap.reasons) if removed_m[i, j]
            },
            "accessed_total": int(accessed_m[i]),
            "restores_total": int(restores_m[i]),
            "restore_ratio": int(restores_m[i]) / stored if stored else None,
        }
        for key, hist in hists.items():
            entry[key] = {
                "count": int(hist.counts[i].sum()),
                "sum": float(hist.sums[i]),
                **{f"p{int(q * 100)}": quantile(hist, i, q) for q in (0.5, 0.9, 0.99)},
            }
        whatif = whatif_summary(view, i, stored, int(accessed_m[i]))
        if whatif is not None:
            entry["whatif"] = whatif
        adapters = {
            adapter: {
                "resident_blocks": int(snap.adapter_resident[i, a]),
                "stored_total": int(snap.adapter_stored[i, a]),
                "restores_total": int(snap.adapter_restores[i, a]),
            }
            for a, adapter in enumerate(snap.adapters)
            if snap.adapter_stored[i, a]
        }
        if adapters:
            entry["adapters"] = adapters
        if stored or resident_m[i] or removed_m[i].any():
            media[name] = entry
    places = [
        {
            "medium": medium,
            "group": group,
            "stored": int(snap.stored[p]),
            "removed": int(snap.removed[p].sum()),
            "resident": int(snap.resident[p]),
            "resident_hashes": int(snap.resident_hashes[p]),
            "resident_tokens": int(snap.resident_tokens[p]),
            "restores": int(snap.restores[p]),
            "accessed": int(snap.accessed[p]),
        }
        for p in range(len(snap.places))
        for medium, group in [snap.place_labels(p)]
    ]
    return {
        "engine": view.name,
        "source": {
            "up": view.source.up,
            "messages_total": view.source.messages,
            "sequence_gaps_total": view.source.sequence_gaps,
            "batches_lost_total": view.source.batches_lost,
            "last_event_timestamp_seconds": view.source.last_event_ts,
        },
        "events_total": view.events,
        "decode_errors_total": view.decode_errors,
        "tracked_blocks": snap.tracked,
        "sample_ratio": view.sample_ratio,
        "cache_clears_total": snap.clears,
        "unknown_removals_total": snap.unknown_removals,
        "media": media,
        "places": places,
        "groups": {
            group: {"kind": spec.kind, "sliding_window": spec.sliding_window or None}
            for group, spec in sorted(view.groups.items())
        },
        "alerts": {
            "active": [alert.to_dict() for alert in view.alerts_active],
            "raised_total": [
                {"alert": alert, "severity": level.value, "count": count}
                for (alert, level), count in sorted(
                    view.alerts_raised.items(), key=lambda kv: (kv[0][0], kv[0][1].value)
                )
                if count
            ],
        },
        "trends": {series: trend.to_dict() for series, trend in sorted(view.trends.items())},
        **({"access_patterns": view.access_patterns} if view.access_patterns is not None else {}),
    }
