"""The cache-size what-if (docs/whatif.md), one concern a module: :mod:`.config` (what it is
asked), :mod:`.model` (ghost ranks of restores and stack distances of hits), :mod:`.orders`
(the order statistics they are counted with) and :mod:`.snapshot` (what it answers)."""

from .config import (
    ALL_MEDIA,
    DEFAULT_DISTANCE_BUCKETS,
    DEFAULT_FACTORS,
    DEFAULT_MAX_GHOSTS,
    DEFAULT_SAMPLE_RATIO,
    WhatIfConfig,
    factor_label,
    validate_factors,
)
from .model import WhatIfModel, whatif_hash
from .snapshot import MediumWhatIf, WhatIfSnapshot

__all__ = [
    "ALL_MEDIA",
    "DEFAULT_DISTANCE_BUCKETS",
    "DEFAULT_FACTORS",
    "DEFAULT_MAX_GHOSTS",
    "DEFAULT_SAMPLE_RATIO",
    "MediumWhatIf",
    "WhatIfConfig",
    "WhatIfModel",
    "WhatIfSnapshot",
    "factor_label",
    "validate_factors",
    "whatif_hash",
]
