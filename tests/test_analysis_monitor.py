"""The monitor's sampling grid."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.monitor import EngineMonitor, MonitorConfig, _grid_after


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


def cuts_one_row_at_a_time(
    ts: np.ndarray, next_point: float | None, interval: float
) -> tuple[list[tuple[int, float]], float | None]:
    """The grid's rule read literally: the first row at or past the next grid point cuts there,
    and the next grid point is the first one after that row's time."""
    out: list[tuple[int, float]] = []
    for row, t in enumerate(ts.tolist()):
        if next_point is None:
            next_point = _grid_after(t, interval)
        if t >= next_point:
            out.append((row, next_point))
            next_point = _grid_after(t, interval)
    return out, next_point


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.floats(0.0, 50.0),
                st.sampled_from([0.0, 1.0, 2.0, 3.0, 1e20, 1.6e9 + 0.1]),
                st.integers(0, 40).map(lambda n: n * 0.3),
            ),
            max_size=30,
        ),
        max_size=6,
    ),
    st.sampled_from([1.0, 0.3, 5.0, 1e-3]),
    st.booleans(),
)
def test_cuts_of_ordered_and_unordered_rows_follow_the_rule(
    batches: list[list[float]], interval: float, ordered: bool
) -> None:
    """Ordered times take one vectorized pass, the others a loop; both give the rule's cuts."""
    monitor = EngineMonitor("e", lambda: 0, MonitorConfig(point_interval=interval))
    next_point: float | None = None
    for times in batches:
        ts = np.array(sorted(times) if ordered else times, np.float64)
        want, next_point = cuts_one_row_at_a_time(ts, next_point, interval)
        assert monitor.cuts(ts) == want
