"""``/metrics`` as scrapers see it, from the real process: both formats, the process's own
series, and a real Prometheus negotiating OpenMetrics."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.catalog import FAMILIES, OTLP_EXPORTS, Type
from kvcache_exporter.protocol.encode import frames

from ..conftest import free_port
from .conftest import ExporterProcess, PrometheusProcess, http_get, managed, wait_for

pytestmark = pytest.mark.e2e

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"  # and parameters
PROMETHEUS_ACCEPT = (  # what Prometheus 2.x sends
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def batch(seq: int, blocks: int = 200) -> list[bytes]:
    """A step storing ``blocks`` new blocks on the GPU and removing the previous step's."""
    hashes = list(range(seq * blocks, (seq + 1) * blocks))
    events = [
        {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": [],
            "block_size": 16,
            "medium": "GPU",
        },
        {"type": "BlockRemoved", "block_hashes": [h - blocks for h in hashes], "medium": "GPU"},
    ]
    return frames("kv-events", seq, msgspec.msgpack.encode([1000.0 + seq, events, 0]))


def get(url: str, accept: str | None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


@pytest.fixture
def fed(start_exporter: Callable[..., ExporterProcess]) -> Iterator[ExporterProcess]:
    """An exporter bound for engine ``vllm``, fed 20 steps."""
    port = free_port()
    exporter = start_exporter("--source", f"vllm=tcp://127.0.0.1:{port},bind")
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        exporter.wait_ready()
        time.sleep(0.3)  # ZeroMQ slow joiner
        for seq in range(20):
            sock.send_multipart(batch(seq))
        exporter.wait_ingested({"vllm": 20})
        yield exporter
    finally:
        sock.close(linger=0)


def test_both_formats_carry_every_family_and_the_process_series(
    fed: ExporterProcess, promtool: str
) -> None:
    """Text 0.0.4 by default, OpenMetrics 1.0 when the Accept header asks (as Prometheus
    does): the same catalog families either way, the process and Python series beside them;
    the text passes ``promtool check metrics``, the OpenMetrics body the strict OpenMetrics
    parser (promtool 2.42 reads only the text format)."""
    url = fed.url + "/metrics"
    text_type, text = get(url, None)
    om_type, om = get(url, PROMETHEUS_ACCEPT)
    assert text_type == "text/plain; version=0.0.4; charset=utf-8"
    assert om_type.startswith(OPENMETRICS)
    assert om.endswith("# EOF\n") and "# EOF" not in text
    catalog = [f for f in FAMILIES if f.name != OTLP_EXPORTS]  # OTLP export is off
    text_families = list(text_string_to_metric_families(text))
    om_families = list(openmetrics_families(om))
    # Family names as each parser gives them: counters without _total; info without _info
    # in OpenMetrics, a gauge named *_info in the text format.
    assert {fam.name for fam in om_families} >= {f.base_name for f in catalog}
    text_want = {f.name if f.type is Type.INFO else f.base_name for f in catalog}
    assert {fam.name for fam in text_families} >= text_want
    for families in (text_families, om_families):
        names = {s.name for fam in families for s in fam.samples}
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
        assert {"process_open_fds", "process_start_time_seconds", "python_info"} <= names
        assert "python_gc_collections_total" in names
    stored = {
        s.name: s.value
        for fam in om_families
        for s in fam.samples
        if s.name == "kvcache_blocks_stored_total"
    }
    assert stored == {"kvcache_blocks_stored_total": 4000}
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_process_cpu_grows_while_ingesting(start_exporter: Callable[..., ExporterProcess]) -> None:
    """``process_cpu_seconds_total`` is the exporter's own: it grows while a stream arrives."""
    port = free_port()
    exporter = start_exporter("--source", f"vllm=tcp://127.0.0.1:{port},bind")
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        exporter.wait_ready()
        time.sleep(0.3)
        before = exporter.scrape()[("process_cpu_seconds_total", frozenset())]
        for seq in range(400):
            sock.send_multipart(batch(seq, 2000))
        after = exporter.wait_ingested({"vllm": 400}, timeout=60)
    finally:
        sock.close(linger=0)
    assert after[("process_cpu_seconds_total", frozenset())] > before


def test_prometheus_negotiates_openmetrics(
    fed: ExporterProcess, prometheus_bin: str, tmp_path: Path
) -> None:
    """A real Prometheus asks for OpenMetrics and gets it: it keeps the build info's metadata
    as the OpenMetrics ``info`` family ``kvcache_exporter_build``, which the text format
    cannot say (there it is the gauge ``kvcache_exporter_build_info``)."""
    prometheus = PrometheusProcess(prometheus_bin, tmp_path, {"kvcache": fed.port})
    with managed(prometheus):
        prometheus.wait_ready()

        def metadata() -> list[dict[str, str]]:
            url = prometheus.url + "/api/v1/metadata?metric=kvcache_exporter_build"
            status, body = http_get(url)
            assert status == 200, body
            found: list[dict[str, str]] = msgspec.json.decode(body)["data"].get(
                "kvcache_exporter_build", []
            )
            return found

        try:
            wait_for(lambda: bool(metadata()), 20, "the build info's metadata", step=0.2)
        except AssertionError as exc:
            raise prometheus.fail(str(exc)) from None
        assert metadata()[0]["type"] == "info"
        (stored,) = prometheus.query("kvcache_blocks_stored_total")
        assert float(stored["value"][1]) == 4000
