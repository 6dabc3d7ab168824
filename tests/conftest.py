"""Shared fixtures: real binaries (promtool, prometheus) and free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_binary(name: str, package: str = "prometheus") -> str:
    """The path of a real tool the test needs. Missing is a skip on a developer machine but a
    failure in CI, where .ci/run installs it, so a broken install never passes silently."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian package {package!r}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture
def prometheus_bin() -> str:
    return require_binary("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
