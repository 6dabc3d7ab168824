"""Alerts and trends of the running exporter: on /metrics, in /api/v1/summary and in the logs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
)
from kvcache_exporter.publisher import Event, KVEventPublisher

from ..conftest import free_port
from .conftest import ExporterProcess, select

pytestmark = pytest.mark.e2e


class ClearingSink:
    """Forwards batches; after ``clear_at`` batches it resets the simulated cache (the
    AllBlocksCleared goes out in that batch), as an operator's reset_prefix_cache would."""

    def __init__(self, publisher: KVEventPublisher, simulator: PrefixCacheSimulator) -> None:
        self.publisher = publisher
        self.simulator = simulator
        self.batches = 0
        self.clear_at = 600

    def send_batch(self, ts: float, events: list[Event]) -> int:
        self.batches += 1
        if self.batches == self.clear_at:
            events = [*events, *self.simulator.reset()]
        return self.publisher.send_batch(ts, events)


def test_thrashing_and_a_reset_raise_alerts_everywhere(
    start_exporter: Callable[..., ExporterProcess],
) -> None:
    """A cache far too small for its workload thrashes (restores ≥ 60% of stores): the
    exporter raises thrashing at critical, then cache_reset for the clear; both show on
    /metrics, in the summary and in the log, and every trend series is on /metrics."""
    port = free_port()
    exporter = start_exporter("--source", f"small=tcp://127.0.0.1:{port}")
    with KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True) as publisher:
        exporter.wait_ready()
        time.sleep(0.3)
        simulator = PrefixCacheSimulator(1500)
        sink = ClearingSink(publisher, simulator)
        engine = SimulatedEngine(simulator, sink, speed=0, requests_per_batch=4)
        engine.run(read_mooncake(bundled_trace_path()))
        samples = exporter.wait_ingested({"small": sink.batches})

    raised = select(samples, "kvcache_alerts_total", engine="small")
    totals = {(dict(k)["alert"], dict(k)["severity"]): v for k, v in raised.items()}
    assert totals[("thrashing", "critical")] >= 1
    assert totals[("cache_reset", "info")] == 1
    active = {dict(k)["alert"] for k in select(samples, "kvcache_alert_active", engine="small")}
    assert "thrashing" in active  # the trace thrashes to its end
    trends = {dict(k)["series"] for k in select(samples, "kvcache_trend_direction", engine="small")}
    assert trends == {
        "store_rate",
        "eviction_rate",
        "resident_blocks",
        "median_lifetime_seconds",
        "restore_ratio",
    }

    status, body = exporter.get("/api/v1/summary")
    summary = json.loads(body)["engines"][0]
    assert status == 200
    assert "thrashing" in {a["alert"] for a in summary["alerts"]["active"]}
    assert {r["alert"] for r in summary["alerts"]["raised_total"]} >= {"thrashing", "cache_reset"}
    assert set(summary["trends"]) == trends
    assert summary["access_patterns"]["resident_tracked_blocks"] > 0

    log = exporter.log_text()
    assert "alert raised: restores are" in log and "alert=thrashing" in log
    assert "alert=cache_reset" in log
