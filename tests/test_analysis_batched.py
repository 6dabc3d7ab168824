"""The detectors fed a batch's points at once (``observe_many``) against the same points fed one
by one (``observe``, the reference): the same transitions in the same order, the same active
alerts, raise counts, trends and state after, on random streams that raise, hold, escalate and
clear every alert, with clears, restarts, lost batches, replaced points and clock jumps."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.anomaly import AnomalyConfig, AnomalyDetector
from kvcache_exporter.analysis.monitor import EngineMonitor, MonitorConfig
from kvcache_exporter.analysis.series import CacheAlert, EnginePoint, EnginePoints
from kvcache_exporter.analysis.trends import TrendConfig, TrendDetector
from kvcache_exporter.collector import CutTotals

BOUNDS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUICK = AnomalyConfig(
    min_hold_seconds=5.0,
    storm_window_seconds=5.0,
    storm_baseline_seconds=40.0,
    storm_min_baseline_seconds=10.0,
    storm_min_rate=5.0,
    thrash_window_seconds=10.0,
    thrash_min_stores=20,
    residency_window_seconds=10.0,
    residency_baseline_seconds=60.0,
    residency_min_observations=5,
    residency_min_baseline_observations=20,
    reset_hold_seconds=8.0,
    loss_window_seconds=20.0,
)


def stream(seed: int, steps: int, irregular: bool) -> list[EnginePoint]:
    """Points of an engine whose load changes regime every few dozen steps: steady, eviction
    bursts, restores near the stores, lifetimes collapsing, lost batches, idle; with ``irregular``,
    also clears, counters going backwards, repeated times and the clock jumping back."""
    rng = np.random.default_rng(seed)
    ts, stored, evicted, restores, clears, lost = 1000.0, 0, 0, 0, 0, 0
    counts = np.zeros(len(BOUNDS) + 1, np.uint64)
    points: list[EnginePoint] = []
    regime = 0
    for _ in range(steps):
        if rng.random() < 0.04:
            regime = int(rng.integers(0, 6))
        store = int(rng.poisson(60 if regime != 1 else 30))
        evict = int(rng.poisson(50 if regime != 1 else 600))
        if regime == 5:  # idle: nothing stored, now and then an eviction
            store, evict = 0, int(rng.random() < 0.3)
        restore = int(rng.binomial(store, 0.8 if regime == 2 else 0.05))
        life_scale = 0.3 if regime == 3 else 40.0
        lifetimes = rng.exponential(life_scale, size=evict)
        np.add.at(counts, np.searchsorted(BOUNDS, lifetimes, side="left"), 1)
        lost += int(rng.random() < (0.3 if regime == 4 else 0.01))
        ts += float(rng.choice([1.0, 1.0, 1.0, 0.5, 2.0, 7.0]))
        if irregular:
            roll = rng.random()
            if roll < 0.01:
                clears += 1
            elif roll < 0.015:  # a restart: counters start over
                stored = evicted = restores = clears = lost = 0
                counts = np.zeros_like(counts)
            elif roll < 0.02:
                ts -= 30.0
            elif roll < 0.03 and points:
                ts = points[-1].ts  # replaces the previous point
        stored, evicted, restores = stored + store, evicted + evict, restores + restore
        points.append(
            EnginePoint(
                ts, stored, evicted, restores, max(stored - evicted, 0), clears, lost, BOUNDS,
                counts.copy(),
            )
        )  # fmt: skip
    return points


def columns(points: list[EnginePoint]) -> EnginePoints:
    def col(name: str, dtype: type) -> np.ndarray:
        return np.array([getattr(p, name) for p in points], dtype)

    return EnginePoints(
        col("ts", np.float64), col("stored", np.int64), col("evicted", np.int64),
        col("restores", np.int64), col("resident", np.int64), col("clears", np.int64),
        col("lost_batches", np.int64), BOUNDS, np.stack([p.lifetime_counts for p in points]),
    )  # fmt: skip


def chunks(n: int, seed: int) -> list[slice]:
    rng = np.random.default_rng(seed)
    out, start = [], 0
    while start < n:
        size = int(rng.choice([1, 2, 3, 8, 30, 100]))
        out.append(slice(start, min(n, start + size)))
        start += size
    return out


def state(det: AnomalyDetector) -> dict[str, object]:
    return {
        "active": [a.to_dict() for a in det.active()],
        "raised": det.raised_total(),
        "states": {
            name: (st.level, st.since, st.level_since, st.last_value, st.count)
            for name, st in det._alerts.states.items()
        },
        "evict_start": det._evict_start_ts,
        "last_reset": det._last_reset_ts,
        "last_ts": det._last_ts,
        "history": (det._h.ts[det._h.start : det._h.n].tolist(), det._h.live),
    }


def check_equal(points: list[EnginePoint], config: AnomalyConfig, seed: int) -> int:
    """Both ways agree after every chunk; returns how many transitions there were. Points
    that follow one another take the batched path: only the first chunk (nothing before it
    to follow) is observed one by one."""
    one, many = AnomalyDetector("e", config), AnomalyDetector("e", config)
    one_by_one = 0
    observe = many.observe

    def counted(point: EnginePoint) -> list[CacheAlert]:
        nonlocal one_by_one
        one_by_one += 1
        return observe(point)

    many.observe = counted  # type: ignore[method-assign]
    by_one: list[dict[str, object]] = []
    by_many: list[dict[str, object]] = []
    parts = chunks(len(points), seed)
    regular = all(b.ts > a.ts and b.clears == a.clears for a, b in itertools.pairwise(points))
    regular = regular and all(
        b.stored >= a.stored and b.lost_batches >= a.lost_batches
        for a, b in itertools.pairwise(points)
    )
    for rows in parts:
        for p in points[rows]:
            by_one += [a.to_dict() for a in one.observe(p)]
        by_many += [a.to_dict() for a in many.observe_many(columns(points[rows]))]
        assert by_many == by_one
        assert state(many) == state(one)
    if regular:
        assert one_by_one == parts[0].stop
    return len(by_one)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_a_batch_at_once_equals_its_points_one_by_one(
    seed: int, irregular: bool, quick: bool
) -> None:
    config = QUICK if quick else AnomalyConfig()
    check_equal(stream(seed, 400, irregular), config, seed)


def test_the_streams_raise_hold_and_clear_every_alert() -> None:
    """The comparison above is worth something only if the streams move the alerts."""
    seen: set[tuple[str, str]] = set()
    for seed in range(6):
        det = AnomalyDetector("e", QUICK)
        for p in stream(seed, 600, irregular=True):
            for a in det.observe(p):
                seen.add((a.alert, str(a.details["transition"])))
    for alert in ("eviction_storm", "thrashing", "short_residency", "event_loss"):
        assert {(alert, "raised"), (alert, "cleared")} <= seen, (alert, seen)
    assert ("cache_reset", "raised") in seen
    assert any(kind in ("escalated", "deescalated") for _, kind in seen)
    assert check_equal(stream(1, 600, True), QUICK, 1) > 20


def same_point(a: EnginePoint | None, b: EnginePoint | None) -> bool:
    if a is None or b is None:
        return a is b
    fields = [f.name for f in dataclasses.fields(EnginePoint) if f.name != "lifetime_counts"]
    return [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields] and (
        a.lifetime_counts.tolist() == b.lifetime_counts.tolist()
    )


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_trends_of_a_batch_at_once_equal_its_points_one_by_one(seed: int, irregular: bool) -> None:
    points = stream(seed, 300, irregular)
    config = TrendConfig(window_seconds=60.0, min_points=5, max_points=40)
    one, many = TrendDetector(config), TrendDetector(config)
    for rows in chunks(len(points), seed):
        for p in points[rows]:
            one.observe(p)
        many.observe_many(columns(points[rows]))
        assert {k: list(v) for k, v in many._samples.items()} == {
            k: list(v) for k, v in one._samples.items()
        }
        assert many.trends() == one.trends()
        assert many._added == one._added
        assert same_point(many._last, one._last) and same_point(many._prev, one._prev)


def test_the_monitor_samples_columns_as_its_detectors_take_each_point() -> None:
    """A batch's totals at its grid times, sampled at once, do to the alerts and trends what
    the same points do fed to the detectors one by one (the loss counter is the monitor's)."""
    points = [dataclasses.replace(p, lost_batches=3) for p in stream(7, 300, irregular=True)]
    config = MonitorConfig(anomaly=QUICK)
    monitor = EngineMonitor("e", lambda: 3, config)
    anomaly, trends = AnomalyDetector("e", QUICK), TrendDetector(config.trend)
    transitions: list[dict[str, object]] = []
    for rows in chunks(len(points), 7):
        for p in points[rows]:
            transitions += [a.to_dict() for a in anomaly.observe(p)]
            trends.observe(p)
        cols = columns(points[rows])
        totals = CutTotals(
            cols.stored, cols.evicted, cols.restores, cols.resident, cols.clears, BOUNDS,
            cols.lifetime_counts,
        )  # fmt: skip
        monitor.sample_many(cols.ts, totals)
        assert [a.to_dict() for a in monitor.active()] == [a.to_dict() for a in anomaly.active()]
    assert len(transitions) > 10
    assert [a.to_dict() for a in monitor.recent_transitions()] == transitions[-50:]
    assert monitor.trends() == trends.trends()
