"""``kvcache-exporter record``: write engines' raw event streams to a recording file."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import zmq

from ..sources.recording import RecordingError, RecordingWriter
from ..sources.spec import SourceSpec, SourceSpecError
from .common import OneLineParser, UsageError, positive_float, status, stop_on_signals


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter record",
        description="Subscribe to engines and append their raw multipart frames, with arrival "
        "times, to a recording (docs/recording.md). Safe to stop at any moment.",
    )
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=ENDPOINT[,topic=PREFIX][,bind]",
        help="as for the exporter (repeatable)",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="FILE",
        help="recording to append to (created if new)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=0.0,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--progress", type=positive_float, default=2.0, help="seconds between progress lines"
    )
    return parser


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        specs = [SourceSpec.parse(text) for text in args.source]
    except SourceSpecError as exc:
        raise UsageError(f"--source: {exc}") from None
    for spec in specs:
        if spec.uses_curve:
            raise UsageError(f"--source {spec.name}: record does not speak CURVE yet")
    try:
        writer = RecordingWriter(args.output)
    except (RecordingError, OSError) as exc:
        raise UsageError(f"--output: {exc}") from None
    context: zmq.Context[Any] = zmq.Context.instance()
    poller = zmq.Poller()
    names: dict[Any, str] = {}
    for spec in specs:
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 200_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
        (sock.bind if spec.binds else sock.connect)(spec.zmq_endpoint)
        poller.register(sock, zmq.POLLIN)
        names[sock] = spec.name
    stop = stop_on_signals()
    started = last_progress = time.monotonic()
    try:
        while not stop.is_set():
            for sock, _ in poller.poll(100):
                arrival = time.time()
                for _ in range(4096):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    writer.write(names[sock], arrival, frames)
            writer.flush()
            now = time.monotonic()
            if now - last_progress >= args.progress:
                status(
                    f"recorded {writer.messages} messages, {writer.bytes / 1e6:.1f} MB "
                    f"to {args.output}"
                )
                last_progress = now
            if args.duration and now - started >= args.duration:
                break
    finally:
        writer.close()
        for sock in names:
            sock.close(linger=0)
    status(f"recorded {writer.messages} messages, {writer.bytes / 1e6:.1f} MB to {args.output}")
    return 0
