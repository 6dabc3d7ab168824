"""Scrape load: many concurrent scrapers while the exporter ingests a fast stream.

Starts the real exporter, publishes the simulated Mooncake stream as fast as the exporter
takes it (looped, fresh hashes per loop) for ``--seconds``, and meanwhile runs ``--scrapers``
threads that each scrape ``/metrics`` over their own kept-alive connection as fast as they
can. Prints scrape latency percentiles and the ingest rate, and checks that nothing was lost
(every batch sent arrived, no sequence gap). Exit 1 on a loss.

    python bench/scrape_load.py                      # 50 scrapers for 30 s
    python bench/scrape_load.py --scrapers 10 --seconds 10
    python bench/scrape_load.py --max-requests 40    # the default limit: 503s beyond it

The exporter runs with ``--web.max-requests`` one above the scrapers (theirs and the pacing
scrape), so that every scrape is served and timed; with ``--max-requests`` below that, the
503s the limit answers with are counted apart from errors.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import zmq

from kvcache_exporter.engine import (
    PrefixCacheSimulator,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
)
from kvcache_exporter.offline import simulate_frames


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scraper(
    port: int, stop: threading.Event, latencies: list[float], errors: list[str], refused: list[int]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            response.read()
            if response.status == 503:  # over --web.max-requests: refused at once, not timed
                refused.append(1)
                continue
            if response.status != 200:
                errors.append(f"status {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - started)
    conn.close()


def metric(port: int, name: str) -> float:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
                text = page.read().decode()
            break
        except urllib.error.HTTPError as exc:
            if exc.code != 503:  # 503: over --web.max-requests, try again
                raise
            time.sleep(0.01)
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--max-requests", type=int, default=None,
        help="the exporter's --web.max-requests (default: one above --scrapers)",
    )  # fmt: skip
    args = parser.parse_args()
    max_requests = args.scrapers + 1 if args.max_requests is None else args.max_requests

    port, http_port = free_port(), free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "kvcache_exporter.cli", "--source", f"load=tcp://127.0.0.1:{port}",
         "--web.listen-address", f"127.0.0.1:{http_port}", "--log.level", "error",
         "--web.max-requests", str(max_requests)],
        env={k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_EXPORTER_")},
    )  # fmt: skip
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        pub.recv()  # the exporter's subscription
        frames = simulate_frames(
            repeat_requests(lambda: read_mooncake(bundled_trace_path()), None, fresh_hashes=True),
            PrefixCacheSimulator(8000),
            requests_per_batch=8,
        )
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[str] = []
        refused: list[int] = []
        threads = [
            threading.Thread(target=scraper, args=(http_port, stop, latencies, errors, refused))
            for _ in range(args.scrapers)
        ]
        for thread in threads:
            thread.start()
        sent = 0
        started = time.monotonic()
        for _, message in frames:
            # Pace to what the exporter takes: stay at most ~2,000 batches ahead of it.
            if sent % 500 == 0:
                while sent - metric(http_port, "kvcache_exporter_messages_total") > 2000:
                    time.sleep(0.01)
                if time.monotonic() - started >= args.seconds:
                    break
            pub.send_multipart(message)
            sent += 1
        elapsed = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 60
        while metric(http_port, "kvcache_exporter_messages_total") < sent:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        received = metric(http_port, "kvcache_exporter_messages_total")
        gaps = metric(http_port, "kvcache_exporter_sequence_gaps_total")
    finally:
        pub.close(linger=0)
        context.term()
        exporter.terminate()
        exporter.wait(10)

    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    print(f"scrapers               {args.scrapers} for {elapsed:.1f} s")
    print(f"scrapes                {len(latencies):,} ({len(latencies) / elapsed:,.0f}/s), "
          f"errors {len(errors)}, 503 over --web.max-requests {max_requests}: "
          f"{len(refused):,}")  # fmt: skip
    worst, mean = latencies[-1] * 1000, statistics.mean(latencies) * 1000
    print(f"latency ms p50/p90/p99 {pct(0.5):.1f} / {pct(0.9):.1f} / {pct(0.99):.1f} "
          f"(max {worst:.1f}, mean {mean:.1f})")  # fmt: skip
    print(f"batches sent/received  {sent:,} / {received:,.0f} ({sent / elapsed:,.0f}/s), "
          f"sequence gaps {gaps:.0f}")  # fmt: skip
    lost = received != sent or gaps > 0 or errors
    print("scrape load: " + ("LOSS OR ERRORS" if lost else "OK: no ingest loss"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
