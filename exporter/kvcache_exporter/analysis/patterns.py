"""Access-pattern analysis of one engine: how its resident blocks are used.

Computed on demand (for the summary and the library), never per scrape: it reads every
resident tracked block's access count and prefix depth once.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from ..collector import CollectorSnapshot, ResidentProfile
from ..collector.histogram import HistogramSnapshot

# Upper bounds of the access-frequency classes of resident blocks (accesses since store).
FREQUENCY_CLASSES: Final = ((0, "0"), (1, "1"), (2, "2"), (4, "3-4"), (9, "5-9"), (19, "10-19"))
LOCALITY_SECONDS: Final = (1.0, 10.0, 60.0, 300.0)


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _fraction_within(hist: HistogramSnapshot, seconds: float) -> float | None:
    """Share of observations at or below ``seconds`` (exact when it is a bucket bound)."""
    counts = hist.counts.sum(axis=0)
    total = int(counts.sum())
    if not total:
        return None
    index = int(np.searchsorted(np.asarray(hist.bounds), seconds, side="right"))
    return int(counts[:index].sum()) / total


def access_patterns(
    profile: ResidentProfile, snapshot: CollectorSnapshot, hot_threshold: int = 4
) -> dict[str, Any]:
    """Hot/warm/cold shares, access-frequency distribution, reuse locality, prefix depth."""
    accesses = profile.accesses.astype(np.int64)
    resident = int(accesses.size)
    cold = int(np.count_nonzero(accesses == 0))
    hot = int(np.count_nonzero(accesses >= hot_threshold))
    distribution: dict[str, int] = {}
    lower = 0
    for upper, label in FREQUENCY_CLASSES:
        distribution[label] = int(np.count_nonzero((accesses >= lower) & (accesses <= upper)))
        lower = upper + 1
    distribution[f"{lower}+"] = int(np.count_nonzero(accesses >= lower))
    reuse = snapshot.histograms["reuse_gap"]
    depth = profile.depth[profile.depth > 0].astype(np.float64)
    return {
        "resident_tracked_blocks": resident,
        "hot_threshold_accesses": hot_threshold,
        "hot_share": _share(hot, resident),
        "warm_share": _share(resident - hot - cold, resident),
        "cold_share": _share(cold, resident),
        "access_frequency": distribution,
        "mean_accesses": float(accesses.mean()) if resident else None,
        "reuse_locality": {
            f"within_{int(s)}s": _fraction_within(reuse, s) for s in LOCALITY_SECONDS
        },
        "prefix_depth": {
            "resident_known": int(depth.size),
            "mean": float(depth.mean()) if depth.size else None,
            "p50": float(np.percentile(depth, 50)) if depth.size else None,
            "p90": float(np.percentile(depth, 90)) if depth.size else None,
            "max": int(depth.max()) if depth.size else None,
        },
    }
