"""The engine vectors at framing level: every message of every stream in
``tests/fixtures/vectors`` (see SOURCE.md there) is three frames, an 8-byte big-endian
sequence number and a msgpack batch ``[ts, events]`` or ``[ts, events, dp_rank]``.

What the events mean, column by column, is test_protocol_decode.py's business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
VECTOR_FILES = sorted(VECTORS.glob("*.jsonl"))


def test_every_stream_is_found() -> None:
    """The parametrization below is not quietly empty or missing the newer engines."""
    names = {path.stem for path in VECTOR_FILES}
    assert {
        "vllm-0.33.0",
        "sglang-0.5.19-live",
        "sglang-0.5.23-live",
        "trtllm-main-13599e9",
        "trtllm-main-13599e9-mm",
    } <= names
    assert len(names) >= 11


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector_messages_are_framed_as_the_engines_send_them(path: Path) -> None:
    header, *lines = path.read_text().splitlines()
    assert path.stem == json.loads(header)["producer"]
    assert lines, "a stream with no messages"
    for line in lines:
        item: dict[str, Any] = json.loads(line)
        frames = [bytes.fromhex(frame) for frame in item["frames_hex"]]
        assert len(frames) == 3, f"seq {item['seq']}: {len(frames)} frames"
        _topic, seq, payload = frames
        assert len(seq) == 8
        assert int.from_bytes(seq, "big") == item["seq"]
        batch = msgspec.msgpack.decode(payload)
        assert isinstance(batch, list)
        assert len(batch) in (2, 3), f"seq {item['seq']}: batch of {len(batch)} elements"
        ts, events = batch[0], batch[1]
        assert isinstance(ts, float | int) and not isinstance(ts, bool)
        assert ts == item["expected"]["ts"]
        assert isinstance(events, list)
        assert len(events) == len(item["expected"]["events"])
