"""What the what-if model answers: its figures per medium, copied under its lock."""

from __future__ import annotations

from dataclasses import dataclass

from ...collector.histogram import HistogramSnapshot


@dataclass(frozen=True, slots=True)
class MediumWhatIf:
    """One medium's what-if figures, copied under the model's lock.

    ``avoided`` follows :attr:`WhatIfConfig.avoided_factors`, ``hits`` the capacity factors.
    Counts are weighted (each sampled reference stands for those since the previous one), so
    they are in blocks, comparable with the exact counters.
    """

    capacity: int  # 0 while unknown (no eviction seen, none configured)
    capacity_configured: bool
    avoided: tuple[int, ...]
    hits: tuple[int, ...]
    distances_known: bool  # hits have been seen: the factors below 1 are measured
    distance: HistogramSnapshot | None  # one row; None until bounds could be fixed
    sampled_stores: int
    sampled_restores: int
    sampled_hits: int
    ghosts: int
    sample_ratio: float  # the rate in force (the budget lowers it)
    sampled_blocks: int  # keys followed: resident and ghosts


@dataclass(frozen=True, slots=True)
class WhatIfSnapshot:
    """An engine's what-if figures: per medium id (the collector's label ids)."""

    sample_ratio: float  # the configured (highest) rate
    max_sampled_blocks: int
    factors: tuple[float, ...]
    avoided_factors: tuple[float, ...]
    media: dict[int, MediumWhatIf]
    nbytes: int
