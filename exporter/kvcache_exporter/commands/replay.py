"""``kvcache-exporter replay``: drive an endpoint from a trace or a recording."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from ..engine import SimulatedEngine
from ..publisher import KVEventPublisher, endpoint_binds
from ..sources.recording import MAGIC, RecordingError, RecordingReader
from .common import (
    OneLineParser,
    UsageError,
    add_workload_arguments,
    make_simulator,
    positive_float,
    request_factory,
    status,
    stop_on_signals,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter replay",
        description="Publish KV events to an endpoint as an engine would: from a request trace "
        "through the simulated prefix cache, or the raw frames of a recording.",
    )
    parser.add_argument(
        "--endpoint",
        default="tcp://*:5557",
        help="where to publish; wildcard hosts are bound (the exporter connects), "
        "others connected to (default tcp://*:5557, like vLLM)",
    )
    parser.add_argument("--recording", metavar="FILE", help="replay a recording's raw frames")
    parser.add_argument("--source", help="with --recording: only this recorded source")
    parser.add_argument(
        "--speed",
        type=positive_float,
        default=1.0,
        help="1 real time, N times faster, 0 as fast as possible",
    )
    parser.add_argument("--topic", default="kv-events", help="topic frame (trace replay)")
    parser.add_argument("--replay-endpoint", help="also serve vLLM-style replay here (trace)")
    parser.add_argument("--requests-per-batch", type=int, default=1)
    parser.add_argument("--limit", type=int, help="stop after this many requests (trace)")
    parser.add_argument(
        "--wait",
        type=positive_float,
        default=1.0,
        help="seconds to let subscribers connect before publishing",
    )
    add_workload_arguments(parser)
    return parser


def _replay_recording(args: argparse.Namespace, stop: Any) -> int:
    path = Path(args.recording)
    try:
        with path.open("rb") as file:
            if file.read(len(MAGIC)) != MAGIC:
                raise UsageError(f"--recording {path}: not a kvcache-exporter recording")
    except OSError as exc:
        raise UsageError(f"--recording {path}: {exc.strerror}") from None
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 5000)
    (sock.bind if endpoint_binds(args.endpoint) else sock.connect)(args.endpoint)
    time.sleep(args.wait)
    sent = 0
    first_arrival: float | None = None
    wall0 = time.monotonic()
    reader = RecordingReader(path)
    try:
        for message in reader:
            if stop.is_set():
                break
            if args.source and message.source != args.source:
                continue
            if first_arrival is None:
                first_arrival = message.arrival
            if args.speed:
                delay = (message.arrival - first_arrival) / args.speed - (time.monotonic() - wall0)
                if delay > 0 and stop.wait(delay):
                    break
            sock.send_multipart(message.frames)
            sent += 1
    except RecordingError as exc:
        raise UsageError(str(exc)) from None
    status(
        f"replayed {sent} messages from {path}"
        + (" (file ends in a cut)" if reader.truncated else "")
    )
    sock.close()
    return 0


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    stop = stop_on_signals()
    if args.recording:
        return _replay_recording(args, stop)
    make = request_factory(args)
    simulator = make_simulator(args)
    with KVEventPublisher(
        args.endpoint, topic=args.topic, form=args.form, replay_endpoint=args.replay_endpoint
    ) as publisher:
        time.sleep(args.wait)
        driver = SimulatedEngine(
            simulator, publisher, speed=args.speed, requests_per_batch=args.requests_per_batch
        )
        result = driver.run(make(), stop=stop, limit=args.limit)
        status(f"published {result.batches} batches, {result.events} events to {args.endpoint}")
    return 0
