"""Recordings of raw engine streams: an append-only file of multipart frames.

Format (all integers little-endian)::

    file    := MAGIC record*
    MAGIC   := b"KVCREC1\\n"
    record  := length:u32  body            (length = len(body))
    body    := arrival:f64  source_len:u8  frame_count:u8  source  frame*
    frame   := frame_len:u32  bytes

``arrival`` is the recorder's wall clock (seconds) when the message arrived, ``source`` the
``--source`` name (UTF-8). Records are written whole and flushed after every burst, so a
recording cut at any byte (the recorder killed, the disk full) reads back up to the last
complete record; :class:`RecordingReader` says whether it met a cut.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

MAGIC: Final = b"KVCREC1\n"
_LENGTH = struct.Struct("<I")
_HEAD = struct.Struct("<dBB")
MAX_RECORD_BYTES: Final = 256 * 1024 * 1024


class RecordingError(ValueError):
    """The file is not a recording (or not one this version reads)."""


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    source: str
    arrival: float
    frames: list[bytes]


def encode_record(source: str, arrival: float, frames: Sequence[bytes]) -> bytes:
    name = source.encode()
    if len(name) > 255 or len(frames) > 255:
        raise ValueError("source name or frame count too large for a record")
    parts = [_HEAD.pack(arrival, len(name), len(frames)), name]
    for frame in frames:
        parts.append(_LENGTH.pack(len(frame)))
        parts.append(bytes(frame))
    body = b"".join(parts)
    return _LENGTH.pack(len(body)) + body


class RecordingWriter:
    """Appends records to a recording, creating it (with its magic) when new."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            with self.path.open("rb") as existing:
                if existing.read(len(MAGIC)) != MAGIC:
                    raise RecordingError(f"{self.path}: exists and is not a recording")
        self._file: BinaryIO = self.path.open("ab")
        if not exists:
            self._file.write(MAGIC)
        self.messages = 0
        self.bytes = 0

    def write(self, source: str, arrival: float, frames: Sequence[bytes]) -> None:
        record = encode_record(source, arrival, frames)
        self._file.write(record)
        self.messages += 1
        self.bytes += len(record)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RecordingReader:
    """Iterates the complete records of a recording; ``truncated`` is set if it ends in a cut."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.truncated = False

    def __iter__(self) -> Iterator[RecordedMessage]:
        with self.path.open("rb") as file:
            if file.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f"{self.path}: not a kvcache-exporter recording")
            while True:
                head = file.read(_LENGTH.size)
                if not head:
                    return
                if len(head) < _LENGTH.size:
                    self.truncated = True
                    return
                (length,) = _LENGTH.unpack(head)
                if length > MAX_RECORD_BYTES:
                    raise RecordingError(f"{self.path}: corrupt record length {length}")
                body = file.read(length)
                if len(body) < length:
                    self.truncated = True
                    return
                yield _decode_body(body, self.path)


def _decode_body(body: bytes, path: Path) -> RecordedMessage:
    try:
        arrival, name_len, count = _HEAD.unpack_from(body)
        offset = _HEAD.size
        source = body[offset : offset + name_len].decode()
        offset += name_len
        frames = []
        for _ in range(count):
            (size,) = _LENGTH.unpack_from(body, offset)
            offset += _LENGTH.size
            frames.append(body[offset : offset + size])
            offset += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: corrupt record ({exc})") from None
    if offset != len(body):
        raise RecordingError(f"{path}: corrupt record (length mismatch)")
    return RecordedMessage(source, arrival, frames)
