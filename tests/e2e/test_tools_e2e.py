"""The subcommands as a user runs them: demo, and record → analyze against the live exporter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "kvcache_exporter.cli"]
# Series that depend on wall-clock arrival or the live socket, not on the stream.
# Live only: the connection, the clock, memory, and the process's own series.
LIVE_ONLY = ("source_up", "event_lag", "collector_bytes", "http_refused", "process_", "python_")


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(url: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_demo_shows_live_metrics_and_exits_0_on_sigint(
    processes: list[subprocess.Popen[str]],
) -> None:
    port = free_port()
    demo = start(
        "demo", "--web.listen-address", f"127.0.0.1:{port}", "--speed", "50", "--interval", "1"
    )
    processes.append(demo)
    assert demo.stdout is not None
    first_line = demo.stdout.readline()
    assert f"http://127.0.0.1:{port}/metrics" in first_line
    url = f"http://127.0.0.1:{port}/metrics"

    def figures() -> dict[str, float]:
        got = values(wait_for(url))
        key = (("engine", "demo"), ("group", "0"), ("medium", "GPU"))
        return {
            name: got.get((name, key), 0.0)
            for name in (
                "kvcache_blocks_stored_total",
                "kvcache_resident_blocks",
                "kvcache_block_lifetime_seconds_count",
            )
        } | {
            "removed": got.get(("kvcache_blocks_removed_total", (*key, ("reason", "evicted"))), 0.0)
        }

    time.sleep(2.0)
    before = figures()
    time.sleep(2.5)
    after = figures()
    assert after["kvcache_blocks_stored_total"] > before["kvcache_blocks_stored_total"] > 0
    assert after["removed"] > before["removed"] > 0  # 4,000 GPU blocks fill in about a second
    assert after["kvcache_block_lifetime_seconds_count"] > 0
    assert after["kvcache_resident_blocks"] == 4000
    summary = demo.stdout.readline()
    assert "stored/s" in summary and "resident" in summary
    demo.send_signal(signal.SIGINT)
    assert demo.wait(5) == 0


def test_record_then_analyze_equals_what_the_live_exporter_served(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    engine_port, http_port = free_port(), free_port()
    recording = tmp_path / "stream.kvrec"
    exporter = start(
        "--source",
        f"live=tcp://127.0.0.1:{engine_port}",
        "--web.listen-address",
        f"127.0.0.1:{http_port}",
    )
    recorder = start(
        "record", "--source", f"live=tcp://127.0.0.1:{engine_port}", "-o", str(recording)
    )
    processes += [exporter, recorder]
    wait_for(f"http://127.0.0.1:{http_port}/healthz")
    replay = subprocess.run(
        [
            *CLI,
            "replay",
            "--endpoint",
            f"tcp://*:{engine_port}",
            "--speed",
            "0",
            "--limit",
            "1200",
            "--cpu-blocks",
            "800",
            "--report-hits",
            "--wait",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    sent = int(replay.stderr.split("published ")[1].split(" batches")[0])
    deadline = time.monotonic() + 20
    live = ""
    while time.monotonic() < deadline:
        live = get(f"http://127.0.0.1:{http_port}/metrics")
        if values(live).get(("kvcache_exporter_messages_total", (("engine", "live"),))) == sent:
            break
        time.sleep(0.2)
    time.sleep(0.5)  # the recorder flushes after each burst
    recorder.send_signal(signal.SIGINT)
    assert recorder.wait(5) == 0
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(5) == 0

    analyzed = subprocess.run(
        [*CLI, "analyze", str(recording), "--format", "prometheus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    want = {k: v for k, v in values(live).items() if not any(s in k[0] for s in LIVE_ONLY)}
    got = {k: v for k, v in values(analyzed).items() if not any(s in k[0] for s in LIVE_ONLY)}
    assert want[("kvcache_exporter_messages_total", (("engine", "live"),))] == sent
    assert got == want

    # A recording cut mid-record still reads, up to the cut.
    data = recording.read_bytes()
    cut = tmp_path / "cut.kvrec"
    cut.write_bytes(data[: len(data) // 2])
    partial = subprocess.run(
        [*CLI, "analyze", str(cut), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "ends in a cut record" in partial.stderr
    assert '"messages_total": ' in partial.stdout


def test_subcommand_usage_errors_exit_2_with_one_line() -> None:
    for argv in (["demo", "--speed", "-1"], ["analyze", "/nonexistent"], ["replay", "--bogus"]):
        result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, argv
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
