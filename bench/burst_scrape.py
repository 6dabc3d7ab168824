"""Scrapes during a catch-up burst: does ``/metrics`` answer while ingest runs flat out?

The real ``kvcache-exporter`` process (``--source burst=tcp://127.0.0.1:PORT,bind``) is fed,
as fast as pyzmq sends, ``--blocks`` distinct stores (default 5,000,000: the default
``--collector.max-tracked-blocks`` of 4,000,000 tracked, the rest counted as untracked) in
vLLM map-form messages of ``--events`` ``BlockStored`` events of ``--run`` blocks each, one
engine-millisecond apart. Meanwhile a client scrapes ``/metrics`` (text 0.0.4, one kept-alive
connection, as Prometheus does) every ``--interval`` seconds and times each scrape from request
to last byte. The burst is over when ``kvcache_blocks_stored_total`` equals what was sent; the
figures are the scrapes made during it. The table grows from empty to ~4M keys meanwhile, so
every growth step of the block table falls inside the burst.

    python bench/burst_scrape.py                    # compiled table (if built)
    python bench/burst_scrape.py --no-extension     # the numpy reference, for comparison

Target (issue 15): every scrape during the burst within 1 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kvcache_exporter.protocol.encode import frames
from scrape_cost import BenchError, exporter_command, free_port, sums, wait_http

TOKENS = bytes(16)  # 16 token ids per block (zeros, 1 byte each on the wire)
TARGET_S = 1.0


@dataclass(slots=True)
class BurstRun:
    extension: bool
    blocks: int
    messages: int
    send_s: float
    ingest_s: float  # first send until every store is counted
    scrapes: list[tuple[float, float, int]] = field(default_factory=list)  # (t, s, stored)
    max_rss_mb: float = 0.0
    collector_mb: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [s for t, s, _ in self.scrapes if t <= self.ingest_s]


def payloads(blocks: int, events: int, run: int) -> list[bytes]:
    out = []
    ts = time.time() - blocks / (events * run) * 1e-3 - 60
    h = 1 << 40
    per_message = events * run
    for start in range(0, blocks, per_message):
        batch = []
        for first in range(start, min(start + per_message, blocks), run):
            count = min(run, blocks - first)
            batch.append(
                {
                    "type": "BlockStored",
                    "block_hashes": list(range(h + first, h + first + count)),
                    "parent_block_hash": None,
                    "token_ids": TOKENS * count,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                }
            )
        out.append(msgspec.msgpack.encode([ts, batch, 0]))
        ts += 1e-3
    return out


def scraper(port: int, stop: threading.Event, t0: list[float], run: BurstRun, interval: float):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set():
        start = time.monotonic()
        conn.request("GET", "/metrics", headers={"Accept": "text/plain"})
        response = conn.getresponse()
        body = response.read().decode()
        took = time.monotonic() - start
        if t0:
            stored = int(sums(body).get("kvcache_blocks_stored_total", 0))
            run.scrapes.append((start - t0[0], took, stored))
        stop.wait(interval)
    conn.close()


def run_burst(args: argparse.Namespace, data: list[bytes]) -> BurstRun:
    zport, hport = free_port(), free_port()
    cmd = [
        *exporter_command(),
        "--web.listen-address",
        f"127.0.0.1:{hport}",
        "--log.level",
        "warn",
        "--source",
        f"burst=tcp://127.0.0.1:{zport},bind",
        *args.exporter_arg,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_EXPORTER_")}
    if args.no_extension:
        env["KVCACHE_EXPORTER_NO_EXTENSION"] = "1"
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    ctx: zmq.Context[Any] = zmq.Context()
    run = BurstRun(not args.no_extension, args.blocks, len(data), 0.0, 0.0)
    stop = threading.Event()
    t0: list[float] = []
    thread = threading.Thread(target=scraper, args=(hport, stop, t0, run, args.interval))
    try:
        wait_http(hport, proc, "/healthz")
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(f"tcp://127.0.0.1:{zport}")
        if not pub.poll(30_000):
            raise BenchError("the exporter did not subscribe within 30 s")
        pub.recv()
        wait_http(hport, proc, "/readyz")
        thread.start()
        time.sleep(1.0)
        t0.append(time.monotonic())
        for seq, payload in enumerate(data):
            pub.send_multipart(frames("kv-events", seq, payload), copy=False)
        run.send_s = time.monotonic() - t0[0]
        deadline = time.monotonic() + args.timeout
        while True:
            done = [s for s in run.scrapes if s[2] >= args.blocks]
            if done:
                run.ingest_s = done[0][0]
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError(f"ingest not done after {args.timeout:.0f} s")
            time.sleep(0.05)
        stop.set()
        thread.join()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        run.max_rss_mb = int(hwm.split()[1]) / 1024
        conn = http.client.HTTPConnection("127.0.0.1", hport, timeout=60)
        conn.request("GET", "/metrics")
        m = sums(conn.getresponse().read().decode())
        run.collector_mb = m.get("kvcache_exporter_collector_bytes", 0) / 1e6
        if m.get("kvcache_exporter_messages_total", 0) != len(data):
            raise BenchError("not every message arrived")
        pub.close(0)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        proc.terminate()
        proc.wait(30)
        ctx.term()
        log.seek(0)
        errors = log.read()
        log.close()
        if proc.returncode not in (0, -15) and errors:
            print(errors[-2000:], file=sys.stderr)
    return run


def render(run: BurstRun) -> str:
    lat = sorted(run.latencies)
    worst = lat[-1] if lat else float("nan")
    verdict = "met" if lat and worst <= TARGET_S else "MISS"
    return "\n".join(
        [
            f"block table: {'compiled' if run.extension else 'numpy reference'}",
            f"burst: {run.blocks:,} distinct stores in {run.messages:,} messages, sent in "
            f"{run.send_s:.1f} s, ingested in {run.ingest_s:.1f} s "
            f"({run.blocks / run.ingest_s / 1e6:.2f} M stores/s)",
            f"scrapes during the burst: {len(lat)}, p50 {statistics.median(lat) * 1e3:.0f} ms, "
            f"max {worst * 1e3:.0f} ms (target <= {TARGET_S * 1e3:.0f} ms: {verdict})",
            f"exporter peak RSS {run.max_rss_mb:.0f} MB, collector bytes {run.collector_mb:.0f} MB",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=5_000_000, help="distinct stores to send")
    p.add_argument("--events", type=int, default=64, help="BlockStored events per message")
    p.add_argument("--run", type=int, default=16, help="blocks per BlockStored event")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between scrapes")
    p.add_argument("--timeout", type=float, default=600, help="give up after this long")
    p.add_argument("--no-extension", action="store_true", help="KVCACHE_EXPORTER_NO_EXTENSION=1")
    p.add_argument("--exporter-arg", action="append", default=[], metavar="FLAG")
    p.add_argument("--json", type=Path, help="write the figures (every scrape) here")
    args = p.parse_args(argv)
    data = payloads(args.blocks, args.events, args.run)
    try:
        run = run_burst(args, data)
    except BenchError as exc:
        print(f"burst bench: INVALID RUN: {exc}", file=sys.stderr)
        return 1
    print(render(run))
    if args.json:
        args.json.write_text(json.dumps(asdict(run), indent=2) + "\n")
    lat = run.latencies
    return 0 if lat and max(lat) <= TARGET_S else 2


if __name__ == "__main__":
    sys.exit(main())
