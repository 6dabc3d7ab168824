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


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(word) for word in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


# Ports handed out below the kernel's ephemeral range, one after another: a port the kernel
# picks for ``bind(0)`` or an outgoing connection (a ZeroMQ peer, a scrape, Prometheus) can
# never be one a test was given, so nothing takes it between the test choosing it and the
# process under test binding it. Each process starts at its own offset.
_EPHEMERAL = _ephemeral_ports()
_LOW, _HIGH = (10000, _EPHEMERAL.start) if _EPHEMERAL.start > 12000 else (61000, 65536)
_next_port = _LOW + (os.getpid() * 7919) % (_HIGH - _LOW)


def free_port() -> int:
    """A loopback port nothing listens on, outside the kernel's ephemeral range."""
    global _next_port
    for _ in range(_HIGH - _LOW):
        port = _next_port
        _next_port = _LOW if port + 1 >= _HIGH else port + 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_LOW}-{_HIGH - 1}")
