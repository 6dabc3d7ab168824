"""The cache-size what-if (docs/whatif.md), one concern a module: :mod:`.config` (what it is
asked), :mod:`.model` (ghost ranks of restores and stack distances of hits), :mod:`.tier`
(one medium's state and the sampling), :mod:`.orders` (the order statistics they are counted
with) and :mod:`.snapshot` (what it answers)."""

from .config import (
    ALL_MEDIA,
    DEFAULT_DISTANCE_BUCKETS,
    DEFAULT_FACTORS,
    DEFAULT_MAX_GHOSTS,
    DEFAULT_MAX_SAMPLED_BLOCKS,
    DEFAULT_SAMPLE_RATIO,
    MIN_SAMPLED_BLOCKS,
    WhatIfConfig,
    factor_label,
    validate_factors,
)
from .model import WhatIfModel
from .snapshot import MediumWhatIf, WhatIfSnapshot
from .tier import whatif_hash

__all__ = [
    "ALL_MEDIA",
    "DEFAULT_DISTANCE_BUCKETS",
    "DEFAULT_FACTORS",
    "DEFAULT_MAX_GHOSTS",
    "DEFAULT_MAX_SAMPLED_BLOCKS",
    "DEFAULT_SAMPLE_RATIO",
    "MIN_SAMPLED_BLOCKS",
    "MediumWhatIf",
    "WhatIfConfig",
    "WhatIfModel",
    "WhatIfSnapshot",
    "factor_label",
    "validate_factors",
    "whatif_hash",
]
