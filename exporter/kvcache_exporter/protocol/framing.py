"""The ZeroMQ multipart framing shared by vLLM, SGLang and TensorRT-LLM.

Live messages are ``[topic, seq, payload]``; replay answers add an empty delimiter in front
and, before vLLM 0.26, carry no topic. ``seq`` is 8 bytes big-endian; -1 ends a replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .decode import DecodeError

SEQ_BYTES: Final = 8
REPLAY_END: Final = -1
MAX_TOPIC_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class Message:
    topic: bytes
    seq: int
    payload: bytes | memoryview


def _seq(frame: bytes | memoryview) -> int:
    if len(frame) != SEQ_BYTES:
        raise DecodeError("seq", f"sequence frame of {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big", signed=True)


def parse_live(frames: list[bytes] | list[memoryview]) -> Message:
    """A live message ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise DecodeError("frames", f"{len(frames)} frames, expected 3")
    topic, seq, payload = frames
    if len(topic) > MAX_TOPIC_BYTES:
        raise DecodeError("frames", "topic frame too long")
    return Message(bytes(topic), _seq(seq), payload)


def parse_replay(frames: list[bytes] | list[memoryview]) -> Message:
    """A replay answer from a DEALER socket: ``[b"", topic, seq, payload]`` or, before vLLM
    0.26, ``[b"", seq, payload]``. A ``seq`` of -1 marks the end of the replay."""
    if len(frames) not in (3, 4) or len(frames[0]) != 0:
        raise DecodeError("frames", f"replay answer of {len(frames)} frames")
    if len(frames) == 4:
        return parse_live(frames[1:])
    return Message(b"", _seq(frames[1]), frames[2])
