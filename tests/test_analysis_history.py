"""The status page's history: a fixed ring of per-place counters on the wall clock."""

from __future__ import annotations

import numpy as np
import pytest

from kvcache_exporter.analysis.history import COUNTERS, History


def counts(*columns: tuple[int, int, int, int]) -> np.ndarray:
    return np.array(columns, np.int64).T.reshape(len(COUNTERS), len(columns))


def test_oldest_first_and_bounded_by_the_window() -> None:
    history = History(seconds=5, interval=1)
    for t in range(20):
        history.record(float(t), counts((t, 0, 0, t)))
    window = history.window()
    assert history.capacity == 6
    assert window.ts.tolist() == [14.0, 15.0, 16.0, 17.0, 18.0, 19.0]
    assert window.counts[:, 0, 0].tolist() == [14, 15, 16, 17, 18, 19]
    before = history.nbytes
    for t in range(20, 200):
        history.record(float(t), counts((t, 0, 0, t)))
    assert history.nbytes == before  # the ring never grows with time


def test_a_new_place_reads_zero_before_it_existed() -> None:
    history = History(seconds=10, interval=1)
    history.record(0.0, counts((5, 1, 0, 4)))
    history.record(1.0, counts((6, 1, 0, 5), (2, 0, 0, 2)))
    window = history.window()
    assert window.counts.shape == (2, len(COUNTERS), 2)
    assert window.counts[:, 0, 1].tolist() == [0, 2]  # stored of the new place
    assert window.counts[:, 3, 0].tolist() == [4, 5]  # resident of the first


def test_calls_faster_than_the_interval_do_not_shorten_the_window() -> None:
    history = History(seconds=10, interval=1)
    for k in range(50):
        history.record(k * 0.1, counts((k, 0, 0, 0)))
    assert history.window().ts.tolist() == pytest.approx(
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    )


def test_empty_window() -> None:
    window = History().window()
    assert len(window) == 0 and window.counts.shape == (0, len(COUNTERS), 0)


def test_rejects_a_window_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        History(seconds=0)
