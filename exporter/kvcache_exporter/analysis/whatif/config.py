"""What the what-if model is asked: which caches it compares, how it samples, how much it
remembers, and the capacities it is told.

Settings only (defaults, validation, the ``capacity=`` parsing of source specs and the
``capacity_factor`` label): what flags, YAML and source specs build, with nothing of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ...collector.histogram import validate_buckets

# Capacity factors: below 1 only for the hit-ratio curve (a smaller cache saves nothing).
DEFAULT_FACTORS: Final = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0)
# Reuse-distance bounds as multiples of C: a rank of (k - 1) C is what a k-times cache keeps,
# so these bounds mark k = 1.0625 … 32, the default factors among them.
DEFAULT_DISTANCE_BUCKETS: Final = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 3.0, 7.0, 15.0, 31.0)
# Fixed-size sampling: every key is followed until an engine's medium has more than the budget
# of sampled keys (resident and remembered), then the sampling rate falls to keep it there.
DEFAULT_SAMPLE_RATIO: Final = 1.0  # the highest rate; the budget lowers it
DEFAULT_MAX_SAMPLED_BLOCKS: Final = 16_384
DEFAULT_MAX_GHOSTS: Final = 100_000
ALL_MEDIA: Final = ""  # the capacity key that applies to every medium
MIN_SAMPLED_BLOCKS: Final = 64


def factor_label(factor: float) -> str:
    """The ``capacity_factor`` label value: ``1.25``, ``2``, ``0.5``."""
    return f"{factor:g}"


@dataclass(frozen=True, slots=True)
class WhatIfConfig:
    """How the what-if model samples, what it remembers and which caches it compares.

    ``capacity`` holds configured capacities as (medium, blocks) pairs, medium ``""`` for every
    medium of the source; media without one use the capacity observed on the stream.
    """

    sample_ratio: float = DEFAULT_SAMPLE_RATIO  # the highest rate; 0 turns the model off
    max_sampled_blocks: int = DEFAULT_MAX_SAMPLED_BLOCKS  # per medium, resident and ghosts
    max_ghosts: int = DEFAULT_MAX_GHOSTS
    capacity_factors: tuple[float, ...] = DEFAULT_FACTORS
    distance_buckets: tuple[float, ...] = DEFAULT_DISTANCE_BUCKETS
    capacity: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample ratio must be in [0, 1], got {self.sample_ratio}")
        if self.max_ghosts < 1:
            raise ValueError("max ghosts must be at least 1")
        if self.max_sampled_blocks < MIN_SAMPLED_BLOCKS:
            raise ValueError(f"max sampled blocks must be at least {MIN_SAMPLED_BLOCKS}")
        validate_factors(self.capacity_factors)
        validate_buckets(self.distance_buckets, "distance buckets")
        if self.distance_buckets[0] <= 0:
            raise ValueError("distance buckets: bounds must be positive multiples of capacity")
        for medium, blocks in self.capacity:
            if blocks < 1:
                raise ValueError(f"capacity of {medium or 'every medium'} must be at least 1")

    @property
    def enabled(self) -> bool:
        return self.sample_ratio > 0.0

    @property
    def ghost_horizon(self) -> float:
        """How deep, in capacities, ghosts are remembered. A restore from deeper than the
        largest distance bucket and the largest factor counts at no factor (only in the
        distance histogram's +Inf bucket): such ghosts are not worth the sampled keys they
        would displace."""
        return max(self.distance_buckets[-1], self.capacity_factors[-1]) + 1.0

    @property
    def avoided_factors(self) -> tuple[float, ...]:
        """The factors above 1: only a larger cache avoids recomputation."""
        return tuple(f for f in self.capacity_factors if f > 1.0)

    def capacity_of(self, medium: str) -> int | None:
        """The configured capacity of a medium (its own, else the source's), or None."""
        found = dict(self.capacity)
        return found.get(medium, found.get(ALL_MEDIA))


def validate_factors(factors: Sequence[float]) -> tuple[float, ...]:
    """Capacity factors: positive, finite, strictly ascending, non-empty."""
    values = validate_buckets(factors, "capacity factors")
    if values[0] <= 0:
        raise ValueError("capacity factors must be positive")
    return values
