"""The block table: compiled kernels against the numpy reference, slot for slot, and the
collector's whole state with either (random streams and vLLM's recorded ones, applied in
rounds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.whatif import model as whatif_model
from kvcache_exporter.collector import BlockLifecycleCollector, CollectorConfig
from kvcache_exporter.collector import apply as apply_module
from kvcache_exporter.collector import table as table_module
from kvcache_exporter.collector.table import GHOST, RESIDENT, TOMBSTONE, BlockTable
from kvcache_exporter.pipeline import new_pipeline
from kvcache_exporter.protocol.batch import OP_REMOVE, OP_STORE, EventBatch
from kvcache_exporter.sinks.prometheus import render

from .streams import NAMES, read_stream
from .test_collector_lifecycle import Row, make_batch, place_rows

needs_extension = pytest.mark.skipif(
    not table_module.COMPILED, reason="compiled block table disabled (or not built)"
)


def test_the_extension_is_built_unless_disabled() -> None:
    """`pip install` builds the kernels where a compiler is found (CI has one): a test run
    without them is one with KVCACHE_EXPORTER_NO_EXTENSION set, never a silent fallback."""
    disabled = os.environ.get("KVCACHE_EXPORTER_NO_EXTENSION", "") not in ("", "0")
    assert table_module.COMPILED is not disabled
    assert BlockTable().compiled is not disabled
    assert not BlockTable(compiled=False).compiled


def assert_same_tables(a: BlockTable, b: BlockTable) -> None:
    assert (a.capacity, a.used, a.horizon) == (b.capacity, b.used, b.horizon)
    for x, y in zip(a.columns(), b.columns(), strict=True):
        np.testing.assert_array_equal(x, y)


# An op script: (kind, size, seed) — kind 0 stores, 1 removes into ghosts, 2 deletes, 3 raises
# the horizon, 4 finds. Keys come from a pool small enough that stores hit resident keys,
# ghosts and expired ghosts, over four places.
ops_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 3000), st.integers(0, 2**32 - 1)),
    min_size=1,
    max_size=25,
)


@needs_extension
@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, pool=st.integers(50, 20_000), seed=st.integers(0, 2**32 - 1))
def test_compiled_table_equals_the_reference_slot_for_slot(
    ops: list[tuple[int, int, int]], pool: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pool_keys = rng.integers(0, 2**64, size=pool, dtype=np.uint64)
    pool_places = rng.integers(0, 4, size=pool, dtype=np.uint8)
    fast, ref = BlockTable(compiled=True), BlockTable(compiled=False)
    model: dict[tuple[int, int], float | None] = {}  # live key -> ghost ordinal (None: resident)
    ordinal = 0
    for kind, size, op_seed in ops:
        r = np.random.default_rng(op_seed)
        pick = r.integers(0, pool, size=size)
        keys, places = pool_keys[pick], pool_places[pick]
        pairs = list(zip(keys.tolist(), places.tolist(), strict=True))
        found = fast.find(keys, places)
        np.testing.assert_array_equal(found, ref.find(keys, places))
        assert (found >= 0).tolist() == [pair in model for pair in pairs]
        want = [RESIDENT if model[p] is None else GHOST for p in pairs if p in model]
        assert fast.state[found[found >= 0]].tolist() == want
        if kind == 0:  # store the absent ones (distinct), as the collector does
            first = {p: i for i, p in reversed(list(enumerate(pairs))) if p not in model}
            rows = np.array(sorted(first.values()), np.int64)
            rebuilt = fast.reserve(rows.size)
            assert ref.reserve(rows.size) == rebuilt
            slots = fast.insert(keys[rows], places[rows], RESIDENT)
            np.testing.assert_array_equal(slots, ref.insert(keys[rows], places[rows], RESIDENT))
            values = r.random(rows.size)
            for t in (fast, ref):
                t.t_access[slots] = values
                t.accesses[slots] = np.arange(rows.size, dtype=np.uint32)
            model.update(dict.fromkeys(first))
        elif kind in (1, 2):  # resident keys into ghosts (with an ordinal), or any deleted
            hits = np.unique(found[found >= 0])
            if kind == 1:
                hits = hits[fast.state[hits] == RESIDENT]
            for t in (fast, ref):
                if kind == 1:
                    t.state[hits] = GHOST
                    t.t_access[hits] = ordinal + np.arange(hits.size)
                else:
                    t.delete(hits)
            for i, s in enumerate(hits.tolist()):
                pair = (int(fast.key[s]), int(fast.medium[s]))
                if kind == 1:
                    model[pair] = float(ordinal + i)
                else:
                    del model[pair]
            ordinal += hits.size if kind == 1 else 0
        elif kind == 3:  # forget the oldest ghosts (a horizon only ever rises)
            horizon = max(fast.horizon, float(ordinal - size))
            for t in (fast, ref):
                t.horizon = horizon
            model = {p: o for p, o in model.items() if o is None or o >= horizon}
        assert_same_tables(fast, ref)
    assert fast.live == ref.live == len(model)


@needs_extension
def test_expired_ghosts_are_free_slots_and_a_rebuild_drops_them() -> None:
    for compiled in (True, False):
        table = BlockTable(compiled=compiled)
        keys = np.arange(1, 801, dtype=np.uint64)
        places = np.zeros(800, np.uint8)
        slots = table.insert(keys, places, RESIDENT)
        table.state[slots] = GHOST
        table.t_access[slots] = np.arange(800, dtype=np.float64)
        table.horizon = 400.0  # the first 400 removals are forgotten
        found = table.find(keys, places)
        assert (found[:400] == -1).all() and (found[400:] == slots[400:]).all()
        assert table.live == 400 and table.used == 800
        again = table.insert(keys[:100], places[:100], RESIDENT)  # reuses expired slots
        assert table.used <= 800 + 100 and table.live == 500
        assert (table.find(keys[:100], places[:100]) == again).all()
        table.reserve(table.capacity)  # forces a rebuild
        assert table.used == table.live == 500
        assert not np.isin(table.state, [TOMBSTONE]).any()
        assert (table.find(keys[100:400], places[100:400]) == -1).all()
        assert (table.state[table.find(keys[400:], places[400:])] == GHOST).all()


@contextmanager
def reference_tables() -> Iterator[None]:
    """Collectors built inside use the numpy reference table."""
    with mock.patch.object(table_module, "COMPILED", False):
        yield


@contextmanager
def rounds_only() -> Iterator[None]:
    """Every collector applies in vectorized rounds and every what-if model in numpy passes,
    whatever its table: the collector-level tests here compare tables; the compiled loops are
    held to the rounds and the passes in test_collector_apply.py and test_analysis_whatif.py."""
    with (
        mock.patch.object(apply_module, "_KERNEL", None),
        mock.patch.object(whatif_model, "_KERNEL", None),
    ):
        yield


def assert_same_state(a: dict[str, npt.NDArray[Any]], b: dict[str, npt.NDArray[Any]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@needs_extension
@pytest.mark.parametrize("hit_reports", [False, True])
@settings(max_examples=150, deadline=None)
@given(
    rows=place_rows,
    sizes=st.lists(st.integers(1, 40), max_size=12),
    removed_memory=st.sampled_from([0, 1, 3, 1_000_000]),
)
@rounds_only()
def test_collector_state_is_the_same_with_either_table(
    hit_reports: bool, rows: list[tuple[Any, ...]], sizes: list[int], removed_memory: int
) -> None:
    """Copies, groups, adapters, copies_left, clears, restores and forgotten ghosts (small
    removed_memory), in batches of random sizes: the whole checkpointed state (every table
    column slot for slot, counters, histograms, eviction records) is identical."""
    config = CollectorConfig(hit_reports=hit_reports, removed_memory=removed_memory)
    fast = BlockLifecycleCollector(config)
    with reference_tables():
        ref = BlockLifecycleCollector(config)
    assert fast.table.compiled and not ref.table.compiled
    ts = 0.0
    timed = []
    for op, h, step, *rest in rows:
        ts += step * 0.37
        timed.append(Row(op, h, ts, *rest))
    start = 0
    for size in [*sizes, len(timed)]:
        piece = timed[start : start + size]
        if not piece:
            break
        for col in (fast, ref):
            col.apply(make_batch(piece, col))
        np.testing.assert_array_equal(fast.copy_rows, ref.copy_rows)
        start += size
    assert_same_state(fast.state(), ref.state())


@needs_extension
@pytest.mark.parametrize("name", NAMES)
@rounds_only()
def test_recorded_streams_give_the_same_state_with_either_table(name: str) -> None:
    """vLLM 0.33's own streams through the whole per-engine pipeline (the monitor and the
    what-if model too), with a removed-block memory small enough that ghosts expire: the same
    state and the same /metrics."""
    config = CollectorConfig(removed_memory=5_000)
    fast = new_pipeline(name, config)
    with reference_tables():
        ref = new_pipeline(name, config)
    assert fast.collector.table.compiled and not ref.collector.table.compiled
    for pipeline in (fast, ref):
        for message in read_stream(name):
            pipeline.stream.handle(message, 0.0)
        pipeline.stream.flush()
    assert_same_state(fast.collector.state(), ref.collector.state())
    assert fast.collector.snapshot().removed.sum() > 0
    assert render([fast.view()]) == render([ref.view()])  # /metrics: alerts, what-if too


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_extension), False])
def test_removal_memory_is_per_distinct_key(compiled: bool) -> None:
    """A block stored and removed 20,000 times is one ghost: the memory does not grow with
    removals (it used to be 17 B per removal), and restores are still recognised."""
    with mock.patch.object(table_module, "COMPILED", compiled):
        col = BlockLifecycleCollector()
    before = col.snapshot().table_bytes
    ops, hashes, times = [], [], []
    for i in range(20_000):
        ops += [OP_STORE, OP_REMOVE]
        hashes += [7, 7]
        times += [2.0 * i, 2.0 * i + 1]
    n = len(ops)
    col.apply(
        EventBatch(
            op=np.array(ops, np.uint8),
            block_hash=np.array(hashes, np.uint64),
            ts=np.array(times),
            medium=np.zeros(n, np.uint8),
            reason=np.zeros(n, np.uint8),
        )
    )
    snap = col.snapshot()
    assert int(snap.restores.sum()) == 19_999
    assert snap.table_bytes == before
    assert col.table.live == 1
