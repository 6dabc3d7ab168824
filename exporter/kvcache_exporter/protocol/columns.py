"""Row columns from decoded events: hash folding, token counts, prefix chains, copies left.

The decoder turns a flush's events into :class:`~.batch.EventBatch` columns with these, one
numpy pass per column rather than per event. Hashes fold to uint64 (ints by two's complement,
bytes by their last 8 bytes); ``token_ids`` are counted from their msgpack header, never decoded.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_not
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from .batch import NO_COPY_COUNT, OP_STORE, PrefixChain
from .schema import Hash

U64_MASK: Final = (1 << 64) - 1

_get_tokens = attrgetter("token_ids")
_get_parent = attrgetter("parent_block_hash")
_get_block_size = attrgetter("block_size")
_get_copies_left = attrgetter("remaining_copy_counts")


def fold_hash(value: object) -> int:
    """Fold a wire hash to uint64: ints by two's complement, bytes by their last 8 bytes."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a block hash")
    if isinstance(value, int):
        return value & U64_MASK
    if isinstance(value, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(value)[-8:], "big")
    raise TypeError(f"a block hash is an int or bytes, not {type(value).__name__}")


def hashes_to_array(hashes: list[Hash]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """uint64 array of folded hashes; the common all-non-negative-int case stays in C."""
    # numpy parses bytes as decimal text (b"12" -> 12), so bytes never take the fast path.
    if bytes not in set(map(type, hashes)):
        try:
            return np.array(hashes, dtype=np.uint64)
        except (OverflowError, TypeError, ValueError):
            pass
        try:  # signed 64-bit hashes (SGLang): the same bits
            return np.array(hashes, dtype=np.int64).view(np.uint64)
        except (OverflowError, TypeError, ValueError):
            pass
    return np.fromiter(map(fold_hash, hashes), dtype=np.uint64, count=len(hashes))


def msgpack_array_length(raw: msgspec.Raw) -> int:
    """Element count of a msgpack array from its header alone (token_ids are never decoded)."""
    view = memoryview(raw)
    if not view:
        return 0
    head = view[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(view) >= 3:
        return int.from_bytes(view[1:3], "big")
    if head == 0xDD and len(view) >= 5:
        return int.from_bytes(view[1:5], "big")
    return 0


def prefix_chain(events: list[Any], counts: npt.NDArray[np.int64]) -> PrefixChain:
    """Per row: its event's parent hash and its offset inside the event."""
    parents = list(map(_get_parent, events))
    has_parent = np.fromiter(map(is_not, parents, repeat(None)), bool, count=len(parents))
    parent = np.zeros(len(parents), np.uint64)
    if has_parent.any():
        parent[has_parent] = hashes_to_array([p for p in parents if p is not None])
    starts = np.cumsum(counts) - counts
    offset = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    return PrefixChain(
        parent=np.repeat(parent, counts),
        has_parent=np.repeat(has_parent, counts),
        offset=offset.astype(np.uint32),
    )


def block_tokens(
    events: list[Any], op_ev: npt.NDArray[np.uint8], counts: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint32]:
    """Tokens each stored block holds (0 on other rows): ``block_size``, the engine's unit of
    caching, and fewer only for a trailing partial block of a store whose ``token_ids`` stop
    short of it.

    ``token_ids`` cannot be split per block in general: a sliding-window group's stores carry
    tokens of blocks that are not in ``block_hashes``. Where ``block_size`` is not sent, each
    block is taken to hold an equal share of the store's tokens.
    """
    tokens = np.zeros(int(counts.sum()), np.uint32)
    store_events = np.flatnonzero(op_ev == OP_STORE)
    if not store_events.size:
        return tokens
    stores = list(map(events.__getitem__, store_events.tolist()))
    n = counts[store_events]
    sent = np.fromiter(map(msgpack_array_length, map(_get_tokens, stores)), np.int64, len(stores))
    sizes = list(map(_get_block_size, stores))
    try:
        size = np.array(sizes, dtype=np.int64)
    except (TypeError, OverflowError):  # some store without a block size (or a bad one)
        size = np.array([b if isinstance(b, int) and 0 < b < 2**31 else 0 for b in sizes])
    size = np.where((size > 0) & (size < 2**31), size, -(-sent // np.maximum(n, 1)))
    offset = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    row_size = np.repeat(size, n)
    held = np.clip(np.repeat(sent, n) - offset * row_size, 0, row_size)
    row_is_store = np.repeat(op_ev == OP_STORE, counts)
    tokens[row_is_store] = np.minimum(held, np.iinfo(np.uint32).max)
    return tokens


def copies_left(events: list[Any], counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]:
    """Per row: the removal's ``remaining_copy_counts`` entry, or NO_COPY_COUNT."""
    lists = list(map(_get_copies_left, events))
    out = np.full(int(counts.sum()), NO_COPY_COUNT, np.int32)
    if lists.count(None) == len(lists):
        return out
    starts = np.cumsum(counts) - counts
    for start, count, values in zip(starts.tolist(), counts.tolist(), lists, strict=True):
        # A list that does not match the hashes one to one says nothing usable.
        if values is not None and len(values) == count:
            out[start : start + count] = np.clip(values, 0, np.iinfo(np.int32).max)
    return out
