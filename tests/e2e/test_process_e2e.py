"""The exporter as an operator runs it: startup with no engine, readiness, signals, bad flags."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from ..conftest import free_port
from .conftest import EXPORTER, ExporterProcess, clean_env, value, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def bind_engine(context: zmq.Context[zmq.Socket[bytes]], port: int) -> zmq.Socket[bytes]:
    """A bare engine PUB socket, bound where the exporter connects."""
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"tcp://127.0.0.1:{port}")
    return socket


def source_up(exporter: ExporterProcess) -> float:
    return value(exporter.scrape(), "kvcache_exporter_source_up", engine="vllm")


def test_starts_without_engine_and_becomes_ready_when_it_appears(
    start_exporter: Callable[..., ExporterProcess],
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    promtool: str,
) -> None:
    """With no engine listening the exporter still serves ``/``, ``/metrics`` (passing promtool)
    and ``/healthz``, and ``/readyz`` is 503; once the engine binds, ``/readyz`` turns 200 and
    ``source_up`` 1; when the engine goes away both turn back."""
    port = free_port()
    exporter = start_exporter("--source", f"vllm=tcp://127.0.0.1:{port}")

    assert exporter.get("/healthz")[0] == 200
    status, body = exporter.get("/readyz")
    assert status == 503 and "vllm" in body
    status, landing = exporter.get("/")
    assert status == 200 and 'href="/metrics"' in landing
    status, text = exporter.get("/metrics")
    assert status == 200
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    samples = exporter.scrape()
    assert value(samples, "kvcache_exporter_source_up", engine="vllm") == 0
    assert value(samples, "kvcache_exporter_messages_total", engine="vllm") == 0
    assert [labels for (name, labels) in samples if name == "kvcache_exporter_build_info"]

    engine = bind_engine(zmq_context, port)
    exporter.wait_ready()
    assert source_up(exporter) == 1
    assert exporter.get("/healthz")[0] == 200

    engine.close()
    wait_for(lambda: exporter.get("/readyz")[0] == 503, 10, "/readyz 503 after the engine left")
    assert source_up(exporter) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_shuts_down_cleanly_within_a_second(
    start_exporter: Callable[..., ExporterProcess],
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    signum: signal.Signals,
) -> None:
    """SIGTERM and SIGINT stop a running, connected exporter in under a second, exit code 0."""
    port = free_port()
    engine = bind_engine(zmq_context, port)  # held: a dropped socket is closed
    exporter = start_exporter("--source", f"vllm=tcp://127.0.0.1:{port}")
    exporter.wait_ready()
    assert exporter.get("/metrics")[0] == 200 and not engine.closed

    started = time.monotonic()
    exporter.proc.send_signal(signum)
    try:
        code = exporter.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise exporter.fail(f"still running 5 s after {signum.name}") from None
    elapsed = time.monotonic() - started
    assert code == 0, exporter.log_text()
    assert elapsed < 1.0, f"took {elapsed:.2f}s to stop"
    assert "stopped" in exporter.log_text()
    with pytest.raises(OSError):
        exporter.get("/healthz")  # the port is closed


BAD_FLAGS = [
    pytest.param(["--collector.sample-ratio", "2"], {}, "--collector.sample-ratio", id="ratio"),
    pytest.param(["--source", "nope"], {}, "nope", id="source"),
    pytest.param(["--source", "vllm=udp://127.0.0.1:1"], {}, "udp://", id="source-transport"),
    pytest.param(["--web.listen-address", "h:x"], {}, "--web.listen-address", id="listen"),
    pytest.param(["--log.level", "loud"], {}, "--log.level", id="log-level"),
    pytest.param(
        ["--source", "vllm=tcp://127.0.0.1:1,curve.engine-key=/absent.key"],
        {},
        "source vllm: CURVE needs the exporter's own key pair (--source.curve.key-file",
        id="curve-without-key-pair",
    ),
    pytest.param(["--no-such-flag"], {}, "--no-such-flag", id="unknown-flag"),
    pytest.param(
        [],
        {"KVCACHE_EXPORTER_COLLECTOR_SAMPLE_RATIO": "0"},
        "KVCACHE_EXPORTER_COLLECTOR_SAMPLE_RATIO",
        id="env",
    ),
]


@pytest.mark.parametrize(("args", "env", "named"), BAD_FLAGS)
def test_bad_flag_exits_2_with_one_line(args: list[str], env: dict[str, str], named: str) -> None:
    """A bad flag (or variable) is one stderr line naming it and exit code 2, before anything
    starts: nothing logged, no port opened."""
    port = free_port()
    result = subprocess.run(
        [*EXPORTER, "--web.listen-address", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env={**clean_env(), **env},
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "level=" not in result.stderr and result.stdout == ""
