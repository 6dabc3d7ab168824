"""Arguments and helpers the subcommands share: workloads, simulators, signals."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

from ..engine import (
    PrefixCacheSimulator,
    Request,
    WorkloadConfig,
    bundled_trace_path,
    read_mooncake,
    repeat_requests,
    synthetic_workload,
)
from ..protocol.encode import WireForm

PROG = "kvcache-exporter"


class UsageError(Exception):
    """A bad argument of a subcommand: one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--trace",
        metavar="FILE",
        help="Mooncake-format trace (JSONL: timestamp ms, hash_ids); "
        "default: the bundled Mooncake synthetic trace",
    )
    group.add_argument(
        "--workload",
        choices=("trace", "synthetic"),
        default="trace",
        help="replay a trace, or generate conversations (seeded)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    group.add_argument(
        "--rate", type=float, default=5.0, help="synthetic workload: requests per second"
    )
    group.add_argument("--gpu-blocks", type=int, default=4000, help="GPU prefix-cache blocks")
    group.add_argument(
        "--cpu-blocks", type=int, default=0, help="CPU offload tier blocks (0: none)"
    )
    group.add_argument(
        "--report-hits",
        action="store_true",
        help="also publish BlockAccessed for cache hits (native extension)",
    )
    group.add_argument(
        "--form",
        choices=[f.value for f in WireForm],
        default=WireForm.VLLM.value,
        help="wire form: vLLM maps (>= 0.24), vLLM arrays (<= 0.23), SGLang",
    )


def make_simulator(args: argparse.Namespace) -> PrefixCacheSimulator:
    if args.gpu_blocks < 1 or args.cpu_blocks < 0:
        raise UsageError("--gpu-blocks must be >= 1 and --cpu-blocks >= 0")
    return PrefixCacheSimulator(args.gpu_blocks, args.cpu_blocks, report_hits=args.report_hits)


def request_factory(args: argparse.Namespace) -> Callable[[], Iterator[Request]]:
    """A callable giving one pass of the chosen workload (checked now, read lazily)."""
    if args.workload == "synthetic":
        config = WorkloadConfig(rate=args.rate, seed=args.seed, num_requests=None)
        return lambda: iter(synthetic_workload(config))
    path = Path(args.trace) if args.trace else bundled_trace_path()
    if not path.is_file():
        raise UsageError(f"--trace {path}: no such file")
    return lambda: iter(read_mooncake(path))


def endless(args: argparse.Namespace) -> Iterator[Request]:
    """The workload, looped forever (a trace replays after its end)."""
    make = request_factory(args)
    if args.workload == "synthetic":
        return make()
    return repeat_requests(make, None)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def status(line: str) -> None:
    """A progress line on stderr (rewritten in place on a terminal)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
