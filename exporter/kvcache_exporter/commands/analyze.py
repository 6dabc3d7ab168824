"""``kvcache-exporter analyze``: the collector, offline, over a recording or a trace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import logs
from ..collector import CollectorConfig
from ..offline import FORMATS, analyze_recording, analyze_trace, format_views
from ..sources.recording import MAGIC, RecordingError
from .common import (
    OneLineParser,
    UsageError,
    add_workload_arguments,
    make_simulator,
    request_factory,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter analyze",
        description="Run the exporter's collector over a recording (or a Mooncake trace through "
        "the simulated prefix cache) and print what /metrics would have served.",
    )
    parser.add_argument("file", help="a recording (from `record`) or, with --trace-file, a trace")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument(
        "--sample-ratio", type=float, default=1.0, help="as --collector.sample-ratio"
    )
    parser.add_argument(
        "--trace-file",
        action="store_true",
        help="FILE is a Mooncake trace: simulate it (see workload options)",
    )
    add_workload_arguments(parser)
    return parser


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    logs.setup("error")  # alerts go into the summary, not onto stderr
    try:
        config = CollectorConfig(sample_ratio=args.sample_ratio)
    except ValueError as exc:
        raise UsageError(f"--sample-ratio: {exc}") from None
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with path.open("rb") as file:
        is_recording = file.read(len(MAGIC)) == MAGIC
    if args.trace_file or not is_recording:
        if not args.trace_file:
            raise UsageError(f"{path}: not a recording (use --trace-file for a Mooncake trace)")
        args.trace = str(path)
        views = analyze_trace(request_factory(args)(), make_simulator(args), config)
    else:
        try:
            views, truncated = analyze_recording(path, config)
        except RecordingError as exc:
            raise UsageError(str(exc)) from None
        if truncated:
            print(f"{path}: ends in a cut record; read up to it", file=sys.stderr)
    sys.stdout.write(format_views(views, args.format))
    return 0
