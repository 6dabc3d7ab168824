"""Sequence tracking: in order, gaps, duplicates, publisher restarts."""

from __future__ import annotations

from kvcache_exporter.sources.sequence import RESTART_DISTANCE, SequenceTracker, Verdict


def test_first_message_sets_the_baseline_wherever_it_starts() -> None:
    tracker = SequenceTracker()
    assert tracker.check(500) is Verdict.IN_ORDER
    assert tracker.check(501) is Verdict.IN_ORDER


def test_gap_counts_the_missing_batches() -> None:
    tracker = SequenceTracker()
    tracker.check(0)
    assert tracker.check(4) is Verdict.GAP
    assert tracker.missing == 3
    assert tracker.check(5) is Verdict.IN_ORDER
    assert tracker.missing == 0


def test_duplicates_are_recognised() -> None:
    tracker = SequenceTracker()
    for seq in range(10):
        tracker.check(seq)
    assert tracker.check(7) is Verdict.DUPLICATE
    assert tracker.check(10) is Verdict.IN_ORDER


def test_restart_back_to_zero_or_far_behind() -> None:
    tracker = SequenceTracker()
    for seq in range(10):
        tracker.check(seq)
    assert tracker.check(0) is Verdict.RESTART
    assert tracker.check(1) is Verdict.IN_ORDER
    tracker.check(RESTART_DISTANCE * 3)
    assert tracker.check(5) is Verdict.RESTART
