"""Payload decoding (SPEC §2.1, §2.2): real engine vectors, edge cases, malformed input, fuzzing.

The vectors in ``tests/fixtures/vectors`` are the engines' own bytes (see SOURCE.md there).
Expected hashes are folded here independently of the decoder's ``fold_hash``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_exporter.protocol.batch import (
    MAX_GROUPS,
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    GroupSpec,
    LabelTable,
    new_adapter_table,
)
from kvcache_exporter.protocol.columns import fold_hash, hashes_to_array, msgpack_array_length
from kvcache_exporter.protocol.decode import DecodeError, DecodeLimits, PayloadDecoder

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
VECTOR_FILES = sorted(VECTORS.glob("*.jsonl"))
MASK = 2**64 - 1
OP_NAMES = {
    OP_STORE: "BlockStored",
    OP_REMOVE: "BlockRemoved",
    OP_ACCESS: "BlockAccessed",
    OP_CLEAR: "AllBlocksCleared",
}
TS = 1_764_000_000.0
encode = msgspec.msgpack.encode

# A row as the tests compare it: (event type, folded hash, ts, medium, reason).
# Clear rows carry no hash; reasons only mean something on removals.
Row = tuple[str, int | None, float, str, str | None]


@dataclass(frozen=True)
class Vector:
    file: str
    seq: int
    frames: list[bytes]
    expected: dict[str, Any]

    @property
    def payload(self) -> bytes:
        return self.frames[2]


def load_vectors(path: Path) -> list[Vector]:
    lines = path.read_text().splitlines()
    out = []
    for line in lines[1:]:
        item = json.loads(line)
        frames = [bytes.fromhex(f) for f in item["frames_hex"]]
        out.append(Vector(path.name, item["seq"], frames, item["expected"]))
    return out


ALL_VECTORS = [v for path in VECTOR_FILES for v in load_vectors(path)]
ALL_PAYLOADS = [v.payload for v in ALL_VECTORS]


def new_decoder(limits: DecodeLimits | None = None) -> PayloadDecoder:
    return PayloadDecoder(LabelTable("unknown"), LabelTable("evicted", seed=("cleared",)), limits)


def fold_expected(value: Any) -> int:
    """The README's folding rule, written out independently of the decoder."""
    if isinstance(value, dict):
        return int.from_bytes(bytes.fromhex(value["bytes_hex"])[-8:], "big")
    assert isinstance(value, int)
    return value & MASK


def rows_of(d: PayloadDecoder, batch: EventBatch) -> list[Row]:
    """The batch as comparable tuples, labels resolved through the decoder's tables."""
    assert batch.op.dtype == np.uint8
    assert batch.block_hash.dtype == np.uint64
    assert batch.ts.dtype == np.float64
    n = len(batch)
    assert all(len(col) == n for col in (batch.block_hash, batch.ts, batch.medium, batch.reason))
    out: list[Row] = []
    for op, h, ts, medium, reason in zip(
        batch.op.tolist(),
        batch.block_hash.tolist(),
        batch.ts.tolist(),
        batch.medium.tolist(),
        batch.reason.tolist(),
        strict=True,
    ):
        out.append(
            (
                OP_NAMES[op],
                None if op == OP_CLEAR else h,
                ts,
                d.media.names[medium],
                d.reasons.names[reason] if op == OP_REMOVE else None,
            )
        )
    return out


def expected_rows(expected: dict[str, Any]) -> list[Row]:
    """Rows a vector's ``expected`` block implies: one per hash, one per clear."""
    ts = expected["ts"]
    out: list[Row] = []
    for event in expected["events"]:
        kind = event["type"]
        if kind == "AllBlocksCleared":
            out.append((kind, None, ts, "unknown", None))
            continue
        medium = event.get("medium") or "unknown"
        reason = (event.get("reason") or "evicted") if kind == "BlockRemoved" else None
        out.extend((kind, fold_expected(h), ts, medium, reason) for h in event["block_hashes"])
    return out


def decode_one(payload: bytes, d: PayloadDecoder | None = None) -> tuple[PayloadDecoder, list[Row]]:
    d = d or new_decoder()
    d.feed(payload)
    return d, rows_of(d, d.flush())


def stored(
    hashes: list[Any],
    medium: str | None = "GPU",
    tokens: int = 16,
    form: str = "map",
    **extra: Any,
) -> Any:
    """A BlockStored event in map or array form."""
    if form == "map":
        return {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": list(range(tokens)),
            "block_size": 16,
            "lora_id": None,
            "medium": medium,
            **extra,
        }
    return ["BlockStored", hashes, None, list(range(tokens)), 16, None, medium, None]


def removed(hashes: list[Any], medium: str | None = "GPU", form: str = "map", **extra: Any) -> Any:
    if form == "map":
        return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium, **extra}
    if "reason" in extra:  # after vLLM's group_idx and remaining_copy_counts
        return ["BlockRemoved", hashes, medium, None, None, extra.pop("reason"), *extra.values()]
    return ["BlockRemoved", hashes, medium, *extra.values()]


# --- 1. conformance with the engines' own bytes ----------------------------------------------


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vectors_decode_exactly_as_expected(path: Path) -> None:
    """Every message of every engine's stream decodes to exactly the README's expected values:
    ts, dp_rank, rows (type, folded hash, medium, ts, one OP_CLEAR row per clear), event counts
    by type and the stored token count, with nothing counted as an error or unknown."""
    d = new_decoder()
    vectors = load_vectors(path)
    assert len(vectors) == 5
    type_counts: Counter[str] = Counter()
    tokens = 0
    for v in vectors:
        exp = v.expected
        assert d.feed(v.payload) == len(exp["events"])
        assert d.last_ts == exp["ts"]
        assert d.last_dp_rank == exp["dp_rank"]
        assert d.pending_events == len(exp["events"])
        got = rows_of(d, d.flush())
        assert got == expected_rows(exp)
        clears = [r for r in got if r[0] == "AllBlocksCleared"]
        assert len(clears) == sum(e["type"] == "AllBlocksCleared" for e in exp["events"])
        type_counts.update(e["type"] for e in exp["events"])
        tokens += sum(e.get("token_count", 0) for e in exp["events"])
        assert d.stats.tokens_stored == tokens
    assert d.stats.events == dict(type_counts)
    assert d.stats.errors == {}
    assert d.stats.unknown_fields == 0
    assert "unknown" not in d.stats.events


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vectors_fed_together_flush_in_order(path: Path) -> None:
    """All messages of a stream fed before one flush give the same rows, in stream order, as
    flushing after each message (ts stays per message)."""
    vectors = load_vectors(path)
    d = new_decoder()
    for v in vectors:
        d.feed(v.payload)
    want = [row for v in vectors for row in expected_rows(v.expected)]
    assert rows_of(d, d.flush()) == want
    assert len(d.flush()) == 0


def test_vector_script_is_the_same_across_engines() -> None:
    """Every producer encodes the same logical script (a sanity check on the fixtures): the
    vLLM and SGLang struct files agree on row types and media per message; the live and
    TensorRT-LLM captures keep its shape (5 batches, 5 stored blocks, one clear, one block
    resident at the end) in what their engines can send."""
    shapes = {
        path.stem: [[(r[0], r[3]) for r in expected_rows(v.expected)] for v in load_vectors(path)]
        for path in VECTOR_FILES
    }
    captured = {k for k in shapes if k.endswith("-live") or k.startswith("trtllm-")}
    assert captured  # the fixtures hold them
    # vLLM 0.9.2 has no medium; the other struct-encoded files agree exactly.
    with_medium = {k: s for k, s in shapes.items() if k != "vllm-0.9.2" and k not in captured}
    assert len({json.dumps(s) for s in with_medium.values()}) == 1
    for name in captured:
        rows = [row for message in shapes[name] for row in message]
        assert len(shapes[name]) == 5, name
        assert sum(kind == "BlockStored" for kind, _ in rows) == 5, name
        assert sum(kind == "AllBlocksCleared" for kind, _ in rows) == 1, name
        assert shapes[name][-1] == [("BlockStored", "GPU")], name


def expected_extras(expected: dict[str, Any]) -> list[tuple[str, int]]:
    """Per row: (adapter, tokens) a vector's ``expected`` block implies — ``lora_name``, else
    ``lora_id`` as its digits, else ``base``; a stored block holds ``block_size`` tokens."""
    out: list[tuple[str, int]] = []
    for event in expected["events"]:
        if event["type"] == "AllBlocksCleared":
            out.append(("base", 0))
            continue
        if event["type"] != "BlockStored":
            out.extend(("base", 0) for _ in event["block_hashes"])
            continue
        name, lora_id = event.get("lora_name"), event.get("lora_id")
        adapter = name or (str(lora_id) if lora_id is not None else "base")
        assert event["token_count"] == event["block_size"] * len(event["block_hashes"])
        out.extend((adapter, event["block_size"]) for _ in event["block_hashes"])
    return out


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vectors_adapters_groups_and_tokens(path: Path) -> None:
    """Every engine's bytes give each stored block its adapter (vLLM and SGLang by
    ``lora_name``, TensorRT-LLM by ``lora_id``, the base model otherwise) and ``block_size``
    tokens; none of these single-group streams names a group other than 0, and no removal
    says how many copies remain."""
    d = new_decoder()
    for v in load_vectors(path):
        d.feed(v.payload)
        batch = d.flush()
        got = [
            (d.adapters.names[a], t)
            for a, t in zip(batch.adapter.tolist(), batch.tokens.tolist(), strict=True)
        ]
        assert got == expected_extras(v.expected)
        assert set(batch.group.tolist()) <= {0}
        assert (batch.copies_left == -1).all()
    assert d.groups.names == ["0"]
    assert d.stats.groups == {}


def test_memoryview_payload() -> None:
    """A payload handed over as a memoryview (zero-copy from zmq) decodes the same."""
    v = ALL_VECTORS[1]
    _, want = decode_one(v.payload)
    _, got = decode_one(memoryview(v.payload))  # type: ignore[arg-type]
    assert got == want == expected_rows(v.expected)


# --- 2. edge cases named by the SPEC ------------------------------------------------------------


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize(
    ("wire", "folded"),
    [
        (-42, 2**64 - 42),
        (-1, MASK),
        (-(2**63), 2**63),
        (2**64 - 1, MASK),
        (2**63, 2**63),
        (0, 0),
        (bytes(range(32)), int.from_bytes(bytes(range(24, 32)), "big")),
        (b"\x01\x02", 0x0102),
        (b"", 0),
        (b"12345678", int.from_bytes(b"12345678", "big")),
        (b"12", 0x3132),
    ],
    ids=[
        "neg42",
        "neg1",
        "int64min",
        "u64max",
        "2^63",
        "zero",
        "bytes32",
        "bytes2",
        "bytes0",
        "ascii-digits8",
        "ascii-digits2",
    ],
)
def test_hash_folding(wire: int | bytes, folded: int, form: str) -> None:
    """Int hashes fold by two's complement, bytes by their last 8 bytes big-endian, whatever
    the form; bytes that happen to be ASCII digits are not read as decimal text."""
    d, rows = decode_one(encode([TS, [stored([wire, 7], form=form)], 0]))
    assert [r[1] for r in rows] == [folded, 7]
    assert fold_hash(wire) == folded
    assert hashes_to_array([wire, 7]).tolist() == [folded, 7]
    assert d.stats.errors == {}


def test_hashes_to_array_mixed_and_empty() -> None:
    """Mixed int/bytes lists and the empty list fold element by element."""
    assert hashes_to_array([]).dtype == np.uint64
    assert len(hashes_to_array([])) == 0
    mixed: list[int | bytes] = [1, b"\xff" * 9, -1, 2**64 - 1, b"7"]
    assert hashes_to_array(mixed).tolist() == [1, MASK, MASK, MASK, ord("7")]


@pytest.mark.parametrize("bad", [True, 1.5, "12", None])
def test_fold_hash_rejects_non_hashes(bad: object) -> None:
    """fold_hash accepts only ints (not bools) and bytes."""
    with pytest.raises(TypeError):
        fold_hash(bad)


def test_msgpack_array_length() -> None:
    """Token counts are read from the array header alone, for every array size class."""
    for n in (0, 15, 16, 65535, 65536):
        assert msgpack_array_length(msgspec.Raw(encode(list(range(n))))) == n
    assert msgpack_array_length(msgspec.Raw(b"")) == 0
    assert msgpack_array_length(msgspec.Raw(encode(None))) == 0
    assert msgpack_array_length(msgspec.Raw(b"\xdc\x00")) == 0  # cut header


def test_batch_of_two_elements_has_no_dp_rank() -> None:
    """``[ts, events]`` decodes, and dp_rank stays unknown."""
    d, rows = decode_one(encode([TS, [stored([1])]]))
    assert rows == [("BlockStored", 1, TS, "GPU", None)]
    assert d.last_dp_rank is None
    assert d.last_ts == TS


def test_dp_rank_is_remembered_and_not_a_bool() -> None:
    """dp_rank is taken from the batch; a bool is not a rank."""
    d = new_decoder()
    d.feed(encode([TS, [], 3]))
    assert d.last_dp_rank == 3
    d.feed(encode([TS, [stored([1])], True]))
    assert d.last_dp_rank == 3
    assert len(d.flush()) == 1


def test_int_ts_is_accepted() -> None:
    """An integer timestamp is a valid float on the wire."""
    _, rows = decode_one(encode([1_764_000_000, [stored([1])], 0]))
    assert rows == [("BlockStored", 1, TS, "GPU", None)]


@pytest.mark.parametrize("form", ["map", "array"])
def test_unknown_event_type_in_the_middle_is_skipped(form: str) -> None:
    """An unknown event type is counted in stats.events["unknown"] and skipped; the events
    around it decode, in order."""
    unknown: Any = (
        {"type": "BlockTransferred", "block_hashes": [9], "src": "GPU"}
        if form == "map"
        else ["BlockTransferred", [9], "GPU", "CPU"]
    )
    payload = encode(
        [TS, [stored([1, 2], form=form), unknown, removed([1], form=form), ["AllBlocksCleared"]], 0]
    )
    d = new_decoder()
    assert d.feed(payload) == 3
    assert rows_of(d, d.flush()) == [
        ("BlockStored", 1, TS, "GPU", None),
        ("BlockStored", 2, TS, "GPU", None),
        ("BlockRemoved", 1, TS, "GPU", "evicted"),
        ("AllBlocksCleared", None, TS, "unknown", None),
    ]
    assert d.stats.events == {
        "unknown": 1,
        "BlockStored": 1,
        "BlockRemoved": 1,
        "AllBlocksCleared": 1,
    }
    assert d.stats.errors == {}
    assert d.stats.tokens_stored == 16


@pytest.mark.parametrize("bad_type", [None, 5, ["BlockStored"], {"a": 1}, b"BlockStored", ""])
def test_event_type_not_a_known_string_is_unknown(bad_type: Any) -> None:
    """A map whose "type" is missing, not a string or not a known name counts as unknown."""
    event = {"block_hashes": [1]} if bad_type is None else {"type": bad_type, "block_hashes": [1]}
    d, rows = decode_one(encode([TS, [event, stored([2])], 0]))
    assert [r[1] for r in rows] == [2]
    assert d.stats.events["unknown"] == 1


def test_unknown_fields_in_map_form_are_counted_and_the_event_kept() -> None:
    """Unknown map keys are counted in stats.unknown_fields; the event still decodes fully,
    token count included."""
    payload = encode(
        [
            TS,
            [
                stored([1, 2], tokens=5, future_key=None, future_idx=3),
                removed([1], "CPU", cache_salt="x"),
                {"type": "AllBlocksCleared", "medium": "GPU"},
                {"type": "BlockAccessed", "block_hashes": [2], "medium": "GPU", "hits": 4},
            ],
            0,
        ]
    )
    d, rows = decode_one(payload)
    assert rows == [
        ("BlockStored", 1, TS, "GPU", None),
        ("BlockStored", 2, TS, "GPU", None),
        ("BlockRemoved", 1, TS, "CPU", "evicted"),
        ("AllBlocksCleared", None, TS, "unknown", None),
        ("BlockAccessed", 2, TS, "GPU", None),
    ]
    assert d.stats.unknown_fields == 5
    assert d.stats.tokens_stored == 5
    assert d.stats.errors == {}


def test_array_form_with_extra_trailing_values() -> None:
    """Array positions past those declared are ignored; the non-null ones are counted as
    unknown fields, and the event (token count included) is kept."""
    ev_stored = [*stored([1], "CPU", tokens=3, form="array"), None, None, None, None, None, "x", 5]
    ev_removed = ["BlockRemoved", [1], "CPU", None, None, None, "future"]
    ev_clear = ["AllBlocksCleared", 1]
    d, rows = decode_one(encode([TS, [ev_stored, ev_removed, ev_clear], 0]))
    assert rows == [
        ("BlockStored", 1, TS, "CPU", None),
        ("BlockRemoved", 1, TS, "CPU", "evicted"),
        ("AllBlocksCleared", None, TS, "unknown", None),
    ]
    assert d.stats.unknown_fields == 4
    assert d.stats.tokens_stored == 3
    assert d.stats.errors == {}


def test_array_form_short_events() -> None:
    """Array events may stop after any declared position (vLLM 0.9.2 has no medium)."""
    events = [["BlockStored", [1]], ["BlockStored", [2], None, [1, 2]], ["BlockRemoved", [1]]]
    d, rows = decode_one(encode([TS, events]))
    assert rows == [
        ("BlockStored", 1, TS, "unknown", None),
        ("BlockStored", 2, TS, "unknown", None),
        ("BlockRemoved", 1, TS, "unknown", "evicted"),
    ]
    assert d.stats.tokens_stored == 2


def test_vllm_group_idx_is_not_a_reason() -> None:
    """vLLM 0.23 writes group_idx (an int) after medium in a BlockRemoved array; it is not a
    removal reason and does not make the event fail."""
    d, rows = decode_one(encode([TS, [["BlockRemoved", [1], "GPU", 2]], 0]))
    assert rows == [("BlockRemoved", 1, TS, "GPU", "evicted")]
    assert d.stats.errors == {}


@pytest.mark.parametrize("form", ["map", "array"])
def test_native_extension_events(form: str) -> None:
    """BlockAccessed decodes to OP_ACCESS rows and BlockRemoved carries its reason (default
    ``evicted``), in map and array form."""
    if form == "map":
        events: list[Any] = [
            {"type": "BlockAccessed", "block_hashes": [1, 2], "medium": "GPU"},
            {"type": "BlockAccessed", "block_hashes": [3]},
            removed([1], reason="freed"),
            removed([2], "CPU", reason="preempted"),
            removed([3], reason=None),
            removed([4], reason="cleared"),
        ]
    else:
        events = [
            ["BlockAccessed", [1, 2], "GPU"],
            ["BlockAccessed", [3]],
            ["BlockRemoved", [1], "GPU", None, None, "freed"],
            ["BlockRemoved", [2], "CPU", None, None, "preempted"],
            ["BlockRemoved", [3], "GPU", None],
            ["BlockRemoved", [4], "GPU", None, None, "cleared"],
        ]
    d, rows = decode_one(encode([TS, events, 0]))
    assert rows == [
        ("BlockAccessed", 1, TS, "GPU", None),
        ("BlockAccessed", 2, TS, "GPU", None),
        ("BlockAccessed", 3, TS, "unknown", None),
        ("BlockRemoved", 1, TS, "GPU", "freed"),
        ("BlockRemoved", 2, TS, "CPU", "preempted"),
        ("BlockRemoved", 3, TS, "GPU", "evicted"),
        ("BlockRemoved", 4, TS, "GPU", "cleared"),
    ]
    assert d.stats.events == {"BlockAccessed": 2, "BlockRemoved": 4}
    assert d.stats.errors == {}
    assert d.stats.unknown_fields == 0


def test_hostile_labels_stay_bounded() -> None:
    """Media and reasons from the wire are sanitized and cut; past capacity they become
    ``other``."""
    events = [removed([i], f"tier {i}!", reason=f"r{i}" * 40) for i in range(40)]
    d, rows = decode_one(encode([TS, events, 0]))
    assert len(rows) == 40
    assert rows[0][3] == "tier_0_"
    assert rows[0][4] == ("r0" * 40)[:32]
    assert rows[-1][3] == rows[-1][4] == "other"
    assert len(d.media.names) <= d.media.capacity
    assert len(d.reasons.names) <= d.reasons.capacity


def test_form_switching_on_one_decoder() -> None:
    """Map, array, map, mixed payloads on the same decoder all decode, in order."""
    payloads = [
        encode([TS, [stored([1])], 0]),
        encode([TS + 1, [stored([2], form="array"), removed([1], form="array")], 0]),
        encode([TS + 2, [removed([2])], 0]),
        encode([TS + 3, [stored([3], form="array"), removed([3])], 0]),
        encode([TS + 4, [["AllBlocksCleared"]], 0]),
        encode([TS + 5, [{"type": "AllBlocksCleared"}], 0]),
    ]
    d = new_decoder()
    for p in payloads:
        d.feed(p)
    assert rows_of(d, d.flush()) == [
        ("BlockStored", 1, TS, "GPU", None),
        ("BlockStored", 2, TS + 1, "GPU", None),
        ("BlockRemoved", 1, TS + 1, "GPU", "evicted"),
        ("BlockRemoved", 2, TS + 2, "GPU", "evicted"),
        ("BlockStored", 3, TS + 3, "GPU", None),
        ("BlockRemoved", 3, TS + 3, "GPU", "evicted"),
        ("AllBlocksCleared", None, TS + 4, "unknown", None),
        ("AllBlocksCleared", None, TS + 5, "unknown", None),
    ]
    assert d.stats.errors == {}


def test_many_messages_then_one_flush_preserve_order() -> None:
    """Hundreds of messages coalesce into one batch in feed order, each row with its own ts."""
    d = new_decoder()
    want: list[Row] = []
    for i in range(300):
        form = "map" if i % 3 else "array"
        d.feed(encode([TS + i, [stored([2 * i, 2 * i + 1], form=form), removed([i], form=form)]]))
        want += [
            ("BlockStored", 2 * i, TS + i, "GPU", None),
            ("BlockStored", 2 * i + 1, TS + i, "GPU", None),
            ("BlockRemoved", i, TS + i, "GPU", "evicted"),
        ]
    assert d.pending_events == 600
    assert rows_of(d, d.flush()) == want
    assert d.pending_events == 0
    assert d.stats.events == {"BlockStored": 300, "BlockRemoved": 300}


def test_event_with_no_hashes_gives_no_rows_but_is_counted() -> None:
    """An event with an empty hash list adds no rows; it still counts as an event."""
    d, rows = decode_one(encode([TS, [stored([]), removed([5])], 0]))
    assert rows == [("BlockRemoved", 5, TS, "GPU", "evicted")]
    assert d.stats.events == {"BlockStored": 1, "BlockRemoved": 1}


def test_flush_with_nothing_pending_is_empty() -> None:
    """flush() on a fresh decoder, or after an empty batch, is an empty batch."""
    d = new_decoder()
    assert len(d.flush()) == 0
    assert d.feed(encode([TS, []])) == 0
    assert len(d.flush()) == 0


# --- 3. malformed input -------------------------------------------------------------------------


def _raises(payload: bytes, reason: str, limits: DecodeLimits | None = None) -> PayloadDecoder:
    d = new_decoder(limits)
    with pytest.raises(DecodeError) as info:
        d.feed(payload)
    assert info.value.reason == reason
    assert d.pending_events == 0
    assert len(d.flush()) == 0
    return d


_NESTED = b"\x91" * 100_000 + b"\xc0"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "truncated"),
        (b"\xc1", "msgpack"),
        (encode([TS, []]) + b"\x00", "msgpack"),
        (encode({"ts": TS, "events": []}), "schema"),
        (encode(5), "schema"),
        (encode([TS]), "schema"),
        (encode([]), "schema"),
        (encode(["1764000000", []]), "schema"),
        (encode([None, []]), "schema"),
        (encode([True, []]), "schema"),
        (encode([TS, {"type": "BlockStored"}]), "schema"),
        (encode([TS, "events"]), "schema"),
        (encode([TS, None]), "schema"),
        (encode([math.nan, [stored([1])]]), "schema"),
        (encode([math.inf, [stored([1])]]), "schema"),
        (encode([-math.inf, [["Nope"]]]), "schema"),
        (b"\x92\xcb" + encode(TS)[1:] + _NESTED, "msgpack"),
        (_NESTED, "schema"),  # one-element array: refused before the nesting is read
    ],
    ids=[
        "empty",
        "bad-opcode",
        "trailing-bytes",
        "map-not-array",
        "int-not-array",
        "one-element",
        "zero-elements",
        "ts-string",
        "ts-null",
        "ts-bool",
        "events-map",
        "events-string",
        "events-null",
        "ts-nan",
        "ts-inf",
        "ts-neg-inf-with-unknown-event",
        "deeply-nested-event",
        "deeply-nested-payload",
    ],
)
def test_unusable_message_raises_decode_error(payload: bytes, reason: str) -> None:
    """A message nothing can be used of raises DecodeError with a stable reason, leaves nothing
    pending and counts nothing per event."""
    d = _raises(payload, reason)
    assert d.stats.events == {}
    assert d.stats.errors == {}


def test_nested_event_among_good_ones() -> None:
    """An event nested deeper than the decoder allows costs the whole message (the raw event
    cannot even be skipped), never an exception other than DecodeError."""
    deep = msgspec.Raw(b"\x9d\xabBlockStored\x91\x01" + b"\xc0" * 10 + _NESTED)
    _raises(encode([TS, [stored([1]), deep], 0]), "msgpack")


@pytest.mark.parametrize(
    ("bad_event", "reason"),
    [
        (stored(["1234"]), "event_schema"),
        (stored([True]), "event_schema"),
        (stored([1.5]), "event_schema"),
        (stored([None]), "event_schema"),
        (stored("12"), "event_schema"),  # type: ignore[arg-type]
        (stored([1], medium=5), "event_schema"),  # type: ignore[arg-type]
        (stored([1], medium=b"GPU"), "event_schema"),  # type: ignore[arg-type]
        (stored([1], block_size="16"), "event_schema"),
        (removed([1], reason=3), "event_schema"),
        (removed(["1"], form="array"), "event_schema"),
        (["BlockStored", [1], None, [], 16, None, 7], "event_schema"),
        (["BlockStored", [True]], "event_schema"),
        ({"type": "BlockStored"}, "event_schema"),
        (["BlockRemoved"], "event_schema"),
        ([], "event_schema"),
        (5, "event_schema"),
        ("BlockStored", "event_schema"),
        (None, "event_schema"),
    ],
    ids=[
        "hash-string",
        "hash-bool",
        "hash-float",
        "hash-null",
        "hashes-string",
        "medium-int",
        "medium-bytes",
        "block-size-string",
        "reason-int",
        "array-hash-string",
        "array-medium-int",
        "array-hash-bool",
        "map-no-hashes",
        "array-no-hashes",
        "empty-array",
        "int-event",
        "string-event",
        "null-event",
    ],
)
def test_bad_event_is_counted_and_the_rest_kept(bad_event: Any, reason: str) -> None:
    """A single event of the wrong shape or types is counted in stats.errors and skipped; the
    events around it in the same message decode, in order."""
    payload = encode([TS, [stored([10]), bad_event, removed([11])], 0])
    d = new_decoder()
    assert d.feed(payload) == 2
    assert rows_of(d, d.flush()) == [
        ("BlockStored", 10, TS, "GPU", None),
        ("BlockRemoved", 11, TS, "GPU", "evicted"),
    ]
    assert d.stats.errors == {reason: 1}
    assert d.stats.events == {"BlockStored": 1, "BlockRemoved": 1}


def test_bad_msgpack_inside_one_event() -> None:
    """Raw events that are well-framed but invalid inside (a 1-byte timestamp extension, bad
    UTF-8, an unhashable map key) are each counted as event_msgpack; the rest is kept."""
    bad = [msgspec.Raw(b"\xd4\xff\x00"), msgspec.Raw(b"\xa1\xff"), msgspec.Raw(b"\x81\x80\x01")]
    d = new_decoder()
    assert d.feed(encode([TS, [bad[0], stored([1]), *bad[1:]], 0])) == 1
    assert rows_of(d, d.flush()) == [("BlockStored", 1, TS, "GPU", None)]
    assert d.stats.errors == {"event_msgpack": 3}


@pytest.mark.parametrize("v", ALL_VECTORS, ids=[f"{v.file[:-6]}-{v.seq}" for v in ALL_VECTORS])
def test_every_truncation_of_every_vector_is_a_decode_error(v: Vector) -> None:
    """A vector payload cut at any byte offset raises DecodeError("truncated") and leaves
    nothing pending; the full payload still decodes afterwards on the same decoder."""
    d = new_decoder()
    for cut in range(len(v.payload)):
        with pytest.raises(DecodeError) as info:
            d.feed(v.payload[:cut])
        assert info.value.reason == "truncated", cut
    assert d.pending_events == 0
    assert d.stats.events == {}
    d.feed(v.payload)
    assert rows_of(d, d.flush()) == expected_rows(v.expected)


def test_payload_over_the_size_limit() -> None:
    """A payload longer than max_payload_bytes is refused before it is decoded."""
    payload = encode([TS, [stored(list(range(100)))], 0])
    _raises(payload, "too_large", DecodeLimits(max_payload_bytes=len(payload) - 1))
    d = new_decoder(DecodeLimits(max_payload_bytes=len(payload)))
    assert d.feed(payload) == 1


@pytest.mark.parametrize("form", ["map", "array", "mixed"])
def test_too_many_events_in_one_batch(form: str) -> None:
    """More events in one batch than max_events_per_batch refuses the whole message."""
    events = [stored([i], form="array" if form == "array" else "map") for i in range(5)]
    if form == "mixed":
        events.append(["AllBlocksCleared"])
    limits = DecodeLimits(max_events_per_batch=len(events) - 1)
    _raises(encode([TS, events, 0]), "too_large", limits)
    d = new_decoder(DecodeLimits(max_events_per_batch=len(events)))
    assert d.feed(encode([TS, events, 0])) == len(events)


@pytest.mark.parametrize("form", ["map", "array", "slow-path"])
def test_too_many_hashes_in_one_event(form: str) -> None:
    """An event with more hashes than max_hashes_per_event is counted as too_large and
    skipped, on the fast path and on the slow path; the other events stay, in order."""
    f = "map" if form == "slow-path" else form
    events = [stored([1, 2], form=f), stored([3, 4, 5, 6], form=f), removed([1, 2, 3], form=f)]
    if form == "slow-path":
        events.append({"type": "Unknown"})  # forces event-by-event decoding
    d = new_decoder(DecodeLimits(max_hashes_per_event=3))
    d.feed(encode([TS, events, 0]))
    assert rows_of(d, d.flush()) == [
        ("BlockStored", 1, TS, "GPU", None),
        ("BlockStored", 2, TS, "GPU", None),
        ("BlockRemoved", 1, TS, "GPU", "evicted"),
        ("BlockRemoved", 2, TS, "GPU", "evicted"),
        ("BlockRemoved", 3, TS, "GPU", "evicted"),
    ]
    assert d.stats.errors == {"too_large": 1}
    assert d.stats.events["BlockStored"] == 1
    assert d.stats.tokens_stored == 16


def test_rejected_message_does_not_disturb_pending_rows() -> None:
    """A bad message between two good ones loses only itself."""
    d = new_decoder()
    d.feed(encode([TS, [stored([1])]]))
    with pytest.raises(DecodeError):
        d.feed(b"\xc1")
    with pytest.raises(DecodeError):
        d.feed(encode([math.nan, [stored([2])]]))
    d.feed(encode([TS + 1, [stored([3])]]))
    assert [r[1] for r in rows_of(d, d.flush())] == [1, 3]
    assert d.last_ts == TS + 1


# --- 4. property tests --------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_counted(d: PayloadDecoder, payload: bytes) -> bool:
    """Feed one message; True if decoded, False if refused with DecodeError. Anything else
    propagates and fails the test."""
    try:
        n = d.feed(payload)
    except DecodeError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return False
    assert isinstance(n, int) and n >= 0
    return True


def _check_flush(d: PayloadDecoder) -> None:
    batch = d.flush()
    rows_of(d, batch)  # column lengths and dtypes agree, every label id resolves
    assert d.pending_events == 0


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5))
def test_random_bytes_only_raise_decode_error(payloads: list[bytes]) -> None:
    """Random bytes as payloads never raise anything but DecodeError, and flush stays sound."""
    d = new_decoder()
    for p in payloads:
        _feed_counted(d, p)
    _check_flush(d)


@st.composite
def mutated_vector(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(ALL_PAYLOADS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_vector(), min_size=1, max_size=4))
def test_mutated_vectors_only_raise_decode_error(payloads: list[bytes]) -> None:
    """Byte flips, insertions, deletions and truncations of real payloads never raise
    anything but DecodeError; every message is either decoded or refused, so a caller can
    count each one; flush afterwards stays sound."""
    d = new_decoder()
    outcomes = [_feed_counted(d, p) for p in payloads]
    assert len(outcomes) == len(payloads)
    _check_flush(d)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=10)
    | st.sampled_from(["BlockStored", "BlockRemoved", "BlockAccessed", "AllBlocksCleared"]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["type", "block_hashes", "medium", "reason", "token_ids", "x"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@FUZZ
@given(
    st.one_of(st.floats(), st.integers(-(2**63), 2**63), st.text(max_size=3)),
    st.lists(_msgpack_values, max_size=6),
    st.one_of(st.none(), _msgpack_values),
)
def test_random_structures_only_raise_decode_error(ts: Any, events: list[Any], dp: Any) -> None:
    """Well-formed msgpack of arbitrary shape in the batch slots (events that look almost
    right) never raises anything but DecodeError."""
    d = new_decoder()
    _feed_counted(d, encode([ts, events, dp]))
    _feed_counted(d, encode([ts, events]))
    _check_flush(d)


# Generated well-formed batches and what they must decode to.
_hash = st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=40))
_media = st.sampled_from([None, "GPU", "CPU", "disk", "cpu_tier2"])
_reasons = st.sampled_from([None, "evicted", "freed", "preempted", "offloaded"])


@st.composite
def generated_event(draw: st.DrawFn, form: str) -> tuple[Any, list[Row], int, str]:
    """(wire event, its rows with ts left 0, its token count, its type)."""
    kind = draw(st.sampled_from(["BlockStored", "BlockRemoved", "BlockAccessed", "Cleared"]))
    if form == "mixed":
        form = draw(st.sampled_from(["map", "array"]))
    if kind == "Cleared":
        wire: Any = ["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"}
        return wire, [("AllBlocksCleared", None, 0.0, "unknown", None)], 0, "AllBlocksCleared"
    hashes = draw(st.lists(_hash, max_size=6))
    medium = draw(_media)
    label = medium or "unknown"
    folded = [h & MASK if isinstance(h, int) else int.from_bytes(h[-8:], "big") for h in hashes]
    tokens = 0
    if kind == "BlockStored":
        sent = draw(st.integers(0, 40))
        # Each block holds block_size tokens; a trailing one fewer if token_ids stop short.
        tokens = sum(min(16, max(0, sent - 16 * i)) for i in range(len(hashes)))
        fields = {
            "block_hashes": hashes,
            "parent_block_hash": draw(st.one_of(st.none(), _hash)),
            "token_ids": list(range(sent)),
            "block_size": 16,
            "lora_id": draw(st.one_of(st.none(), st.integers(0, 9))),
            "medium": medium,
            "lora_name": draw(st.one_of(st.none(), st.just("adapter-a"))),
        }
        reason = None
    else:
        fields = {"block_hashes": hashes, "medium": medium}
        reason = draw(_reasons) if kind == "BlockRemoved" else None
        if reason is not None:
            if form != "map":  # the array form keeps vLLM's two slots before the reason
                fields.update(group_idx=None, remaining_copy_counts=None)
            fields["reason"] = reason
    if form == "map":
        omit = draw(st.booleans())  # SGLang leaves null fields out
        wire = {"type": kind, **{k: v for k, v in fields.items() if v is not None or not omit}}
    else:
        values = list(fields.values())
        while values and values[-1] is None and len(values) > 1 and draw(st.booleans()):
            values.pop()  # older vLLM: fewer trailing positions
        wire = [kind, *values]
    row_reason = (reason or "evicted") if kind == "BlockRemoved" else None
    return wire, [(kind, h, 0.0, label, row_reason) for h in folded], tokens, kind


@st.composite
def generated_batch(draw: st.DrawFn) -> tuple[bytes, float, list[Row], int, Counter[str]]:
    form = draw(st.sampled_from(["map", "array", "mixed"]))
    ts = draw(st.floats(0, 2e9, allow_nan=False))
    events = draw(st.lists(generated_event(form), max_size=8))
    batch: list[Any] = [ts, [e[0] for e in events]]
    if draw(st.booleans()):
        batch.append(draw(st.integers(0, 7)))
    rows = [(r[0], r[1], ts, r[3], r[4]) for e in events for r in e[1]]
    return encode(batch), ts, rows, sum(e[2] for e in events), Counter(e[3] for e in events)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(generated_batch(), min_size=1, max_size=4))
def test_generated_batches_decode_exactly(
    batches: list[tuple[bytes, float, list[Row], int, Counter[str]]],
) -> None:
    """Random well-formed batches (map, array and mixed forms; int and bytes hashes; optional
    fields present, null or left out) decode to exactly the generated rows in order, with the
    right event counts and token total, and nothing counted as an error."""
    d = new_decoder()
    for payload, ts, _, _, _ in batches:
        d.feed(payload)
        assert d.last_ts == ts
    assert rows_of(d, d.flush()) == [row for b in batches for row in b[2]]
    counts: Counter[str] = sum((b[4] for b in batches), Counter())
    assert d.stats.events == {k: v for k, v in counts.items() if v}
    assert d.stats.tokens_stored == sum(b[3] for b in batches)
    assert d.stats.errors == {}
    assert d.stats.unknown_fields == 0


# --- 5. KV-cache groups, copies, adapters, tokens -------------------------------------------


@pytest.mark.parametrize("form", ["map", "array"])
def test_group_idx_spec_and_remaining_copies(form: str) -> None:
    """``group_idx`` (absent or null: group 0) labels every row of its event; a store's
    ``kv_cache_spec_kind`` and ``kv_cache_spec_sliding_window`` say what its group is; a
    removal's ``remaining_copy_counts`` lands on its rows when it matches the hashes."""
    if form == "map":
        events: list[Any] = [
            stored(
                [1, 2],
                tokens=200,
                group_idx=0,
                kv_cache_spec_kind="sliding_window",
                kv_cache_spec_sliding_window=128,
            ),
            stored([1], group_idx=1, kv_cache_spec_kind="full_attention"),
            stored([9]),
            removed([1, 2], group_idx=0, remaining_copy_counts=[1, 0]),
            removed([1], group_idx=1, remaining_copy_counts=[0, 0]),  # does not match: unsaid
            {"type": "BlockAccessed", "block_hashes": [1], "medium": "GPU", "group_idx": 1},
        ]
    else:
        pad = [None]  # extra_keys
        events = [
            [*stored([1, 2], tokens=200, form="array"), *pad, 0, "sliding_window", 128],
            [*stored([1], form="array"), *pad, 1, "full_attention", None],
            stored([9], form="array"),
            ["BlockRemoved", [1, 2], "GPU", 0, [1, 0]],
            ["BlockRemoved", [1], "GPU", 1, [0, 0]],
            ["BlockAccessed", [1], "GPU", 1],
        ]
    d = new_decoder()
    d.feed(encode([TS, events]))
    batch = d.flush()
    groups = [d.groups.names[g] for g in batch.group.tolist()]
    assert groups == ["0", "0", "1", "0", "0", "0", "1", "1"]
    assert batch.copies_left.tolist() == [-1, -1, -1, -1, 1, 0, -1, -1]
    assert batch.tokens.tolist() == [16, 16, 16, 16, 0, 0, 0, 0]
    assert d.stats.groups == {
        0: GroupSpec("sliding_window", "128"),
        1: GroupSpec("full_attention", ""),
    }
    assert d.stats.errors == {}
    assert d.stats.unknown_fields == 0


def test_sglang_salted_array_store_is_read() -> None:
    """SGLang <= 0.5.19 puts a metadata map where vLLM's arrays have ``lora_name``: the store
    is read (base adapter), not dropped, and the map is not an unknown field."""
    salted = [*stored([5], form="array")[:7], {"cache_salt": "tenant-a"}]
    d, rows = decode_one(encode([TS, [salted], 0]))
    assert rows == [("BlockStored", 5, TS, "GPU", None)]
    assert d.stats.errors == {}
    assert d.stats.unknown_fields == 0


def test_hostile_group_values_stay_bounded() -> None:
    """Group values that are not ints land in ``other``; at most MAX_GROUPS labels exist."""
    events = [stored([i], group_idx=i) for i in range(40)]
    events += [stored([99], group_idx=[1, 2]), stored([98], group_idx="x" * 100)]
    d = new_decoder()
    d.feed(encode([TS, events]))
    batch = d.flush()
    assert len(d.groups.names) == MAX_GROUPS
    assert d.groups.names[batch.group[-2]] == "other"
    assert len(batch) == 42
    assert d.stats.errors == {}


def test_adapter_labels_are_capped() -> None:
    """Beyond ``max_adapters`` named adapters, stores land in ``other``; the base model is
    ``base``; removals carry no adapter."""
    d = PayloadDecoder(
        LabelTable("unknown"), LabelTable("evicted"), adapters=new_adapter_table(max_adapters=2)
    )
    events = [stored([i], lora_name=f"a{i}") for i in range(4)]
    events += [stored([7], lora_id=3), stored([8]), removed([1])]
    d.feed(encode([TS, events]))
    batch = d.flush()
    names = [d.adapters.names[a] for a in batch.adapter.tolist()]
    assert names == ["a0", "a1", "other", "other", "other", "base", "base"]
