"""Recordings: what is written reads back, and a file cut anywhere reads up to the cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache_exporter.sources.recording import (
    MAGIC,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    encode_record,
)

MESSAGES = [
    ("vllm", 1.5, [b"kv-events", (0).to_bytes(8, "big"), b"\x92\xcb" + b"\x00" * 8 + b"\x90"]),
    ("sglang", 2.25, [b"", (7).to_bytes(8, "big"), b"payload"]),
    ("vllm", 3.0, [b"only-one-frame"]),
]


def write(path: Path) -> None:
    writer = RecordingWriter(path)
    for source, arrival, frames in MESSAGES:
        writer.write(source, arrival, frames)
    writer.close()


def test_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "r.kvrec"
    write(path)
    write(path)  # appending keeps one magic and adds records
    got = [(m.source, m.arrival, m.frames) for m in RecordingReader(path)]
    assert got == MESSAGES + MESSAGES
    assert path.read_bytes().count(MAGIC) == 1


def test_a_cut_at_every_byte_reads_the_complete_records(tmp_path: Path) -> None:
    full = tmp_path / "full.kvrec"
    write(full)
    data = full.read_bytes()
    ends = [len(MAGIC)]
    for source, arrival, frames in MESSAGES:
        ends.append(ends[-1] + len(encode_record(source, arrival, frames)))
    cut = tmp_path / "cut.kvrec"
    for size in range(len(MAGIC), len(data) + 1):
        cut.write_bytes(data[:size])
        reader = RecordingReader(cut)
        complete = sum(1 for end in ends[1:] if end <= size)
        assert len(list(reader)) == complete
        assert reader.truncated == (size not in ends)


def test_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"hello world")
    with pytest.raises(RecordingError):
        list(RecordingReader(path))
    with pytest.raises(RecordingError):
        RecordingWriter(path)
