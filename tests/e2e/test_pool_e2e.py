"""The fleet view end to end: the real process with four sources in one pool, fed by four
publishers (simulated replicas behind round-robin over the bundled trace), scraped by a real
Prometheus evaluating the committed rules.

The final gauges and the per-engine store counts do not depend on the order in which the
exporter interleaves the four streams, so they are compared exactly with the reference of
``tests/test_pool.py``; the resident-elsewhere counter does (it is defined by arrival order),
so it is bounded. The overview panel "Recomputation a KV-aware router could have avoided"
must return data from Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import msgspec
import pytest

from kvcache_exporter.engine import PrefixCacheSimulator
from kvcache_exporter.engine.trace import bundled_trace_path, read_mooncake
from kvcache_exporter.protocol.encode import encode_batch
from kvcache_exporter.publisher import Event, KVEventPublisher

from ..conftest import free_port, require_binary
from ..test_pool import ReferencePool
from .conftest import ExporterProcess, managed, select, wait_for
from .test_dashboards_e2e import RulesPrometheus, Stack, has_data, run_query

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "prometheus_rules.yaml"
OVERVIEW = ROOT / "grafana" / "dashboards" / "kvcache-overview.json"
PANEL = "Recomputation a KV-aware router could have avoided"
ENGINES = ("r0", "r1", "r2", "r3")
REQUESTS = 600


def replica_batches() -> dict[str, list[list[Event]]]:
    """Each replica's batches: request i goes to replica i mod 4, one batch per request."""
    sims = [PrefixCacheSimulator(1500, 0) for _ in ENGINES]
    batches: dict[str, list[list[Event]]] = {name: [] for name in ENGINES}
    for i, request in enumerate(islice(read_mooncake(bundled_trace_path()), REQUESTS)):
        events = sims[i % len(ENGINES)].step(request)
        if events:
            batches[ENGINES[i % len(ENGINES)]].append(events)
    return batches


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Stack, dict[str, list[list[Event]]]]]:
    binary = require_binary("prometheus")
    ports = {name: free_port() for name in ENGINES}
    with contextlib.ExitStack() as cleanup:
        publishers = {}
        for name, port in ports.items():
            publishers[name] = KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True)
            cleanup.callback(publishers[name].close)
        sources = [
            arg
            for name, port in ports.items()
            for arg in ("--source", f"{name}=tcp://127.0.0.1:{port},pool=llama")
        ]
        exporter = ExporterProcess(sources, tmp_path / "exporter.log")
        cleanup.enter_context(managed(exporter))
        exporter.wait_serving()
        exporter.wait_ready()
        prometheus = RulesPrometheus(binary, tmp_path, exporter.port, [RULES])
        cleanup.enter_context(managed(prometheus))
        started = time.time()
        prometheus.wait_ready()
        wait_for(lambda: prometheus.has("up == 1"), 20, "the first scrape", 0.2)
        time.sleep(0.3)  # the subscriptions reach the publishers
        batches = replica_batches()
        # Round-robin over about 6 s, so that Prometheus sees the counters grow.
        longest = max(len(b) for b in batches.values())
        for k in range(longest):
            for name in ENGINES:
                if k < len(batches[name]):
                    publishers[name].send_batch(time.time(), batches[name][k])
            time.sleep(6.0 / longest)
        yield Stack(prometheus, exporter, started), batches


def test_four_replicas_in_one_pool(fleet: tuple[Stack, dict[str, list[list[Event]]]]) -> None:
    stack, batches = fleet
    samples = stack.exporter.wait_ingested({name: len(b) for name, b in batches.items()})
    ref = ReferencePool(dict.fromkeys(ENGINES, False))
    decoder = msgspec.msgpack.Decoder()
    for name, engine_batches in batches.items():
        for events in engine_batches:
            ts, wire, *_ = decoder.decode(encode_batch(0.0, events))
            ref.feed(name, ts, wire)
    distinct, duplicate = ref.gauges()
    pool = {"pool": "llama", "medium": "GPU"}
    got = select(samples, "kvcache_pool_distinct_resident_blocks", **pool)
    assert list(got.values()) == [distinct["GPU"]]
    got = select(samples, "kvcache_pool_duplicate_resident_blocks", **pool)
    assert list(got.values()) == [duplicate["GPU"]]
    assert duplicate["GPU"] > 0
    for name in ENGINES:
        labels = {**pool, "engine": name}
        (stored,) = select(samples, "kvcache_pool_stores_total", **labels).values()
        (elsewhere,) = select(
            samples, "kvcache_pool_stores_resident_elsewhere_total", **labels
        ).values()
        assert stored == ref.stored[(name, "GPU")]
        assert 0 < elsewhere <= stored
        mismatches = select(samples, "kvcache_exporter_pool_mismatches_total", engine=name)
        assert list(mismatches.values()) == [0]

    dashboard = json.loads(OVERVIEW.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == PANEL]
    (target,) = panel["targets"]
    expr = target["expr"].replace("$job", ".*").replace("$instance", ".*")
    expr = expr.replace("$medium", "GPU")
    wait_for(lambda: has_data(run_query(stack, expr, instant=False)), 30, PANEL, step=0.5)
    result = run_query(stack, expr, instant=True)["result"]
    assert [s["metric"]["pool"] for s in result] == ["llama"]
    assert 0 < float(result[0]["value"][1]) <= 1
