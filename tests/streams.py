"""Whole event streams from vLLM 0.33's own cache manager, and what its state said about them.

The files are in ``tests/fixtures/streams`` (see SOURCE.md there). A ``*.frames.gz`` file is
gzip of repeated ``[length: u32 big-endian][bytes]`` frames; every three frames are one ZeroMQ
multipart message ``[topic, seq (8 bytes BE), msgpack payload]``. ``*.truth.json`` holds the
engine's own counts per ``"group|medium"``.

    messages = read_stream("full")      # or "hybrid", or "vllm-0.33.0-full"
    truth = load_truth("full")
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from pathlib import Path
from typing import Any, Final

STREAMS: Final = Path(__file__).parent / "fixtures" / "streams"
NAMES: Final = ("full", "hybrid")  # the short names of the streams there
FRAMES_PER_MESSAGE: Final = 3
_LENGTH: Final = struct.Struct(">I")


def _stem(name: str) -> str:
    """``full`` → ``vllm-0.33.0-full``; a full stem is kept as it is."""
    return name if name.startswith("vllm-") else f"vllm-0.33.0-{name}"


def frames_path(name: str) -> Path:
    return STREAMS / f"{_stem(name)}.frames.gz"


def truth_path(name: str) -> Path:
    return STREAMS / f"{_stem(name)}.truth.json"


def split_frames(data: bytes) -> list[bytes]:
    """The length-prefixed frames of ``data`` (already gunzipped); a cut frame is an error."""
    frames: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise ValueError(f"cut length prefix at byte {offset}")
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise ValueError(f"frame at byte {offset} wants {size} bytes, file ends first")
        frames.append(data[offset : offset + size])
        offset += size
    return frames


@functools.cache
def _messages(name: str) -> tuple[tuple[bytes, ...], ...]:
    frames = split_frames(gzip.decompress(frames_path(name).read_bytes()))
    if len(frames) % FRAMES_PER_MESSAGE:
        raise ValueError(f"{name}: {len(frames)} frames is not a whole number of messages")
    return tuple(
        tuple(frames[i : i + FRAMES_PER_MESSAGE]) for i in range(0, len(frames), FRAMES_PER_MESSAGE)
    )


def read_stream(name: str) -> list[list[bytes]]:
    """Every message of stream ``name``, in order, each ``[topic, seq, payload]`` (bytes as in
    the file). Read once per process; each call returns fresh lists."""
    return [list(message) for message in _messages(_stem(name))]


def load_truth(name: str) -> dict[str, Any]:
    """The engine's own counts for stream ``name`` (the ``*.truth.json`` beside it)."""
    truth: dict[str, Any] = json.loads(truth_path(name).read_text())
    return truth


def seq_of(message: list[bytes]) -> int:
    """The sequence number a message carries (its second frame, 8 bytes big-endian)."""
    return int.from_bytes(message[1], "big")
