"""The short run of bench/fuzz.py: a running exporter survives bad frames and counts them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fuzz  # bench/ is not a package; the same code runs as a benchmark

pytestmark = pytest.mark.e2e


def test_twenty_thousand_random_and_mutated_frames() -> None:
    """Half the frames are random, mutated (from the real vectors) or malformed: the exporter
    stays up, applies every valid batch exactly once, and receives and counts every message
    exactly as its own pipeline does in process."""
    figures = fuzz.run(frames=20_000, seed=7, invalid_share=0.5)
    assert fuzz.check(figures) == []
    assert figures["invalid"] > 9_000 and figures["decode_errors"] > 9_000
