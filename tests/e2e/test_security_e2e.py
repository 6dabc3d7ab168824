"""--web.config.file applied by the real exporter process to every endpoint."""

from __future__ import annotations

import base64
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import zmq

from kvcache_exporter.curve import load_key_pair, load_public_key
from kvcache_exporter.publisher import KVEventPublisher, Stored

from ..conftest import free_port
from .conftest import EXPORTER, ExporterProcess, clean_env, select, value, wait_for

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
    for path in ("/metrics", "/", "/healthz", "/api/v1/summary", "/api/v1/status"):
        assert status(exporter.url + path, None) == 401, path
        assert status(exporter.url + path, "prometheus:wrong") == 401, path
        assert status(exporter.url + path, "prometheus:scrape-me") == 200, path


def keygen(directory: Path, name: str) -> tuple[bytes, bytes]:
    """A key pair made by the real ``kvcache-exporter keygen``, as (public, secret)."""
    result = subprocess.run(
        [*EXPORTER, "keygen", name, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    public, secret = load_key_pair(directory / f"{name}.key_secret")
    assert load_public_key(directory / f"{name}.key") == public
    assert public.decode() in result.stdout
    assert (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0  # owner only
    return public, secret


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    keygen(tmp_path, "exporter")
    before = (tmp_path / "exporter.key_secret").read_bytes()
    result = subprocess.run(
        [*EXPORTER, "keygen", "exporter", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not overwriting" in result.stderr
    assert (tmp_path / "exporter.key_secret").read_bytes() == before


def test_curve_publishers_without_the_right_key_are_not_heard(
    start_exporter: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    """The real process with CURVE on three sources. ``curve.engine-key``: the engine with that
    key is heard, an impostor bound with another key is not. ``curve.allow``: the exporter
    binds; a listed engine is heard, an unlisted one is refused. What was refused shows in
    ``handshake_failures_total``, ``source_up`` and ``/readyz``."""
    _, exporter_secret = keygen(tmp_path, "exporter")
    exporter_public = zmq.curve_public(exporter_secret)
    _, engine_secret = keygen(tmp_path, "engine")
    _, impostor_secret = keygen(tmp_path, "impostor")
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    _, listed_secret = keygen(allowed_dir, "listed")
    _, stranger_secret = keygen(tmp_path, "stranger")
    real_port, fake_port, agent_port = free_port(), free_port(), free_port()
    engine_key = tmp_path / "engine.key"
    with ExitStack() as stack:
        real = stack.enter_context(
            KVEventPublisher(
                f"tcp://127.0.0.1:{real_port}", bind=True, curve_secret_key=engine_secret
            )
        )
        fake = stack.enter_context(
            KVEventPublisher(
                f"tcp://127.0.0.1:{fake_port}", bind=True, curve_secret_key=impostor_secret
            )
        )
        exporter = start_exporter(
            "--source.curve.key-file", str(tmp_path / "exporter.key_secret"),
            "--source", f"real=tcp://127.0.0.1:{real_port},curve.engine-key={engine_key}",
            "--source", f"fake=tcp://127.0.0.1:{fake_port},curve.engine-key={engine_key}",
            "--source", f"agent=tcp://127.0.0.1:{agent_port},bind,curve.allow={allowed_dir}",
        )  # fmt: skip
        listed, stranger = (
            stack.enter_context(
                KVEventPublisher(
                    f"tcp://127.0.0.1:{agent_port}",
                    bind=False,
                    curve_secret_key=secret,
                    curve_server_key=exporter_public,
                )
            )
            for secret in (listed_secret, stranger_secret)
        )

        def failures(samples: dict[Any, float], engine: str, reason: str) -> float:
            name = "kvcache_exporter_handshake_failures_total"
            return value(samples, name, engine=engine, reason=reason)

        def settled() -> bool:
            samples = exporter.scrape()
            return (
                value(samples, "kvcache_exporter_source_up", engine="real") == 1
                and value(samples, "kvcache_exporter_source_up", engine="agent") == 1
                and failures(samples, "fake", "closed") >= 1
                and failures(samples, "agent", "auth") >= 1
            )

        wait_for(settled, 15, "real and agent up, fake and the stranger refused")

        # Every publisher sends batch i (a fresh block) until the heard ones got 10 each: a
        # subscription may take a moment to reach a publisher, which drops what it sent before.
        def heard() -> dict[str, float]:
            samples = exporter.scrape()
            name = "kvcache_exporter_messages_total"
            return {e: value(samples, name, engine=e) for e in ("real", "agent", "fake")}

        i = 0
        while min(heard()[e] for e in ("real", "agent")) < 10:
            assert i < 500, heard()
            for pub in (real, fake, listed, stranger):
                pub.send_batch(100.0 + i, [Stored([1000 + i], token_count=16)])
            i += 1
            time.sleep(0.02)
        # The exporter keeps connecting to the impostor (a wrong engine key is a hang-up, which
        # libzmq retries), moving the failure counter; stopping it lets /metrics settle.
        fake.close()
        stranger.close()
        time.sleep(1.0)  # what is in flight on loopback arrives
        counts = heard()
        assert counts["fake"] == 0
        samples = exporter.wait_ingested({e: int(n) for e, n in counts.items()})
        for engine in ("real", "agent"):
            # One fresh block per message: nothing but the heard publisher's batches.
            stored = value(
                samples, "kvcache_blocks_stored_total", engine=engine, medium="GPU", group="0"
            )
            assert stored == counts[engine] >= 10
            assert failures(samples, engine, "protocol") == 0
        assert failures(samples, "real", "closed") == 0
        assert value(samples, "kvcache_exporter_source_up", engine="fake") == 0
        assert not select(samples, "kvcache_blocks_stored_total", engine="fake")
        status_code, body = exporter.get("/readyz")
        assert status_code == 503 and "fake" in body and "real" not in body
        warnings = [
            line
            for line in exporter.log_text().splitlines()
            if "handshake with a publisher" in line
        ]
        assert any("logger=source.fake" in w and "reason=closed" in w for w in warnings)
        assert any("logger=source.agent" in w and "reason=auth" in w for w in warnings)
