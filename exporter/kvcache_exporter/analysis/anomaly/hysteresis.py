"""The level state machine every alert shares: raise, escalate, and step down with hysteresis.

An alert is raised, or escalated to CRITICAL, as soon as its signal reaches the level's
threshold. It steps down (CRITICAL to WARNING, or to cleared) only when both hold:

* the signal is past the *clear level* of its current level: below ``threshold * clear_ratio``
  for signals where higher is worse, above ``threshold / clear_ratio`` for ``short_residency``
  where lower is worse; every gate (minimum rate, minimum stores, minimum observations) is
  scaled the same way, and a window without enough data to judge counts as past the clear level;
* the current level has been held at least ``min_hold_seconds`` (engine time; wall time for
  ``source_stalled``) since it was entered.

A signal hovering at a threshold therefore raises once and stays raised. ``cache_reset`` has
its own hold (``reset_hold_seconds``) and ignores ``clear_ratio`` and ``min_hold_seconds``.
Signals are computed elsewhere (:mod:`.detector`); here each is only a :class:`Reading`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..series import AlertLevel, CacheAlert
from .config import ALERT_LEVELS

RANK: Final[dict[AlertLevel | None, int]] = {
    None: 0,
    AlertLevel.INFO: 1,
    AlertLevel.WARNING: 2,
    AlertLevel.CRITICAL: 3,
}


@dataclass(slots=True)
class Reading:
    """One evaluation of an alert's signal.

    ``raise_level``: the level the signal reaches at the raise thresholds; ``hold_level``: the
    highest level it still sustains at the clear levels (never below ``raise_level``).
    ``value`` None means not enough data to judge.
    """

    raise_level: AlertLevel | None
    hold_level: AlertLevel | None
    value: float | None
    # Or a function that writes it: read only while the alert is active, so a reading of a
    # quiet alert, taken at every sample, does not format numbers nobody sees.
    message: str | Callable[[], str]
    thresholds: dict[AlertLevel, float]
    details: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The message."""
        return self.message if isinstance(self.message, str) else self.message()


def no_data(message: str, thresholds: dict[AlertLevel, float]) -> Reading:
    """A reading without enough data to judge: it raises nothing and holds nothing."""
    return Reading(None, None, None, message, thresholds)


def levels_high(value: float, warn: float, crit: float, scale: float) -> AlertLevel | None:
    """Level of a higher-is-worse ``value`` against thresholds multiplied by ``scale``."""
    if value >= crit * scale:
        return AlertLevel.CRITICAL
    if value >= warn * scale:
        return AlertLevel.WARNING
    return None


def levels_low(value: float, warn: float, crit: float, scale: float) -> AlertLevel | None:
    """Level of a lower-is-worse ``value`` against thresholds divided by ``scale``."""
    if value <= crit / scale:
        return AlertLevel.CRITICAL
    if value <= warn / scale:
        return AlertLevel.WARNING
    return None


def raise_and_hold(
    levels: Callable[[float, float, float, float], AlertLevel | None],
    value: float,
    warn: float,
    crit: float,
    scale: float,
    enough: bool = True,
    enough_to_hold: bool = True,
) -> tuple[AlertLevel | None, AlertLevel | None]:
    """The level to raise at (the thresholds themselves, with enough data) and the level an
    alert already raised holds at (thresholds eased by ``scale``, with less data needed)."""
    return (
        levels(value, warn, crit, 1.0) if enough else None,
        levels(value, warn, crit, scale) if enough_to_hold else None,
    )


@dataclass(slots=True)
class AlertState:
    """Where one alert stands: its level, since when, and the view of it last reported."""

    level: AlertLevel | None = None
    since: float = 0.0  # reported: engine time the alert was raised
    level_since: float = 0.0  # the alert's own clock: when the current level was entered
    last_value: float = 0.0
    view: CacheAlert | None = None
    count: int = 0  # cache_reset: clears and restarts while active


class AlertStates:
    """Every alert's state for one engine, and how often each was raised at each level.

    :meth:`step` advances one alert by a reading of its signal on the alert's own clock.
    """

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.raised: dict[tuple[str, AlertLevel], int] = {
            (name, level): 0 for name, levels in ALERT_LEVELS.items() for level in levels
        }
        self.states: dict[str, AlertState] = {name: AlertState() for name in ALERT_LEVELS}

    def active(self) -> list[CacheAlert]:
        """Active alerts with their latest value and message, in :data:`ALERT_LEVELS` order."""
        return [
            st.view for st in self.states.values() if st.level is not None and st.view is not None
        ]

    def reset(self) -> list[CacheAlert]:
        """Forget every alert's state; returns a cleared transition for each alert that was
        active. The raise counts are kept: they back a Prometheus counter."""
        out: list[CacheAlert] = []
        for st in self.states.values():
            if st.level is not None and st.view is not None:
                cleared = dataclasses.replace(
                    st.view, active=False, message="cleared: detector reset"
                )
                out.append(_transition(cleared, "cleared"))
        self.states = {name: AlertState() for name in ALERT_LEVELS}
        return out

    def step(
        self, name: str, reading: Reading, clock: float, since: float, min_hold: float
    ) -> CacheAlert | None:
        """Advance one alert; ``clock`` is its own time base, ``since`` what a raise reports.

        Returns the transition, if any, with ``details["transition"]`` set to ``raised``,
        ``escalated``, ``deescalated`` or ``cleared`` (the stored view does not carry it).
        """
        st = self.states[name]
        if reading.value is not None:
            st.last_value = reading.value
        current = RANK[st.level]
        if RANK[reading.raise_level] > current:
            assert reading.raise_level is not None
            kind = "raised" if st.level is None else "escalated"
            if st.level is None:
                st.since = since
            st.level = reading.raise_level
            st.level_since = clock
            self.raised[(name, st.level)] += 1
            st.view = self._view(name, st, reading, active=True)
            return _transition(st.view, kind)
        if st.level is None:
            return None
        if RANK[reading.hold_level] < current and clock - st.level_since >= min_hold:
            if reading.hold_level is None:
                cleared = self._view(name, st, reading, active=False)
                st.level, st.view, st.count = None, None, 0
                return _transition(cleared, "cleared")
            st.level = reading.hold_level
            st.level_since = clock
            st.view = self._view(name, st, reading, active=True)
            return _transition(st.view, "deescalated")
        st.view = self._view(name, st, reading, active=True)
        return None

    def _view(self, name: str, st: AlertState, reading: Reading, *, active: bool) -> CacheAlert:
        assert st.level is not None
        text = reading.text()
        message = text if active else f"cleared: {text}"
        if active and reading.value is None:
            message = f"holding: {text}"
        return CacheAlert(
            alert=name,
            level=st.level,
            engine=self.engine,
            message=message,
            since=st.since,
            value=reading.value if reading.value is not None else st.last_value,
            threshold=reading.thresholds.get(st.level, 0.0),
            active=active,
            details=dict(reading.details),
        )


def _transition(alert: CacheAlert, kind: str) -> CacheAlert:
    return dataclasses.replace(alert, details={**alert.details, "transition": kind})
