"""ZeroMQ multipart framing (SPEC §2.1): live ``[topic, seq, payload]`` and replay answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.protocol.decode import DecodeError
from kvcache_exporter.protocol.framing import (
    MAX_TOPIC_BYTES,
    REPLAY_END,
    Message,
    parse_live,
    parse_replay,
)

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
VECTOR_FILES = sorted(VECTORS.glob("*.jsonl"))
SEQ7 = (7).to_bytes(8, "big")
END = b"\xff" * 8


def _frames(path: Path) -> list[tuple[list[bytes], int]]:
    out = []
    for line in path.read_text().splitlines()[1:]:
        item = json.loads(line)
        out.append(([bytes.fromhex(f) for f in item["frames_hex"]], item["seq"]))
    return out


def _reason(call: object, frames: list[bytes]) -> str:
    with pytest.raises(DecodeError) as info:
        call(frames)  # type: ignore[operator]
    return info.value.reason


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector_frames_parse(path: Path) -> None:
    """Every vector message parses as a live message: topic as sent (empty for SGLang), seq
    counting up from 0 as the vector says, payload untouched."""
    messages = _frames(path)
    assert [seq for _, seq in messages] == list(range(len(messages)))
    for frames, seq in messages:
        msg = parse_live(frames)
        assert msg == Message(frames[0], seq, frames[2])
        empty_topic = path.stem.startswith(("sglang", "trtllm"))  # their default topic is ""
        assert msg.topic == (b"" if empty_topic else b"kv-events")


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector_frames_as_replay_answers(path: Path) -> None:
    """The same messages as replay answers, with (vLLM >= 0.26) and without the topic, give
    the same seq and payload."""
    for frames, seq in _frames(path):
        with_topic = parse_replay([b"", *frames])
        without_topic = parse_replay([b"", frames[1], frames[2]])
        assert with_topic == Message(frames[0], seq, frames[2])
        assert without_topic == Message(b"", seq, frames[2])


def test_memoryview_frames() -> None:
    """Frames handed over as memoryviews (zmq copy=False) parse the same; topic becomes bytes."""
    frames = [memoryview(b"kv"), memoryview(SEQ7), memoryview(b"\x92\x00\x90")]
    msg = parse_live(frames)
    assert msg.topic == b"kv"
    assert isinstance(msg.topic, bytes)
    assert msg.seq == 7
    assert bytes(msg.payload) == b"\x92\x00\x90"


@pytest.mark.parametrize(
    ("seq", "value"),
    [(b"\x00" * 8, 0), (SEQ7, 7), (b"\x7f" + b"\xff" * 7, 2**63 - 1), (END, REPLAY_END)],
)
def test_seq_is_big_endian_signed(seq: bytes, value: int) -> None:
    """seq is 8 bytes big-endian; eight 0xff bytes read as -1 (the replay end marker)."""
    assert parse_live([b"t", seq, b"p"]).seq == value


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_live_wrong_frame_count(count: int) -> None:
    """A live message of other than three frames is refused as ``frames``."""
    frames = [b"t", SEQ7, b"p", b"x", b"y"][:count]
    assert _reason(parse_live, frames) == "frames"


@pytest.mark.parametrize("size", [0, 1, 4, 7, 9, 16])
def test_seq_frame_not_8_bytes(size: int) -> None:
    """A sequence frame of any length but 8 is refused as ``seq``, live and replayed."""
    seq = b"\x01" * size
    assert _reason(parse_live, [b"t", seq, b"p"]) == "seq"
    assert _reason(parse_replay, [b"", b"t", seq, b"p"]) == "seq"
    assert _reason(parse_replay, [b"", seq, b"p"]) == "seq"


def test_topic_length_limit() -> None:
    """A topic up to MAX_TOPIC_BYTES is fine; a longer one is refused as ``frames``."""
    assert parse_live([b"t" * MAX_TOPIC_BYTES, SEQ7, b"p"]).topic == b"t" * MAX_TOPIC_BYTES
    assert _reason(parse_live, [b"t" * (MAX_TOPIC_BYTES + 1), SEQ7, b"p"]) == "frames"


def test_empty_payload_frame_is_framing_valid() -> None:
    """Framing does not judge the payload: an empty one is the decoder's business."""
    assert parse_live([b"", SEQ7, b""]) == Message(b"", 7, b"")


def test_replay_end_marker() -> None:
    """The replay ends with seq -1 and an empty payload, with and without topic."""
    assert parse_replay([b"", b"kv-events", END, b""]) == Message(b"kv-events", REPLAY_END, b"")
    assert parse_replay([b"", END, b""]) == Message(b"", REPLAY_END, b"")


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"", SEQ7],
        [b"", b"t", SEQ7, b"p", b"x"],
        [b"x", SEQ7, b"p"],
        [b"x", b"t", SEQ7, b"p"],
        [b"t", SEQ7, b"p"],  # a live message is not a replay answer
    ],
    ids=["none", "one", "two", "five", "delimiter-3", "delimiter-4", "live-shape"],
)
def test_replay_wrong_shape(frames: list[bytes]) -> None:
    """Replay answers need an empty delimiter and 3 or 4 frames in all; else ``frames``."""
    assert _reason(parse_replay, frames) == "frames"


def test_replay_topic_too_long() -> None:
    """The topic limit holds for replayed messages too."""
    assert _reason(parse_replay, [b"", b"t" * (MAX_TOPIC_BYTES + 1), SEQ7, b"p"]) == "frames"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=6))
def test_random_frames_only_raise_decode_error(frames: list[bytes]) -> None:
    """Any list of frames either parses (with seq from 8 bytes) or raises DecodeError."""
    for parse in (parse_live, parse_replay):
        try:
            msg = parse(frames)
        except DecodeError as exc:
            assert exc.reason in {"frames", "seq"}
        else:
            assert -(2**63) <= msg.seq < 2**63
            assert msg.payload is frames[-1]
