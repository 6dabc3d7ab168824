"""Per-publisher sequence tracking: gaps, duplicates and engine restarts."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

# A seq this far behind the expected one is a new publisher, not a late duplicate.
RESTART_DISTANCE: Final = 1024


class Verdict(enum.Enum):
    IN_ORDER = "in_order"
    GAP = "gap"
    DUPLICATE = "duplicate"
    RESTART = "restart"


@dataclass(slots=True)
class SequenceTracker:
    """Classifies each arriving ``seq`` against the next one expected."""

    expected: int | None = None
    missing: int = 0  # batches skipped by the last GAP verdict

    def check(self, seq: int) -> Verdict:
        expected = self.expected
        self.missing = 0
        if expected is None or seq == expected:
            self.expected = seq + 1
            return Verdict.IN_ORDER
        if seq > expected:
            self.missing = seq - expected
            self.expected = seq + 1
            return Verdict.GAP
        if seq == 0 or expected - seq > RESTART_DISTANCE:
            self.expected = seq + 1
            return Verdict.RESTART
        return Verdict.DUPLICATE
