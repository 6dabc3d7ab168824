"""``kvcache-exporter demo``: the exporter and an embedded engine together on loopback."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence

from .. import logs
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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter demo",
        description="Start the exporter and a simulated engine (LRU prefix cache over a real "
        "request trace) on loopback, and watch the metrics move.",
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


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        parse_listen_address(args.listen)
    except ValueError as exc:
        raise UsageError(f"--web.listen-address: {exc}") from None
    requests = endless(args)
    simulator = make_simulator(args)
    logs.setup(args.log_level, "logfmt")

    port = free_tcp_port()
    spec = SourceSpec.parse(f"{ENGINE}=tcp://127.0.0.1:{port}")
    exporter = Exporter(ExporterConfig(sources=(spec,), listen_address=args.listen))
    publisher = KVEventPublisher(f"tcp://127.0.0.1:{port}", form=args.form, bind=True)
    stop = stop_on_signals()
    exporter.start()
    assert exporter.http is not None
    engine = exporter.engines[0]
    deadline = time.monotonic() + 5.0
    while not engine.source.stats.up and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the subscription reach the publisher before the first batch

    driver = SimulatedEngine(simulator, publisher, speed=args.speed)
    thread = threading.Thread(
        target=driver.run, args=(requests,), kwargs={"stop": stop}, name="engine", daemon=True
    )
    host, _ = parse_listen_address(args.listen)
    base = f"http://{host or '127.0.0.1'}:{exporter.http.port}"
    # The status page first: the cache in pictures, with nothing else installed.
    print(
        f"kvcache-exporter demo: status page at {base}/  metrics at {base}/metrics  "
        "(Ctrl-C to stop)",
        flush=True,
    )
    thread.start()
    started = time.monotonic()
    before, last = engine.collector.snapshot(), started
    while not stop.wait(min(args.interval, 0.5) if args.interval else 0.5):
        now = time.monotonic()
        if args.duration and now - started >= args.duration:
            break
        if now - last >= args.interval:
            snap = engine.collector.snapshot()
            print(summary_line(snap, before, now - last), flush=True)
            before, last = snap, now
    stop.set()
    thread.join(timeout=2.0)
    exporter.stop()
    publisher.close()
    return 0
