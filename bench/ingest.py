"""Ingest benchmark: the exporter end to end against a straightforward per-event collector.

One run does five things on the same pre-encoded stream (see ``docs/performance.md``):

1. **Stream.** The bundled Mooncake trace is served by :class:`PrefixCacheSimulator` (LRU,
   ``--gpu-blocks``), looped until at least ``--min-block-events`` block events, and encoded
   once as vLLM map-form payloads (``[ts, events, dp_rank]``) with ``seq`` counting from 0.
   A *block event* is one hash in a ``BlockStored``, ``BlockRemoved`` or ``BlockAccessed``.
2. **In process.** The frames fed to :class:`EventStream` directly, flushing every
   ``MAX_DRAIN`` messages as the subscriber does when it is behind: decode alone, the
   collector's apply alone, then the exporter's whole per-engine pipeline. No ZeroMQ, no HTTP.
3. **Exporter.** The real ``kvcache-exporter`` process; an XPUB socket (a PUB that also tells
   us when the subscription has arrived) sends every frame as fast as it can. Timed from the
   first send until ``/metrics`` shows every message counted *and* every block event applied;
   CPU from ``/proc/PID/stat``. Then ``/metrics`` scrape times.
4. **Baseline.** A per-event collector (this file, ``--baseline-worker``) in its own process,
   fed the same frames the same way: plain ``msgspec.msgpack.decode``, a dict of per-block
   Python objects, and ``prometheus_client`` ``inc``/``observe`` per block event.
5. **Memory sweep.** Hash-table bytes per resident block with N fresh blocks stored, so the
   per-block cost is seen without the fixed cost of the removed-hash memory.

Run: ``python bench/ingest.py`` (about a minute on 2 cores); ``--json FILE`` keeps figures.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import gzip
import http.client
import importlib
import io
import json
import logging
import os
import platform
import pstats
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import numpy as np
import zmq

from kvcache_exporter.collector import DEFAULT_REASONS, BlockLifecycleCollector, CollectorConfig
from kvcache_exporter.collector.histogram import ACCESS_COUNT_BUCKETS, RESIDENCY_BUCKETS
from kvcache_exporter.collector.table import RESIDENT
from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    Request,
    SimulatedEngine,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
)
from kvcache_exporter.protocol import compiled as compiled_module
from kvcache_exporter.protocol.batch import OP_STORE, EventBatch, LabelTable
from kvcache_exporter.protocol.encode import (
    Accessed,
    Event,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    frames,
)
from kvcache_exporter.sources.stream import EventStream
from kvcache_exporter.sources.subscriber import MAX_DRAIN

# Wire names of the event records, for the per-type counts.
_TYPE_NAMES: Final[dict[type, str]] = {
    Stored: "BlockStored",
    Removed: "BlockRemoved",
    Accessed: "BlockAccessed",
}

# Targets of issue 2 (on a 2-core machine).
TARGET_RATIO: Final = 25.0
TARGET_EPS: Final = 3_000_000.0
TARGET_BYTES: Final = 48.0
TARGET_CPU_PER_M: Final = 0.3
TARGET_SCRAPE_MS: Final = 10.0

ENGINE: Final = "bench"
U64: Final = (1 << 64) - 1
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
# Progress polls are scrapes, and a scrape costs the exporter CPU on the ingest thread's GIL,
# so they stay rare until the end is near, then close in to find the end within ~10 ms.
POLL_SPARSE_S: Final = 0.25
POLL_DENSE_S: Final = 0.01
DENSE_FROM: Final = 0.9  # fraction of block events applied before polling densely
STALL_S: Final = 30.0  # no progress for this long: something was dropped, fail


class BenchError(RuntimeError):
    """The run is not valid (messages dropped, counts differ, a process died)."""


# --- 1. the stream -------------------------------------------------------------------------
@dataclass(slots=True)
class Stream:
    """The pre-encoded multipart messages and what they hold."""

    messages: list[list[bytes]]
    block_events: int
    by_type: dict[str, int]
    events: int
    payload_bytes: int
    requests: int
    hit_ratio: float
    engine_seconds: float  # engine clock from first to last batch (the trace's own time)
    build_s: float


class _Recorder:
    """An :class:`EventSink` that encodes each batch once and counts its block events."""

    def __init__(self, form: WireForm, min_block_events: int, stop: threading.Event) -> None:
        self.form = form
        self.min_block_events = min_block_events
        self.stop = stop
        self.payloads: list[bytes] = []
        self.block_events = 0
        self.events = 0
        self.by_type = {"BlockStored": 0, "BlockRemoved": 0, "BlockAccessed": 0}

    def send_batch(self, ts: float, events: Iterable[Event]) -> int:
        batch = list(events)
        for event in batch:
            if isinstance(event, Stored | Removed | Accessed):
                count = len(event.block_hashes)
                self.by_type[_TYPE_NAMES[type(event)]] += count
                self.block_events += count
        self.events += len(batch)
        self.payloads.append(encode_batch(ts, batch, self.form))
        if self.block_events >= self.min_block_events:
            self.stop.set()  # the engine stops before its next request
        return len(self.payloads) - 1


def build_stream(args: argparse.Namespace) -> Stream:
    """Simulate the looped trace and encode every batch once (module docstring, step 1)."""
    started = time.perf_counter()
    # --time-scale compresses the engine clock: more block events per engine-second, as from a
    # busier engine. Durations shrink alike; the cache's behaviour does not change.
    requests: list[Request] = [
        Request(r.timestamp_s / args.time_scale, r.hash_ids, r.input_length, r.output_length)
        for r in read_mooncake(bundled_trace_path())
    ]
    stop = threading.Event()
    recorder = _Recorder(WireForm.VLLM, args.min_block_events, stop)
    simulator = PrefixCacheSimulator(args.gpu_blocks, report_hits=args.report_hits)
    engine = SimulatedEngine(
        simulator, recorder, speed=0, requests_per_batch=args.requests_per_batch, start_time=0.0
    )
    # fresh_hashes=False: later passes hit (and restore) blocks the earlier passes left.
    run = engine.run(repeat_requests(lambda: requests, None, fresh_hashes=False), stop=stop)
    messages = [frames(b"", seq, payload) for seq, payload in enumerate(recorder.payloads)]
    return Stream(
        messages=messages,
        block_events=recorder.block_events,
        by_type=recorder.by_type,
        events=recorder.events,
        payload_bytes=sum(len(p) for p in recorder.payloads),
        requests=run.requests,
        hit_ratio=simulator.stats.hit_ratio,
        engine_seconds=(run.last_ts or 0.0) - (run.first_ts or 0.0),
        build_s=time.perf_counter() - started,
    )


def recorded_stream(path: Path) -> Stream:
    """A recorded engine stream instead of the simulated one: ``path`` holds gzip of
    ``[length: u32 big-endian][bytes]`` frames, three per ZeroMQ message ``[topic, seq,
    payload]`` (``tests/fixtures/streams/*.frames.gz``, made by vLLM 0.33's own cache manager),
    sent as recorded."""
    started = time.perf_counter()
    data = gzip.decompress(path.read_bytes())
    parts, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        parts.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    messages = [parts[i : i + 3] for i in range(0, len(parts), 3)]
    by_type = {"BlockStored": 0, "BlockRemoved": 0, "BlockAccessed": 0}
    events, first_ts, last_ts = 0, None, 0.0
    for _, _, payload in messages:
        ts, batch = msgspec.msgpack.decode(payload)[:2]
        first_ts = ts if first_ts is None else first_ts
        last_ts = ts
        events += len(batch)
        for event in batch:
            kind = event["type"] if isinstance(event, dict) else event[0]
            hashes = event.get("block_hashes") if isinstance(event, dict) else event[1]
            if kind in by_type:
                by_type[kind] += len(hashes or ())
    return Stream(
        messages=messages,
        block_events=sum(by_type.values()),
        by_type=by_type,
        events=events,
        payload_bytes=sum(len(m[2]) for m in messages),
        requests=0,
        hit_ratio=float("nan"),
        engine_seconds=last_ts - (first_ts or 0.0),
        build_s=time.perf_counter() - started,
    )


# --- experiments: patches applied to the exporter as it starts, never to its files ----------
# Each is one line of Python run before the exporter's main(), in the exporter process, and the
# same setting applied around the in-process measurement. They exist to measure a proposed
# change before anyone makes it; a run with patches says so in its table.
PATCHES: Final[dict[str, str]] = {
    # A batch due at this many pending rows (compiled decoder) instead of 32,768.
    "batch-rows": "from kvcache_exporter.protocol import compiled; compiled.BATCH_ROWS = {value}",
    # Move start-up objects out of the GC's sight.
    "gc-freeze": "import gc; gc.collect(); gc.freeze()",
    # A larger first-generation threshold: fewer collections while decoded events are held.
    "gc-threshold": "import gc; gc.set_threshold({value}, 50, 1000)",
}


def parse_patches(text: str) -> list[tuple[str, str]]:
    """``batch-rows=65536,gc-threshold=100000`` -> [(name, value)], checked against PATCHES."""
    out = []
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in PATCHES or ("{value}" in PATCHES[name]) != bool(value):
            raise argparse.ArgumentTypeError(f"bad item {item!r}; known: {list(PATCHES)}")
        if value and not value.isdigit():
            raise argparse.ArgumentTypeError(f"{name} takes an integer")
        out.append((name, value))
    return out


def exporter_boot(patches: list[tuple[str, str]]) -> str:
    """A ``python -c`` program: apply the patches, then run the exporter's CLI."""
    lines = [PATCHES[name].format(value=value) for name, value in patches]
    # Patches after the import, so that gc-freeze also freezes the exporter's modules.
    return "\n".join(
        ["import sys", "from kvcache_exporter.cli import main", *lines, "sys.exit(main())"]
    )


class InProcessPatches:
    """The in-process part of the patches (flush size, GC settings), undone on exit."""

    def __init__(self, patches: list[tuple[str, str]]) -> None:
        self.patches = dict(patches)
        self._rows = compiled_module.BATCH_ROWS
        self._threshold = gc.get_threshold()

    def __enter__(self) -> None:
        if "batch-rows" in self.patches:
            compiled_module.BATCH_ROWS = int(self.patches["batch-rows"])  # type: ignore[misc]
        if "gc-threshold" in self.patches:
            gc.set_threshold(int(self.patches["gc-threshold"]), 50, 1000)
        if "gc-freeze" in self.patches:
            gc.collect()
            gc.freeze()

    def __exit__(self, *_exc: object) -> None:
        compiled_module.BATCH_ROWS = self._rows  # type: ignore[misc]
        gc.set_threshold(*self._threshold)
        gc.unfreeze()


# --- 2. in process -------------------------------------------------------------------------
@dataclass(slots=True)
class InProcess:
    pipeline: str  # what the full run went through
    decode_s: float  # EventStream alone (framing, seq, msgspec, columns)
    decode_nogc_s: float  # the same with the cyclic GC off (experiment)
    apply_s: float  # BlockLifecycleCollector.apply alone on the decoded batches
    pipeline_s: float  # the exporter's per-engine pipeline, all stages
    # The same whole-pipeline run split by stage (timers around each stage's call): decode is
    # the stream's own time (framing, seq, msgspec, columns), the rest what it hands on to.
    stage_s: dict[str, float]
    compiled_table: bool  # the collector's block table used the compiled kernels
    batches: int
    collector_bytes: int  # what kvcache_exporter_collector_bytes reports
    table_bytes: int  # the hash table's columns alone
    table_live: int
    table_capacity: int
    ghosts: int  # remembered removed keys: table slots, one per distinct key
    resident: int
    tracked: int
    expected_counts_ok: bool


def _labels() -> tuple[LabelTable, LabelTable]:
    return LabelTable("unknown"), LabelTable("evicted", seed=DEFAULT_REASONS)


def _stream(on_batch: Callable[[EventBatch], None], labels: tuple[LabelTable, ...]) -> EventStream:
    media, reasons = labels
    return EventStream(ENGINE, on_batch, lambda _ts: None, media, reasons)


Stages = list[tuple[str, object, str]]  # (stage, object, method) a pipeline calls per batch


def engine_pipeline() -> tuple[EventStream, BlockLifecycleCollector, str, Stages]:
    """What the exporter runs per engine: ``kvcache_exporter.pipeline.new_pipeline`` (stream,
    collector, monitor) where the package has it, else a stream feeding a collector; and the
    stages beside the collector that its batches go through."""
    try:
        module = importlib.import_module("kvcache_exporter.pipeline")
    except ImportError:
        labels = _labels()
        collector = BlockLifecycleCollector(None, *labels)
        return _stream(collector.apply, labels), collector, "EventStream -> collector", []
    built = module.new_pipeline(ENGINE, CollectorConfig())
    stages: Stages = [("monitor", built.monitor, "cuts")]
    stages += [("monitor", built.monitor, name) for name in ("sample", "sample_many")]
    if getattr(built, "whatif", None) is not None:
        stages.append(("what-if", built.whatif, "apply"))
    kind = "kvcache_exporter.pipeline (stream, collector, monitor, what-if)"
    return built.stream, built.collector, kind, stages


def _feed(stream: EventStream, messages: list[list[bytes]]) -> None:
    """As SubscriberSource.drain does when it is behind: MAX_DRAIN messages, then a flush."""
    handle = stream.handle
    for start in range(0, len(messages), MAX_DRAIN):
        for message in messages[start : start + MAX_DRAIN]:
            handle(message, 0.0)
        stream.flush()


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def run_in_process(data: Stream) -> InProcess:
    """Decode alone, apply alone, then the whole per-engine pipeline, without ZeroMQ."""
    labels = _labels()
    batches: list[EventBatch] = []
    decoder = _stream(batches.append, labels)
    decode_s = _timed(lambda: _feed(decoder, data.messages))
    collector = BlockLifecycleCollector(None, *labels)  # same label tables as the batches

    def apply_all() -> None:
        for batch in batches:
            collector.apply(batch)

    apply_s = _timed(apply_all)
    batches.clear()

    # The same decode with the cyclic GC off: how much of decoding is GC passes over the
    # decoded event objects held until the flush (an experiment, not the exporter as shipped).
    quiet = _stream(lambda _batch: None, _labels())
    gc.collect()
    gc.disable()
    try:
        nogc_s = _timed(lambda: _feed(quiet, data.messages))
    finally:
        gc.enable()

    stream, collector, kind, stages = engine_pipeline()
    stage_s = _time_stages(collector, stages)
    pipeline_s = _timed(lambda: _feed(stream, data.messages))
    stage_s["decode"] = pipeline_s - sum(stage_s.values())
    snap = collector.snapshot()
    counted = (
        int(snap.stored.sum())
        + int(snap.accessed.sum())
        + snap.unknown_accesses
        + int(snap.removed.sum())
    )
    return InProcess(
        pipeline=kind,
        decode_s=decode_s,
        decode_nogc_s=nogc_s,
        apply_s=apply_s,
        pipeline_s=pipeline_s,
        batches=stream.stats.messages,
        collector_bytes=snap.table_bytes,
        table_bytes=collector.table.nbytes,
        table_live=collector.table.live,
        table_capacity=collector.table.capacity,
        # Private, read only here: the removal records kept to forget ghosts oldest first.
        ghosts=collector.table.live - collector.table.slots_in_state(RESIDENT).size,
        stage_s=stage_s,
        compiled_table=collector.table.compiled,
        resident=int(snap.resident.sum()),
        tracked=snap.tracked,
        expected_counts_ok=counted == data.block_events,
    )


def _time_stages(collector: BlockLifecycleCollector, stages: Stages) -> dict[str, float]:
    """Wrap the pipeline's stages (collector apply, monitor, what-if) in timers; the dict
    fills as the stream runs."""
    seconds = {"apply": 0.0, "monitor": 0.0, "what-if": 0.0}

    def timed(name: str, owner: object, method: str) -> None:
        inner = getattr(owner, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - t0

        setattr(owner, method, wrapper)

    timed("apply", collector, "apply")
    for name, owner, method in stages:
        timed(name, owner, method)
    return seconds


def profile_in_process(data: Stream, top: int) -> str:
    """cProfile of the exporter's per-engine pipeline on the frames: the ``top`` functions by
    own time (profiling slows Python code more than C code: read shares, not seconds)."""
    stream, _, _, _ = engine_pipeline()
    profiler = cProfile.Profile()
    profiler.enable()
    _feed(stream, data.messages)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --- 3. the exporter -----------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Each metric name's value summed over its series (enough for totals and gauges)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match:
            name = match.group(1)
            totals[name] = totals.get(name, 0.0) + float(match.group(3))
    return totals


def applied_block_events(m: dict[str, float]) -> int:
    """Block events the collector has applied: every one lands in exactly one of these."""
    return int(
        m.get("kvcache_blocks_stored_total", 0)
        + m.get("kvcache_blocks_accessed_total", 0)
        + m.get("kvcache_exporter_unknown_accesses_total", 0)
        + m.get("kvcache_blocks_removed_total", 0)
    )


def _stat_cpu(stat: str) -> tuple[str, float]:
    """(comm, utime + stime in seconds) from a /proc stat line."""
    head, tail = stat.rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads, live and exited), from /proc."""
    return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())[1]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind: libzmq's I/O threads are named ``ZMQbg/...``, the
    Python threads (ingest, HTTP, main) keep the interpreter's name."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm, cpu = _stat_cpu((task / "stat").read_text())
        except OSError:
            continue  # the thread ended
        kind = "zmq" if comm.startswith("ZMQbg") else "python"
        out[kind] = out.get(kind, 0.0) + cpu
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Scraper:
    """Plain-text GETs (no gzip asked), on a kept-alive connection as Prometheus scrapes, or
    on a fresh connection each time.

    The two differ when the server writes headers and body in separate TCP segments: with
    Nagle's algorithm on, the body then waits for the client's delayed ACK (about 40 ms on
    Linux) on a kept-alive connection only. Progress polls use fresh connections so that
    this stall does not blur the end of the ingest.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str, fresh: bool = False) -> tuple[int, str]:
        conn = self._connect() if fresh else self.conn
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        except (OSError, http.client.HTTPException):
            if not fresh:
                self.conn.close()
                self.conn = self._connect()
            raise
        finally:
            if fresh:
                conn.close()

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics", fresh=True)
        if status != 200:
            raise BenchError(f"/metrics answered {status}")
        return parse_metrics(text)

    def timed(self, count: int, fresh: bool) -> tuple[list[float], int]:
        """Wall times of ``count`` scrapes of ``/metrics``, and the page's size."""
        times, size = [], 0
        for _ in range(count):
            t0 = time.perf_counter()
            status, text = self.get("/metrics", fresh=fresh)
            times.append(time.perf_counter() - t0)
            if status != 200:
                raise BenchError(f"/metrics answered {status}")
            size = len(text)
        return times, size

    def close(self) -> None:
        self.conn.close()


def open_xpub(port: int) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    """The engine side: an XPUB bound on ``port``, never dropping (unbounded send queue)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    return ctx, sock


def wait_subscribed(sock: zmq.Socket[Any], timeout_s: float) -> None:
    """Block until the subscriber's subscription reaches us: sending earlier loses frames."""
    if not sock.poll(int(timeout_s * 1000)):
        raise BenchError("no subscriber subscribed in time")
    message = sock.recv()
    if not message or message[0] != 1:
        raise BenchError(f"unexpected XPUB message {message[:16]!r}")


def blast(sock: zmq.Socket[Any], messages: list[list[bytes]]) -> float:
    """Send every message as fast as pyzmq can; returns the monotonic time of the first send."""
    send = sock.send_multipart
    first = time.monotonic()
    for message in messages:
        send(message, copy=False)
    return first


@dataclass(slots=True)
class ExporterRun:
    wall_s: float
    eps: float
    cpu_s: float
    cpu_per_m: float
    cpu_python_s: float
    cpu_zmq_s: float
    polls: int
    scrape_ms_p50: float
    scrape_ms_p90: float
    scrape_fresh_ms_p50: float
    blast_s: float
    scrape_bytes: int
    collector_bytes: int
    tracked: int
    resident: int
    messages: int
    sequence_gaps: int
    decode_errors: int


def run_exporter(data: Stream, args: argparse.Namespace) -> ExporterRun:
    """Start the exporter, blast the frames at it, time ingest and scrapes (step 3)."""
    zport, hport = free_port(), free_port()
    ctx, pub = open_xpub(zport)
    cmd = [
        sys.executable,
        *(["-c", exporter_boot(args.patch)] if args.patch else ["-m", "kvcache_exporter.cli"]),
        f"--source={ENGINE}=tcp://127.0.0.1:{zport}",
        f"--web.listen-address=127.0.0.1:{hport}",
        "--log.level=warn",
        *args.exporter_arg,
    ]
    # The exporter's logs (warnings such as its thrashing alert, which this stream raises) go
    # to a file, shown only when the run fails.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    scraper = Scraper(hport)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"exporter exited with {proc.returncode}")
            try:
                if scraper.get("/readyz")[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise BenchError("exporter not ready after 30 s")
            time.sleep(0.05)
        wait_subscribed(pub, 10)
        time.sleep(0.2)  # settle: let start-up work finish before the clock starts
        cpu0, threads0 = cpu_seconds(proc.pid), thread_cpu(proc.pid)
        first = blast(pub, data.messages)
        blast_s = time.monotonic() - first
        polls, end, cpu1, threads1 = 0, 0.0, 0.0, threads0
        last_progress, last_seen = time.monotonic(), -1
        while True:
            m = scraper.metrics()
            now = time.monotonic()
            polls += 1
            applied = applied_block_events(m)
            if int(m.get("kvcache_exporter_messages_total", 0)) >= len(data.messages) and (
                applied >= data.block_events
            ):
                end, cpu1, threads1 = now, cpu_seconds(proc.pid), thread_cpu(proc.pid)
                break
            if applied != last_seen:
                last_seen, last_progress = applied, now
            elif now - last_progress > STALL_S:
                raise BenchError(
                    f"exporter stalled at {m.get('kvcache_exporter_messages_total')} of "
                    f"{len(data.messages)} messages, {applied} of {data.block_events} block "
                    "events: frames were dropped"
                )
            near = applied >= DENSE_FROM * data.block_events
            time.sleep(POLL_DENSE_S if near else POLL_SPARSE_S)
        final = scraper.metrics()
        if int(final["kvcache_exporter_messages_total"]) != len(data.messages):
            raise BenchError(
                f"exporter counted {final['kvcache_exporter_messages_total']:.0f} messages, "
                f"{len(data.messages)} were sent"
            )
        gaps = int(final.get("kvcache_exporter_sequence_gaps_total", 0))
        if gaps:
            raise BenchError(f"exporter saw {gaps} sequence gaps: frames were dropped")
        if applied_block_events(final) != data.block_events:
            raise BenchError(
                f"exporter applied {applied_block_events(final)} block events, "
                f"{data.block_events} were sent"
            )
        errors = int(final.get("kvcache_exporter_decode_errors_total", 0))
        if errors:
            raise BenchError(f"exporter counted {errors} decode errors")
        times, size = scraper.timed(args.scrapes, fresh=False)
        fresh_times, _ = scraper.timed(args.scrapes, fresh=True)
        wall = end - first
        cpu = cpu1 - cpu0
        return ExporterRun(
            wall_s=wall,
            eps=data.block_events / wall,
            cpu_s=cpu,
            cpu_per_m=cpu / (data.block_events / 1e6),
            cpu_python_s=threads1.get("python", 0.0) - threads0.get("python", 0.0),
            cpu_zmq_s=threads1.get("zmq", 0.0) - threads0.get("zmq", 0.0),
            polls=polls,
            scrape_ms_p50=statistics.median(times) * 1e3,
            scrape_ms_p90=float(np.percentile(times, 90)) * 1e3,
            scrape_fresh_ms_p50=statistics.median(fresh_times) * 1e3,
            blast_s=blast_s,
            scrape_bytes=size,
            collector_bytes=int(final["kvcache_exporter_collector_bytes"]),
            tracked=int(final["kvcache_tracked_blocks"]),
            resident=int(final["kvcache_resident_blocks"]),
            messages=int(final["kvcache_exporter_messages_total"]),
            sequence_gaps=gaps,
            decode_errors=errors,
        )
    except BenchError as exc:
        log.seek(0)
        tail = "".join(log.readlines()[-20:])
        raise BenchError(f"{exc}\n--- exporter log (last lines) ---\n{tail}") from None
    finally:
        scraper.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        pub.close(0)
        ctx.term()


# --- 4. the baseline: a straightforward per-event collector --------------------------------
@dataclass(slots=True)
class BlockRecord:
    """One resident block, as a per-event collector keeps it."""

    stored_at: float
    last_access: float
    accesses: int


class _MediumMetrics:
    """One medium's ``prometheus_client`` children, resolved once (``labels()`` is slow)."""

    def __init__(self, m: _BaselineMetrics, medium: str) -> None:
        labels = (ENGINE, medium)
        self.stored = m.stored.labels(*labels)
        self.accessed = m.accessed.labels(*labels)
        self.restores = m.restores.labels(*labels)
        self.resident = m.resident.labels(*labels)
        self.lifetime = m.lifetime.labels(*labels)
        self.idle = m.idle.labels(*labels)
        self.reuse = m.reuse.labels(*labels)
        self.restore_gap = m.restore_gap.labels(*labels)
        self.accesses_before_evict = m.accesses_before_evict.labels(*labels)
        self.removed: dict[str, Any] = {}
        self._removed_family = m.removed
        self._medium = medium

    def removed_child(self, reason: str) -> Any:
        child = self.removed.get(reason)
        if child is None:
            child = self._removed_family.labels(ENGINE, self._medium, reason)
            self.removed[reason] = child
        return child


class _BaselineMetrics:
    """The same metric set as the exporter, as ``prometheus_client`` objects."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        em = ("engine", "medium")
        d = RESIDENCY_BUCKETS
        self.events = Counter("kvcache_events", "events", ("engine", "type"), registry=r)
        self.stored = Counter("kvcache_blocks_stored", "stored", em, registry=r)
        self.removed = Counter("kvcache_blocks_removed", "removed", (*em, "reason"), registry=r)
        self.accessed = Counter("kvcache_blocks_accessed", "accessed", em, registry=r)
        self.restores = Counter("kvcache_block_restores", "restores", em, registry=r)
        self.unknown_removals = Counter(
            "kvcache_exporter_unknown_removals", "unknown", ("engine",), registry=r
        ).labels(ENGINE)
        self.unknown_accesses = Counter(
            "kvcache_exporter_unknown_accesses", "unknown", ("engine",), registry=r
        ).labels(ENGINE)
        self.resident = Gauge("kvcache_resident_blocks", "resident", em, registry=r)
        self.tracked = Gauge("kvcache_tracked_blocks", "tracked", ("engine",), registry=r).labels(
            ENGINE
        )
        self.lifetime = Histogram("kvcache_block_lifetime_seconds", "l", em, buckets=d, registry=r)
        self.idle = Histogram(
            "kvcache_block_idle_before_evict_seconds", "i", em, buckets=d, registry=r
        )
        self.reuse = Histogram("kvcache_block_reuse_gap_seconds", "r", em, buckets=d, registry=r)
        self.restore_gap = Histogram(
            "kvcache_block_restore_gap_seconds", "g", em, buckets=d, registry=r
        )
        self.accesses_before_evict = Histogram(
            "kvcache_block_accesses_before_evict", "a", em, buckets=ACCESS_COUNT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._media: dict[str, _MediumMetrics] = {}
        self._events: dict[str, Any] = {}

    def medium(self, name: str) -> _MediumMetrics:
        found = self._media.get(name)
        if found is None:
            found = self._media[name] = _MediumMetrics(self, name)
        return found

    def event(self, kind: str) -> Any:
        found = self._events.get(kind)
        if found is None:
            found = self._events[kind] = self.events.labels(ENGINE, kind)
        return found


def fold(h: int | bytes) -> int:
    """A wire hash as uint64 (SPEC §2.1)."""
    if isinstance(h, int):
        return h & U64
    return int.from_bytes(h[-8:], "big")


class PerEventCollector:
    """The straightforward design: decode to Python objects, update per block, per event.

    Same semantics as the exporter (SPEC §2.1.1, §3): re-announced stores are accesses, a
    store of a remembered removed hash is a restore, removed hashes are remembered up to
    ``removed_memory`` (least recently removed forgotten first).
    """

    def __init__(self, removed_memory: int = 1_000_000) -> None:
        self.metrics = _BaselineMetrics()
        self.resident: dict[tuple[int, str], BlockRecord] = {}
        self.removed: OrderedDict[tuple[int, str], float] = OrderedDict()
        self.removed_memory = removed_memory
        self.block_events = 0

    def handle(self, payload: bytes) -> None:
        batch = msgspec.msgpack.decode(payload)
        ts: float = batch[0]
        for event in batch[1]:
            self.event(ts, event)
        self.metrics.tracked.set(len(self.resident))

    def event(self, ts: float, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self.metrics.event(str(kind)).inc()
        medium = event.get("medium") or "unknown"
        m = self.metrics.medium(medium)
        hashes = event.get("block_hashes", ())
        self.block_events += len(hashes)
        if kind == "BlockStored":
            for h in hashes:
                self.store(ts, (fold(h), medium), m)
        elif kind == "BlockRemoved":
            removed = m.removed_child(event.get("reason") or "evicted")
            for h in hashes:
                self.remove(ts, (fold(h), medium), m, removed)
        elif kind == "BlockAccessed":
            for h in hashes:
                self.access(ts, (fold(h), medium), m)
        elif kind == "AllBlocksCleared":
            for key in list(self.resident):
                self.remove(ts, key, self.metrics.medium(key[1]), m.removed_child("cleared"))

    def store(self, ts: float, key: tuple[int, str], m: _MediumMetrics) -> None:
        record = self.resident.get(key)
        if record is not None:  # a re-announcement is an access
            self.access(ts, key, m)
            return
        removed_at = self.removed.pop(key, None)
        if removed_at is not None:
            m.restore_gap.observe(ts - removed_at)
            m.restores.inc()
        self.resident[key] = BlockRecord(ts, ts, 0)
        m.stored.inc()
        m.resident.inc()

    def access(self, ts: float, key: tuple[int, str], m: _MediumMetrics) -> None:
        record = self.resident.get(key)
        if record is None:
            self.metrics.unknown_accesses.inc()
            return
        m.reuse.observe(ts - record.last_access)
        record.last_access = ts
        record.accesses += 1
        m.accessed.inc()

    def remove(self, ts: float, key: tuple[int, str], m: _MediumMetrics, removed: Any) -> None:
        removed.inc()
        record = self.resident.pop(key, None)
        if record is None:
            self.metrics.unknown_removals.inc()
            return
        m.lifetime.observe(ts - record.stored_at)
        m.idle.observe(ts - record.last_access)
        m.accesses_before_evict.observe(record.accesses)
        m.resident.dec()
        self.removed.pop(key, None)
        self.removed[key] = ts
        if len(self.removed) > self.removed_memory:
            self.removed.popitem(last=False)


def deep_size(root: object) -> int:
    """Bytes of every object reachable through containers and slots, each counted once."""
    seen: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str):  # label strings are shared, not per block
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, tuple | list):
            stack.extend(obj)
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, name) for name in obj.__slots__)
    return total


def baseline_worker(args: argparse.Namespace) -> None:
    """The baseline's process: subscribe, report ready, consume, report (JSON lines)."""
    collector = PerEventCollector(args.removed_memory)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)  # never drop: the run is invalid if anything is lost
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(args.connect)

    def report(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    report(ready=True)
    cpu0 = time.process_time()
    messages, gaps, expected_seq = 0, 0, 0
    first_recv = 0.0
    while messages < args.expect_messages:
        if not sock.poll(int(STALL_S * 1000)):
            report(error=f"stalled at {messages} of {args.expect_messages} messages")
            return
        _topic, seq_frame, payload = sock.recv_multipart()
        if not messages:
            first_recv = time.monotonic()
        seq = int.from_bytes(seq_frame, "big")
        gaps += seq != expected_seq
        expected_seq = seq + 1
        messages += 1
        collector.handle(payload)
    done = time.monotonic()
    cpu = time.process_time() - cpu0
    scrapes = []
    from prometheus_client import generate_latest

    for _ in range(args.scrapes):
        t0 = time.perf_counter()
        generate_latest(collector.metrics.registry)
        scrapes.append(time.perf_counter() - t0)
    resident_bytes = deep_size(collector.resident)
    removed_bytes = deep_size(collector.removed)
    report(
        done=done,
        first_recv=first_recv,
        cpu_s=cpu,
        messages=messages,
        gaps=gaps,
        block_events=collector.block_events,
        resident=len(collector.resident),
        remembered=len(collector.removed),
        resident_bytes=resident_bytes,
        removed_bytes=removed_bytes,
        scrape_ms_p50=statistics.median(scrapes) * 1e3,
    )
    sock.close(0)
    ctx.term()


@dataclass(slots=True)
class BaselineRun:
    wall_s: float
    eps: float
    cpu_s: float
    cpu_per_m: float
    bytes_per_resident: float
    bytes_per_entry: float
    resident: int
    remembered: int
    scrape_ms_p50: float


def run_baseline(data: Stream, args: argparse.Namespace) -> BaselineRun:
    """The per-event collector in its own process, fed exactly as the exporter is."""
    port = free_port()
    ctx, pub = open_xpub(port)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--baseline-worker",
        f"--connect=tcp://127.0.0.1:{port}",
        f"--expect-messages={len(data.messages)}",
        f"--removed-memory={args.removed_memory}",
        f"--scrapes={args.scrapes}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        if "ready" not in json.loads(proc.stdout.readline() or "{}"):
            raise BenchError("baseline worker did not start")
        wait_subscribed(pub, 10)
        time.sleep(0.2)  # same settle as the exporter's
        first = blast(pub, data.messages)
        result = json.loads(proc.stdout.readline() or '{"error": "worker died"}')
        if "error" in result:
            raise BenchError(f"baseline: {result['error']}")
        if result["gaps"] or result["block_events"] != data.block_events:
            raise BenchError(f"baseline lost frames: {result}")
        wall = result["done"] - first
        entries = result["resident"] + result["remembered"]
        return BaselineRun(
            wall_s=wall,
            eps=data.block_events / wall,
            cpu_s=result["cpu_s"],
            cpu_per_m=result["cpu_s"] / (data.block_events / 1e6),
            bytes_per_resident=result["resident_bytes"] / max(result["resident"], 1),
            bytes_per_entry=(result["resident_bytes"] + result["removed_bytes"]) / max(entries, 1),
            resident=result["resident"],
            remembered=result["remembered"],
            scrape_ms_p50=result["scrape_ms_p50"],
        )
    finally:
        proc.wait(30)
        pub.close(0)
        ctx.term()


# --- 5. memory sweep -----------------------------------------------------------------------
def memory_sweep(sizes: list[int]) -> dict[int, tuple[float, float]]:
    """Bytes per resident block after storing N fresh blocks (no removals): the hash table's
    alone (what grows with tracked blocks), and all collector bytes (fixed parts included)."""
    out: dict[int, tuple[float, float]] = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        collector = BlockLifecycleCollector()
        collector.media.id_of("GPU")
        keys = rng.integers(0, 2**63, size=n, dtype=np.uint64)
        for start in range(0, n, 65_536):
            chunk = keys[start : start + 65_536]
            size = chunk.shape[0]
            collector.apply(
                EventBatch(
                    op=np.full(size, OP_STORE, np.uint8),
                    block_hash=chunk,
                    ts=np.zeros(size, np.float64),
                    medium=np.ones(size, np.uint8),
                    reason=np.zeros(size, np.uint8),
                )
            )
        snap = collector.snapshot()
        out[n] = (collector.table.nbytes / snap.tracked, snap.table_bytes / snap.tracked)
    return out


# --- report --------------------------------------------------------------------------------
RunT = TypeVar("RunT", "ExporterRun", "BaselineRun")


def median_run(runs: list[RunT]) -> RunT | None:
    """The run with the median throughput (the lower middle one for an even count)."""
    if not runs:
        return None
    return sorted(runs, key=lambda r: r.eps)[(len(runs) - 1) // 2]


def _cpu_range(runs: list[ExporterRun]) -> str:
    values = sorted(r.cpu_per_m for r in runs)
    return f"{values[0]:.3f}-{values[-1]:.3f}"


def _spread(runs: list[ExporterRun] | list[BaselineRun]) -> str:
    if len(runs) < 2:
        return ""
    rates = sorted(r.eps / 1e6 for r in runs)
    return f"; median of {len(runs)}, {rates[0]:.2f}-{rates[-1]:.2f}"


@dataclass(slots=True)
class Report:
    machine: dict[str, str]
    config: dict[str, Any]
    stream: dict[str, Any]
    in_process: InProcess | None = None
    exporter: ExporterRun | None = None  # the median run by throughput
    baseline: BaselineRun | None = None
    exporter_runs: list[ExporterRun] = field(default_factory=list)
    baseline_runs: list[BaselineRun] = field(default_factory=list)
    memory_sweep: dict[int, tuple[float, float]] = field(default_factory=dict)


def machine_info() -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "msgspec": msgspec.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "prometheus_client": version("prometheus-client"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": git_commit(),
    }


def git_commit() -> str:
    """The checkout measured: short commit, ``+dirty`` when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(report: Report) -> Iterator[str]:
    """The figures table, one line per figure, targets with PASS/MISS."""
    s = report.stream
    yield (
        f"stream: {s['messages']:,} messages, {s['events']:,} events, {s['block_events']:,} "
        f"block events ({s['by_type']}), {s['payload_bytes'] / 1e6:.1f} MB, "
        f"{s['requests']:,} requests over {s['engine_seconds']:,.0f} s of engine clock, "
        f"hit ratio {s['hit_ratio']:.2f}, built in {s['build_s']:.1f} s"
    )
    m = report.machine
    yield (
        f"machine: {m['nproc']} cpus ({m['cpu']}), python {m['python']}, numpy {m['numpy']}, "
        f"msgspec {m['msgspec']}, pyzmq {m['pyzmq']}, loadavg {m['loadavg']}, "
        f"commit {m['commit']}, {m['date']}"
    )
    if report.config.get("patch"):
        patched = ",".join(f"{n}={v}" if v else n for n, v in report.config["patch"])
        yield f"EXPERIMENT: the exporter was patched as it started: {patched}"
    yield ""
    rows: list[tuple[str, str, str]] = []
    ip = report.in_process
    if ip is not None:
        n = s["block_events"]
        rest = ip.pipeline_s - ip.decode_s - ip.apply_s
        yield f"in-process pipeline: {ip.pipeline}"
        rows += [
            ("in-process decode (EventStream)", f"{n / ip.decode_s / 1e6:.2f} M block ev/s "
             f"({ip.decode_s:.2f} s)", ""),
            ("in-process decode, GC off (experiment)",
             f"{n / ip.decode_nogc_s / 1e6:.2f} M block ev/s ({ip.decode_nogc_s:.2f} s)", ""),
            ("in-process apply (collector)", f"{n / ip.apply_s / 1e6:.2f} M block ev/s "
             f"({ip.apply_s:.2f} s)", ""),
            ("in-process whole pipeline", f"{n / ip.pipeline_s / 1e6:.2f} M block ev/s "
             f"({ip.pipeline_s:.2f} s; {rest:+.2f} s beyond decode + apply)", ""),
            ("  stage split (same run)", ", ".join(
                f"{name} {sec:.2f} s ({sec / n * 1e9:.0f} ns/ev)" for name, sec in
                sorted(ip.stage_s.items(), key=lambda kv: -kv[1])),
             f"table: {'compiled' if ip.compiled_table else 'numpy reference'}"),
        ]  # fmt: skip
    ex, bl = report.exporter, report.baseline
    if ex is not None:
        rows.append(
            (
                "exporter end to end",
                f"{ex.eps / 1e6:.2f} M block ev/s ({ex.wall_s:.2f} s; sent in {ex.blast_s:.2f} s"
                f"{_spread(report.exporter_runs)})",
                f">= 3.0 M  {_verdict(ex.eps >= TARGET_EPS)}",
            )
        )
    if bl is not None:
        rows.append(
            (
                "per-event baseline",
                f"{bl.eps / 1e6:.3f} M block ev/s "
                f"({bl.wall_s:.2f} s{_spread(report.baseline_runs)})",
                "",
            )
        )
    if ex is not None and bl is not None:
        ratio = ex.eps / bl.eps
        rows.append(
            (
                "ratio exporter / baseline",
                f"{ratio:.1f}x",
                f">= 25x  {_verdict(ratio >= TARGET_RATIO)}",
            )
        )
    if ex is not None:
        rows += [
            ("exporter CPU per M block events",
             f"{ex.cpu_per_m:.3f} CPU-s ({ex.cpu_s:.2f} s: python threads {ex.cpu_python_s:.2f}, "
             f"zmq I/O {ex.cpu_zmq_s:.2f}; runs {_cpu_range(report.exporter_runs)})",
             f"<= 0.3  {_verdict(ex.cpu_per_m <= TARGET_CPU_PER_M)}"),
            ("scrape /metrics p50 / p90 (kept alive)",
             f"{ex.scrape_ms_p50:.2f} / {ex.scrape_ms_p90:.2f} ms ({ex.scrape_bytes / 1e3:.0f} kB)",
             f"<= 10 ms  {_verdict(ex.scrape_ms_p90 <= TARGET_SCRAPE_MS)}"),
            ("scrape /metrics p50 (new connection)", f"{ex.scrape_fresh_ms_p50:.2f} ms", ""),
        ]  # fmt: skip
    if bl is not None:
        rows.append(("baseline CPU per M block events", f"{bl.cpu_per_m:.3f} CPU-s", ""))
        rows.append(("baseline scrape (generate_latest) p50", f"{bl.scrape_ms_p50:.2f} ms", ""))
    if report.memory_sweep:
        worst = max(table for table, _ in report.memory_sweep.values())
        sweep = ", ".join(f"{n:,}: {t:.0f}" for n, (t, _) in report.memory_sweep.items())
        total = ", ".join(f"{n:,}: {a:.0f}" for n, (_, a) in report.memory_sweep.items())
        rows += [
            ("bytes / tracked block (table, sweep worst)", f"{worst:.0f} B  [{sweep}]",
             f"<= 48  {_verdict(worst <= TARGET_BYTES)}"),
            ("  same, all collector bytes", f"[{total}]", ""),
        ]  # fmt: skip
    if ex is not None:
        rows.append(
            ("bytes / tracked block (this run)",
             f"{ex.collector_bytes / max(ex.tracked, 1):,.0f} B "
             f"({ex.collector_bytes / 1e6:.1f} MB / {ex.tracked:,} tracked)", "incl. ghosts")
        )  # fmt: skip
    if ip is not None:
        other = ip.collector_bytes - ip.table_bytes
        rows.append(
            ("  of which (in process, same state)",
             f"table {ip.table_bytes / 1e6:.1f} MB ({ip.table_bytes / max(ip.table_live, 1):.0f}"
             f" B x {ip.table_live:,} entries, {ip.ghosts:,} of them removed keys), "
             f"other {other / 1e6:.1f} MB",
             "")
        )  # fmt: skip
    if bl is not None:
        rows.append(
            ("baseline bytes / resident block, / entry",
             f"{bl.bytes_per_resident:.0f} B, {bl.bytes_per_entry:.0f} B "
             f"({bl.resident:,} resident, {bl.remembered:,} remembered)", "")
        )  # fmt: skip
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    yield f"{'figure':<{width}}  {'measured':<{vwidth}}  target"
    for name, value, target in rows:
        yield f"{name:<{width}}  {value:<{vwidth}}  {target}".rstrip()


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--min-block-events",
        type=int,
        default=2_000_000,
        help="loop the trace until the stream holds this many block events",
    )
    p.add_argument(
        "--gpu-blocks",
        type=int,
        default=8_000,
        help="GPU prefix-cache capacity of the simulated engine, in blocks",
    )
    p.add_argument(
        "--requests-per-batch",
        type=int,
        default=8,
        help="requests whose events go into one message (an engine step)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="divide the trace's timestamps by this: denser engine time (the trace's own "
        "clock holds about 150 block events per engine-second)",
    )
    p.add_argument(
        "--report-hits",
        action="store_true",
        help="the engine also sends BlockAccessed for prefix hits (native extension)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="exporter and baseline runs (alternated); the median is reported",
    )
    p.add_argument(
        "--scrapes", type=_at_least_one, default=20, help="timed /metrics scrapes (>= 1)"
    )
    p.add_argument(
        "--removed-memory",
        type=int,
        default=1_000_000,
        help="removed hashes the baseline remembers (the exporter's default)",
    )
    p.add_argument(
        "--patch",
        type=parse_patches,
        default=[],
        metavar="LIST",
        help="EXPERIMENT: monkeypatch the exporter as it starts, e.g. "
        "batch-rows=65536,gc-freeze,gc-threshold=100000 (see PATCHES)",
    )
    p.add_argument(
        "--exporter-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the exporter process (repeatable)",
    )
    p.add_argument(
        "--sweep",
        default="10000,100000,1000000",
        help="block counts for the memory sweep (comma-separated; empty: skip)",
    )
    p.add_argument(
        "--skip", default="", help="comma-separated parts to skip: inprocess,exporter,baseline"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the top N functions of a cProfile of the per-engine pipeline",
    )
    p.add_argument(
        "--frames",
        type=Path,
        help="a recorded stream (e.g. tests/fixtures/streams/vllm-0.33.0-hybrid.frames.gz) "
        "instead of the simulated trace; --min-block-events and the trace options are ignored",
    )
    p.add_argument("--json", type=Path, help="write every figure to this file")
    # The baseline's own process (internal).
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)
    p.add_argument("--expect-messages", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The in-process pipeline logs alerts (this stream thrashes on purpose); keep them off
    # the figures. The exporter process's logs go to a file (run_exporter).
    logging.getLogger("kvcache_exporter").addHandler(logging.NullHandler())
    logging.getLogger("kvcache_exporter").propagate = False
    if args.baseline_worker:
        baseline_worker(args)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    data = recorded_stream(args.frames) if args.frames else build_stream(args)
    report = Report(
        machine=machine_info(),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        stream={
            "messages": len(data.messages),
            "events": data.events,
            "block_events": data.block_events,
            "by_type": data.by_type,
            "payload_bytes": data.payload_bytes,
            "requests": data.requests,
            "hit_ratio": data.hit_ratio,
            "engine_seconds": data.engine_seconds,
            "build_s": data.build_s,
        },
    )
    try:
        if "inprocess" not in skip:
            with InProcessPatches(args.patch):
                report.in_process = run_in_process(data)
            if not report.in_process.expected_counts_ok:
                raise BenchError("in-process collector counts differ from the stream")
        # Alternated, so that a burst of load from elsewhere hits both sides alike.
        for _ in range(args.repeat):
            if "exporter" not in skip:
                report.exporter_runs.append(run_exporter(data, args))
            if "baseline" not in skip:
                report.baseline_runs.append(run_baseline(data, args))
        report.exporter = median_run(report.exporter_runs)
        report.baseline = median_run(report.baseline_runs)
    except BenchError as exc:
        print(f"ingest bench: INVALID RUN: {exc}", file=sys.stderr)
        return 1
    sizes = [int(x) for x in args.sweep.split(",") if x]
    report.memory_sweep = memory_sweep(sizes)
    for line in render(report):
        print(line)
    if args.profile:
        print()
        with InProcessPatches(args.patch):
            print(profile_in_process(data, args.profile))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
