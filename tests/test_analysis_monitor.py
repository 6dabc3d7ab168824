"""The monitor's sampling grid."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from kvcache_exporter.analysis.monitor import EngineMonitor, MonitorConfig


def test_cuts_move_forward_even_for_absurd_timestamps() -> None:
    """A garbage engine timestamp (1e20, where +1 s is lost to rounding) must not stall the
    grid: found by bench/fuzz.py, it once looped forever."""
    monitor = EngineMonitor("e", lambda: 0, MonitorConfig())
    cuts = monitor.cuts(np.array([10.0, 11.5, 1e20, 1e20, 12.0]))
    assert [row for row, _ in cuts] == [1, 2]
    assert all(b > a for (_, a), (_, b) in pairwise(cuts))


def test_cuts_on_a_regular_stream() -> None:
    monitor = EngineMonitor("e", lambda: 0, MonitorConfig(point_interval=1.0))
    assert monitor.cuts(np.array([0.2, 0.7, 1.1, 1.2, 3.5])) == [(2, 1.0), (4, 2.0)]
    assert monitor.cuts(np.array([3.9, 4.0])) == [(1, 4.0)]
