"""The compiled apply (one C loop per segment, rows in stream order) against the vectorized
rounds it replaces, which stay the reference: the same counters, histogram counts, table
contents key by key, eviction records, copy rows and totals at cuts, on random streams and on
vLLM's recorded ones.

The two tables are not slot for slot alike (the loop inserts keys in stream order, the rounds
a round at a time, and they reserve room at other moments), so the table is compared per key;
histogram sums are compared to the last few bits (the loop adds them in stream order).

At the tracked-blocks limit the two differ by design: the rounds decide which new keys still
fit a round at a time (a round's removals first), the loop in stream order, as the engine did
them. Both count every store; ``test_a_full_table_follows_stores_in_stream_order`` holds the
loop to the stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import pairwise
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.collector import BlockLifecycleCollector, CollectorConfig
from kvcache_exporter.collector import apply as apply_module
from kvcache_exporter.collector import table as table_module
from kvcache_exporter.collector.snapshot import CutTotals
from kvcache_exporter.pipeline import new_pipeline
from kvcache_exporter.protocol.batch import OP_REMOVE, OP_STORE, PrefixChain
from kvcache_exporter.sinks.prometheus import render

from .streams import NAMES, read_stream
from .test_collector_lifecycle import Row, make_batch, place_rows

needs_extension = pytest.mark.skipif(
    not apply_module.COMPILED, reason="compiled collector disabled (or not built)"
)


@contextmanager
def reference_apply() -> Iterator[None]:
    """Collectors built inside use the numpy table; every apply inside runs the rounds."""
    with mock.patch.object(table_module, "COMPILED", False):
        yield


def test_the_compiled_apply_is_built_unless_disabled() -> None:
    disabled = os.environ.get("KVCACHE_EXPORTER_NO_EXTENSION", "") not in ("", "0")
    assert apply_module.COMPILED is not disabled
    assert BlockLifecycleCollector()._compiled_apply is not disabled
    with reference_apply():
        assert not BlockLifecycleCollector()._compiled_apply


def canonical(state: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """The state with the table's rows in (place, key) order and the eviction records in
    the order of all their columns (a clear logs its blocks in slot order)."""
    out = dict(state)
    order = np.lexsort((state["table.key"], state["table.medium"]))
    for name in state:
        if name.startswith("table."):
            out[name] = state[name][order]
    records = [name for name in state if name.startswith("evictions.")]
    if records and state[records[0]].size:
        order = np.lexsort([state[name] for name in reversed(records)])
        for name in records:
            out[name] = state[name][order]
    return out


def assert_same_state(got: dict[str, npt.NDArray[Any]], want: dict[str, npt.NDArray[Any]]) -> None:
    got, want = canonical(got), canonical(want)
    assert got.keys() == want.keys()
    for name in want:
        if name.endswith(".sums"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def same_totals(a: CutTotals | None, b: CutTotals | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(
        getattr(a, name).tolist() == getattr(b, name).tolist()
        for name in ("stored", "evicted", "restores", "resident", "clears", "lifetime_counts")
    )


@needs_extension
@pytest.mark.parametrize("hit_reports", [False, True])
@settings(max_examples=300, deadline=None)
@given(
    rows=place_rows,
    sizes=st.lists(st.integers(1, 40), max_size=12),
    removed_memory=st.sampled_from([0, 1, 3, 1_000_000]),
    sample_ratio=st.sampled_from([1.0, 0.5]),
    cuts=st.lists(st.integers(0, 39), max_size=4),
)
def test_compiled_apply_equals_the_rounds(
    hit_reports: bool,
    rows: list[tuple[Any, ...]],
    sizes: list[int],
    removed_memory: int,
    sample_ratio: float,
    cuts: list[int],
) -> None:
    """Copies, groups, adapters, copies_left, clears, restores, forgotten ghosts and
    sampling, in batches of random sizes with random cuts."""
    config = CollectorConfig(
        hit_reports=hit_reports, removed_memory=removed_memory, sample_ratio=sample_ratio
    )
    fast = BlockLifecycleCollector(config)
    with reference_apply():
        ref = BlockLifecycleCollector(config)
    assert fast._compiled_apply and not ref._compiled_apply
    ts = 0.0
    timed = []
    for op, h, step, *rest in rows:
        ts += step * 0.37
        timed.append(Row(op, h, ts, *rest))
    bounds = [0]
    for size in sizes:
        bounds.append(min(bounds[-1] + size, len(timed)))
    bounds.append(len(timed))
    for start, stop in pairwise(bounds):
        if start == stop:
            continue
        at = sorted({c for c in cuts if c < stop - start})
        got = fast.apply(make_batch(timed[start:stop], fast), at)
        want = ref.apply(make_batch(timed[start:stop], ref), at)
        assert same_totals(got, want)
        assert (got is None) == (not at)
        np.testing.assert_array_equal(fast.copy_rows, ref.copy_rows)
    assert_same_state(fast.state(), ref.state())


@needs_extension
@settings(max_examples=200, deadline=None)
@given(
    stores=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60),
    limit=st.integers(1, 5),
)
def test_a_full_table_follows_stores_in_stream_order(
    stores: list[tuple[bool, int]], limit: int
) -> None:
    """Stores and removals of few keys against a limit of a few tracked keys, in one batch:
    a new key is followed exactly when fewer than ``limit`` keys were resident just before
    it, in stream order (a removed key, remembered, comes back as a restore whatever the
    limit: its slot is held already); every store is counted, followed or not."""
    col = BlockLifecycleCollector(CollectorConfig(max_tracked_blocks=limit))
    rows: list[tuple[int, int, float, int]] = []
    copies: dict[int, int] = {}  # resident keys: their copies
    ghosts: set[int] = set()
    untracked = unknown = restores = 0
    for i, (store, key) in enumerate(stores):
        rows.append((OP_STORE if store else OP_REMOVE, key + 1, float(i), 0))
        if store and key in copies:
            copies[key] += 1
        elif store and (key in ghosts or len(copies) < limit):
            restores += key in ghosts
            ghosts.discard(key)
            copies[key] = 1
        elif store:
            untracked += 1
        elif key not in copies:
            unknown += 1
        elif copies[key] > 1:
            copies[key] -= 1
        else:
            del copies[key]
            ghosts.add(key)
    if rows:
        col.apply(make_batch(rows, col))
    snap = col.snapshot()
    assert int(snap.stored.sum()) == sum(1 for store, _ in stores if store)
    assert (snap.untracked_stores, snap.unknown_removals) == (untracked, unknown)
    assert int(snap.restores.sum()) == restores
    assert int(snap.resident_hashes.sum()) == len(copies)
    assert int(snap.resident.sum()) == sum(copies.values())


chain_events = st.lists(
    st.tuples(
        st.sampled_from([OP_STORE] * 3 + [OP_REMOVE]),
        st.integers(0, 15),  # first block's hash id
        st.integers(1, 4),  # blocks in the event
        st.one_of(st.none(), st.integers(0, 18)),  # parent's hash id
        st.integers(0, 1),  # medium
    ),
    max_size=25,
)


@needs_extension
@settings(max_examples=300, deadline=None)
@given(batches=st.lists(chain_events, max_size=4))
def test_compiled_prefix_depths_equal_the_reference(
    batches: list[list[tuple[int, int, int, int | None, int]]],
) -> None:
    """Events naming parents stored earlier in the batch, in an earlier batch (the table,
    on either medium), removed since, or never: the same depth per row, in the table and in
    the prefix-depth histogram."""
    fast = BlockLifecycleCollector()
    with reference_apply():
        ref = BlockLifecycleCollector()
    ts = 0.0
    for events in batches:
        rows, parents, has_parent, offsets = [], [], [], []
        for op, first, blocks, parent, medium in events:
            ts += 1.0
            for i in range(blocks):
                rows.append(Row(op, (first + i) % 19 + 1, ts, medium))
                parents.append(0 if parent is None else parent + 1)
                has_parent.append(parent is not None and i == 0)
                offsets.append(i)
        if not rows:
            continue
        chain = PrefixChain(
            np.array(parents, np.uint64), np.array(has_parent, bool), np.array(offsets, np.uint32)
        )
        for col in (fast, ref):
            batch = replace(make_batch(rows, col), chain=chain)
            np.testing.assert_array_equal(col._depths(batch), ref._depths(batch))
            col.apply(batch)
    assert_same_state(fast.state(), ref.state())


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@needs_extension
@pytest.mark.parametrize("name", NAMES)
def test_recorded_streams_give_the_same_numbers_either_way(name: str) -> None:
    """vLLM 0.33's own streams through the whole per-engine pipeline (monitor and what-if
    too), ghosts expiring: the same state and the same /metrics."""
    config = CollectorConfig(removed_memory=5_000)
    fast = new_pipeline(name, config)
    with reference_apply():
        ref = new_pipeline(name, config)
    for pipeline in (fast, ref):
        for message in read_stream(name):
            pipeline.stream.handle(message, 0.0)
        pipeline.stream.flush()
    assert_same_state(fast.collector.state(), ref.collector.state())
    assert fast.collector.snapshot().removed.sum() > 0
    got, want = values(render([fast.view()])), values(render([ref.view()]))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12), key
        elif key[0] == "kvcache_exporter_collector_bytes":
            # The tables grew at other moments: no more memory than the reference's, give or
            # take a growth step.
            assert got[key] <= value * 1.05, key
        else:
            assert got[key] == value, key
