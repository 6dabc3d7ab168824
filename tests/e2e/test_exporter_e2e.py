"""The real exporter process fed over real ZeroMQ by a simulated engine, checked number by number.

Two engines run the bundled Mooncake trace through an LRU prefix cache with a CPU tier and hit
reporting (so stores, accesses, evictions, offloads and restores all happen), one publishing
vLLM's map form, the other its array form; the ``map`` engine also clears its cache halfway.
Ground truth is :class:`tests.reference.ReferenceCollector` fed the very batches the engines
sent. A real Prometheus then scrapes the exporter and answers queries.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from kvcache_exporter.catalog import DECODE_ERROR_REASONS
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
)
from kvcache_exporter.engine.simulator import EventSink
from kvcache_exporter.publisher import (
    Event,
    KVEventPublisher,
    Stored,
    WireForm,
)

from ..conftest import free_port
from ..reference import Hist, ReferenceCollector
from .conftest import (
    ExporterProcess,
    PrometheusProcess,
    Samples,
    as_map,
    managed,
    select,
    value,
    wait_for,
)

pytestmark = pytest.mark.e2e

START_TS = 1_760_000_000.0  # the engines' clock at the first request (fixed: reproducible)
HISTOGRAMS = (
    ("kvcache_block_lifetime_seconds", "lifetime"),
    ("kvcache_block_idle_before_evict_seconds", "idle_before_evict"),
    ("kvcache_block_reuse_gap_seconds", "reuse_gap"),
    ("kvcache_block_restore_gap_seconds", "restore_gap"),
    ("kvcache_block_accesses_before_evict", "accesses_before_evict"),
)


@dataclass(frozen=True)
class Plan:
    """One simulated engine: its wire form, cache tiers and where (if at all) it clears."""

    name: str
    form: WireForm
    gpu_blocks: int
    cpu_blocks: int
    clear_at_batch: int | None = None


PLANS = (
    Plan("map", WireForm.VLLM, gpu_blocks=4000, cpu_blocks=2000, clear_at_batch=500),
    Plan("array", WireForm.VLLM_ARRAY, gpu_blocks=3000, cpu_blocks=1000),
)
ENGINES = [plan.name for plan in PLANS]


class RecordingSink:
    """Forwards each batch to the publisher and keeps a copy of what was sent.

    At batch ``clear_at_batch`` it resets the simulator and appends the resulting
    ``AllBlocksCleared`` to that batch, so the clear sits in the stream exactly where the
    simulator's state was emptied.
    """

    def __init__(
        self, inner: EventSink, simulator: PrefixCacheSimulator, clear_at_batch: int | None
    ) -> None:
        self.inner = inner
        self.simulator = simulator
        self.clear_at_batch = clear_at_batch
        self.batches: list[tuple[float, list[Event]]] = []

    def send_batch(self, ts: float, events: Iterable[Event]) -> int:
        batch = list(events)
        if len(self.batches) == self.clear_at_batch:
            batch.extend(self.simulator.reset())
        self.batches.append((ts, batch))
        return self.inner.send_batch(ts, batch)


def stored_tokens(batches: list[tuple[float, list[Event]]]) -> int:
    """Tokens the engine reported in its ``BlockStored`` events."""
    total = 0
    for _, events in batches:
        for event in events:
            if isinstance(event, Stored):
                assert event.token_ids is None and event.token_count is not None
                total += event.token_count
    return total


@dataclass
class Run:
    """One exporter after it ingested every engine's whole stream."""

    exporter: ExporterProcess
    samples: Samples
    sinks: dict[str, RecordingSink]
    refs: dict[str, ReferenceCollector] = field(default_factory=dict)
    prometheus: PrometheusProcess | None = None  # started early: its first scrape takes ~5 s


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Start the exporter, publish both engines' streams, wait until all is ingested.

    Prometheus (when installed) starts alongside: its discovery hands it targets only after
    about five seconds, which the publishing then overlaps.
    """
    log_dir = tmp_path_factory.mktemp("e2e-stream")
    ports = {plan.name: free_port() for plan in PLANS}
    requests = list(read_mooncake(bundled_trace_path()))
    with contextlib.ExitStack() as stack:
        publishers = {
            plan.name: stack.enter_context(
                KVEventPublisher(f"tcp://127.0.0.1:{ports[plan.name]}", bind=True, form=plan.form)
            )
            for plan in PLANS
        }
        args: list[str] = []
        for plan in PLANS:
            args += ["--source", f"{plan.name}=tcp://127.0.0.1:{ports[plan.name]}"]
        exporter = ExporterProcess(args, log_dir / "exporter.log")
        stack.enter_context(managed(exporter))
        prometheus_path = shutil.which("prometheus")
        prometheus = None
        if prometheus_path is not None:
            prometheus = PrometheusProcess(
                prometheus_path, tmp_path_factory.mktemp("prometheus"), {"kvcache": exporter.port}
            )
            stack.enter_context(managed(prometheus))
        exporter.wait_serving()
        exporter.wait_ready()
        time.sleep(0.3)  # ZeroMQ slow joiner: let the subscriptions reach the publishers

        sinks: dict[str, RecordingSink] = {}
        for plan in PLANS:
            simulator = PrefixCacheSimulator(plan.gpu_blocks, plan.cpu_blocks, report_hits=True)
            sink = RecordingSink(publishers[plan.name], simulator, plan.clear_at_batch)
            engine = SimulatedEngine(
                simulator, sink, speed=0, requests_per_batch=4, start_time=START_TS
            )
            engine.run(requests)
            sinks[plan.name] = sink
        samples = exporter.wait_ingested({name: len(sink.batches) for name, sink in sinks.items()})

        refs: dict[str, ReferenceCollector] = {}
        for name, sink in sinks.items():
            ref = ReferenceCollector()
            for ts, events in sink.batches:
                ref.feed(ts, [as_map(event) for event in events])
            refs[name] = ref
        yield Run(exporter, samples, sinks, refs, prometheus)


def media_of(run: Run, engine: str) -> list[str]:
    """Media either the exporter or the reference has numbers for, for this engine."""
    ref = run.refs[engine]
    media = set(ref.stored) | {medium for medium, _ in ref.removed} | set(ref.accessed)
    exported = select(run.samples, "kvcache_resident_blocks", engine=engine)
    media |= {dict(labels)["medium"] for labels in exported}
    return sorted(media)


# --- the stream is realistic ------------------------------------------------------------------
def test_streams_exercise_every_path(run: Run) -> None:
    """The workload really has CPU offloads, hits on both tiers, restores and a clear, so the
    comparisons below cover every kind of number (not just zeros)."""
    for plan in PLANS:
        ref = run.refs[plan.name]
        assert set(ref.events) >= {"BlockStored", "BlockRemoved", "BlockAccessed"}
        for medium in ("GPU", "CPU"):
            assert ref.stored[medium] > 0 and ref.removed[(medium, "evicted")] > 0
            assert ref.accessed[medium] > 0 and ref.restores[medium] > 0
            assert ref.resident_count(medium) > 0
        assert ref.hist["reuse_gap"].count("GPU") > 0
    assert run.refs["map"].clears == 1 and run.refs["map"].removed[("GPU", "cleared")] > 0
    assert run.refs["array"].clears == 0


# --- counters and gauges ----------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_stream_received_whole(run: Run, engine: str) -> None:
    """Every batch sent arrived, in order, and decoded: no gaps, losses or errors."""
    s, sink = run.samples, run.sinks[engine]
    assert value(s, "kvcache_exporter_messages_total", engine=engine) == len(sink.batches)
    assert value(s, "kvcache_exporter_sequence_gaps_total", engine=engine) == 0
    assert value(s, "kvcache_exporter_batches_lost_total", engine=engine) == 0
    assert value(s, "kvcache_exporter_duplicate_batches_total", engine=engine) == 0
    assert value(s, "kvcache_exporter_engine_restarts_total", engine=engine) == 0
    assert value(s, "kvcache_exporter_unknown_fields_total", engine=engine) == 0
    errors = select(s, "kvcache_exporter_decode_errors_total", engine=engine)
    # Every reason is served from the start, at 0 here.
    assert {dict(labels)["reason"] for labels in errors} == set(DECODE_ERROR_REASONS)
    assert set(errors.values()) == {0}
    assert value(s, "kvcache_exporter_source_up", engine=engine) == 1
    assert value(s, "kvcache_exporter_sample_ratio", engine=engine) == 1
    last_ts = sink.batches[-1][0]
    assert value(s, "kvcache_exporter_last_event_timestamp_seconds", engine=engine) == last_ts


@pytest.mark.parametrize("engine", ENGINES)
def test_events_by_type_match(run: Run, engine: str) -> None:
    """kvcache_events_total{type} counts every event sent, by type."""
    exported = {
        dict(labels)["type"]: count
        for labels, count in select(run.samples, "kvcache_events_total", engine=engine).items()
    }
    assert exported == dict(run.refs[engine].events)


@pytest.mark.parametrize("engine", ENGINES)
def test_block_counters_match_reference(run: Run, engine: str) -> None:
    """Stored, accessed, restored and resident blocks per medium equal the reference."""
    s, ref = run.samples, run.refs[engine]
    for medium in media_of(run, engine):
        got = {
            "stored": value(
                s, "kvcache_blocks_stored_total", engine=engine, medium=medium, group="0"
            ),
            "accessed": value(
                s, "kvcache_blocks_accessed_total", engine=engine, medium=medium, group="0"
            ),
            "restores": value(
                s, "kvcache_block_restores_total", engine=engine, medium=medium, group="0"
            ),
            "resident": value(
                s, "kvcache_resident_blocks", engine=engine, medium=medium, group="0"
            ),
        }
        want = {
            "stored": ref.stored[medium],
            "accessed": ref.accessed[medium],
            "restores": ref.restores[medium],
            "resident": ref.resident_count(medium),
        }
        assert got == want, medium


@pytest.mark.parametrize("engine", ENGINES)
def test_removals_match_reference(run: Run, engine: str) -> None:
    """kvcache_blocks_removed_total{medium,reason}, clears and unknown removals are exact."""
    s, ref = run.samples, run.refs[engine]
    exported = {
        (dict(labels)["medium"], dict(labels)["reason"]): count
        for labels, count in select(s, "kvcache_blocks_removed_total", engine=engine).items()
        if count
    }
    assert exported == {key: n for key, n in ref.removed.items() if n}
    assert value(s, "kvcache_cache_clears_total", engine=engine) == ref.clears
    assert value(s, "kvcache_exporter_unknown_removals_total", engine=engine) == (
        ref.unknown_removals
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_tracked_and_tokens(run: Run, engine: str) -> None:
    """At sample ratio 1 every resident block is tracked; stored tokens are those sent."""
    s, ref = run.samples, run.refs[engine]
    tracked = select(s, "kvcache_tracked_blocks", engine=engine)
    assert sum(tracked.values()) == len(ref.resident)
    assert value(s, "kvcache_stored_tokens_total", engine=engine) == stored_tokens(
        run.sinks[engine].batches
    )


# --- histograms -------------------------------------------------------------------------------
def reference_hist(ref: ReferenceCollector, key: str) -> Hist:
    return ref.accesses_before_evict if key == "accesses_before_evict" else ref.hist[key]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("family", "key"), HISTOGRAMS, ids=[key for _, key in HISTOGRAMS])
def test_histogram_matches_reference(run: Run, engine: str, family: str, key: str) -> None:
    """Every bucket, ``_count`` and ``_sum`` of a lifecycle histogram equal the reference's: the
    sum to 1e-6 relative, and every bucket exactly."""
    s, hist = run.samples, reference_hist(run.refs[engine], key)
    for medium in media_of(run, engine):
        row = hist.counts.get(medium, [0] * (len(hist.bounds) + 1))
        got = {
            float(dict(labels)["le"]): count
            for labels, count in select(
                s, family + "_bucket", engine=engine, medium=medium, group="0"
            ).items()
        }
        assert set(got) == {*hist.bounds, math.inf}, medium
        wrong, cumulative = [], 0
        for i, bound in enumerate([*hist.bounds, math.inf]):
            cumulative += row[i]
            if got[bound] != cumulative:
                wrong.append(f"le={bound:g}: exported {got[bound]:g}, reference {cumulative}")
        assert not wrong, f"{medium}: " + "; ".join(wrong)
        assert value(s, family + "_count", engine=engine, medium=medium, group="0") == hist.count(
            medium
        )
        assert value(s, family + "_sum", engine=engine, medium=medium, group="0") == pytest.approx(
            hist.sums[medium], rel=1e-6, abs=1e-9
        ), medium


# --- the exposition and a real Prometheus ------------------------------------------------------
def test_exposition_passes_promtool(run: Run, promtool: str) -> None:
    """The loaded exporter's /metrics passes ``promtool check metrics`` (format and lint)."""
    status, text = run.exporter.get("/metrics")
    assert status == 200
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_exporter(run: Run, prometheus_bin: str) -> None:
    """A real Prometheus scrapes the exporter: ``up`` is 1 and queries return what the
    exporter serves, which is the reference's numbers."""
    prometheus = run.prometheus
    assert prometheus is not None, f"{prometheus_bin} was not on PATH when the module started"
    prometheus.wait_ready()
    promql = 'kvcache_blocks_stored_total{engine="map",medium="GPU",group="0"}'
    want = value(run.samples, "kvcache_blocks_stored_total", engine="map", medium="GPU", group="0")
    assert want == run.refs["map"].stored["GPU"]

    def answered() -> bool:
        result = prometheus.query(promql)
        return len(result) == 1 and float(result[0]["value"][1]) == want

    try:
        wait_for(answered, 20, f"Prometheus to answer {promql} with {want}", step=0.2)
    except AssertionError as exc:
        raise prometheus.fail(str(exc)) from None
    (up,) = prometheus.query('up{job="kvcache"}')
    assert up["metric"]["instance"] == f"127.0.0.1:{run.exporter.port}"
    assert float(up["value"][1]) == 1
    resident = prometheus.query("sum by (engine) (kvcache_resident_blocks)")
    assert {r["metric"]["engine"]: float(r["value"][1]) for r in resident} == {
        name: float(len(ref.resident)) for name, ref in run.refs.items()
    }
