"""Anomaly detection on one engine's point stream: alerts with levels and hysteresis.

The detector is fed one :class:`~.series.EnginePoint` per engine-clock step and keeps only the
points its longest window needs (plus one older point, so a window always has a start). Every
window quantity is a difference of cumulative counters between the newest point and the latest
point at or before the window start, divided by the *actual* time between those two points, so
irregular spacing and gaps give honest averages instead of fabricated ones.

Alerts (names are the ``alert`` label of ``kvcache_alerts_total`` / ``kvcache_alert_active``):

``eviction_storm``
    Eviction rate over the short window (default 10 s) against the rate over the baseline window
    (default 300 s) that *precedes* the short window, so a storm cannot inflate its own
    baseline. WARNING at ``storm_factor`` (4x), CRITICAL at ``storm_critical_factor`` (10x);
    both need the short-window rate to reach ``storm_min_rate``. The baseline only counts time
    from the series' first eviction and must cover ``storm_min_baseline_seconds`` of it, so a
    cache filling up and starting to evict is not a storm; a baseline under
    ``storm_baseline_floor`` counts as the floor. A sustained higher rate becomes the new
    baseline after one baseline window and the alert clears: it flags changes, not levels.
``thrashing``
    Restores / stores over ``thrash_window_seconds``: WARNING at 0.3, CRITICAL at 0.6, only
    with at least ``thrash_min_stores`` stores in the window. The window starts no earlier
    than ``reset_hold_seconds`` after the latest clear or restart: storing again what a clear
    removed counts as restores, but it is not thrashing.
``short_residency``
    Median block lifetime over the short window (bucket-interpolated from the lifetime
    histogram's count deltas, as PromQL's ``histogram_quantile``) divided by the median over the
    baseline window preceding it. WARNING at <= 0.25, CRITICAL at <= 0.1, with minimum
    observation counts in both windows. Neither window reaches back past the latest clear or
    restart: a clear observes the lifetime of every resident block at once.
``cache_reset``
    INFO when the clears counter increases (all blocks removed) or the counters go backwards
    (engine or collector restart). Held ``reset_hold_seconds`` of engine time after the latest
    one, then cleared.
``event_loss``
    Lost (unrecovered) event batches within ``loss_window_seconds``: WARNING at 1, CRITICAL at
    ``loss_critical_batches``.
``source_stalled``
    Wall clock, via :meth:`AnomalyDetector.check_stalled`: a source that has received messages
    and then none for ``stall_seconds``. WARNING only: an idle engine is legitimately silent.

How an alert's level then steps up and down (hysteresis) is :mod:`.hysteresis`'s.
"""

from __future__ import annotations

import bisect
import math
from typing import Final

import numpy as np
import numpy.typing as npt

from ...collector.histogram import histogram_quantile
from ..series import AlertLevel, CacheAlert, EnginePoint, went_backwards
from .config import (
    CACHE_RESET,
    EVENT_LOSS,
    EVICTION_STORM,
    SHORT_RESIDENCY,
    SOURCE_STALLED,
    THRASHING,
    AnomalyConfig,
)
from .hysteresis import AlertStates, Reading, levels_high, levels_low, no_data, raise_and_hold

_TIMES: Final = "\u00d7"  # the multiplication sign of "9.4x its baseline"


def _num(x: float) -> str:
    """A number for a message: as many digits as a human reads."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10.0:
        return f"{x:.0f}"
    if abs(x) >= 1.0:
        return f"{x:.1f}"
    return f"{x:.2g}"


def _duration(seconds: float) -> str:
    """'5-minute', '90-second', '1-hour': a window length as an adjective."""
    s = round(seconds)
    if s >= 3600 and s % 3600 == 0:
        return f"{s // 3600}-hour"
    if s >= 120 and s % 60 == 0:
        return f"{s // 60}-minute"
    return f"{s}-second"


class AnomalyDetector:
    """Alerts for one engine from its point stream (engine clock) and its arrivals (wall clock).

    Not thread-safe; feed it from one task. Memory is bounded by the points within
    :attr:`AnomalyConfig.history_seconds` of the newest one, and each :meth:`observe` costs
    O(log points + buckets).
    """

    def __init__(self, engine: str, config: AnomalyConfig | None = None) -> None:
        self.engine = engine
        self.config = config or AnomalyConfig()
        self._alerts = AlertStates(engine)
        self._pts: list[EnginePoint] = []
        self._ts: list[float] = []
        self._start = 0  # live points are _pts[_start:]; trimming moves it, compaction drops
        # Start of the step in which this series' first eviction happened: the baseline is taken
        # from there, so a cache filling up for the first time is not an eviction storm.
        self._evict_start_ts: float | None = None
        self._last_reset_ts: float | None = None  # latest clear or restart
        self._last_ts: float | None = None

    # -- public API

    def observe(self, point: EnginePoint) -> list[CacheAlert]:
        """Take the next point; returns the transitions it caused, in :data:`ALERT_LEVELS`
        order: raised or escalated (``active`` True, counted in :meth:`raised_total`),
        de-escalated (``active`` True) or cleared (``active`` False, at the level it had);
        ``details["transition"]`` names which.

        A point with the same ``ts`` as the previous one replaces it. Counters that go
        backwards, changed histogram bounds, or an engine clock that goes backwards restart the
        history (the first two also raise ``cache_reset``); alerts then keep their state and
        clear through the usual hysteresis as their windows lack data.
        """
        now = float(point.ts)
        last = self._pts[-1] if self._pts else None
        reset_cause: str | None = None
        clears_seen = 0
        if last is not None:
            if went_backwards(last, point):
                reset_cause = "counters went backwards (engine or collector restart)"
                self._restart(point)
            elif now < last.ts:
                # Not a reset of the cache: only the clock moved, so the windows are unusable.
                self._restart(point)
            else:
                clears_seen = point.clears - last.clears
                if now == last.ts:
                    self._pts[-1] = point
                else:
                    self._append(point)
        else:
            self._append(point)
        if self._evict_start_ts is None:
            prev = self._pts[-2] if len(self._pts) - self._start >= 2 else None
            if prev is None and point.evicted > 0:
                self._evict_start_ts = now
            elif prev is not None and point.evicted > prev.evicted:
                self._evict_start_ts = float(prev.ts)
        self._trim(now)
        if clears_seen > 0 or reset_cause is not None:
            self._last_reset_ts = now
        self._last_ts = now

        resets = max(clears_seen, 0) + (1 if reset_cause is not None else 0)
        reset_state = self._alerts.states[CACHE_RESET]
        if resets:
            reset_state.count = (reset_state.count if reset_state.level is not None else 0) + resets

        readings = {
            EVICTION_STORM: self._storm(now),
            THRASHING: self._thrash(now),
            SHORT_RESIDENCY: self._residency(now),
            CACHE_RESET: self._reset_reading(now, clears_seen, reset_cause),
            EVENT_LOSS: self._loss(now),
        }
        out: list[CacheAlert] = []
        for name, reading in readings.items():
            # cache_reset carries its own hold in its reading (reset_hold_seconds).
            hold = 0.0 if name == CACHE_RESET else self.config.min_hold_seconds
            changed = self._alerts.step(name, reading, now, now, hold)
            if changed is not None:
                out.append(changed)
        return out

    def check_stalled(self, now_wall: float, last_arrival_wall: float | None) -> list[CacheAlert]:
        """Evaluate ``source_stalled`` on the wall clock; returns its transition, if any.

        ``last_arrival_wall`` is when the source last received a message (None: never, which is
        not a stall). Call it periodically, whether or not points arrive: a silent engine
        produces none. The alert's ``since`` is the newest engine time seen (the engine clock
        stops with the source); wall times are in ``details``.
        """
        cfg = self.config
        thresholds = {AlertLevel.WARNING: cfg.stall_seconds}
        if last_arrival_wall is None:
            reading = no_data("the source has not received any message", thresholds)
        else:
            silent = max(0.0, now_wall - last_arrival_wall)
            level = AlertLevel.WARNING if silent >= cfg.stall_seconds else None
            held = AlertLevel.WARNING if silent >= cfg.stall_seconds * cfg.clear_ratio else None
            reading = Reading(
                level,
                held,
                silent,
                lambda: (
                    f"no messages for {_num(silent)} s from a source that was active "
                    f"(stall threshold {_num(cfg.stall_seconds)} s)"
                ),
                thresholds,
                {"last_arrival_wall": last_arrival_wall, "now_wall": now_wall},
            )
        since = self._last_ts if self._last_ts is not None else 0.0
        changed = self._alerts.step(SOURCE_STALLED, reading, now_wall, since, cfg.min_hold_seconds)
        return [changed] if changed is not None else []

    def active(self) -> list[CacheAlert]:
        """Active alerts with their latest value and message, in :data:`ALERT_LEVELS` order."""
        return self._alerts.active()

    def raised_total(self) -> dict[tuple[str, AlertLevel], int]:
        """Times each alert was raised or escalated to each level (de-escalations and clears do
        not count); every possible (alert, level) pair is present, zeros included."""
        return dict(self._alerts.raised)

    def reset(self) -> list[CacheAlert]:
        """Forget the history and every active alert; returns a cleared transition for each
        alert that was active, so gauges and logs stay consistent. :meth:`raised_total` is
        kept: it backs a Prometheus counter, which must not go backwards."""
        out = self._alerts.reset()
        self._clear_history()
        return out

    # -- history

    def _clear_history(self) -> None:
        self._pts, self._ts, self._start = [], [], 0
        self._evict_start_ts = self._last_reset_ts = self._last_ts = None

    def _append(self, point: EnginePoint) -> None:
        self._pts.append(point)
        self._ts.append(float(point.ts))

    def _restart(self, point: EnginePoint) -> None:
        now = float(point.ts)
        self._pts, self._ts, self._start = [], [], 0
        self._evict_start_ts = None
        self._append(point)
        # On a clock that went backwards the holds restart from the new clock's now, otherwise
        # an alert would wait for the new clock to catch up with the old one before clearing.
        for name, st in self._alerts.states.items():
            if name != SOURCE_STALLED:
                st.level_since = min(st.level_since, now)
        if self._last_reset_ts is not None:
            self._last_reset_ts = min(self._last_reset_ts, now)

    def _trim(self, now: float) -> None:
        horizon = now - self.config.history_seconds
        keep = bisect.bisect_right(self._ts, horizon, lo=self._start) - 1
        if keep > self._start:
            self._start = keep
        # Compact rarely so trimming is amortised O(1) and memory stays bounded.
        if self._start >= 64 and self._start * 2 >= len(self._pts):
            del self._pts[: self._start]
            del self._ts[: self._start]
            self._start = 0

    def _at_or_before(self, t: float, floor: float | None = None) -> EnginePoint:
        """The latest point at or before ``t``, or the oldest one kept; never a point before
        ``floor`` while one at or after it exists (the newest point at the latest)."""
        i = max(bisect.bisect_right(self._ts, t, lo=self._start) - 1, self._start)
        if floor is not None:
            i = max(i, min(bisect.bisect_left(self._ts, floor, lo=self._start), len(self._ts) - 1))
        return self._pts[i]

    # -- signals

    def _storm(self, now: float) -> Reading:
        cfg = self.config
        th = {AlertLevel.WARNING: cfg.storm_factor, AlertLevel.CRITICAL: cfg.storm_critical_factor}
        head = self._pts[-1]
        s = self._at_or_before(now - cfg.storm_window_seconds)
        short_span = now - s.ts
        if short_span <= 0.0:
            return no_data("eviction rate: fewer than two points", th)
        b = self._at_or_before(s.ts - cfg.storm_baseline_seconds)
        evicting = self._evict_start_ts
        base_span = s.ts - max(b.ts, evicting if evicting is not None else s.ts)
        if evicting is None or base_span <= 0.0 or base_span < cfg.storm_min_baseline_seconds:
            return no_data(
                "eviction rate: baseline shorter than "
                f"{_num(cfg.storm_min_baseline_seconds)} s of evicting",
                th,
            )
        rate = (head.evicted - s.evicted) / short_span
        base = (s.evicted - b.evicted) / base_span
        factor = rate / max(base, cfg.storm_baseline_floor)
        scale = cfg.clear_ratio
        level, held = raise_and_hold(
            levels_high,
            factor,
            cfg.storm_factor,
            cfg.storm_critical_factor,
            scale,
            enough=rate >= cfg.storm_min_rate,
            enough_to_hold=rate >= cfg.storm_min_rate * scale,
        )
        return Reading(
            level,
            held,
            factor,
            lambda: (
                f"eviction rate {_num(rate)}/s is {_num(factor)}{_TIMES} its "
                f"{_duration(base_span)} baseline of {_num(base)}/s"
            ),
            th,
            {
                "rate": rate,
                "baseline_rate": base,
                "window_seconds": short_span,
                "baseline_seconds": base_span,
                "min_rate": cfg.storm_min_rate,
            },
        )

    def _thrash(self, now: float) -> Reading:
        cfg = self.config
        th = {AlertLevel.WARNING: cfg.thrash_ratio, AlertLevel.CRITICAL: cfg.thrash_critical_ratio}
        head = self._pts[-1]
        # After a clear or restart, storing again what it removed counts as restores, but it is
        # not thrashing: the window starts only once the reset hold has passed.
        last_reset = self._last_reset_ts
        floor = None if last_reset is None else last_reset + cfg.reset_hold_seconds
        s = self._at_or_before(now - cfg.thrash_window_seconds, floor)
        span = now - s.ts
        stores = head.stored - s.stored
        restores = head.restores - s.restores
        window = f"the last {_num(span)} s"
        if span <= 0.0:
            return no_data("thrashing: no window yet after the latest clear or restart", th)
        if stores <= 0:
            return no_data(f"no stores in {window}", th)
        ratio = restores / stores
        scale = cfg.clear_ratio
        level, held = raise_and_hold(
            levels_high,
            ratio,
            cfg.thrash_ratio,
            cfg.thrash_critical_ratio,
            scale,
            enough=stores >= cfg.thrash_min_stores,
            enough_to_hold=stores >= cfg.thrash_min_stores * scale,
        )
        return Reading(
            level,
            held,
            ratio,
            lambda: (
                f"restores are {ratio:.0%} of stores over {window} "
                f"({restores} restores / {stores} stores)"
            ),
            th,
            {"restores": restores, "stores": stores, "window_seconds": span},
        )

    def _residency(self, now: float) -> Reading:
        cfg = self.config
        th = {
            AlertLevel.WARNING: cfg.residency_ratio,
            AlertLevel.CRITICAL: cfg.residency_critical_ratio,
        }
        head = self._pts[-1]
        # A clear observes the lifetime of every resident block at once, and a restart starts
        # the counts over: neither window may reach back past the latest one.
        floor = self._last_reset_ts
        s = self._at_or_before(now - cfg.residency_window_seconds, floor)
        b = self._at_or_before(s.ts - cfg.residency_baseline_seconds, floor)
        short_counts = _delta(head, s)
        base_counts = _delta(s, b)
        n_short = int(short_counts.sum())
        n_base = int(base_counts.sum())
        bounds = head.lifetime_bounds
        short_med = histogram_quantile(bounds, short_counts, 0.5)
        base_med = histogram_quantile(bounds, base_counts, 0.5)
        if short_med is None or base_med is None or base_med <= 0.0:
            return no_data("median lifetime: no lifetimes in a window", th)
        ratio = short_med / base_med
        scale = cfg.clear_ratio
        level, held = raise_and_hold(
            levels_low,
            ratio,
            cfg.residency_ratio,
            cfg.residency_critical_ratio,
            scale,
            enough=n_short >= cfg.residency_min_observations
            and n_base >= cfg.residency_min_baseline_observations,
            enough_to_hold=n_short >= cfg.residency_min_observations * scale
            and n_base >= cfg.residency_min_baseline_observations * scale,
        )
        base_span = s.ts - b.ts
        return Reading(
            level,
            held,
            ratio,
            lambda: (
                f"median block lifetime {_num(short_med)} s over the last "
                f"{_num(now - s.ts)} s is {_num(ratio)}{_TIMES} its {_duration(base_span)} "
                f"baseline of {_num(base_med)} s"
            ),
            th,
            {
                "median_seconds": short_med,
                "baseline_median_seconds": base_med,
                "observations": n_short,
                "baseline_observations": n_base,
                "window_seconds": now - s.ts,
                "baseline_seconds": base_span,
            },
        )

    def _reset_reading(self, now: float, clears_seen: int, cause: str | None) -> Reading:
        cfg = self.config
        st = self._alerts.states[CACHE_RESET]
        fresh = clears_seen > 0 or cause is not None
        last = self._last_reset_ts
        held = fresh or (last is not None and now - last < cfg.reset_hold_seconds)
        if cause is not None:
            message = f"{cause} at engine time {_num(now)} s"
        elif clears_seen > 0:
            plural = "s" if clears_seen > 1 else ""
            message = f"cache cleared ({clears_seen} clear{plural}) at engine time {_num(now)} s"
        elif held and st.view is not None:
            message = st.view.message
        else:
            message = f"no cache clear or restart in the last {_num(cfg.reset_hold_seconds)} s"
        return Reading(
            AlertLevel.INFO if fresh else None,
            AlertLevel.INFO if held else None,
            float(st.count),
            message,
            {AlertLevel.INFO: 1.0},
            {"last_reset_ts": last, "hold_seconds": cfg.reset_hold_seconds},
        )

    def _loss(self, now: float) -> Reading:
        cfg = self.config
        th = {
            AlertLevel.WARNING: float(cfg.loss_batches),
            AlertLevel.CRITICAL: float(cfg.loss_critical_batches),
        }
        head = self._pts[-1]
        s = self._at_or_before(now - cfg.loss_window_seconds)
        lost = head.lost_batches - s.lost_batches
        span = now - s.ts
        return Reading(
            *raise_and_hold(
                levels_high, lost, cfg.loss_batches, cfg.loss_critical_batches, cfg.clear_ratio
            ),
            float(lost),
            lambda: (
                f"{lost} event batch{'es' if lost != 1 else ''} lost in the last "
                f"{_num(span)} s (sequence gaps not recovered)"
            ),
            th,
            {"lost_batches": lost, "window_seconds": span},
        )


def _delta(a: EnginePoint, b: EnginePoint) -> npt.NDArray[np.int64]:
    """Lifetime bucket counts observed between ``b`` and the later ``a``."""
    return a.lifetime_counts.astype(np.int64) - b.lifetime_counts.astype(np.int64)
