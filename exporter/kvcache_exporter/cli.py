"""The ``kvcache-exporter`` command: serve by default, plus tool subcommands."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import zmq

from . import config as config_mod
from . import logs
from .app import Exporter
from .commands import analyze, demo, keygen, record, replay
from .commands.common import UsageError

log = logging.getLogger("kvcache_exporter")
PROG = "kvcache-exporter"


def tune_gc() -> None:
    """Decoding makes many short-lived lists; with CPython's default thresholds the cyclic
    collector runs every few hundred allocations and rescans everything alive. Objects that
    exist at start-up are frozen out of its scans, and young collections run less often."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def serve(argv: Sequence[str]) -> int:
    """Run the exporter until SIGTERM or SIGINT."""
    try:
        cfg = config_mod.load(argv)
    except config_mod.ConfigError as exc:
        return _fail(str(exc), 2)
    logs.setup(cfg.log_level, cfg.log_format)
    exporter = Exporter(cfg)
    try:
        exporter.start()
    except (OSError, zmq.ZMQError) as exc:
        exporter.stop()
        return _fail(f"cannot start: {exc}", 1)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    exporter.stop()
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "demo": demo.run,
    "replay": replay.run,
    "record": record.run,
    "analyze": analyze.run,
    "keygen": keygen.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``kvcache-exporter [FLAGS]`` serves; ``kvcache-exporter
    demo|replay|record|analyze|keygen`` runs a tool (each has its own ``--help``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    tune_gc()
    if args and args[0] in SUBCOMMANDS:
        try:
            return SUBCOMMANDS[args[0]](args[1:])
        except UsageError as exc:
            return _fail(str(exc), 2)
        except KeyboardInterrupt:
            return 130
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
