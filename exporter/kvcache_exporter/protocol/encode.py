"""The wire format's encoding side: KV-cache events as the engines encode them (SPEC §2.1, §2.2).

Pure: no sockets. :mod:`kvcache_exporter.publisher` sends these bytes over ZeroMQ; an engine
that owns its sockets can call :func:`encode_batch` and :func:`frames` directly.

Framing is vLLM's: a PUB socket sends ``[topic, seq (8 bytes big-endian), payload]`` with
``seq`` counting from 0 and ``payload`` the msgpack batch ``[ts, events, dp_rank]``. Three
wire forms are offered (:class:`WireForm`); each matches the bytes of the engine it is named
after as far as msgspec allows (``tests/fixtures/vectors``):

- ``vllm``: events are maps with a ``"type"`` key (vLLM >= 0.24). vLLM's own declared fields
  are always written, ``null`` included, exactly as vLLM does; the extension field ``reason``
  is written only when given (msgspec ``omit_defaults``). Byte-identical to vLLM 0.25's
  encoder. vLLM 0.33 differs only in a ``map16`` header for ``BlockStored`` (msgspec picks it
  because vLLM 0.33 declares more than 15 fields); the decoded values are the same.
- ``vllm-array``: events are arrays (vLLM <= 0.23):
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name]``, ``["BlockRemoved", block_hashes, medium(, null, null, reason)]``,
  ``["AllBlocksCleared"]``. vLLM 0.18 / 0.23 pad further positions with nulls; consumers read
  by position and ignore the padding, so it is left out.
- ``sglang``: maps like SGLang 0.5: ``medium`` and ``lora_name`` are omitted when null, the
  topic is conventionally empty. Byte-identical to SGLang 0.5.23's encoder.

The native extension (SPEC §2.2) adds ``BlockAccessed {block_hashes, medium}`` and an optional
``reason`` on ``BlockRemoved``; engines that never send them stay wire-compatible with vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "END_SEQ",
    "Accessed",
    "Cleared",
    "Event",
    "Hash",
    "Hashes",
    "Removed",
    "Stored",
    "WireForm",
    "encode_batch",
    "encode_wire_events",
    "frames",
    "seq_frame",
    "wire_converter",
]

Hash = int | bytes
"""A block hash as engines send it: an int (uint64; SGLang may send it signed) or raw bytes."""
Hashes = Sequence[Hash] | npt.NDArray[np.uint64] | npt.NDArray[np.int64]
"""Block hashes in order: a list or tuple, or a numpy array (sent via ``tolist()``)."""

END_SEQ: Final = b"\xff" * 8
"""The replay end marker: sequence number -1 as 8 big-endian bytes."""

_U64: Final = (1 << 64) - 1


class WireForm(StrEnum):
    """How events are laid out inside the msgpack batch (see the module docstring)."""

    VLLM = "vllm"
    VLLM_ARRAY = "vllm-array"
    SGLANG = "sglang"


# --- the public event records --------------------------------------------------------------
# Plain msgspec structs: cheap to build in an engine's hot path, compared by value in tests.
class Stored(msgspec.Struct, frozen=True, gc=False):
    """Blocks newly stored on ``medium``; ``parent_block_hash`` is the block before them.

    Engines send the blocks' token ids; the exporter only counts them. Give ``token_ids``, or
    just ``token_count`` (sent as that many zeros); with neither, ``block_size`` tokens per
    block are sent, as an engine storing full blocks does.
    """

    block_hashes: Hashes
    parent_block_hash: Hash | None = None
    token_ids: Sequence[int] | None = None
    token_count: int | None = None
    block_size: int = 16
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class Removed(msgspec.Struct, frozen=True, gc=False):
    """Blocks removed from ``medium``; ``reason`` (``evicted``, ``freed``, …) is the extension."""

    block_hashes: Hashes
    medium: str | None = "GPU"
    reason: str | None = None


class Accessed(msgspec.Struct, frozen=True, gc=False):
    """A cache hit on resident blocks (native extension ``BlockAccessed``)."""

    block_hashes: Hashes
    medium: str | None = "GPU"


class Cleared(msgspec.Struct, frozen=True, gc=False):
    """Every block of the cache is gone (``AllBlocksCleared``)."""


Event = Stored | Removed | Accessed | Cleared


# --- wire structs, one set per form ----------------------------------------------------------
# Field order is the wire order (map key order, array position). Fields without a default are
# always written, null included; fields with a default are left out when they hold it.
class _VStored(msgspec.Struct, tag="BlockStored", tag_field="type", omit_defaults=True, gc=False):
    block_hashes: Sequence[Hash]
    parent_block_hash: Hash | None
    token_ids: Any
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class _VRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", omit_defaults=True, gc=False):
    block_hashes: Sequence[Hash]
    medium: str | None
    reason: str | None = None


class _VAccessed(
    msgspec.Struct, tag="BlockAccessed", tag_field="type", omit_defaults=True, gc=False
):
    block_hashes: Sequence[Hash]
    medium: str | None


class _VCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _AStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
    block_hashes: Sequence[Hash]
    parent_block_hash: Hash | None
    token_ids: Any
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


# msgspec writes every position of an array-like struct, defaults included, so a removal with
# a reason is its own struct. The reason follows the positions vLLM declares after medium
# (group_idx, remaining_copy_counts), sent as nulls, so it never lands in one of vLLM's slots.
class _ARemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: Sequence[Hash]
    medium: str | None


class _ARemovedWithReason(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: Sequence[Hash]
    medium: str | None
    group_idx: None
    remaining_copy_counts: None
    reason: str


class _AAccessed(msgspec.Struct, tag="BlockAccessed", array_like=True, gc=False):
    block_hashes: Sequence[Hash]
    medium: str | None


class _ACleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):
    pass


class _SStored(msgspec.Struct, tag="BlockStored", tag_field="type", omit_defaults=True, gc=False):
    block_hashes: Sequence[Hash]
    parent_block_hash: Hash | None
    token_ids: Any
    block_size: int
    lora_id: int | None
    medium: str | None = None
    lora_name: str | None = None


class _SRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", omit_defaults=True, gc=False):
    block_hashes: Sequence[Hash]
    medium: str | None = None
    reason: str | None = None


class _SAccessed(
    msgspec.Struct, tag="BlockAccessed", tag_field="type", omit_defaults=True, gc=False
):
    block_hashes: Sequence[Hash]
    medium: str | None = None


class _Batch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    dp_rank: int | None


_encoder: Final = msgspec.msgpack.Encoder()


def _seq(values: Sequence[Any] | npt.NDArray[Any]) -> Sequence[Any]:
    """A list or tuple msgspec can write; numpy arrays and other sequences are converted."""
    if type(values) is list or type(values) is tuple:
        return values
    tolist: Callable[[], list[Any]] | None = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)


@lru_cache(maxsize=256)
def _zeros(count: int) -> msgspec.Raw:
    """A msgpack array of ``count`` zeros, built once per length and embedded as raw bytes."""
    if count < 0:
        raise ValueError(f"token_count must be >= 0, not {count}")
    if count <= 15:
        head = bytes((0x90 | count,))
    elif count <= 0xFFFF:
        head = b"\xdc" + count.to_bytes(2, "big")
    else:
        head = b"\xdd" + count.to_bytes(4, "big")
    return msgspec.Raw(head + bytes(count))


def _tokens(event: Stored) -> Any:
    if event.token_ids is not None:
        return _seq(event.token_ids)
    count = event.token_count
    if count is None:
        count = event.block_size * len(event.block_hashes)
    return _zeros(count)


def _converter(
    stored: Callable[..., Any],
    removed: Callable[[Any, str | None, str | None], Any],
    accessed: Callable[[Any, str | None], Any],
    cleared: Callable[[], Any],
) -> Callable[[Event], Any]:
    """An event converter for one wire form: the forms differ only in the structs, which
    decide the shape (map or array) and what a null field looks like (written, or left out)."""

    def convert(event: Event) -> Any:
        if type(event) is Stored:
            return stored(
                _seq(event.block_hashes),
                event.parent_block_hash,
                _tokens(event),
                event.block_size,
                event.lora_id,
                event.medium,
                event.lora_name,
            )
        if type(event) is Removed:
            return removed(_seq(event.block_hashes), event.medium, event.reason)
        if type(event) is Accessed:
            return accessed(_seq(event.block_hashes), event.medium)
        if type(event) is Cleared:
            return cleared()
        raise TypeError(f"not a KV event: {event!r}")

    return convert


def _array_removed(hashes: Any, medium: str | None, reason: str | None) -> Any:
    """A removal in vLLM's array form: with a reason, the struct that carries one."""
    if reason is None:
        return _ARemoved(hashes, medium)
    return _ARemovedWithReason(hashes, medium, None, None, reason)


_TO_WIRE: Final[dict[WireForm, Callable[[Event], Any]]] = {
    WireForm.VLLM: _converter(_VStored, _VRemoved, _VAccessed, _VCleared),
    WireForm.VLLM_ARRAY: _converter(_AStored, _array_removed, _AAccessed, _ACleared),
    # {"type": "AllBlocksCleared"} is the same in both map forms.
    WireForm.SGLANG: _converter(_SStored, _SRemoved, _SAccessed, _VCleared),
}


def encode_batch(
    ts: float,
    events: Iterable[Event],
    form: WireForm | str = WireForm.VLLM,
    dp_rank: int | None = 0,
) -> bytes:
    """The msgpack payload ``[ts, events, dp_rank]`` of one batch in the given wire form.

    ``ts`` is the engine's wall clock in seconds; durations the exporter reports are measured
    on it. Pure: no sockets, usable to write test vectors or feed another transport.
    """
    return encode_wire_events(ts, list(map(wire_converter(form), events)), dp_rank)


def frames(topic: str | bytes, seq: int, payload: bytes) -> list[bytes]:
    """The multipart message ``[topic, seq (8 bytes big-endian), payload]`` a PUB socket sends."""
    topic_bytes = topic.encode("utf-8") if isinstance(topic, str) else bytes(topic)
    return [topic_bytes, seq_frame(seq), payload]


def wire_converter(form: WireForm | str) -> Callable[[Event], Any]:
    """The function turning an event record into its wire struct in ``form``.

    It raises TypeError for anything that is not an event, so a publisher that converts as it
    queues fails at the call that made the bad event.
    """
    return _TO_WIRE[WireForm(form)]


def encode_wire_events(ts: float, wire_events: list[Any], dp_rank: int | None) -> bytes:
    """The payload ``[ts, events, dp_rank]`` of events already converted by
    :func:`wire_converter`."""
    return _encoder.encode(_Batch(float(ts), wire_events, dp_rank))


def seq_frame(seq: int) -> bytes:
    """A sequence number as its frame: 8 bytes big-endian, wrapping at 2**64 (so -1 is
    :data:`END_SEQ`)."""
    return (seq & _U64).to_bytes(8, "big")
