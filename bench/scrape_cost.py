"""Scrape cost: one ``/metrics`` scrape as Prometheus makes it, every family populated.

For 1 engine and for 8 engines (``--engines``), each on 3 media (GPU, CPU, DISK) with two
KV-cache groups and two LoRA adapters, the bench:

1. **Feeds** the real ``kvcache-exporter`` process (one ``--source NAME=tcp://…,bind`` per
   engine): per engine, one pyzmq XPUB socket (a PUB that also says when the subscription
   has arrived) connects and sends ``--batches`` vLLM map-form batches ``[ts, events, 0]``
   (msgspec, frames ``[topic, seq 8-byte BE, payload]``), one engine-second apart. Every
   batch stores blocks on every (medium, group) place (a third of the runs as restores of
   removed blocks, adapters base / ``sql-lora`` / ``chat-lora``), hits resident blocks
   (``BlockAccessed``), evicts beyond each place's capacity (``reason=evicted``) and now and
   then frees a run (``reason=preempted``); one ``AllBlocksCleared`` near the end. So the
   lifecycle histograms, the what-if, adapter, group, alert and trend families all have
   series. It waits until ``kvcache_exporter_messages_total`` and the stored-block counters
   equal what was sent.
2. **Scrapes** ``/metrics`` ``--scrapes`` times on one kept-alive ``http.client`` connection
   per variant: text 0.0.4 (``Accept: text/plain``) and OpenMetrics 1.0 (``Accept:
   application/openmetrics-text; version=1.0.0``), each with and without ``Accept-Encoding:
   gzip``. Latency is request sent to last body byte read; CPU per scrape is the server
   process's ``utime + stime`` over the timed scrapes.
3. **Baseline**, same run: the exporter's page rebuilt as plain ``prometheus_client``
   ``Counter``/``Gauge``/``Histogram`` objects (same names, labels and series; ``_created``
   series off, as the exporter has none), plus the same process/platform/GC collectors, in a
   worker process. It times ``generate_latest`` (and OpenMetrics', and gzip level 1 as the
   exporter's server applies) in process, then serves that registry through the exporter's
   own HTTP server class, scraped exactly like the exporter. The HTTP figure is the one to
   compare: both sides then pay the same HTTP, encoder and gzip; what differs is only how
   the samples are produced (the exporter: engine snapshots walked at every scrape).

Targets (issue): p50 <= 5 ms for one engine, <= 50 ms for 8 engines x 3 media; every
variant is judged. A run whose ingest does not add up is refused (exit 1, ``INVALID RUN``).

    python bench/scrape_cost.py                     # 200 scrapes per variant, 1 and 8 engines
    python bench/scrape_cost.py --scrapes 50 --engines 8 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import zmq

import ingest  # bench/ingest.py: the checkout a run measured

MEDIA: Final = ("GPU", "CPU", "DISK")
CAPACITY: Final = {"GPU": 512, "CPU": 1024, "DISK": 2048}  # blocks per (medium, group)
GROUPS: Final = ((0, "full_attention", None), (1, "sliding_window", 1024))
ADAPTERS: Final = ((None, None), (1, "sql-lora"), (2, "chat-lora"))  # (lora_id, lora_name)
RUN: Final = 8  # blocks per BlockStored
RUNS_PER_PLACE: Final = 3  # BlockStored events per place per batch, one per adapter
HITS_PER_PLACE: Final = 16  # hashes per BlockAccessed
RESTORE_SHARE: Final = 0.35  # store runs that bring back removed blocks
BLOCK_SIZE: Final = 16
TOKENS: Final = msgspec.Raw(
    b"\xdc" + (RUN * BLOCK_SIZE).to_bytes(2, "big") + bytes(RUN * BLOCK_SIZE)
)

VARIANTS: Final = (
    ("text", "text/plain", False),
    ("text", "text/plain", True),
    ("openmetrics", "application/openmetrics-text; version=1.0.0", False),
    ("openmetrics", "application/openmetrics-text; version=1.0.0", True),
)
TARGET_MS: Final = {1: 5.0, 8: 50.0}  # p50, by engine count (3 media each)
KEEPALIVE_S: Final = 10.0  # an empty batch per engine this often: no source_stalled mid-run
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_SAMPLE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


class BenchError(RuntimeError):
    """The run is not valid (frames lost, counts differ, a process died)."""


# --- 1. the stream -------------------------------------------------------------------------
@dataclass(slots=True)
class EngineStream:
    payloads: list[bytes]
    last_ts: float
    stored: int = 0
    accessed: int = 0
    removed: int = 0
    restored: int = 0
    clears: int = 0


class _Place:
    """One (medium, group) of a simulated engine: FIFO residency and recently removed hashes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: dict[int, None] = {}
        self.removed: list[int] = []

    def evict(self, count: int) -> list[int]:
        out = []
        for h in self.resident:
            out.append(h)
            if len(out) == count:
                break
        for h in out:
            del self.resident[h]
        self.removed.extend(out)
        del self.removed[: max(0, len(self.removed) - 8 * self.capacity)]
        return out


def engine_stream(engine: int, batches: int, start_ts: float, seed: int) -> EngineStream:
    """One engine's batches: stores (fresh and restored), hits, evictions, frees, a clear."""
    rng = random.Random(seed * 1_000 + engine)
    places = [(m, g, _Place(CAPACITY[m])) for m in MEDIA for g in GROUPS]
    next_hash = (engine + 1) << 40
    out = EngineStream([], start_ts)
    clear_at = batches - 40 if batches > 80 else -1
    for b in range(batches):
        ts = start_ts + b
        events: list[dict[str, Any]] = []
        if b == clear_at:
            events.append({"type": "AllBlocksCleared"})
            out.clears += 1
            for _, _, place in places:
                place.removed.extend(place.resident)
                place.resident.clear()
        for medium, (group, kind, window), place in places:
            for lora_id, lora_name in ADAPTERS:
                pool = [h for h in place.removed[-4 * RUN :] if h not in place.resident]
                if len(pool) >= RUN and rng.random() < RESTORE_SHARE:
                    hashes = pool[:RUN]
                    taken = set(hashes)
                    place.removed = [h for h in place.removed if h not in taken]
                    out.restored += RUN
                else:
                    hashes = list(range(next_hash, next_hash + RUN))
                    next_hash += RUN
                parent = next(reversed(place.resident)) if place.resident and b % 2 else None
                events.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": hashes,
                        "parent_block_hash": parent,
                        "token_ids": TOKENS,
                        "block_size": BLOCK_SIZE,
                        "lora_id": lora_id,
                        "medium": medium,
                        "lora_name": lora_name,
                        "extra_keys": None,
                        "group_idx": group,
                        "kv_cache_spec_kind": kind,
                        "kv_cache_spec_sliding_window": window,
                    }
                )
                place.resident.update(dict.fromkeys(hashes))
                out.stored += RUN
            resident = list(place.resident)
            hits = rng.sample(resident, min(HITS_PER_PLACE, len(resident)))
            events.append(
                {
                    "type": "BlockAccessed",
                    "block_hashes": hits,
                    "medium": medium,
                    "group_idx": group,
                }
            )
            out.accessed += len(hits)
            over = len(place.resident) - place.capacity
            if over > 0:
                gone = place.evict(over)
                events.append(
                    {
                        "type": "BlockRemoved",
                        "block_hashes": gone,
                        "medium": medium,
                        "group_idx": group,
                        "remaining_copy_counts": None,
                        "reason": "evicted",
                    }
                )
                out.removed += len(gone)
            if b % 10 == 5 and len(place.resident) > RUN:
                gone = place.evict(RUN)
                events.append(
                    {
                        "type": "BlockRemoved",
                        "block_hashes": gone,
                        "medium": medium,
                        "group_idx": group,
                        "remaining_copy_counts": None,
                        "reason": "preempted",
                    }
                )
                out.removed += len(gone)
        out.payloads.append(msgspec.msgpack.encode([ts, events, 0]))
        out.last_ts = ts
    return out


# --- helpers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sums(text: str) -> dict[str, float]:
    """Each sample name's value summed over its series."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and line[0] != "#" and (match := _SAMPLE.match(line)):
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(3))
    return totals


def series_count(text: str, prefix: str = "") -> int:
    """Sample lines of a text-format page (those whose name starts with ``prefix``)."""
    return sum(
        1 for line in text.splitlines() if line and line[0] != "#" and line.startswith(prefix)
    )


def get(conn: http.client.HTTPConnection, accept: str, use_gzip: bool) -> tuple[bytes, str]:
    """One scrape on a kept-alive connection: the body as sent and its Content-Encoding."""
    conn.request(
        "GET",
        "/metrics",
        headers={"Accept": accept, "Accept-Encoding": "gzip" if use_gzip else "identity"},
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise BenchError(f"/metrics answered {response.status}")
    return body, response.getheader("Content-Encoding", "")


def wait_http(port: int, proc: subprocess.Popen[Any], path: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not 200 after {timeout_s:.0f} s")
        time.sleep(0.05)


@dataclass(slots=True)
class Timing:
    p50_ms: float
    p90_ms: float
    cpu_ms: float  # server process CPU per scrape
    body_bytes: int
    reconnects: int = 0


def timed_scrapes(port: int, pid: int, accept: str, use_gzip: bool, n: int, warmup: int) -> Timing:
    """``n`` scrapes on one kept-alive connection (after ``warmup`` untimed ones)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(warmup):
            get(conn, accept, use_gzip)
        sock, reconnects, times = conn.sock, 0, []
        cpu0 = cpu_seconds(pid)
        for _ in range(n):
            t0 = time.perf_counter()
            body, encoding = get(conn, accept, use_gzip)
            times.append(time.perf_counter() - t0)
            if conn.sock is not sock:  # http.client reopened it: not kept alive
                reconnects, sock = reconnects + 1, conn.sock
        cpu = cpu_seconds(pid) - cpu0
        if use_gzip and encoding != "gzip":
            raise BenchError("asked for gzip, got an uncompressed body")
        return Timing(
            statistics.median(times) * 1e3,
            float(np.percentile(times, 90)) * 1e3,
            cpu / n * 1e3,
            len(body),
            reconnects,
        )
    finally:
        conn.close()


# --- 3. the baseline worker ----------------------------------------------------------------
def plain_registry(page: str) -> Any:
    """The page's ``kvcache_*`` families as plain prometheus_client objects, and the exporter's
    process/platform/GC collectors: the same series, produced the ordinary way."""
    import prometheus_client as pc
    from prometheus_client.parser import text_string_to_metric_families

    pc.disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = pc.CollectorRegistry(auto_describe=False)
    metric: Any
    for family in text_string_to_metric_families(page):
        if not family.name.startswith("kvcache_") or not family.samples:
            continue
        # Label names in the page's order (the catalog's), so the samples read the same.
        labelnames = list(dict.fromkeys(k for s in family.samples for k in s.labels if k != "le"))
        if family.type == "histogram":
            # One bucket set per family, as prometheus_client has it: the first series'. (The
            # what-if's reuse distances are multiples of each medium's capacity, so its bounds
            # differ by medium; the number of buckets, hence of series, is the same.)
            first = next(s.labels for s in family.samples if "le" in s.labels)
            same = {k: v for k, v in first.items() if k != "le"}
            bounds = [
                float(s.labels["le"])
                for s in family.samples
                if "le" in s.labels and {k: v for k, v in s.labels.items() if k != "le"} == same
            ]
            metric = pc.Histogram(
                family.name, family.documentation, labelnames, registry=registry, buckets=bounds
            )
            counts = {
                tuple(sorted(s.labels.items())): s.value
                for s in family.samples
                if s.name.endswith("_count")
            }
            for s in family.samples:
                if s.name.endswith("_sum"):
                    count = counts[tuple(sorted(s.labels.items()))]
                    child = metric.labels(**s.labels) if labelnames else metric
                    if count:
                        child.observe(s.value / count)
        else:
            cls = pc.Counter if family.type == "counter" else pc.Gauge
            metric = cls(family.name, family.documentation, labelnames, registry=registry)
            for s in family.samples:
                child = metric.labels(**s.labels) if labelnames else metric
                if cls is pc.Counter:
                    child.inc(s.value)
                else:
                    child.set(s.value)
    pc.ProcessCollector(registry=registry)
    pc.PlatformCollector(registry=registry)
    pc.GCCollector(registry=registry)
    return registry


def baseline_worker(args: argparse.Namespace) -> None:
    """The baseline's process: build the registry, time the encoders in process, report one
    JSON line, then serve the registry over HTTP until stdin closes."""
    from prometheus_client.exposition import choose_encoder

    from kvcache_exporter.sinks.http import MetricsHTTPServer, Routes

    registry = plain_registry(Path(args.page).read_text())
    in_process: dict[str, Any] = {}
    for fmt, accept, use_gzip in VARIANTS:
        encoder, _ = choose_encoder(accept)
        times, body = [], b""
        for i in range(args.warmup + args.scrapes):
            t0 = time.perf_counter()
            body = encoder(registry)
            if use_gzip:
                body = gzip.compress(body, compresslevel=1)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        in_process[f"{fmt}{'+gzip' if use_gzip else ''}"] = {
            "p50_ms": statistics.median(times) * 1e3,
            "p90_ms": float(np.percentile(times, 90)) * 1e3,
            "body_bytes": len(body),
        }
    text = choose_encoder("text/plain")[0](registry).decode()

    def library_exposition(registry: Any, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    routes = Routes(
        telemetry_path="/metrics",
        metrics=lambda accept: library_exposition(registry, accept),
        ready=lambda: (True, "ready"),
        summary=dict,
        export=lambda _query: (b"", "text/plain"),
    )
    server = MetricsHTTPServer(("127.0.0.1", args.port), routes)
    server.start()
    print(
        json.dumps(
            {
                "in_process": in_process,
                "series": series_count(text),
                "kvcache_series": series_count(text, "kvcache_"),
            }
        ),
        flush=True,
    )
    sys.stdin.read()
    server.stop()


# --- 2. one configuration ------------------------------------------------------------------
@dataclass(slots=True)
class Variant:
    format: str
    gzip: bool
    exporter: Timing
    baseline_http: Timing
    baseline_in_process: dict[str, float]


@dataclass(slots=True)
class ConfigRun:
    engines: int
    messages: int
    block_events: int
    payload_mb: float
    ingest_s: float
    series: int
    kvcache_series: int
    baseline_series: int
    baseline_kvcache_series: int
    families_populated: int
    families_total: int
    families_empty: list[str]
    series_at_end: int
    variants: list[Variant] = field(default_factory=list)


def exporter_command() -> list[str]:
    script = Path(sys.executable).with_name("kvcache-exporter")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvcache_exporter.cli"]


def run_config(engines: int, args: argparse.Namespace) -> ConfigRun:
    from kvcache_exporter.catalog import FAMILIES, OTLP_EXPORTS
    from kvcache_exporter.protocol.encode import frames

    start_ts = time.time() - args.batches - 5
    streams = [engine_stream(e, args.batches, start_ts, args.seed) for e in range(engines)]
    zports, hport, bport = [free_port() for _ in range(engines)], free_port(), free_port()
    names = [f"engine-{e}" for e in range(engines)]
    cmd = [
        *exporter_command(),
        "--web.listen-address",
        f"127.0.0.1:{hport}",
        "--log.level",
        "warn",
        *(
            a
            for name, port in zip(names, zports, strict=True)
            for a in ("--source", f"{name}=tcp://127.0.0.1:{port},bind")
        ),
        *args.exporter_arg,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_EXPORTER_")}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    page_file = tempfile.NamedTemporaryFile("w", suffix=".prom", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    ctx: zmq.Context[Any] = zmq.Context()
    pubs: list[zmq.Socket[Any]] = []
    worker: subprocess.Popen[str] | None = None
    seqs = [0] * engines
    last_keepalive = time.monotonic()

    def keepalive(force: bool = False) -> None:
        nonlocal last_keepalive
        if force or time.monotonic() - last_keepalive >= KEEPALIVE_S:
            for e, pub in enumerate(pubs):
                empty = msgspec.msgpack.encode([streams[e].last_ts, [], 0])
                pub.send_multipart(frames("kv-events", seqs[e], empty))
                seqs[e] += 1
            last_keepalive = time.monotonic()

    try:
        wait_http(hport, proc, "/healthz")
        for port in zports:
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.setsockopt(zmq.LINGER, 0)
            pub.connect(f"tcp://127.0.0.1:{port}")
            pubs.append(pub)
        for pub in pubs:  # the subscription arrives once the exporter's SUB has the peer
            if not pub.poll(30_000):
                raise BenchError("the exporter did not subscribe within 30 s")
            pub.recv()
        wait_http(hport, proc, "/readyz")
        time.sleep(0.2)
        t0 = time.monotonic()
        for b in range(args.batches):  # interleaved: engines publish side by side
            for e, pub in enumerate(pubs):
                pub.send_multipart(frames("kv-events", seqs[e], streams[e].payloads[b]), copy=False)
                seqs[e] += 1
        sent = sum(seqs)
        stored = sum(s.stored for s in streams)
        conn = http.client.HTTPConnection("127.0.0.1", hport, timeout=60)
        page, last_progress, seen = "", time.monotonic(), -1.0
        while True:
            page = get(conn, "text/plain", False)[0].decode()
            m = sums(page)
            messages = m.get("kvcache_exporter_messages_total", 0)
            got = m.get("kvcache_blocks_stored_total", 0)
            if messages >= sent and got >= stored:
                break
            if messages + got != seen:
                seen, last_progress = messages + got, time.monotonic()
            elif time.monotonic() - last_progress > 30:
                raise BenchError(
                    f"ingest stalled: {m.get('kvcache_exporter_messages_total')} of "
                    f"{sent} messages, {m.get('kvcache_blocks_stored_total')} of "
                    f"{stored} stored blocks"
                )
            time.sleep(0.05)
        ingest_s = time.monotonic() - t0
        conn.close()
        expected = {
            "kvcache_exporter_messages_total": sent,
            "kvcache_blocks_stored_total": stored,
            "kvcache_blocks_accessed_total": sum(s.accessed for s in streams),
            "kvcache_block_restores_total": sum(s.restored for s in streams),
            "kvcache_cache_clears_total": sum(s.clears for s in streams),
        }
        for name, want in expected.items():
            if int(m.get(name, -1)) != want:
                raise BenchError(f"{name} is {m.get(name)}, {want} were sent")
        for name in (
            "kvcache_exporter_sequence_gaps_total",
            "kvcache_exporter_decode_errors_total",
            "kvcache_exporter_unknown_fields_total",
        ):
            if m.get(name, 0):
                raise BenchError(f"{name} is {m[name]:.0f}")
        present = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line}
        empty = [
            f.name
            for f in FAMILIES
            if f.name != OTLP_EXPORTS
            and not any(p == f.name or p.startswith(f.name + "_") for p in present)
        ]
        page_file.write(page)
        page_file.close()
        worker = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--baseline-worker",
                "--page",
                page_file.name,
                "--port",
                str(bport),
                "--scrapes",
                str(args.scrapes),
                "--warmup",
                str(args.warmup),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if not line:
            raise BenchError(f"baseline worker exited with {worker.wait()}")
        base = json.loads(line)
        wait_http(bport, worker, "/metrics")
        run = ConfigRun(
            engines=engines,
            messages=sent,
            block_events=sum(s.stored + s.accessed + s.removed for s in streams),
            payload_mb=sum(len(p) for s in streams for p in s.payloads) / 1e6,
            ingest_s=ingest_s,
            series=series_count(page),
            kvcache_series=series_count(page, "kvcache_"),
            baseline_series=base["series"],
            baseline_kvcache_series=base["kvcache_series"],
            families_populated=len(FAMILIES) - 1 - len(empty),
            families_total=len(FAMILIES) - 1,
            families_empty=empty,
            series_at_end=0,
        )
        for fmt, accept, use_gzip in VARIANTS:
            keepalive(force=True)
            ours = timed_scrapes(hport, proc.pid, accept, use_gzip, args.scrapes, args.warmup)
            keepalive()
            theirs = timed_scrapes(bport, worker.pid, accept, use_gzip, args.scrapes, args.warmup)
            key = f"{fmt}{'+gzip' if use_gzip else ''}"
            run.variants.append(Variant(fmt, use_gzip, ours, theirs, base["in_process"][key]))
        conn = http.client.HTTPConnection("127.0.0.1", hport, timeout=60)
        run.series_at_end = series_count(get(conn, "text/plain", False)[0].decode())
        conn.close()
        return run
    except BenchError as exc:
        log.seek(0)
        tail = "".join(log.readlines()[-20:])
        raise BenchError(
            f"{engines} engines: {exc}\n--- exporter log (last lines) ---\n{tail}"
        ) from None
    finally:
        if worker is not None:
            assert worker.stdin is not None
            worker.stdin.close()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        for pub in pubs:
            pub.close(0)
        ctx.term()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(page_file.name).unlink(missing_ok=True)


# --- the report ----------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "prometheus_client": version("prometheus-client"),
        "msgspec": msgspec.__version__,
        "pyzmq": zmq.__version__,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": ingest.git_commit(),
    }


def render(runs: list[ConfigRun], machine: dict[str, str], scrapes: int) -> Iterator[str]:
    m = machine
    yield (
        f"machine: {m['nproc']} cpus, python {m['python']}, prometheus_client "
        f"{m['prometheus_client']}, msgspec {m['msgspec']}, pyzmq {m['pyzmq']}, "
        f"loadavg {m['loadavg']}, commit {m['commit']}, {m['date']}"
    )
    yield f"{scrapes} timed scrapes per variant, each on one kept-alive connection"
    for run in runs:
        yield ""
        yield (
            f"{run.engines} engine(s) x 3 media x 2 groups: {run.messages:,} messages, "
            f"{run.block_events:,} block events ({run.payload_mb:.1f} MB) ingested in "
            f"{run.ingest_s:.2f} s"
        )
        yield (
            f"series: {run.series:,} ({run.kvcache_series:,} kvcache_*; at the end "
            f"{run.series_at_end:,}); baseline {run.baseline_series:,} "
            f"({run.baseline_kvcache_series:,} kvcache_*); families with series "
            f"{run.families_populated}/{run.families_total}"
            + (f", empty: {', '.join(run.families_empty)}" if run.families_empty else "")
        )
        target = TARGET_MS.get(run.engines)
        rows = [
            (
                "variant",
                "exporter p50 / p90",
                "CPU/scrape",
                "body",
                "baseline HTTP p50 / p90",
                "CPU/scrape",
                "body",
                "generate_latest p50",
                "exp/base",
                "target",
            )
        ]
        for v in run.variants:
            e, b, ip = v.exporter, v.baseline_http, v.baseline_in_process
            verdict = ""
            if target is not None:
                verdict = f"<= {target:g} ms  {'PASS' if e.p50_ms <= target else 'MISS'}"
            if e.reconnects or b.reconnects:
                verdict += f"  (reconnects: exporter {e.reconnects}, baseline {b.reconnects})"
            rows.append(
                (
                    f"{v.format}{' + gzip' if v.gzip else ''}",
                    f"{e.p50_ms:.2f} / {e.p90_ms:.2f} ms",
                    f"{e.cpu_ms:.2f} ms",
                    f"{e.body_bytes / 1e3:.1f} kB",
                    f"{b.p50_ms:.2f} / {b.p90_ms:.2f} ms",
                    f"{b.cpu_ms:.2f} ms",
                    f"{b.body_bytes / 1e3:.1f} kB",
                    f"{ip['p50_ms']:.2f} ms",
                    f"{e.p50_ms / b.p50_ms:.1f}x",
                    verdict,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            yield "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--scrapes", type=int, default=200, help="timed scrapes per variant and side")
    p.add_argument("--warmup", type=int, default=5, help="untimed scrapes first, per connection")
    p.add_argument("--engines", default="1,8", help="engine counts to run (comma-separated)")
    p.add_argument(
        "--batches", type=int, default=300, help="batches per engine, one engine-second apart"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the simulated streams")
    p.add_argument(
        "--exporter-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the exporter process (repeatable)",
    )
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--page", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_worker:
        baseline_worker(args)
        return 0
    machine = machine_info()
    runs = []
    try:
        for engines in (int(x) for x in args.engines.split(",") if x):
            runs.append(run_config(engines, args))
    except BenchError as exc:
        print(f"scrape cost bench: INVALID RUN: {exc}", file=sys.stderr)
        return 1
    for line in render(runs, machine, args.scrapes):
        print(line)
    if args.json:
        config = {k: str(v) for k, v in vars(args).items()}
        figures = {"machine": machine, "config": config, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
