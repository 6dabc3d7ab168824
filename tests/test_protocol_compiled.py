"""The compiled decode stage (``protocol/_wire.c``) against the msgspec reference.

Both decoders get the same payloads, the same flush points and label tables of the same
shape; after every feed and every flush everything observable must be identical: what
``feed`` returns or raises, ``pending_events``, ``DecodeStats``, ``last_ts``/``last_dp_rank``,
every ``EventBatch`` column (values and dtypes) and the label tables. Inputs: every engine
vector, both recorded vLLM streams, and hypothesis-made batches, mutations, truncations and
garbage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_exporter.protocol.batch import EventBatch, GroupSpec, LabelTable
from kvcache_exporter.protocol.compiled import (
    BATCH_ROWS,
    COMPILED,
    DISABLE_ENV,
    CompiledPayloadDecoder,
    Walker,
    new_payload_decoder,
)
from kvcache_exporter.protocol.decode import (
    DecodeError,
    DecodeLimits,
    PayloadDecoder,
    new_adapter_table,
)
from kvcache_exporter.sinks.prometheus import render

from .streams import NAMES, read_stream
from .test_protocol_decode import (
    ALL_PAYLOADS,
    ALL_VECTORS,
    TS,
    _msgpack_values,
    generated_batch,
    mutated_vector,
    removed,
    stored,
)

pytestmark = pytest.mark.skipif(Walker is None, reason="the extension was not built")
encode = msgspec.msgpack.encode
FEED = object()  # a flush point in a script of payloads
COLUMNS = ("op", "block_hash", "ts", "medium", "reason", "group", "adapter", "tokens")
COLUMNS += ("copies_left",)
DEEP: list[Any] = [1]
for _ in range(40):
    DEEP = [DEEP]


def new_pair(
    limits: DecodeLimits | None = None, max_adapters: int = 4
) -> tuple[PayloadDecoder, CompiledPayloadDecoder]:
    """A reference and a compiled decoder with label tables of the same (small) shape."""

    def tables() -> dict[str, LabelTable]:
        return {
            "media": LabelTable("unknown", capacity=6),
            "reasons": LabelTable("evicted", capacity=5, seed=("cleared",)),
            "adapters": new_adapter_table(max_adapters),
        }

    return PayloadDecoder(limits=limits, **tables()), CompiledPayloadDecoder(
        limits=limits, **tables()
    )


def columns(batch: EventBatch) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: (col.dtype.str, col.tobytes()) for name in COLUMNS for col in [getattr(batch, name)]
    }
    chain = batch.chain
    out["chain"] = (
        None
        if chain is None
        else [(c.dtype.str, c.tobytes()) for c in (chain.parent, chain.has_parent, chain.offset)]
    )
    return out


def outcome(d: PayloadDecoder, payload: bytes) -> tuple[str, Any]:
    try:
        return "fed", d.feed(payload)
    except DecodeError as exc:
        return "refused", exc.reason


def state(d: PayloadDecoder) -> tuple[Any, ...]:
    return (
        d.pending_events,
        d.stats,
        d.last_ts,
        d.last_dp_rank,
        d.media.names,
        d.reasons.names,
        d.groups.names,
        d.adapters.names,
    )


def assert_same(
    script: Sequence[bytes | object], limits: DecodeLimits | None = None, max_adapters: int = 4
) -> PayloadDecoder:
    """Run ``script`` (payloads, FEED marks a flush) through both; identical at every step."""
    ref, com = new_pair(limits, max_adapters)
    for step, item in enumerate([*script, FEED]):
        if item is FEED:
            want, got = ref.flush(), com.flush()
            assert columns(got) == columns(want), step
        else:
            assert isinstance(item, bytes)
            assert outcome(com, item) == outcome(ref, item), step
        assert state(com) == state(ref), step
    return ref


# --- the engines' own bytes -------------------------------------------------------------------


def test_every_vector_in_one_flush_and_each_alone() -> None:
    ref = assert_same(ALL_PAYLOADS)
    assert ref.stats.events["BlockStored"] > 0
    assert_same([x for p in ALL_PAYLOADS for x in (p, FEED)])


@pytest.mark.parametrize("name", NAMES)
def test_recorded_vllm_streams(name: str) -> None:
    """Both recorded vLLM 0.33 streams, flushed at the same points (every BATCH_EVENTS
    pending events, the reference's rule), flushed when the compiled decoder says a batch is
    due, and in one flush."""
    payloads = [message[2] for message in read_stream(name)]
    ref, com = new_pair()
    rows = 0
    for payload in payloads:
        assert com.feed(payload) == ref.feed(payload)
        assert com.pending_events == ref.pending_events
        if ref.batch_due:
            want = ref.flush()
            assert columns(com.flush()) == columns(want)
            rows += len(want)
    assert columns(com.flush()) == columns(ref.flush())
    assert state(com) == state(ref)
    assert rows > 100_000
    assert_same(payloads)
    # Flushed when the compiled decoder's own rule says so: batches of about BATCH_ROWS rows
    # whose columns, end to end, are the reference's one batch.
    ref, com = new_pair()
    batches = []
    for payload in payloads:
        ref.feed(payload)
        com.feed(payload)
        if com.batch_due:
            batches.append(com.flush())
    batches.append(com.flush())
    whole = ref.flush()
    assert len(batches) > 2
    assert all(len(b) < BATCH_ROWS + 4096 for b in batches)
    for name in COLUMNS:
        got = np.concatenate([getattr(b, name) for b in batches])
        assert got.dtype == getattr(whole, name).dtype
        assert got.tobytes() == getattr(whole, name).tobytes(), name


# --- generated, mutated and broken input ---------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_label = st.one_of(
    st.none(), st.integers(-3, 3), st.sampled_from(["0", "1", "full_attention", "sliding", ""])
)
_anything = st.one_of(_label, _msgpack_values)


@st.composite
def extended_event(draw: st.DrawFn) -> Any:
    """An event with the fields the generated batches of test_protocol_decode leave out:
    groups, specs, copy counts, adapters, unknown fields, unknown types, bad values."""
    kind = draw(st.sampled_from(["BlockStored", "BlockRemoved", "BlockAccessed", "Other"]))
    hashes = draw(st.lists(st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=12), max_size=5))
    fields: dict[str, Any] = {"block_hashes": hashes}
    optional = {
        "group_idx": _label,
        "medium": st.sampled_from([None, "GPU", "CPU", "DISK", "a b", "x" * 40]),
        "kv_cache_spec_kind": _label,
        "kv_cache_spec_sliding_window": st.one_of(st.none(), st.integers(0, 2**40)),
        "block_size": st.one_of(st.none(), st.integers(-2, 2**32), st.just(16)),
        "token_ids": st.one_of(st.none(), st.integers(0, 70).map(lambda n: list(range(n)))),
        "lora_name": st.one_of(st.none(), st.sampled_from(["", "a", "b", "c", "d", "e"])),
        "lora_id": st.one_of(st.none(), st.integers(-1, 9)),
        "parent_block_hash": st.one_of(st.none(), st.integers(0, 2**64 - 1), st.binary()),
        "remaining_copy_counts": st.one_of(
            st.none(), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5)
        ),
        "reason": st.sampled_from([None, "freed", "preempted", "offloaded", "x", "y", "z"]),
        "extra_keys": _anything,
        "cache_salt": _anything,
        "unknown_field": _anything,
    }
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        fields[name] = draw(optional[name])
    if draw(st.integers(0, 3)) == 0:  # a bad value somewhere
        fields[draw(st.sampled_from(sorted(fields)))] = draw(_anything)
    if draw(st.booleans()):
        return {"type": kind, **fields}
    order = {
        "BlockStored": [
            *("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"),
            *("medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"),
            "kv_cache_spec_sliding_window",
        ],
        "BlockRemoved": ["block_hashes", "medium", "group_idx", "remaining_copy_counts", "reason"],
    }.get(kind, ["block_hashes", "medium", "group_idx"])
    values = [fields.get(name) for name in order]
    values += draw(st.lists(_anything, max_size=2))  # positions past the known ones
    return [kind, *values[: draw(st.integers(0, len(values)))]]


@st.composite
def extended_payload(draw: st.DrawFn) -> bytes:
    events = draw(st.lists(extended_event() | st.just(["AllBlocksCleared"]), max_size=6))
    batch: list[Any] = [draw(st.floats(0, 2e9) | st.integers(0, 2**40)), events]
    if draw(st.booleans()):
        batch.append(draw(st.one_of(st.integers(0, 7), st.none(), _anything)))
    return encode(batch)


def _script(draw: st.DrawFn, payload: st.SearchStrategy[bytes]) -> list[bytes | object]:
    return draw(st.lists(payload | st.just(FEED), min_size=1, max_size=8))


_limits = st.builds(
    DecodeLimits,
    max_payload_bytes=st.sampled_from([200, 16 * 1024 * 1024]),
    max_events_per_batch=st.sampled_from([3, 1_000_000]),
    max_hashes_per_event=st.sampled_from([0, 2, 1_000_000]),
)


@FUZZ
@given(st.data(), _limits)
def test_generated_batches(data: st.DataObject, limits: DecodeLimits) -> None:
    """Well-formed batches of every form, with and without small limits."""
    assert_same(_script(data.draw, generated_batch().map(lambda b: b[0])), limits)


@FUZZ
@given(st.data(), _limits)
def test_groups_copies_adapters_unknowns_and_bad_values(
    data: st.DataObject, limits: DecodeLimits
) -> None:
    """Every field, unknown fields and types, bad values, both forms mixed in a batch."""
    assert_same(_script(data.draw, extended_payload()), limits, max_adapters=2)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_and_truncated_vectors(data: st.DataObject) -> None:
    """Byte flips, insertions, deletions and cuts of the engines' payloads, among intact
    ones: refused with the same reason, or read to the same rows and counts."""
    payload = mutated_vector() | st.sampled_from(ALL_PAYLOADS)
    assert_same(_script(data.draw, payload))


@FUZZ
@given(st.data())
def test_garbage_and_arbitrary_structures(data: st.DataObject) -> None:
    structure = st.tuples(st.floats() | st.integers(-(2**63), 2**63), st.lists(_msgpack_values))
    payload = st.binary(max_size=64) | structure.map(lambda s: encode([s[0], s[1]]))
    assert_same(_script(data.draw, payload | st.sampled_from(ALL_PAYLOADS)))


def test_every_truncation_of_a_vector_between_good_ones() -> None:
    payload = ALL_VECTORS[0].payload
    cut = [payload[:n] for n in range(len(payload))]
    assert_same([payload, *cut, payload, FEED, *cut])


@pytest.mark.parametrize(
    "odd",
    [
        encode([TS, [stored([1], extra_keys=msgspec.msgpack.Ext(1, b"x"))]]),  # ext type
        encode([TS, [stored([1], token_ids=["x"])]]).replace(b"\xa1x", b"\xa1\xff"),  # not UTF-8
        encode([TS, [stored([1], group_idx=1.5)]]),  # a float group
        encode([TS, [stored([1], group_idx=True)]]),  # a bool group
        encode([TS, [{**stored([1]), 7: 1}]]),  # a non-str key
        encode([TS, [stored([1], extra_keys=DEEP)]]),  # nested deeper than the walker goes
    ],
)  # fmt: skip
def test_shapes_left_to_the_reference_keep_the_window_identical(odd: bytes) -> None:
    """A payload the walker hands to the reference, between payloads it reads itself: the
    batch and the counts are the reference's, before and after that flush."""
    good = [encode([TS, [stored([i]), removed([i + 100], reason="freed")], 1]) for i in range(3)]
    assert_same([good[0], good[1], odd, good[2], FEED, good[0], odd, FEED, good[2]])


# --- reference rules the identity rests on ---------------------------------------------------


def test_tokens_of_a_store_do_not_depend_on_other_stores() -> None:
    """A block_size of 2**31 or more is unusable (an equal share of token_ids), whether or not
    another store in the same flush sends no block_size."""
    big = stored([1, 2], tokens=16, block_size=2**40)
    for events in ([big], [big, stored([3], block_size=None)]):
        d = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
        d.feed(encode([TS, events]))
        assert d.flush().tokens.tolist()[:2] == [8, 8]


def test_conflicting_group_specs_in_one_flush_the_later_wins() -> None:
    a = stored([1], group_idx=0, kv_cache_spec_kind="full_attention")
    b = stored([2], group_idx=0, kv_cache_spec_kind="sliding_window")
    for first, second in ((a, b), (b, a)):
        d = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
        d.feed(encode([TS, [first, second, first]]))
        d.flush()
        assert d.stats.groups == {0: GroupSpec(second["kv_cache_spec_kind"], "")}


# --- selection ---------------------------------------------------------------------------------


def _compiled_in_subprocess(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    if env_value is not None:
        env[DISABLE_ENV] = env_value
    code = "from kvcache_exporter.protocol.compiled import COMPILED, decode_path; print(COMPILED)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_environment_variable_selects_the_reference() -> None:
    assert _compiled_in_subprocess(None) == "True"
    assert _compiled_in_subprocess("1") == "False"
    assert _compiled_in_subprocess("0") == "True"
    d = new_payload_decoder(LabelTable("unknown"), LabelTable("evicted"))
    assert isinstance(d, CompiledPayloadDecoder) == COMPILED
    assert isinstance(d, PayloadDecoder)


def test_build_info_says_which_decoder_runs() -> None:
    text = render([])
    want = f'kvcache_exporter_build_info{{compiled="{str(COMPILED).lower()}",version='
    assert want in text
