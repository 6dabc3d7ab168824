"""Trend detection: direction and slope of the derived series over a sliding window."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.series import EnginePoint
from kvcache_exporter.analysis.trends import (
    EVICTION_RATE,
    MEDIAN_LIFETIME,
    RESIDENT_BLOCKS,
    RESTORE_RATIO,
    SERIES,
    STORE_RATE,
    Trend,
    TrendConfig,
    TrendDetector,
    fit_trend,
)
from tests.test_analysis_anomaly import Engine, streams


def feed(det: TrendDetector, points: list[EnginePoint]) -> dict[str, Trend]:
    for p in points:
        det.observe(p)
    return det.trends()


def test_linear_growth_is_up_with_the_right_slope() -> None:
    """Store rate 100 + 2t blocks/s (slope 2 blocks/s²), resident growing 3 blocks/s."""
    eng = Engine()
    points = []
    for i in range(400):
        t0, t1 = float(i), float(i + 1)
        # Stores in the step: the integral of the rate, so the step average is exact.
        stores = round((100 * t1 + t1 * t1) - (100 * t0 + t0 * t0))
        points.append(eng.step(stores=stores, evictions=stores, resident=1000 + 3 * (i + 1)))
    trends = feed(TrendDetector(), points)
    assert trends[STORE_RATE].direction == 1 and trends[STORE_RATE].direction_name == "up"
    assert trends[STORE_RATE].slope == pytest.approx(2.0, rel=0.01)
    assert trends[EVICTION_RATE].slope == pytest.approx(2.0, rel=0.01)
    assert trends[RESIDENT_BLOCKS].slope == pytest.approx(3.0, rel=0.01)
    assert trends[RESIDENT_BLOCKS].direction == 1
    assert trends[RESIDENT_BLOCKS].value == 1000 + 3 * 400
    assert trends[STORE_RATE].points == 300  # one per step within the 300 s window
    assert trends[STORE_RATE].value == pytest.approx(100 + 2 * 399.5)


def test_irregular_spacing_keeps_the_slope() -> None:
    """Samples sit at the middle of their step, where a step average of a linear rate is exact."""
    rng = random.Random(11)
    eng = Engine()
    points = []
    t = 0.0
    for _ in range(300):
        dt = rng.choice([0.25, 0.5, 1.0, 2.0, 3.0])
        t1 = t + dt
        stores = round(50 * ((100 * t1 + 0.5 * t1 * t1) - (100 * t + 0.5 * t * t))) / 50
        points.append(eng.step(dt, stores=round(stores), resident=round(2000 - 4 * t1)))
        t = t1
    trends = feed(TrendDetector(), points)
    assert trends[STORE_RATE].slope == pytest.approx(1.0, rel=0.01)
    assert trends[RESIDENT_BLOCKS].slope == pytest.approx(-4.0, rel=0.01)


def test_constant_is_flat() -> None:
    rng = random.Random(5)
    eng = Engine()
    points = [
        eng.step(
            stores=rng.randint(95, 105),
            evictions=100,
            restores=20,
            resident=4000,
            lifetimes=[(40.0, 100)],
        )
        for _ in range(400)
    ]
    trends = feed(TrendDetector(), points)
    assert set(trends) == set(SERIES)
    for trend in trends.values():
        assert trend.direction == 0 and trend.direction_name == "flat", trend
    assert trends[RESIDENT_BLOCKS].slope == 0.0
    assert trends[EVICTION_RATE].slope == 0.0
    assert trends[RESTORE_RATIO].value == pytest.approx(20 / 105, rel=0.1)


def test_decreasing_is_down() -> None:
    eng = Engine()
    points = [eng.step(stores=1000 - 2 * i, resident=10_000 - 10 * i) for i in range(300)]
    trends = feed(TrendDetector(), points)
    assert trends[STORE_RATE].direction == -1 and trends[STORE_RATE].direction_name == "down"
    assert trends[STORE_RATE].slope == pytest.approx(-2.0, rel=0.01)
    assert trends[RESIDENT_BLOCKS].slope == pytest.approx(-10.0, rel=0.01)


def test_median_lifetime_from_histogram_deltas() -> None:
    """Fine buckets; two lifetimes per step in bucket (k-1, k] interpolate to k - 0.5."""
    bounds = tuple(float(b) for b in range(1, 200))
    eng = Engine(bounds=bounds)
    points = []
    for i in range(300):
        if i % 2:  # steps without lifetimes are skipped, not zeros
            points.append(eng.step())
        else:
            points.append(eng.step(lifetimes=[(10.0 + 0.2 * i, 2)]))
    trends = feed(TrendDetector(), points)
    med = trends[MEDIAN_LIFETIME]
    assert med.direction == 1
    assert med.points == 149  # every other step, less the first point (no step before it)
    assert med.slope == pytest.approx(0.2, rel=0.03)  # the staircase of whole buckets
    assert 60.0 <= med.value <= 71.0


def test_restore_ratio_per_step() -> None:
    eng = Engine()
    points = [eng.step(stores=100, restores=round(10 + 0.1 * i)) for i in range(300)]
    points.append(eng.step())  # no stores: no ratio sample
    trends = feed(TrendDetector(), points)
    ratio = trends[RESTORE_RATIO]
    assert ratio.direction == 1
    assert ratio.points == 299  # the stepless last point adds none; the window keeps 299
    assert ratio.slope == pytest.approx(0.001, rel=0.05)


def test_too_few_points_is_unknown_not_flat() -> None:
    eng = Engine()
    trends = feed(TrendDetector(), [eng.step(stores=10, resident=5) for _ in range(5)])
    assert trends == {}
    trends = feed(TrendDetector(TrendConfig(min_points=3)), [eng.step(stores=10)] * 1)
    assert trends == {}


def test_window_and_memory_are_bounded() -> None:
    det = TrendDetector(TrendConfig(window_seconds=60.0))
    eng = Engine()
    for _ in range(2000):
        det.observe(eng.step(stores=10, resident=5, lifetimes=[(3.0, 1)]))
    assert all(len(s) <= 62 for s in det._samples.values())
    capped = TrendDetector(TrendConfig(window_seconds=1e6, max_points=50))
    for _ in range(500):
        capped.observe(eng.step(stores=10))
    assert all(len(s) <= 50 for s in capped._samples.values())


def test_same_ts_replaces_and_reset_restarts() -> None:
    eng = Engine()
    once = TrendDetector()
    twice = TrendDetector()
    for i in range(100):
        p = eng.step(stores=10 + i, resident=i)
        partial = Engine()
        partial.ts, partial.stored, partial.resident = p.ts, p.stored - 3, 0
        twice.observe(partial.point())
        twice.observe(p)
        once.observe(p)
    assert once.trends() == twice.trends()

    restarted = Engine(ts=eng.ts)  # counters back to zero
    for _ in range(20):
        once.observe(restarted.step(stores=7, resident=3))
    trends = once.trends()
    assert trends[STORE_RATE].points == 19 and trends[STORE_RATE].value == 7.0
    assert trends[RESIDENT_BLOCKS].points == 20

    back = Engine(ts=1.0)  # the clock goes backwards: start over too
    once.observe(back.step(stores=1))
    assert once.trends() == {}


def test_trend_to_dict_is_json_ready() -> None:
    eng = Engine()
    trend = feed(TrendDetector(), [eng.step(stores=10 * i) for i in range(50)])[STORE_RATE]
    doc = json.loads(json.dumps(trend.to_dict(), allow_nan=False))
    assert doc["series"] == STORE_RATE and doc["direction"] == 1 and doc["direction_name"] == "up"
    assert set(doc) >= {"slope", "value", "points", "span_seconds", "relative_change"}


def test_fit_trend_centres_large_timestamps() -> None:
    t0 = 1.7e9
    trend = fit_trend("x", [t0 + 0.1 * i for i in range(100)], [5.0 + i for i in range(100)], 0.1)
    assert trend.slope == pytest.approx(10.0, rel=1e-6)
    flat = fit_trend("x", [t0, t0 + 1.0], [0.0, 0.0], 0.1)
    assert flat.direction == 0 and flat.relative_change == 0.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"window_seconds": 0.0}, "window_seconds"),
        ({"window_seconds": float("nan")}, "window_seconds"),
        ({"min_points": 1}, "min_points"),
        ({"min_points": 2.5}, "min_points"),
        ({"flat_tolerance": -0.1}, "flat_tolerance"),
        ({"max_points": 5}, "max_points"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TrendConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(points=streams())
def test_observe_never_raises(points: list[EnginePoint]) -> None:
    det = TrendDetector(TrendConfig(min_points=2))
    for p in points:
        det.observe(p)
        for name, trend in det.trends().items():
            assert name in SERIES and trend.direction in (-1, 0, 1)
            assert trend.points >= 2


@settings(max_examples=30, deadline=None)
@given(
    slope=st.floats(-50.0, 50.0).filter(lambda s: abs(s) > 0.5),
    start=st.floats(10_000.0, 20_000.0),
)
def test_resident_slope_recovered(slope: float, start: float) -> None:
    eng = Engine()
    det = TrendDetector()
    for i in range(300):
        det.observe(eng.step(resident=round(start + slope * i)))
    trend = det.trends()[RESIDENT_BLOCKS]
    assert trend.slope == pytest.approx(slope, rel=0.01, abs=0.01)
