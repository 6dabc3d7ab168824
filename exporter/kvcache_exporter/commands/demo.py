"""``kvcache-exporter demo``: the exporter and an embedded engine together on loopback."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from itertools import islice

from .. import logs
from ..analysis.pool import MAX_ENGINES, PoolSnapshot
from ..app import Exporter
from ..collector import CollectorSnapshot
from ..config import ExporterConfig
from ..engine import SimulatedEngine
from ..publisher import KVEventPublisher
from ..sinks.http import parse_listen_address
from ..sources.spec import SourceSpec
from .common import (
    OneLineParser,
    UsageError,
    add_workload_arguments,
    endless,
    free_tcp_port,
    make_simulator,
    positive_float,
    stop_on_signals,
)

ENGINE = "demo"
"""The engine's name; with ``--engines N`` above 1, the replicas are ``demo-0`` … ``demo-N-1``."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter demo",
        description="Start the exporter and a simulated engine (LRU prefix cache over a real "
        "request trace) on loopback, and watch the metrics move.",
    )
    parser.add_argument(
        "--engines",
        type=int,
        default=1,
        help="simulated replicas of one model behind a round-robin balancer, each with its own "
        "cache and publisher, all in one pool (default 1)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        default="127.0.0.1:9477",
        help="where /metrics is served (default 127.0.0.1:9477)",
    )
    parser.add_argument(
        "--speed",
        type=positive_float,
        default=20.0,
        help="trace time runs this many times faster than real time (0: flat out)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=0.0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--interval", type=positive_float, default=5.0, help="seconds between summary lines"
    )
    parser.add_argument(
        "--log.level", dest="log_level", default="warn", choices=("debug", "info", "warn", "error")
    )
    add_workload_arguments(parser)
    return parser


def summary_line(now: CollectorSnapshot, before: CollectorSnapshot, seconds: float) -> str:
    stored = int(now.stored.sum())
    evicted = int(now.removed[:, 0].sum())
    rate_stored = (stored - int(before.stored.sum())) / seconds
    rate_evicted = (evicted - int(before.removed[:, 0].sum())) / seconds
    restores = int(now.restores.sum())
    ratio = restores / stored if stored else 0.0
    return (
        f"stored/s {rate_stored:9.1f}   evicted/s {rate_evicted:9.1f}   "
        f"resident {int(now.resident.sum()):7d}   restore ratio {ratio:6.1%}"
    )


def fleet_line(now: PoolSnapshot, before: PoolSnapshot) -> str:
    """The pool's figures: the share of the stores since ``before`` whose block another
    replica held, and the keys resident now (distinct, and on two replicas or more)."""
    stored = sum(int(e.stored.sum()) for e in now.engines)
    stored -= sum(int(e.stored.sum()) for e in before.engines)
    elsewhere = sum(int(e.elsewhere.sum()) for e in now.engines)
    elsewhere -= sum(int(e.elsewhere.sum()) for e in before.engines)
    ratio = elsewhere / stored if stored else 0.0
    return (
        f"pool {now.name}: stores resident elsewhere {ratio:6.1%}   "
        f"distinct {int(now.distinct.sum()):7d}   duplicate {int(now.duplicate.sum()):7d}"
    )


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        parse_listen_address(args.listen)
    except ValueError as exc:
        raise UsageError(f"--web.listen-address: {exc}") from None
    if not 1 <= args.engines <= MAX_ENGINES:
        raise UsageError(f"--engines must be in 1..{MAX_ENGINES}")
    count = args.engines
    # Round-robin: replica i serves requests i, i + N, i + 2N, … of the one workload.
    requests = [islice(endless(args), i, None, count) for i in range(count)]
    simulators = [make_simulator(args) for _ in range(count)]
    logs.setup(args.log_level, "logfmt")

    names = [ENGINE] if count == 1 else [f"{ENGINE}-{i}" for i in range(count)]
    ports = [free_tcp_port() for _ in names]
    specs = tuple(
        SourceSpec.parse(f"{name}=tcp://127.0.0.1:{port}")
        for name, port in zip(names, ports, strict=True)
    )
    exporter = Exporter(ExporterConfig(sources=specs, listen_address=args.listen))
    publishers = [
        KVEventPublisher(f"tcp://127.0.0.1:{port}", form=args.form, bind=True) for port in ports
    ]
    stop = stop_on_signals()
    exporter.start()
    assert exporter.http is not None
    deadline = time.monotonic() + 5.0
    while not all(e.source.stats.up for e in exporter.engines) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the subscriptions reach the publishers before the first batch

    start_time = time.time()  # one engine clock for the replicas
    threads = [
        threading.Thread(
            target=SimulatedEngine(
                simulator, publisher, speed=args.speed, start_time=start_time
            ).run,
            args=(replica_requests,),
            kwargs={"stop": stop},
            name=f"engine-{i}",
            daemon=True,
        )
        for i, (simulator, publisher, replica_requests) in enumerate(
            zip(simulators, publishers, requests, strict=True)
        )
    ]
    host, _ = parse_listen_address(args.listen)
    base = f"http://{host or '127.0.0.1'}:{exporter.http.port}"
    # The status page first: the cache in pictures, with nothing else installed.
    print(
        f"kvcache-exporter demo: status page at {base}/  metrics at {base}/metrics  "
        "(Ctrl-C to stop)",
        flush=True,
    )
    for thread in threads:
        thread.start()
    engine = exporter.engines[0]
    pool = exporter.pools.get(specs[0].pool)  # None: one engine, no pool index
    started = time.monotonic()
    before, last = engine.collector.snapshot(), started
    pool_before = pool.snapshot() if pool is not None else None
    while not stop.wait(min(args.interval, 0.5) if args.interval else 0.5):
        now = time.monotonic()
        if args.duration and now - started >= args.duration:
            break
        if now - last >= args.interval:
            snap = engine.collector.snapshot()
            if pool is None or pool_before is None:
                print(summary_line(snap, before, now - last), flush=True)
            else:
                pool_now = pool.snapshot()
                print(fleet_line(pool_now, pool_before), flush=True)
                pool_before = pool_now
            before, last = snap, now
    stop.set()
    for thread in threads:
        thread.join(timeout=2.0)
    exporter.stop()
    for publisher in publishers:
        publisher.close()
    return 0
