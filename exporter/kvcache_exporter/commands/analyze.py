"""``kvcache-exporter analyze``: the collector, offline, over a recording or a trace."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import logs
from ..analysis.whatif import (
    DEFAULT_FACTORS,
    DEFAULT_MAX_SAMPLED_BLOCKS,
    DEFAULT_SAMPLE_RATIO,
    MIN_SAMPLED_BLOCKS,
    WhatIfConfig,
    validate_factors,
)
from ..collector import CollectorConfig
from ..offline import (
    FORMATS,
    PlotError,
    analyze_recording,
    analyze_trace,
    format_views,
    plot_whatif,
)
from ..sources.recording import MAGIC, RecordingError
from ..sources.spec import REPORT_MODES, parse_capacity
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
        "--report-mode",
        choices=REPORT_MODES,
        default="default",
        help="as a source's report-mode=: full when the engine's stores of resident blocks "
        "are hit reports (vLLM's kv_cache_report_mode: full)",
    )
    whatif = parser.add_argument_group("cache-size what-if (docs/whatif.md)")
    whatif.add_argument(
        "--whatif-sample-ratio",
        type=float,
        default=DEFAULT_SAMPLE_RATIO,
        help=f"as --whatif.sample-ratio (default {DEFAULT_SAMPLE_RATIO:g}, as the live "
        "exporter: the highest rate)",
    )
    whatif.add_argument(
        "--whatif-max-sampled-blocks",
        type=int,
        default=DEFAULT_MAX_SAMPLED_BLOCKS,
        metavar="N",
        help=f"as --whatif.max-sampled-blocks (default {DEFAULT_MAX_SAMPLED_BLOCKS}): beyond "
        "it the rate falls; as many as the recording's distinct hashes follows every block",
    )
    whatif.add_argument(
        "--capacity",
        action="append",
        default=[],
        metavar="[MEDIUM=]BLOCKS",
        help="the engine's cache size in blocks (every medium, or one); default: observed",
    )
    whatif.add_argument(
        "--capacity-factors",
        default=",".join(f"{f:g}" for f in DEFAULT_FACTORS),
        metavar="F1,F2,...",
        help="as --whatif.capacity-factors",
    )
    whatif.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw recomputation saved vs cache size into a PNG (needs matplotlib: "
        "the 'plot' extra)",
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
        config = CollectorConfig(
            sample_ratio=args.sample_ratio, hit_reports=args.report_mode == "full"
        )
    except ValueError as exc:
        raise UsageError(f"--sample-ratio: {exc}") from None
    whatif = _whatif_config(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'kvcache-exporter[plot]'")
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with path.open("rb") as file:
        is_recording = file.read(len(MAGIC)) == MAGIC
    if args.trace_file or not is_recording:
        if not args.trace_file:
            raise UsageError(f"{path}: not a recording (use --trace-file for a Mooncake trace)")
        args.trace = str(path)
        views = analyze_trace(request_factory(args)(), make_simulator(args), config, whatif=whatif)
    else:
        try:
            views, truncated = analyze_recording(path, config, whatif)
        except RecordingError as exc:
            raise UsageError(str(exc)) from None
        if truncated:
            print(f"{path}: ends in a cut record; read up to it", file=sys.stderr)
    sys.stdout.write(format_views(views, args.format))
    if args.plot:
        try:
            plot_whatif(views, args.plot)
        except PlotError as exc:
            raise UsageError(str(exc)) from None
    return 0


def _whatif_config(args: argparse.Namespace) -> WhatIfConfig:
    """The what-if flags, checked (each bad one a usage error naming it)."""
    capacity: dict[str, int] = {}
    for text in args.capacity:
        medium, sep, blocks = text.rpartition("=")
        try:
            key = f"capacity.{medium}" if sep else "capacity"
            found, value = parse_capacity(key, blocks)
        except ValueError:
            raise UsageError(f"--capacity {text}: expected BLOCKS or MEDIUM=BLOCKS") from None
        capacity[found] = value
    try:
        factors = validate_factors([float(f) for f in args.capacity_factors.split(",") if f])
    except ValueError as exc:
        raise UsageError(f"--capacity-factors: {exc}") from None
    if args.whatif_max_sampled_blocks < MIN_SAMPLED_BLOCKS:
        raise UsageError(f"--whatif-max-sampled-blocks: must be at least {MIN_SAMPLED_BLOCKS}")
    try:
        return WhatIfConfig(
            sample_ratio=args.whatif_sample_ratio,
            max_sampled_blocks=args.whatif_max_sampled_blocks,
            capacity_factors=factors,
            capacity=tuple(capacity.items()),
        )
    except ValueError as exc:
        raise UsageError(f"--whatif-sample-ratio: {exc}") from None
