"""Anomaly detection: scripted point streams that must raise each alert, ones that must not,
hysteresis (no flapping at a threshold, hold before clearing), and robustness."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.anomaly import (
    ALERT_LEVELS,
    CACHE_RESET,
    EVENT_LOSS,
    EVICTION_STORM,
    SHORT_RESIDENCY,
    SOURCE_STALLED,
    THRASHING,
    AnomalyConfig,
    AnomalyDetector,
)
from kvcache_exporter.analysis.series import AlertLevel, CacheAlert, EnginePoint
from kvcache_exporter.collector.histogram import histogram_quantile

BOUNDS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WARNING, CRITICAL, INFO = AlertLevel.WARNING, AlertLevel.CRITICAL, AlertLevel.INFO
RANK = {INFO: 1, WARNING: 2, CRITICAL: 3}


class Engine:
    """A scripted engine: cumulative counters advanced one step at a time."""

    def __init__(self, bounds: tuple[float, ...] = BOUNDS, ts: float = 0.0) -> None:
        self.bounds = bounds
        self.ts = ts
        self.stored = self.evicted = self.restores = self.clears = self.lost = 0
        self.resident = 0
        self.counts = np.zeros(len(bounds) + 1, np.uint64)

    def point(self) -> EnginePoint:
        return EnginePoint(
            ts=self.ts,
            stored=self.stored,
            evicted=self.evicted,
            restores=self.restores,
            resident=self.resident,
            clears=self.clears,
            lost_batches=self.lost,
            lifetime_bounds=self.bounds,
            lifetime_counts=self.counts.copy(),
        )

    def step(
        self,
        dt: float = 1.0,
        *,
        stores: int = 0,
        evictions: int = 0,
        restores: int = 0,
        resident: int | None = None,
        lifetimes: Iterable[tuple[float, int]] = (),
        clears: int = 0,
        lost: int = 0,
    ) -> EnginePoint:
        """Advance the clock by ``dt`` with these increments; ``lifetimes`` are (seconds, n)."""
        self.ts += dt
        self.stored += stores
        self.evicted += evictions
        self.restores += restores
        self.clears += clears
        self.lost += lost
        self.resident = resident if resident is not None else self.resident + stores - evictions
        for seconds, n in lifetimes:
            self.counts[int(np.searchsorted(self.bounds, seconds, side="left"))] += np.uint64(n)
        return self.point()


def run(det: AnomalyDetector, points: Iterable[EnginePoint]) -> list[CacheAlert]:
    out: list[CacheAlert] = []
    for p in points:
        out.extend(det.observe(p))
    return out


def of(alerts: list[CacheAlert], name: str) -> list[CacheAlert]:
    return [a for a in alerts if a.alert == name]


def steady(eng: Engine, seconds: int, **kw: object) -> list[EnginePoint]:
    """``seconds`` one-second steps with the same increments."""
    return [eng.step(1.0, **kw) for _ in range(seconds)]  # type: ignore[arg-type]


STEADY: dict[str, object] = {
    "stores": 100,
    "evictions": 100,
    "restores": 10,
    "lifetimes": [(40.0, 100)],
}


# -- steady load and sub-threshold bursts: nothing


def test_steady_load_raises_nothing() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    rng = random.Random(7)
    alerts: list[CacheAlert] = []
    for _ in range(1500):
        n = rng.randint(80, 120)
        alerts += det.observe(
            eng.step(
                rng.uniform(0.8, 1.2),
                stores=n,
                evictions=n,
                restores=rng.randint(5, 15),
                lifetimes=[(rng.uniform(30.0, 60.0), n)],
            )
        )
    assert alerts == []
    assert det.active() == []
    assert sum(det.raised_total().values()) == 0


def test_single_burst_below_threshold_raises_nothing() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = run(det, steady(eng, 400, stores=20, evictions=20))
    # A one-second burst: the 10 s rate goes from 20/s to 38/s, under 4x and under 50/s.
    alerts += det.observe(eng.step(stores=200, evictions=200))
    alerts += run(det, steady(eng, 100, stores=20, evictions=20))
    assert alerts == []


def test_high_factor_below_min_rate_is_not_a_storm() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 400, stores=1, evictions=1))
    alerts = run(det, steady(eng, 30, stores=30, evictions=30))  # 30x, but 30/s < 50/s
    assert of(alerts, EVICTION_STORM) == []


def test_storm_needs_baseline_history() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 30, stores=10, evictions=10))
    alerts = run(det, steady(eng, 20, stores=500, evictions=500))
    assert of(alerts, EVICTION_STORM) == []


def test_cache_filling_up_is_not_a_storm() -> None:
    """Evictions start once the cache is full: the baseline counts from the first eviction."""
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = run(det, steady(eng, 300, stores=200))
    alerts += run(det, steady(eng, 600, stores=200, evictions=200))
    assert of(alerts, EVICTION_STORM) == []


# -- eviction_storm


def test_eviction_storm_warning_then_critical() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    assert run(det, steady(eng, 400, stores=20, evictions=20)) == []
    alerts = run(det, steady(eng, 20, stores=250, evictions=250))
    storm = of(alerts, EVICTION_STORM)
    assert [(a.level, a.active) for a in storm] == [(WARNING, True), (CRITICAL, True)]
    raised, escalated = storm
    assert raised.since == escalated.since  # escalation keeps the raise time
    assert raised.value >= 4.0 and raised.threshold == 4.0
    assert escalated.value >= 10.0 and escalated.threshold == 10.0
    assert "baseline of 20/s" in raised.message and "5-minute" in raised.message
    assert raised.details["baseline_rate"] == pytest.approx(20.0)
    assert det.raised_total()[(EVICTION_STORM, WARNING)] == 1
    assert det.raised_total()[(EVICTION_STORM, CRITICAL)] == 1
    assert [a.alert for a in det.active()] == [EVICTION_STORM]
    assert "transition" not in det.active()[0].details  # only transitions say which they are


def test_storm_clears_after_hold_and_below_clear_level() -> None:
    cfg = AnomalyConfig()
    det = AnomalyDetector("e", cfg)
    eng = Engine()
    run(det, steady(eng, 400, stores=20, evictions=20))
    alerts = run(det, steady(eng, 5, stores=300, evictions=300))
    (raised,) = of(alerts, EVICTION_STORM)
    alerts = []
    for _ in range(120):
        for a in det.observe(eng.step(stores=20, evictions=20)):
            alerts.append(a)
            # The storm leaves the 10 s window after 10 s; the level holds 30 s from its raise.
            assert eng.ts == raised.since + cfg.min_hold_seconds
    downs = of(alerts, EVICTION_STORM)
    assert [a.active for a in downs] == [False]
    assert downs[0].since == raised.since and det.active() == []
    assert downs[0].value < cfg.storm_factor * cfg.clear_ratio


def test_storm_hovering_at_threshold_raises_once() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 400, stores=20, evictions=20))
    alerts: list[CacheAlert] = []
    for i in range(40):  # 10 s rate alternates around 80/s = 4x the 20/s baseline
        n = 90 if (i // 3) % 2 else 70
        alerts += det.observe(eng.step(stores=n, evictions=n))
    storm = of(alerts, EVICTION_STORM)
    assert [(a.level, a.active) for a in storm] == [(WARNING, True)]


# -- thrashing


def _thrash_stream(
    det: AnomalyDetector, eng: Engine, ratios: Iterable[float], stores: int = 100
) -> list[CacheAlert]:
    return run(
        det,
        (eng.step(stores=stores, evictions=stores, restores=round(r * stores)) for r in ratios),
    )


def test_thrashing_warning_and_critical() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = _thrash_stream(det, eng, [0.1] * 100 + [0.5] * 100 + [0.9] * 100)
    thrash = of(alerts, THRASHING)
    assert [(a.level, a.active) for a in thrash] == [(WARNING, True), (CRITICAL, True)]
    assert "of stores over the last 60 s" in thrash[0].message
    assert thrash[0].value == pytest.approx(0.3, abs=0.01)


def test_thrashing_needs_min_stores() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = run(det, (eng.step(stores=1, restores=1) for _ in range(300)))  # 60 stores/60 s
    assert of(alerts, THRASHING) == []


def test_thrashing_hovering_at_threshold_does_not_flap() -> None:
    """The 60 s ratio crosses 0.3 again and again; hysteresis raises once and holds."""
    # 20 s blocks: the 60 s window alternates between 0.287 and 0.313.
    ratios = ([0.26] * 20 + [0.34] * 20) * 30
    det = AnomalyDetector("e")
    thrash = of(_thrash_stream(det, Engine(), [0.1] * 120 + ratios), THRASHING)
    assert [(a.level, a.active) for a in thrash] == [(WARNING, True)]

    # The same signal without hysteresis flaps: the test would catch a missing dead band.
    bare = AnomalyDetector("e", AnomalyConfig(clear_ratio=1.0, min_hold_seconds=0.0))
    assert len(of(_thrash_stream(bare, Engine(), [0.1] * 120 + ratios), THRASHING)) > 10


def test_thrashing_clears_only_after_hold() -> None:
    cfg = AnomalyConfig(thrash_window_seconds=10.0, min_hold_seconds=30.0)
    det = AnomalyDetector("e", cfg)
    eng = Engine()
    alerts = _thrash_stream(det, eng, [0.0] * 20 + [0.8] * 5)
    (raised,) = of(alerts, THRASHING)
    # Just above the clear level (0.3 * 0.7 = 0.21): it holds however long it lasts.
    assert of(_thrash_stream(det, eng, [0.25] * 200), THRASHING) == []
    assert [a.alert for a in det.active()] == [THRASHING]
    # Below it: clears as soon as the window is below and the level has been held 30 s.
    start = eng.ts
    down = []
    for _ in range(60):
        down += of(_thrash_stream(det, eng, [0.0]), THRASHING)
        if down:
            break
    assert [a.active for a in down] == [False]
    assert eng.ts - start == 2  # 2 s of zeros: 8 * 0.25 / 10 = 0.2 < 0.21; held > 30 s
    assert down[0].level == WARNING and down[0].since == raised.since
    assert down[0].message.startswith("cleared: ")


def test_critical_steps_down_to_warning_then_clears() -> None:
    cfg = AnomalyConfig(thrash_window_seconds=10.0, min_hold_seconds=20.0)
    det = AnomalyDetector("e", cfg)
    eng = Engine()
    first = of(_thrash_stream(det, eng, [0.0] * 20 + [0.9] * 20), THRASHING)
    assert [a.level for a in first] == [WARNING, CRITICAL]
    later = of(_thrash_stream(det, eng, [0.35] * 60 + [0.0] * 60), THRASHING)
    assert [(a.level, a.active) for a in later] == [(WARNING, True), (WARNING, False)]
    kinds = [a.details["transition"] for a in first + later]
    assert kinds == ["raised", "escalated", "deescalated", "cleared"]
    # De-escalation and clear are transitions, but only raises and escalations are counted.
    assert det.raised_total()[(THRASHING, WARNING)] == 1
    assert det.raised_total()[(THRASHING, CRITICAL)] == 1


# -- short_residency


def test_short_residency_raises_on_collapse() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = run(det, steady(eng, 700, stores=10, evictions=10, lifetimes=[(60.0, 10)]))
    assert alerts == []
    alerts = run(det, steady(eng, 60, stores=10, evictions=10, lifetimes=[(10.0, 10)]))
    res = of(alerts, SHORT_RESIDENCY)
    # Medians: (30, 60] -> 45 s baseline, (5, 10] -> 7.5 s: 0.17, under 0.25.
    assert [(a.level, a.active) for a in res] == [(WARNING, True)]
    assert res[0].value <= 0.25
    (now,) = det.active()  # the window is all short lifetimes by now
    assert now.value == pytest.approx(7.5 / 45.0)
    assert "median block lifetime 7.5 s over the last 60 s" in now.message
    assert "10-minute baseline of 45 s" in now.message
    alerts = run(det, steady(eng, 60, stores=10, evictions=10, lifetimes=[(1.5, 10)]))
    assert [(a.level, a.active) for a in of(alerts, SHORT_RESIDENCY)] == [(CRITICAL, True)]


def test_short_residency_needs_history_and_observations() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 30, lifetimes=[(60.0, 3)]))  # 90 baseline lifetimes: under 200
    alerts = run(det, steady(eng, 100, lifetimes=[(1.0, 3)]))
    assert of(alerts, SHORT_RESIDENCY) == []

    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 700, lifetimes=[(60.0, 3)]))
    alerts = run(det, [eng.step(lifetimes=[(1.0, 10)])])  # 10 short lifetimes: under 50
    alerts += run(det, steady(eng, 100))
    assert of(alerts, SHORT_RESIDENCY) == []


def test_steady_short_lifetimes_are_not_a_collapse() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    alerts = run(det, steady(eng, 1000, stores=50, evictions=50, lifetimes=[(0.8, 50)]))
    assert of(alerts, SHORT_RESIDENCY) == []


def test_clear_does_not_count_as_short_residency() -> None:
    """A clear observes the lifetime of every resident block at once; the windows restart."""
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 700, stores=10, evictions=10, lifetimes=[(60.0, 10)]))
    alerts = run(det, [eng.step(clears=1, lifetimes=[(0.8, 5000)], resident=0)])
    alerts += run(det, steady(eng, 300, stores=10, evictions=10, lifetimes=[(60.0, 10)]))
    assert of(alerts, SHORT_RESIDENCY) == []


def test_restores_after_clear_are_not_thrashing() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, _thrash_points(eng, [0.05] * 200))
    alerts = run(det, [eng.step(clears=1, resident=0)])
    # Everything stored right after the clear was resident before it: all restores.
    alerts += run(det, _thrash_points(eng, [1.0] * 50 + [0.05] * 300))
    assert of(alerts, THRASHING) == []
    assert [(a.level, a.active) for a in of(alerts, CACHE_RESET)] == [(INFO, True), (INFO, False)]


def _thrash_points(eng: Engine, ratios: Iterable[float], stores: int = 100) -> list[EnginePoint]:
    return [eng.step(stores=stores, evictions=stores, restores=round(r * stores)) for r in ratios]


# -- cache_reset


def test_cache_reset_held_then_cleared() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 100, **STEADY))
    alerts = run(det, [eng.step(clears=1, resident=0)])
    assert [(a.alert, a.level, a.active) for a in alerts] == [(CACHE_RESET, INFO, True)]
    assert alerts[0].since == 101.0 and "cache cleared (1 clear) at engine time 101" in (
        alerts[0].message
    )
    alerts = run(det, steady(eng, 59, **STEADY))
    assert alerts == []
    (cleared,) = run(det, [eng.step(**STEADY)])  # type: ignore[arg-type]
    assert (cleared.alert, cleared.active, eng.ts) == (CACHE_RESET, False, 161.0)


def test_second_clear_extends_the_hold() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 10))
    transitions = run(det, [eng.step(clears=1)])
    transitions += run(det, steady(eng, 29))
    transitions += run(det, [eng.step(clears=2)])  # t = 41: no new transition
    assert det.active()[0].value == 3.0
    for _ in range(100):
        for a in det.observe(eng.step()):
            transitions.append(a)
            if not a.active:
                assert eng.ts == 101.0
    assert [a.active for a in of(transitions, CACHE_RESET)] == [True, False]
    assert det.raised_total()[(CACHE_RESET, INFO)] == 1


def test_counter_reset_restarts_history_and_raises_cache_reset() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 400, stores=20, evictions=20))
    run(det, _thrash_points(eng, [0.9] * 30, stores=20))
    assert {a.alert for a in det.active()} == {THRASHING}
    restarted = Engine(ts=eng.ts)  # counters back to zero, clock continues
    alerts = run(det, [restarted.step(stores=500, evictions=500)])
    assert [(a.alert, a.level, a.active) for a in alerts] == [(CACHE_RESET, INFO, True)]
    assert "backwards" in alerts[0].message
    # A fresh series: its first large deltas are no storm, and thrashing clears after its hold.
    alerts = run(det, steady(restarted, 120, stores=500, evictions=500))
    assert of(alerts, EVICTION_STORM) == []
    assert [a.active for a in of(alerts, THRASHING)] == [False]


# -- event_loss


def test_event_loss_warning_held_for_window() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 50))
    alerts = run(det, [eng.step(lost=1)])
    assert [(a.alert, a.level) for a in alerts] == [(EVENT_LOSS, WARNING)]
    assert "1 event batch lost" in alerts[0].message
    lost_at = eng.ts
    cleared_at = None
    for _ in range(400):
        for a in det.observe(eng.step()):
            assert a.alert == EVENT_LOSS and not a.active
            cleared_at = eng.ts
    assert cleared_at == lost_at + 300.0


def test_event_loss_critical() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, steady(eng, 10))
    alerts = run(det, [eng.step(lost=3), eng.step(lost=8)])
    assert [(a.level, a.active) for a in of(alerts, EVENT_LOSS)] == [
        (WARNING, True),
        (CRITICAL, True),
    ]


def test_losses_before_the_first_point_do_not_count() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    eng.lost, eng.clears = 7, 2  # an exporter attached to a running engine
    assert run(det, steady(eng, 30)) == []


# -- source_stalled (wall clock)


def test_source_stalled_on_wall_clock() -> None:
    det = AnomalyDetector("e")
    assert det.check_stalled(1000.0, None) == []  # never received: not a stall
    assert det.check_stalled(1059.0, 1000.0) == []
    (raised,) = det.check_stalled(1060.0, 1000.0)
    assert (raised.alert, raised.level, raised.active) == (SOURCE_STALLED, WARNING, True)
    assert "no messages for 60 s" in raised.message
    assert det.check_stalled(1070.0, 1000.0) == []  # still stalled: no new transition
    assert det.check_stalled(1075.0, 1074.0) == []  # a message, but held 30 s from 1060
    (cleared,) = det.check_stalled(1090.0, 1089.0)
    assert not cleared.active and det.active() == []
    assert det.raised_total()[(SOURCE_STALLED, WARNING)] == 1


def test_source_stalled_since_is_engine_time() -> None:
    det = AnomalyDetector("e")
    eng = Engine(ts=5000.0)
    run(det, steady(eng, 3))
    (raised,) = det.check_stalled(200.0, 100.0)
    assert raised.since == 5003.0 and raised.details["last_arrival_wall"] == 100.0


def test_source_slower_than_stall_does_not_flap_within_hold() -> None:
    det = AnomalyDetector("e")
    transitions = []
    last = 0.0
    for now in range(0, 600):
        if now % 59 == 0:
            last = float(now)
        transitions += det.check_stalled(float(now), last)
    assert transitions == []


# -- irregular points, duplicates, clocks


def test_irregular_spacing_and_gaps() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    rng = random.Random(3)
    alerts: list[CacheAlert] = []
    for _ in range(500):
        dt = rng.choice([0.2, 0.5, 1.0, 2.5, 4.0])
        n = round(20 * dt)
        alerts += det.observe(eng.step(dt, stores=n, evictions=n))
    # A 100 s gap, then the same rate: the average over the gap is the same 20/s.
    alerts += det.observe(eng.step(100.0, stores=2000, evictions=2000))
    alerts += run(det, steady(eng, 50, stores=20, evictions=20))
    assert alerts == []
    alerts = []
    for _ in range(30):
        dt = rng.choice([0.3, 0.7, 1.9])
        n = round(400 * dt)
        alerts += det.observe(eng.step(dt, stores=n, evictions=n))
    storm = of(alerts, EVICTION_STORM)
    assert storm and storm[-1].level == CRITICAL
    assert storm[-1].details["baseline_rate"] == pytest.approx(20.0, rel=0.05)


def test_same_ts_replaces_the_previous_point() -> None:
    def stream(partial: bool) -> list[EnginePoint]:
        eng = Engine()
        out: list[EnginePoint] = []
        for i in range(500):
            n = 300 if 400 <= i < 420 else 20
            if partial:  # first a partial sample of the step, then the whole step at the same ts
                part = Engine()
                part.__dict__.update({k: v for k, v in eng.__dict__.items() if k != "counts"})
                part.counts = eng.counts.copy()
                out.append(part.step(stores=n // 2, evictions=n // 2, restores=i % 3))
            out.append(eng.step(stores=n, evictions=n, restores=i % 3))
        return out

    def key(alerts: list[CacheAlert]) -> list[tuple[str, AlertLevel, bool, float]]:
        return [(a.alert, a.level, a.active, a.since) for a in alerts]

    whole = run(AnomalyDetector("e"), stream(False))
    doubled = run(AnomalyDetector("e"), stream(True))
    assert key(whole) == key(doubled)
    assert of(whole, EVICTION_STORM)


def test_clock_going_backwards_restarts_and_holds_restart() -> None:
    det = AnomalyDetector("e")
    eng = Engine(ts=10_000.0)
    run(det, _thrash_points(eng, [0.9] * 100))
    assert {a.alert for a in det.active()} == {THRASHING}
    eng.ts = 100.0  # the engine clock jumps back; counters continue
    alerts = run(det, _thrash_points(eng, [0.0] * 100))
    assert [a.active for a in of(alerts, THRASHING)] == [False]
    assert of(alerts, CACHE_RESET) == []


def test_history_is_bounded() -> None:
    cfg = AnomalyConfig()
    det = AnomalyDetector("e", cfg)
    eng = Engine()
    run(det, steady(eng, 5000, stores=1, evictions=1))
    live = det._h.live
    assert live <= cfg.history_seconds + 2
    assert det._h.ts.size <= 2 * live + 64


def test_reset_clears_active_alerts_and_keeps_totals() -> None:
    det = AnomalyDetector("e")
    eng = Engine()
    run(det, _thrash_points(eng, [0.9] * 100))
    cleared = det.reset()
    assert [(a.alert, a.active) for a in cleared] == [(THRASHING, False)]
    assert det.active() == []
    assert det.raised_total()[(THRASHING, CRITICAL)] == 1
    assert run(det, _thrash_points(Engine(), [0.0] * 10)) == []


def test_raised_total_has_every_label_pair() -> None:
    totals = AnomalyDetector("e").raised_total()
    assert set(totals) == {(n, lvl) for n, lvls in ALERT_LEVELS.items() for lvl in lvls}
    assert set(ALERT_LEVELS) == {
        EVICTION_STORM,
        THRASHING,
        SHORT_RESIDENCY,
        CACHE_RESET,
        EVENT_LOSS,
        SOURCE_STALLED,
    }


def test_alert_to_dict_is_json_ready() -> None:
    import json

    det = AnomalyDetector("e")
    eng = Engine()
    run(det, _thrash_points(eng, [0.9] * 100))
    (alert,) = det.active()
    doc = json.loads(json.dumps(alert.to_dict(), allow_nan=False))
    assert doc["alert"] == THRASHING and doc["severity"] == "critical" and doc["engine"] == "e"


# -- config


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("clear_ratio", 0.0, "clear_ratio"),
        ("clear_ratio", 1.5, "clear_ratio"),
        ("min_hold_seconds", -1.0, "min_hold_seconds"),
        ("storm_window_seconds", 0.0, "storm_window_seconds"),
        ("stall_seconds", float("nan"), "stall_seconds"),
        ("storm_factor", 1.0, "storm_factor"),
        ("storm_critical_factor", 3.0, "storm_critical_factor"),
        ("storm_min_baseline_seconds", 400.0, "storm_min_baseline_seconds"),
        ("thrash_critical_ratio", 0.2, "thrash_critical_ratio"),
        ("thrash_min_stores", 0, "thrash_min_stores"),
        ("thrash_min_stores", 10.5, "thrash_min_stores"),
        ("residency_ratio", 1.0, "residency_ratio"),
        ("residency_critical_ratio", 0.5, "residency_critical_ratio"),
        ("loss_critical_batches", 0, "loss_critical_batches"),
        ("reset_hold_seconds", "60", "reset_hold_seconds"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AnomalyConfig(**{field: value})  # type: ignore[arg-type]


def test_config_defaults_and_history() -> None:
    cfg = AnomalyConfig()
    assert cfg.history_seconds == 660.0
    assert dataclasses.replace(cfg, loss_window_seconds=900.0).history_seconds == 900.0


# -- histogram_quantile


def test_histogram_quantile_matches_promql() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert histogram_quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert histogram_quantile(bounds, [2, 0, 0, 0], 0.5) == pytest.approx(0.5)
    assert histogram_quantile(bounds, [0, 0, 4, 0], 0.5) == pytest.approx(3.0)
    assert histogram_quantile(bounds, [1, 1, 0, 0], 0.5) == pytest.approx(1.0)
    assert histogram_quantile(bounds, [0, 0, 0, 5], 0.5) == 4.0  # +Inf: highest finite bound
    assert histogram_quantile((0.0, 1.0), [3, 0, 0], 0.5) == 0.0


def promql_quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """PromQL's histogram_quantile written with numpy's cumsum and searchsorted."""
    c = np.asarray(counts, np.float64)
    if c.sum() <= 0:
        return None
    cumulative = np.cumsum(c)
    rank = q * c.sum()
    b = int(np.searchsorted(cumulative, rank, side="left"))
    if b >= len(bounds):
        return bounds[-1]
    if b == 0 and bounds[0] <= 0.0:
        return bounds[0]
    lower, below = (0.0, 0.0) if b == 0 else (bounds[b - 1], float(cumulative[b - 1]))
    fraction = (rank - below) / c[b] if c[b] > 0 else 0.0
    return lower + (bounds[b] - lower) * float(fraction)


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(0, 10**12), min_size=4, max_size=4),
    q=st.sampled_from([0.0, 1e-9, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]),
    first=st.sampled_from([0.0, 0.5]),
)
def test_histogram_quantile_equals_the_searchsorted_form(
    counts: list[int], q: float, first: float
) -> None:
    bounds = (first, 2.0, 4.0)
    assert histogram_quantile(bounds, counts, q) == promql_quantile(bounds, counts, q)
    assert histogram_quantile(bounds, np.array(counts, np.uint64), q) == promql_quantile(
        bounds, counts, q
    )


# -- property: never raises, transitions bounded, hysteresis holds


@st.composite
def streams(draw: st.DrawFn) -> list[EnginePoint]:
    eng = Engine(ts=draw(st.floats(0.0, 1e9)))
    points: list[EnginePoint] = []
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 0.1, 1.0, 1.0, 1.0, 3.0, 70.0]),
                st.integers(0, 2000),
                st.sampled_from([0, 5, 20, 20, 20, 20, 3000]),
                st.integers(0, 1000),
                st.sampled_from([0.1, 3.0, 45.0, 1e4]),
                st.integers(0, 3),
                st.sampled_from([0, 0, 0, 0, 1, 5]),
                st.sampled_from([0] * 20 + [1]),
                st.booleans(),
            ),
            min_size=1,
            max_size=300,
        )
    )
    for dt, stores, evictions, restores, life, lives, lost, clears, restart in steps:
        if restart and draw(st.integers(0, 30)) == 0:
            eng = Engine(ts=eng.ts)
        points.append(
            eng.step(
                dt,
                stores=stores,
                evictions=evictions,
                restores=restores,
                lifetimes=[(life, lives * 20)],
                lost=lost,
                clears=clears,
            )
        )
    return points


@settings(max_examples=60, deadline=None)
@given(points=streams())
def test_observe_never_raises_and_transitions_are_bounded(points: list[EnginePoint]) -> None:
    cfg = AnomalyConfig(
        storm_min_baseline_seconds=5.0,
        thrash_min_stores=10,
        residency_min_observations=5,
        residency_min_baseline_observations=5,
    )
    det = AnomalyDetector("e", cfg)
    active: dict[str, AlertLevel] = {}
    last_change: dict[str, float] = {}
    count: dict[str, int] = {}
    for p in points:
        for a in det.observe(p):
            assert a.alert in ALERT_LEVELS and a.level in ALERT_LEVELS[a.alert]
            count[a.alert] = count.get(a.alert, 0) + 1
            down = not a.active or (a.alert in active and RANK[a.level] < RANK[active[a.alert]])
            if down and a.alert != CACHE_RESET:
                assert p.ts - last_change[a.alert] >= cfg.min_hold_seconds
            last_change[a.alert] = p.ts
            if a.active:
                active[a.alert] = a.level
            else:
                assert a.alert in active
                del active[a.alert]
    assert {a.alert: a.level for a in det.active()} == active
    span = points[-1].ts - points[0].ts
    for name, n in count.items():
        hold = cfg.reset_hold_seconds if name == CACHE_RESET else cfg.min_hold_seconds
        # Per hold period at most: a raise, an escalation and a step down (a clear after it).
        assert n <= 3 * (span / hold + 1) + 1
