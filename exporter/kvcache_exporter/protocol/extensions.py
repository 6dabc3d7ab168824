"""The switch for the compiled stages (the decoder, the collector's block table and apply, the
what-if's chunks), and how each finds its extension module.

Each compiled stage has a reference beside it; ``KVCACHE_EXPORTER_NO_EXTENSION=1`` selects the
references everywhere, as an install without a C compiler runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Final

DISABLE_ENV: Final = "KVCACHE_EXPORTER_NO_EXTENSION"


def extensions_disabled() -> bool:
    """Whether the environment asks for the references instead of the compiled stages."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def load_extension(
    name: str, agreed: Mapping[str, tuple[int, ...]] | None = None
) -> ModuleType | None:
    """The compiled module ``name`` (absolute), or None: switched off, not built, or not
    agreeing with its caller on the constants it is given (``agreed``: attribute → value), so
    that a stale build is never used with new codes."""
    if extensions_disabled():
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    for attribute, value in (agreed or {}).items():
        if getattr(module, attribute, None) != value:
            return None
    return module
