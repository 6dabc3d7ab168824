"""Cumulative-ready histograms per label id, observed a whole array at a time, and the
bucket-interpolated quantile of their counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import numpy as np
import numpy.typing as npt

# vLLM's KV-residency buckets (log-spaced, 1 ms … 30 min), so dashboards line up with vLLM's.
RESIDENCY_BUCKETS: Final = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
)  # fmt: skip
ACCESS_COUNT_BUCKETS: Final = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)
PREFIX_DEPTH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


def validate_buckets(bounds: Sequence[float], name: str = "buckets") -> tuple[float, ...]:
    """Bucket upper bounds: finite, strictly ascending, non-empty."""
    values = tuple(float(b) for b in bounds)
    if not values:
        raise ValueError(f"{name}: at least one bucket bound is needed")
    if not all(np.isfinite(values)):
        raise ValueError(f"{name}: bucket bounds must be finite (+Inf is implied)")
    if any(low >= high for low, high in pairwise(values)):
        raise ValueError(f"{name}: bucket bounds must be strictly ascending")
    return values


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    counts: npt.NDArray[np.uint64]  # [labels, len(bounds) + 1], per bucket (not cumulative)
    sums: npt.NDArray[np.float64]  # [labels]


class HistogramSet:
    """One histogram per label id (e.g. per medium), sharing bucket bounds."""

    def __init__(self, bounds: Sequence[float], labels: int) -> None:
        self.bounds = validate_buckets(bounds)
        self.edges = np.asarray(self.bounds, np.float64)  # the bounds as one contiguous array
        self._width = len(self.bounds) + 1
        self.labels = labels
        self.counts = np.zeros((labels, self._width), np.uint64)
        self.sums = np.zeros(labels, np.float64)

    def bucket_of(self, values: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
        """The bucket index each value falls in (le semantics; the last is +Inf)."""
        return np.searchsorted(self.edges, values, side="left").astype(np.int64)

    def observe(self, label_ids: npt.NDArray[np.uint8], values: npt.NDArray[np.floating]) -> None:
        if not values.size:
            return
        bucket = np.searchsorted(self.edges, values, side="left")  # first bound >= value: le
        flat = label_ids.astype(np.int64) * self._width + bucket
        counts = np.bincount(flat, minlength=self.labels * self._width)
        self.counts += counts.reshape(self.labels, self._width).astype(np.uint64)
        self.sums += np.bincount(label_ids, weights=values, minlength=self.labels)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, self.counts.copy(), self.sums.copy())

    def reset(self) -> None:
        self.counts[:] = 0
        self.sums[:] = 0.0


def histogram_quantile(bounds: Sequence[float], counts: npt.ArrayLike, q: float) -> float | None:
    """The ``q`` quantile of per-bucket ``counts`` (``len(bounds) + 1``, last is +Inf).

    Interpolates linearly inside the bucket, as PromQL's ``histogram_quantile`` does: the first
    bucket starts at 0 (or is its upper bound if that is <= 0), and a rank in the +Inf bucket
    answers the highest finite bound. None when the histogram is empty.
    """
    # A plain loop: the alerts ask for a few quantiles of ~20 buckets at every sample, where
    # numpy's per-call overhead is most of the cost.
    c = [float(n) for n in np.asarray(counts).ravel().tolist()]
    total = sum(c)
    if total <= 0.0 or not bounds:
        return None
    rank = q * total
    below = 0.0  # observations in the buckets before `bucket`
    bucket = len(c) - 1
    for i, n in enumerate(c):
        if below + n >= rank:  # the first cumulative count at or above the rank
            bucket = i
            break
        below += n
    if bucket >= len(bounds):
        return float(bounds[-1])
    upper = float(bounds[bucket])
    if bucket == 0 and upper <= 0.0:
        return upper
    lower = 0.0 if bucket == 0 else float(bounds[bucket - 1])
    in_bucket = c[bucket]
    fraction = (rank - below) / in_bucket if in_bucket > 0.0 else 0.0
    return lower + (upper - lower) * fraction


def histogram_quantiles(
    bounds: Sequence[float], counts: npt.NDArray[np.integer], q: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """:func:`histogram_quantile` of each row of ``counts`` at once: the values, and which rows
    have one (the others are empty). The same arithmetic, so the same floats, row by row."""
    rows = counts.shape[0]
    if not bounds or not rows:
        return np.zeros(rows), np.zeros(rows, bool)
    c = counts.astype(np.float64)
    cumulative = np.cumsum(c, axis=1)  # exact: whole counts far below 2**53
    total = cumulative[:, -1]
    valid = total > 0.0
    rank = q * total
    bucket = np.argmax(cumulative >= rank[:, None], axis=1)
    edges = np.asarray(bounds, np.float64)
    inside = bucket < edges.size
    b = np.minimum(bucket, edges.size - 1)
    upper = edges[b]
    lower = np.where(b == 0, 0.0, edges[np.maximum(b - 1, 0)])
    below = np.where(bucket == 0, 0.0, cumulative[np.arange(rows), np.maximum(bucket - 1, 0)])
    in_bucket = c[np.arange(rows), bucket]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(in_bucket > 0.0, (rank - below) / in_bucket, 0.0)
    value = lower + (upper - lower) * fraction
    value = np.where((bucket == 0) & (upper <= 0.0), upper, value)
    value = np.where(inside, value, edges[-1])
    return value, valid
