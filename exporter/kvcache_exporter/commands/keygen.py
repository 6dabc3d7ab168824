"""``kvcache-exporter keygen``: make a CURVE key pair for the exporter or an engine."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import zmq.auth

from ..curve import curve_available
from .common import OneLineParser, UsageError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvcache-exporter keygen",
        description="Write a ZeroMQ CURVE key pair as DIR/NAME.key (the public key, to give "
        "to the other side) and DIR/NAME.key_secret (both keys, readable by you only) — "
        "the certificate format of czmq and pyzmq (docs/security.md).",
    )
    parser.add_argument("name", metavar="NAME", help="file name stem, e.g. exporter or engine-0")
    parser.add_argument("--dir", default=".", metavar="DIR", help="folder to write to")
    return parser


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not _NAME.match(args.name):
        raise UsageError(f"keygen: name {args.name!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if not curve_available():
        raise UsageError("keygen: this libzmq was built without CURVE support")
    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"keygen: --dir {directory}: no such directory")
    public_path = directory / f"{args.name}.key"
    secret_path = directory / f"{args.name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise UsageError(f"keygen: {path} exists; not overwriting a key")
    # The secret file is created readable by its owner only before the key is written.
    previous = os.umask(0o077)
    try:
        zmq.auth.create_certificates(directory, args.name)
    finally:
        os.umask(previous)
    public_path.chmod(0o644)
    public_key, _ = zmq.auth.load_certificate(public_path)
    print(f"public key {public_key.decode()}: {public_path}", file=sys.stdout)
    print(f"secret key (keep it private): {secret_path}", file=sys.stdout)
    return 0
