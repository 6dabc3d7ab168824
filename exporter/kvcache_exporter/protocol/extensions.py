"""The switch for the compiled stages (the decoder here, the collector's block table).

Each compiled stage has a reference beside it; ``KVCACHE_EXPORTER_NO_EXTENSION=1`` selects the
references everywhere, as an install without a C compiler runs.
"""

from __future__ import annotations

import os
from typing import Final

DISABLE_ENV: Final = "KVCACHE_EXPORTER_NO_EXTENSION"


def extensions_disabled() -> bool:
    """Whether the environment asks for the references instead of the compiled stages."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")
