"""Fuzz a running exporter over ZeroMQ: random and mutated frames among valid ones.

It starts the real ``kvcache-exporter`` process and sends ``--frames`` messages to it (by
default 1,000,000): valid batches (each storing one fresh block on medium ``FUZZ``), and
between them random payloads, mutated copies of the real vectors' payloads (byte flips, cuts,
insertions), wrong frame counts and bad sequence frames. At the end it checks that

- the process is still up;
- every valid batch was applied exactly once:
  ``kvcache_blocks_stored_total{medium="FUZZ",group="0"}`` equals the valid batches sent (a
  mutation cannot make that label);
- every message was received and every bad one counted: messages, decode errors by reason,
  events by type and unknown fields equal what the same stream gives the exporter's own
  pipeline in this process (so nothing was dropped or left uncounted on the way).

Prints the figures; exit 1 on any mismatch.

    python bench/fuzz.py                 # a million frames, a few minutes on 2 cores
    python bench/fuzz.py --frames 20000  # the short run the test suite also makes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.pipeline import new_pipeline

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "fixtures" / "vectors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vector_payloads() -> list[bytes]:
    payloads = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        for line in path.read_text().splitlines()[1:]:
            payloads.append(bytes.fromhex(json.loads(line)["frames_hex"][2]))
    return payloads


def mutate(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        if kind == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif kind == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif data:
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 8)]
    return bytes(data)


def metrics(port: int) -> dict[str, float]:
    """Every sample, keyed ``name{label="value",...}`` with the labels sorted by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def total(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix))


def run(frames: int, seed: int, invalid_share: float) -> dict[str, float]:
    """Fuzz one fresh exporter; returns the figures (raises AssertionError on a mismatch)."""
    rng = random.Random(seed)
    port, http = free_port(), free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "kvcache_exporter.cli", "--source", f"fuzz=tcp://127.0.0.1:{port}",
         "--web.listen-address", f"127.0.0.1:{http}", "--log.level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_EXPORTER_")},
    )  # fmt: skip
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.XPUB)  # knows when the subscription has arrived
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        pub.recv()  # the subscription message
        seeds = vector_payloads()
        encoder = msgspec.msgpack.Encoder()
        expected = new_pipeline("fuzz", CollectorConfig())
        valid = invalid = seq = 0
        started = time.perf_counter()
        for i in range(frames):
            if rng.random() >= invalid_share:
                event = {"type": "BlockStored", "block_hashes": [(1 << 40) + i], "medium": "FUZZ"}
                payload = encoder.encode([1000.0 + i * 1e-3, [event], 0])
                frames_out = [b"kv-events", seq.to_bytes(8, "big"), payload]
                pub.send_multipart(frames_out)
                expected.stream.handle(frames_out, 0.0)
                seq += 1
                valid += 1
                continue
            invalid += 1
            kind = rng.randrange(4)
            if kind == 0:  # random bytes as payload
                payload = rng.randbytes(rng.randint(0, 64))
                frames_out = [b"kv-events", seq.to_bytes(8, "big"), payload]
            elif kind == 1:  # a mutated real vector
                payload = mutate(rng.choice(seeds), rng)
                frames_out = [b"kv-events", seq.to_bytes(8, "big"), payload]
            elif kind == 2:  # wrong frame count
                frames_out = [b"kv-events", rng.randbytes(rng.randint(0, 12))][: rng.randint(1, 2)]
            else:  # a sequence frame of the wrong size
                frames_out = [b"kv-events", rng.randbytes(rng.choice([0, 3, 9])), b"\x90"]
            if len(frames_out) == 3 and len(frames_out[1]) == 8:
                seq += 1  # a framed message with a good seq keeps the sequence contiguous
            pub.send_multipart(frames_out)
            expected.stream.handle(frames_out, 0.0)
        expected.stream.flush()
        sent_seconds = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while True:
            values = metrics(http)
            received = values.get('kvcache_exporter_messages_total{engine="fuzz"}', 0)
            errors = total(values, "kvcache_exporter_decode_errors_total")
            if received + errors >= frames or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        values = metrics(http)
        assert exporter.poll() is None, "the exporter died: " + exporter.stderr.read().decode()
        view = expected.view()
        want_errors = sum(view.decode_errors.values())
        return {
            "frames": frames,
            "valid": valid,
            "invalid": invalid,
            "send_seconds": sent_seconds,
            "valid_applied": values.get(
                'kvcache_blocks_stored_total{engine="fuzz",group="0",medium="FUZZ"}', 0
            ),
            "messages": values.get('kvcache_exporter_messages_total{engine="fuzz"}', 0),
            "messages_expected": view.source.messages,
            "decode_errors": total(values, "kvcache_exporter_decode_errors_total"),
            "decode_errors_expected": want_errors,
            "events": total(values, "kvcache_events_total"),
            "events_expected": sum(view.events.values()),
            "unknown_fields": values.get('kvcache_exporter_unknown_fields_total{engine="fuzz"}', 0),
            "unknown_fields_expected": view.unknown_fields,
            "sequence_gaps": values.get('kvcache_exporter_sequence_gaps_total{engine="fuzz"}', 0),
            "sequence_gaps_expected": view.source.sequence_gaps,
        }
    finally:
        pub.close(linger=0)
        context.term()
        exporter.terminate()
        exporter.wait(10)


def check(figures: dict[str, float]) -> list[str]:
    """Every valid batch applied once; every message received and accounted for."""
    problems = []
    if figures["valid_applied"] != figures["valid"]:
        problems.append(
            f"valid batches applied {figures['valid_applied']}, sent {figures['valid']}"
        )
    for key in ("messages", "decode_errors", "events", "unknown_fields", "sequence_gaps"):
        if figures[key] != figures[f"{key}_expected"]:
            problems.append(
                f"{key}: exporter {figures[key]}, expected {figures[f'{key}_expected']}"
            )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--invalid-share", type=float, default=0.5)
    args = parser.parse_args()
    figures = run(args.frames, args.seed, args.invalid_share)
    for key, value in figures.items():
        print(f"{key:<16} {value:,.2f}" if isinstance(value, float) else f"{key:<16} {value:,}")
    problems = check(figures)
    for problem in problems:
        print("FAIL:", problem)
    print("fuzz: OK" if not problems else "fuzz: FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
