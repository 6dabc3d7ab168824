"""Anomaly detection on one engine's point stream: alerts with levels and hysteresis.

The detector is fed one :class:`~.series.EnginePoint` per engine-clock step, or a batch's points
at once as :class:`~.series.EnginePoints`, and keeps only the points its longest window needs
(plus one older point, so a window always has a start). Every
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

import math
from collections.abc import Callable
from functools import partial
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from ...collector.histogram import histogram_quantile, histogram_quantiles
from ..series import AlertLevel, CacheAlert, EnginePoint, EnginePoints, went_backwards
from .config import (
    ALERT_LEVELS,
    CACHE_RESET,
    EVENT_LOSS,
    EVICTION_STORM,
    SHORT_RESIDENCY,
    SOURCE_STALLED,
    THRASHING,
    AnomalyConfig,
)
from .hysteresis import (
    RANK,
    AlertStates,
    Reading,
    levels_high,
    levels_low,
    no_data,
    raise_and_hold,
)

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


_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


_Column = TypeVar("_Column", bound=np.generic)


def _kept(
    column: npt.NDArray[_Column], rows: slice, shape: tuple[int, ...]
) -> npt.NDArray[_Column]:
    """``column[rows]`` at the start of a new column of ``shape``."""
    out = np.zeros(shape, column.dtype)
    if rows.stop > rows.start:
        out[: rows.stop - rows.start] = column[rows]
    return out


class _History:
    """The detector's points as columns, oldest first: rows ``start`` to ``n`` are live, the
    rows before them wait for the next compaction."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.n = self.start = 0
        self.ts: _F64 = np.zeros(0)
        self.stored: _I64 = np.zeros(0, np.int64)
        self.evicted: _I64 = np.zeros(0, np.int64)
        self.restores: _I64 = np.zeros(0, np.int64)
        self.lost: _I64 = np.zeros(0, np.int64)
        self.life: _I64 = np.zeros((0, 0), np.int64)

    @property
    def live(self) -> int:
        return self.n - self.start

    def append(self, point: EnginePoint) -> None:
        self._room(1, point.lifetime_counts.size)
        self._write(self.n, point)
        self.n += 1

    def replace_last(self, point: EnginePoint) -> None:
        self._write(self.n - 1, point)

    def extend(self, points: EnginePoints) -> None:
        k = len(points)
        self._room(k, points.lifetime_counts.shape[1])
        self._write(slice(self.n, self.n + k), points)
        self.n += k

    def _write(self, rows: int | slice, source: EnginePoint | EnginePoints) -> None:
        """A point at a row, or a batch's points at a slice of rows (the same field names)."""
        self.ts[rows] = source.ts
        self.stored[rows] = source.stored
        self.evicted[rows] = source.evicted
        self.restores[rows] = source.restores
        self.lost[rows] = source.lost_batches
        self.life[rows] = source.lifetime_counts

    def _room(self, k: int, width: int) -> None:
        """Room for ``k`` more rows: the dead rows dropped first, the columns doubled only
        when the live ones need it, so memory stays within twice the live points."""
        if self.n + k <= self.ts.size:
            return
        live = slice(self.start, self.n)
        size = max(64, 2 * (self.live + k))
        self.ts = _kept(self.ts, live, (size,))
        self.stored = _kept(self.stored, live, (size,))
        self.evicted = _kept(self.evicted, live, (size,))
        self.restores = _kept(self.restores, live, (size,))
        self.lost = _kept(self.lost, live, (size,))
        self.life = _kept(self.life, live, (size, width))
        self.n, self.start = self.live, 0


class AnomalyDetector:
    """Alerts for one engine from its point stream (engine clock) and its arrivals (wall clock).

    Not thread-safe; feed it from one task. Memory is bounded by the points within
    :attr:`AnomalyConfig.history_seconds` of the newest one. Each :meth:`observe` costs
    O(log points + buckets); :meth:`observe_many` evaluates a batch's points together and
    steps an alert's levels in Python only where they change.
    """

    def __init__(self, engine: str, config: AnomalyConfig | None = None) -> None:
        self.engine = engine
        self.config = config or AnomalyConfig()
        self._history_seconds = self.config.history_seconds
        self._alerts = AlertStates(engine)
        self._h = _History()
        self._last: EnginePoint | None = None  # the newest point
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
        last = self._last
        h = self._h
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
                    h.replace_last(point)
                else:
                    h.append(point)
        else:
            h.append(point)
        self._last = point
        if self._evict_start_ts is None:
            if h.live < 2 and point.evicted > 0:
                self._evict_start_ts = now
            elif h.live >= 2 and point.evicted > h.evicted[h.n - 2]:
                self._evict_start_ts = float(h.ts[h.n - 2])
        horizon = now - self._history_seconds
        h.start = max(h.start, int(np.searchsorted(h.ts[: h.n], horizon, "right")) - 1)
        if clears_seen > 0 or reset_cause is not None:
            self._last_reset_ts = now
        self._last_ts = now

        resets = max(clears_seen, 0) + (1 if reset_cause is not None else 0)
        reset_state = self._alerts.states[CACHE_RESET]
        if resets:
            reset_state.count = (reset_state.count if reset_state.level is not None else 0) + resets

        cfg = self.config
        head = h.n - 1
        s = self._at_or_before(now - cfg.storm_window_seconds)
        storm = self._storm_at(
            now, head, s, self._at_or_before(float(h.ts[s]) - cfg.storm_baseline_seconds)
        )
        s = self._at_or_before(now - cfg.residency_window_seconds, self._last_reset_ts)
        b = self._at_or_before(float(h.ts[s]) - cfg.residency_baseline_seconds, self._last_reset_ts)
        readings = {
            EVICTION_STORM: storm,
            THRASHING: self._thrash_at(
                now, head, self._at_or_before(now - cfg.thrash_window_seconds, self._thrash_floor())
            ),
            SHORT_RESIDENCY: self._residency_at(now, head, s, b),
            CACHE_RESET: self._reset_reading(now, clears_seen, reset_cause),
            EVENT_LOSS: self._loss_at(now, head, self._at_or_before(now - cfg.loss_window_seconds)),
        }
        out: list[CacheAlert] = []
        for name, reading in readings.items():
            # cache_reset carries its own hold in its reading (reset_hold_seconds).
            hold = 0.0 if name == CACHE_RESET else self.config.min_hold_seconds
            changed = self._alerts.step(name, reading, now, now, hold)
            if changed is not None:
                out.append(changed)
        return out

    def observe_many(self, points: EnginePoints) -> list[CacheAlert]:
        """:meth:`observe` of each point in turn, in one pass: the same transitions, in order,
        and the same state after.

        The signals of every point are computed as columns, and each alert's levels are
        stepped only at the points where the columns say they change. Points that clear the
        cache, restart the series or replace one another, and any while ``cache_reset`` is
        active, take :meth:`observe` one by one.
        """
        k = len(points)
        last = self._last
        if not k:
            return []
        if (
            last is None
            or self._alerts.states[CACHE_RESET].level is not None
            or int(points.clears[-1]) != last.clears
            or not points.follows(last)
        ):
            return [alert for i in range(k) for alert in self.observe(points.point(i))]
        cfg = self.config
        h = self._h
        h.extend(points)
        self._last = points.point(k - 1)
        ts = h.ts[: h.n]
        head = np.arange(h.n - k, h.n)
        now = points.ts.astype(np.float64)
        evict_start = np.full(k, np.nan)
        if self._evict_start_ts is not None:
            evict_start[:] = self._evict_start_ts
        else:
            rises = np.flatnonzero(h.evicted[head] > h.evicted[head - 1])
            if rises.size:
                first = int(rises[0])
                self._evict_start_ts = float(ts[head[first] - 1])
                evict_start[first:] = self._evict_start_ts
        starts = np.maximum.accumulate(
            np.maximum(np.searchsorted(ts, now - self._history_seconds, "right") - 1, h.start)
        )
        h.start = int(starts[-1])
        self._last_ts = float(now[-1])

        def at_or_before(t: _F64, floor: float | None = None) -> _I64:
            i: _I64 = np.maximum(np.searchsorted(ts, t, "right") - 1, starts)
            if floor is not None:
                at_floor = np.searchsorted(ts, floor, "left")
                i = np.maximum(i, np.minimum(np.maximum(at_floor, starts), head))
            return i

        scale = cfg.clear_ratio
        found: list[tuple[int, int, CacheAlert]] = []
        with np.errstate(divide="ignore", invalid="ignore"):
            # eviction_storm
            s = at_or_before(now - cfg.storm_window_seconds)
            b = at_or_before(ts[s] - cfg.storm_baseline_seconds)
            short_span = now - ts[s]
            evicting = ~np.isnan(evict_start)
            base_span = ts[s] - np.maximum(ts[b], np.where(evicting, evict_start, ts[s]))
            rate = (h.evicted[head] - h.evicted[s]) / short_span
            base = (h.evicted[s] - h.evicted[b]) / base_span
            factor = rate / np.maximum(base, cfg.storm_baseline_floor)
            valid = (
                (short_span > 0.0)
                & evicting
                & (base_span > 0.0)
                & (base_span >= cfg.storm_min_baseline_seconds)
            )
            found += self._step_many(
                EVICTION_STORM,
                *_rank_columns(
                    True,
                    factor,
                    cfg.storm_factor,
                    cfg.storm_critical_factor,
                    scale,
                    valid & (rate >= cfg.storm_min_rate),
                    valid & (rate >= cfg.storm_min_rate * scale),
                ),
                np.where(valid, factor, np.nan),
                now,
                partial(_reading_at, self._storm_at, now, head, (s, b)),
            )
            # thrashing
            s = at_or_before(now - cfg.thrash_window_seconds, self._thrash_floor())
            stores = h.stored[head] - h.stored[s]
            restores = h.restores[head] - h.restores[s]
            ratio = restores / stores
            valid = (now - ts[s] > 0.0) & (stores > 0)
            found += self._step_many(
                THRASHING,
                *_rank_columns(
                    True,
                    ratio,
                    cfg.thrash_ratio,
                    cfg.thrash_critical_ratio,
                    scale,
                    valid & (stores >= cfg.thrash_min_stores),
                    valid & (stores >= cfg.thrash_min_stores * scale),
                ),
                np.where(valid, ratio, np.nan),
                now,
                partial(_reading_at, self._thrash_at, now, head, (s,)),
            )
            # short_residency
            floor = self._last_reset_ts
            s = at_or_before(now - cfg.residency_window_seconds, floor)
            b = at_or_before(ts[s] - cfg.residency_baseline_seconds, floor)
            short_counts = h.life[head] - h.life[s]
            base_counts = h.life[s] - h.life[b]
            n_short, n_base = short_counts.sum(axis=1), base_counts.sum(axis=1)
            short_med, short_any = histogram_quantiles(points.lifetime_bounds, short_counts, 0.5)
            base_med, base_any = histogram_quantiles(points.lifetime_bounds, base_counts, 0.5)
            ratio = short_med / base_med
            valid = short_any & base_any & (base_med > 0.0)
            short_min, base_min = (
                cfg.residency_min_observations,
                cfg.residency_min_baseline_observations,
            )
            found += self._step_many(
                SHORT_RESIDENCY,
                *_rank_columns(
                    False,
                    ratio,
                    cfg.residency_ratio,
                    cfg.residency_critical_ratio,
                    scale,
                    valid & (n_short >= short_min) & (n_base >= base_min),
                    valid & (n_short >= short_min * scale) & (n_base >= base_min * scale),
                ),
                np.where(valid, ratio, np.nan),
                now,
                partial(_reading_at, self._residency_at, now, head, (s, b)),
            )
            # cache_reset: nothing to raise, inactive (else one by one above); its value is
            # the count it keeps.
            reset_state = self._alerts.states[CACHE_RESET]
            reset_state.last_value = float(reset_state.count)
            # event_loss
            s = at_or_before(now - cfg.loss_window_seconds)
            lost = (h.lost[head] - h.lost[s]).astype(np.float64)
            always = np.ones(k, bool)
            found += self._step_many(
                EVENT_LOSS,
                *_rank_columns(
                    True, lost, cfg.loss_batches, cfg.loss_critical_batches, scale, always, always
                ),
                lost,
                now,
                partial(_reading_at, self._loss_at, now, head, (s,)),
            )
        found.sort(key=lambda item: (item[0], item[1]))
        return [alert for _, _, alert in found]

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
        self._h.clear()
        self._last = None
        self._evict_start_ts = self._last_reset_ts = self._last_ts = None

    def _restart(self, point: EnginePoint) -> None:
        now = float(point.ts)
        self._h.clear()
        self._evict_start_ts = None
        self._h.append(point)
        # On a clock that went backwards the holds restart from the new clock's now, otherwise
        # an alert would wait for the new clock to catch up with the old one before clearing.
        for name, st in self._alerts.states.items():
            if name != SOURCE_STALLED:
                st.level_since = min(st.level_since, now)
        if self._last_reset_ts is not None:
            self._last_reset_ts = min(self._last_reset_ts, now)

    def _at_or_before(self, t: float, floor: float | None = None) -> int:
        """The row of the latest point at or before ``t``, or the oldest one kept; never a
        point before ``floor`` while one at or after it exists (the newest point at the
        latest)."""
        h = self._h
        ts = h.ts[: h.n]
        i = max(int(np.searchsorted(ts, t, "right")) - 1, h.start)
        if floor is not None:
            i = max(i, min(max(int(np.searchsorted(ts, floor, "left")), h.start), h.n - 1))
        return i

    def _thrash_floor(self) -> float | None:
        """After a clear or restart, storing again what it removed counts as restores, but it is
        not thrashing: the window starts only once the reset hold has passed."""
        last_reset = self._last_reset_ts
        return None if last_reset is None else last_reset + self.config.reset_hold_seconds

    def _step_many(
        self,
        name: str,
        raise_rank: npt.NDArray[np.int8],
        hold_rank: npt.NDArray[np.int8],
        value: _F64,
        now: _F64,
        reading_at: Callable[[int], Reading],
    ) -> list[tuple[int, int, CacheAlert]]:
        """Step one alert through a batch's points as :meth:`AlertStates.step` would point by
        point, given the levels its readings raise and hold at (``value`` NaN: no data). The
        readings themselves are built only where a level may change, and at the last point
        of an active alert (its view)."""
        st = self._alerts.states[name]
        min_hold = self.config.min_hold_seconds
        order = _ORDER[name]
        valued = np.flatnonzero(~np.isnan(value))
        out: list[tuple[int, int, CacheAlert]] = []
        k = now.size
        i = 0

        def last_value_before(j: int) -> None:
            # What step() would have kept from the points i..j-1 it was not called for.
            before = int(np.searchsorted(valued, j)) - 1
            if before >= 0 and valued[before] >= i:
                st.last_value = float(value[valued[before]])

        while i < k:
            current = RANK[st.level]
            if current == 0:
                moves = raise_rank[i:] > 0
            else:
                held_long = now[i:] - st.level_since >= min_hold
                moves = (raise_rank[i:] > current) | ((hold_rank[i:] < current) & held_long)
            where = np.flatnonzero(moves)
            if not where.size:
                break
            j = i + int(where[0])
            last_value_before(j)
            changed = self._alerts.step(name, reading_at(j), float(now[j]), float(now[j]), min_hold)
            if changed is not None:
                out.append((j, order, changed))
            i = j + 1
        if i < k:
            if st.level is None:
                last_value_before(k)
            else:
                last_value_before(k - 1)
                changed = self._alerts.step(
                    name, reading_at(k - 1), float(now[-1]), float(now[-1]), min_hold
                )
                if changed is not None:
                    out.append((k - 1, order, changed))
        return out

    # -- signals, each at a head row and the window rows it reads

    def _storm_at(self, now: float, head: int, s: int, b: int) -> Reading:
        cfg = self.config
        h = self._h
        th = {AlertLevel.WARNING: cfg.storm_factor, AlertLevel.CRITICAL: cfg.storm_critical_factor}
        s_ts = float(h.ts[s])
        short_span = now - s_ts
        if short_span <= 0.0:
            return no_data("eviction rate: fewer than two points", th)
        evicting = self._evict_start_ts
        base_span = s_ts - max(float(h.ts[b]), evicting if evicting is not None else s_ts)
        if evicting is None or base_span <= 0.0 or base_span < cfg.storm_min_baseline_seconds:
            return no_data(
                "eviction rate: baseline shorter than "
                f"{_num(cfg.storm_min_baseline_seconds)} s of evicting",
                th,
            )
        rate = int(h.evicted[head] - h.evicted[s]) / short_span
        base = int(h.evicted[s] - h.evicted[b]) / base_span
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

    def _thrash_at(self, now: float, head: int, s: int) -> Reading:
        cfg = self.config
        h = self._h
        th = {AlertLevel.WARNING: cfg.thrash_ratio, AlertLevel.CRITICAL: cfg.thrash_critical_ratio}
        span = now - float(h.ts[s])
        stores = int(h.stored[head] - h.stored[s])
        restores = int(h.restores[head] - h.restores[s])
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

    def _residency_at(self, now: float, head: int, s: int, b: int) -> Reading:
        cfg = self.config
        h = self._h
        th = {
            AlertLevel.WARNING: cfg.residency_ratio,
            AlertLevel.CRITICAL: cfg.residency_critical_ratio,
        }
        # A clear observes the lifetime of every resident block at once, and a restart starts
        # the counts over: neither window reaches back past the latest one (the rows given).
        short_counts = h.life[head] - h.life[s]
        base_counts = h.life[s] - h.life[b]
        n_short = int(short_counts.sum())
        n_base = int(base_counts.sum())
        bounds = self._last.lifetime_bounds if self._last is not None else ()
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
        s_ts = float(h.ts[s])
        base_span = s_ts - float(h.ts[b])
        return Reading(
            level,
            held,
            ratio,
            lambda: (
                f"median block lifetime {_num(short_med)} s over the last "
                f"{_num(now - s_ts)} s is {_num(ratio)}{_TIMES} its {_duration(base_span)} "
                f"baseline of {_num(base_med)} s"
            ),
            th,
            {
                "median_seconds": short_med,
                "baseline_median_seconds": base_med,
                "observations": n_short,
                "baseline_observations": n_base,
                "window_seconds": now - s_ts,
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

    def _loss_at(self, now: float, head: int, s: int) -> Reading:
        cfg = self.config
        h = self._h
        th = {
            AlertLevel.WARNING: float(cfg.loss_batches),
            AlertLevel.CRITICAL: float(cfg.loss_critical_batches),
        }
        lost = int(h.lost[head] - h.lost[s])
        span = now - float(h.ts[s])
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


def _reading_at(
    signal: Callable[..., Reading], now: _F64, head: _I64, windows: tuple[_I64, ...], j: int
) -> Reading:
    """``signal``'s reading at the ``j``-th point of a batch, from its window rows."""
    return signal(float(now[j]), int(head[j]), *(int(rows[j]) for rows in windows))


_ORDER: Final = {name: i for i, name in enumerate(ALERT_LEVELS)}


def _rank_columns(
    higher_is_worse: bool,
    value: _F64,
    warn: float,
    crit: float,
    scale: float,
    enough: npt.NDArray[np.bool_],
    enough_to_hold: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
    """:func:`raise_and_hold` of a column of values, as ranks (:data:`RANK`): the level each
    raises at, and the level each holds at (thresholds eased by ``scale``)."""

    def ranks(
        critical: npt.NDArray[np.bool_], warning: npt.NDArray[np.bool_], ok: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.int8]:
        level = np.where(
            critical, RANK[AlertLevel.CRITICAL], np.where(warning, RANK[AlertLevel.WARNING], 0)
        )
        return np.where(ok, level, 0).astype(np.int8)

    if higher_is_worse:
        return (
            ranks(value >= crit, value >= warn, enough),
            ranks(value >= crit * scale, value >= warn * scale, enough_to_hold),
        )
    return (
        ranks(value <= crit, value <= warn, enough),
        ranks(value <= crit / scale, value <= warn / scale, enough_to_hold),
    )
