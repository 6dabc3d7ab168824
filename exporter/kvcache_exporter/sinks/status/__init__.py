"""The status page (``/``) and its JSON (``/api/v1/status``): the cache at a glance.

:mod:`.document` builds the status document from the engine views and their histories,
:mod:`.charts` lays its charts out as drawing primitives, :mod:`.svg` draws them on the
server and ``static/status.js`` in the browser, :mod:`.page` writes the HTML.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from .document import EngineStatus, status_document
from .page import render_page

__all__ = ["EngineStatus", "StatusPage"]


class StatusPage:
    """Renders the page and its JSON from fresh engine statuses at every request."""

    def __init__(
        self,
        engines: Callable[[], Sequence[EngineStatus]],
        links: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engines = engines
        self._links = links
        self._clock = clock

    def document(self) -> dict[str, Any]:
        """The status document now."""
        return status_document(self._engines(), self._clock())

    def html(self, query: dict[str, list[str]]) -> tuple[bytes, str]:
        """``/``: the page (the query is ignored)."""
        return render_page(self.document(), self._links).encode(), "text/html; charset=utf-8"

    def json(self, query: dict[str, list[str]]) -> tuple[bytes, str]:
        """``/api/v1/status``: the document (the query is ignored)."""
        return json.dumps(self.document(), separators=(",", ":")).encode(), "application/json"
