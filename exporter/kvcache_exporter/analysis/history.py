"""The last minutes of one engine's per-place counters: the status page's time axis.

The ingest loop's tick (about once a second, between batches) records the collector's
cumulative counts per place (:meth:`BlockLifecycleCollector.place_counts`); nothing is done
per event. Samples go into a ring allocated for ``seconds / interval`` of them, so memory is
fixed by the window and the number of places (at most 256): 32 bytes per place per sample,
about 29 kB per place for the default 15 minutes.

Times are wall-clock, unlike every duration the collector measures: the page shows what an
operator watching it sees, as Prometheus' ``rate()`` over scrape times would, and a silent
source draws a flat line instead of no points (the engine clock stops with it).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

COUNTERS: Final = ("stored", "removed", "restores", "resident")
"""The rows of a sample, as :meth:`BlockLifecycleCollector.place_counts` returns them."""
HISTORY_SECONDS: Final = 900.0
SAMPLE_INTERVAL: Final = 1.0  # the ingest loop's tick


@dataclass(frozen=True, slots=True)
class HistoryWindow:
    """The samples held, oldest first: wall times and counts per counter and place.

    A place that did not exist yet at a sample counts 0 there: its counters started at 0.
    """

    ts: npt.NDArray[np.float64]  # [samples]
    counts: npt.NDArray[np.int64]  # [samples, len(COUNTERS), places]

    def __len__(self) -> int:
        return int(self.ts.shape[0])


class History:
    """A bounded ring of samples; recorded on one thread, read from any."""

    def __init__(self, seconds: float = HISTORY_SECONDS, interval: float = SAMPLE_INTERVAL) -> None:
        if not (seconds > 0 and interval > 0):
            raise ValueError("history window and interval must be positive")
        self.seconds = seconds
        self.interval = interval
        self.capacity = math.ceil(seconds / interval) + 1
        self._ts = np.zeros(self.capacity, np.float64)
        self._counts = np.zeros((self.capacity, len(COUNTERS), 0), np.int64)
        self._next = 0  # slot of the next sample
        self._size = 0
        self._lock = threading.Lock()

    def record(self, now: float, counts: npt.NDArray[np.int64]) -> None:
        """Add a sample at wall time ``now`` (``counts``: [len(COUNTERS), places]). A call
        sooner than half an interval after the last sample is ignored, so a faster caller
        cannot shorten the window."""
        with self._lock:
            if self._size and now - self._ts[(self._next - 1) % self.capacity] < self.interval / 2:
                return
            places = counts.shape[1]
            if places > self._counts.shape[2]:  # a new place: rare, bounded by 256
                wider = np.zeros((self.capacity, len(COUNTERS), places), np.int64)
                wider[:, :, : self._counts.shape[2]] = self._counts
                self._counts = wider
            self._ts[self._next] = now
            self._counts[self._next] = 0
            self._counts[self._next, :, :places] = counts
            self._next = (self._next + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)

    def window(self) -> HistoryWindow:
        """A copy of the samples held, oldest first."""
        with self._lock:
            order = (np.arange(self._size) + self._next - self._size) % self.capacity
            return HistoryWindow(self._ts[order], self._counts[order])

    @property
    def nbytes(self) -> int:
        """Memory held by the ring's arrays."""
        return int(self._ts.nbytes + self._counts.nbytes)
