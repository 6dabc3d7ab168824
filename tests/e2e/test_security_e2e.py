"""--web.config.file applied by the real exporter process to every endpoint."""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from .conftest import ExporterProcess

pytestmark = pytest.mark.e2e


def status(url: str, auth: str | None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_basic_auth_guards_every_endpoint(
    start_exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"scrape-me", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    exporter = start_exporter("--web.config.file", str(config), wait=False)
    deadline = time.monotonic() + 15
    while True:  # /healthz itself asks for the password now
        try:
            status(exporter.url + "/healthz", None)
            break
        except OSError:
            assert exporter.alive() and time.monotonic() < deadline, exporter.log_text()
            time.sleep(0.05)
    for path in ("/metrics", "/", "/healthz", "/api/v1/summary"):
        assert status(exporter.url + path, None) == 401, path
        assert status(exporter.url + path, "prometheus:wrong") == 401, path
        assert status(exporter.url + path, "prometheus:scrape-me") == 200, path
