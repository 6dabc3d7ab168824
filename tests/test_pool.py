"""The pool index against a plain reference: per-engine sets of resident keys, event by event."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any
from unittest import mock

import msgspec
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvcache_exporter.analysis.pool import PoolIndex, PoolSnapshot
from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.collector import apply as apply_module
from kvcache_exporter.collector import table as table_module
from kvcache_exporter.engine import PrefixCacheSimulator
from kvcache_exporter.engine.trace import bundled_trace_path, read_mooncake
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.protocol.batch import OP_CLEAR, OP_REMOVE, OP_STORE
from kvcache_exporter.protocol.encode import encode_batch, frames
from kvcache_exporter.sinks.series import series

from .reference import DEFAULT_GROUP, Key, ReferenceCollector
from .test_collector_lifecycle import ADAPTERS, REASONS, Row, event_of, make_batch


class ReferencePool:
    """Each engine's residency by the reference collector; the pool as a set of engines per
    key. A store that makes a key resident on an engine counts as resident elsewhere when
    another engine's set holds the key at that row."""

    def __init__(self, engines: dict[str, bool]) -> None:  # name → hit_reports
        self.refs = {e: ReferenceCollector(hit_reports=h) for e, h in engines.items()}
        self.holders: dict[Key, set[str]] = defaultdict(set)
        self.stored: dict[tuple[str, str], int] = defaultdict(int)  # (engine, medium)
        self.elsewhere: dict[tuple[str, str], int] = defaultdict(int)

    def feed(self, engine: str, ts: float, events: list[dict[str, Any]]) -> None:
        ref = self.refs[engine]
        for event in events:
            if event["type"] == "AllBlocksCleared":
                ref.clear(ts)
                self.restart(engine)
                continue
            before = set(ref.resident)
            ref.feed(ts, [event])
            after = set(ref.resident)
            group_idx = event.get("group_idx")
            medium = event.get("medium") or "unknown"
            for h in event["block_hashes"]:
                key = (h, medium, DEFAULT_GROUP if group_idx is None else str(group_idx))
                if key in after and key not in before and event["type"] == "BlockStored":
                    self.stored[(engine, medium)] += 1
                    if self.holders[key] - {engine}:
                        self.elsewhere[(engine, medium)] += 1
                    self.holders[key].add(engine)
                elif key in before and key not in after:
                    self.holders[key].discard(engine)

    def restart(self, engine: str) -> None:
        for holders in self.holders.values():
            holders.discard(engine)

    def gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        distinct: dict[str, int] = defaultdict(int)
        duplicate: dict[str, int] = defaultdict(int)
        for (_, medium, _), holders in self.holders.items():
            distinct[medium] += len(holders) >= 1
            duplicate[medium] += len(holders) >= 2
        return dict(distinct), dict(duplicate)


def assert_same(snap: PoolSnapshot, ref: ReferencePool) -> None:
    distinct, duplicate = ref.gauges()
    for i, medium in enumerate(snap.media):
        assert int(snap.distinct[i]) == distinct.get(medium, 0), medium
        assert int(snap.duplicate[i]) == duplicate.get(medium, 0), medium
    for engine in snap.engines:
        for i, medium in enumerate(snap.media):
            assert int(engine.stored[i]) == ref.stored.get((engine.name, medium), 0)
            assert int(engine.elsewhere[i]) == ref.elsewhere.get((engine.name, medium), 0)


def fleet(
    names: list[str], hit_reports: dict[str, bool] | None = None, **config: Any
) -> dict[str, Pipeline]:
    pool = PoolIndex("p")
    hits = hit_reports or {}
    return {
        n: new_pipeline(n, CollectorConfig(hit_reports=hits.get(n, False), **config), pool=pool)
        for n in names
    }


def feed(engines: dict[str, Pipeline], ref: ReferencePool, engine: str, rows: list[Row]) -> None:
    pipeline = engines[engine]
    pipeline.apply(make_batch(rows, pipeline.collector))
    events = [event_of(r) for r in rows]
    ref.feed(engine, rows[0].ts if rows else 0.0, events)


def snapshot(engines: dict[str, Pipeline]) -> PoolSnapshot:
    pipeline = next(iter(engines.values()))
    assert pipeline.pool is not None
    return pipeline.pool.pool.snapshot()


S, R, C = OP_STORE, OP_REMOVE, OP_CLEAR


def test_by_hand() -> None:
    engines = fleet(["a", "b", "c"])
    ref = ReferencePool({"a": False, "b": False, "c": False})
    steps = [
        ("a", [Row(S, 1, 0.0, tokens=16), Row(S, 2, 0.0, tokens=16)]),
        ("b", [Row(S, 1, 1.0, tokens=16)]),  # a holds 1: resident elsewhere
        ("b", [Row(S, 1, 1.5, tokens=16)]),  # a copy: neither a store nor elsewhere
        ("c", [Row(S, 2, 2.0, tokens=16), Row(R, 2, 2.0), Row(S, 2, 2.0, tokens=16)]),
        ("a", [Row(R, 1, 3.0), Row(S, 1, 3.0, tokens=16)]),  # b holds 1: elsewhere again
        ("b", [Row(R, 1, 4.0), Row(R, 1, 4.0)]),  # both copies go
        ("c", [Row(C, 0, 5.0)]),
    ]
    for engine, rows in steps:
        feed(engines, ref, engine, rows)
        assert_same(snapshot(engines), ref)
    snap = snapshot(engines)
    gpu = snap.media.index("GPU")
    assert [int(e.elsewhere[gpu]) for e in snap.engines] == [1, 1, 2]
    assert [int(e.stored[gpu]) for e in snap.engines] == [3, 1, 2]
    assert (int(snap.distinct[gpu]), int(snap.duplicate[gpu])) == (2, 0)


def test_order_within_a_batch_matters() -> None:
    """An engine that removes a key and stores it again in one batch stores it while another
    engine holds it; one that stores then removes leaves nothing for a later store to find."""
    engines = fleet(["a", "b"])
    ref = ReferencePool({"a": False, "b": False})
    feed(engines, ref, "a", [Row(S, 7, 0.0, tokens=16), Row(R, 7, 0.0)])
    feed(engines, ref, "b", [Row(S, 7, 1.0, tokens=16)])
    feed(engines, ref, "a", [Row(S, 7, 2.0, tokens=16), Row(R, 7, 2.0), Row(S, 7, 2.0, tokens=16)])
    assert_same(snapshot(engines), ref)
    snap = snapshot(engines)
    assert [int(e.elsewhere[snap.media.index("GPU")]) for e in snap.engines] == [2, 0]


def test_an_engine_restart_takes_its_keys_out() -> None:
    engines = fleet(["a", "b"])
    for name in engines:
        engines[name].apply(make_batch([Row(S, 1, 0.0, tokens=16)], engines[name].collector))
    gpu = snapshot(engines).media.index("GPU")
    assert int(snapshot(engines).duplicate[gpu]) == 1
    stream = engines["a"].stream
    for seq in (0, 1, 0):  # the publisher restarts: its sequence goes back to 0
        stream.handle(frames("", seq, encode_batch(1.0, [])))
    stream.flush()
    snap = snapshot(engines)
    assert (int(snap.distinct[gpu]), int(snap.duplicate[gpu])) == (1, 0)


def test_a_mismatched_block_size_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """The first engine to store fixes the pool's block size (16 tokens here); an engine whose
    stored blocks hold another number is refused from then on, its keys out of the index."""
    engines = fleet(["a", "b", "c"])
    a, b, c = engines["a"], engines["b"], engines["c"]
    a.apply(make_batch([Row(S, 1, 0.0, tokens=16)], a.collector))
    b.apply(make_batch([Row(S, 9, 0.0, tokens=16)], b.collector))
    with caplog.at_level(logging.WARNING, "kvcache_exporter.pool"):
        b.apply(make_batch([Row(S, 1, 1.0, tokens=32)], b.collector))
        b.apply(make_batch([Row(R, 9, 2.0)], b.collector))
        c.apply(make_batch([Row(S, 1, 1.0, tokens=8)], c.collector))
    assert caplog.text.count("block size differs") == 2
    snap = snapshot(engines)
    gpu = snap.media.index("GPU")
    assert [e.mismatches for e in snap.engines] == [0, 2, 1]
    assert (int(snap.distinct[gpu]), int(snap.duplicate[gpu])) == (1, 0)  # 9 went with b
    assert int(snap.engines[1].elsewhere[gpu]) == 0
    out = series([p.view() for p in engines.values()])
    assert out["kvcache_exporter_pool_mismatches_total"][(("pool", "p"), ("engine", "b"))] == 2


MEDIA_OF = ("GPU", "CPU")
stream_rows = st.lists(
    st.tuples(
        st.integers(0, 3),  # engine
        st.sampled_from([S] * 6 + [R] * 4 + [OP_CLEAR]),
        st.integers(0, 9),  # hash
        st.sampled_from([0, 0, 1]),  # medium
        st.sampled_from([0, 0, 1]),  # group
        st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2)),  # copies_left
        st.booleans(),  # ends the engine's batch
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(rows=stream_rows, hit_reports=st.lists(st.booleans(), min_size=4, max_size=4))
def test_random_multi_engine_streams_match_the_reference(
    rows: list[tuple[int, int, int, int, int, int | None, bool]], hit_reports: list[bool]
) -> None:
    """Four engines (some with hit reports), two media, two groups, copies and copy counts,
    clears, batches of random sizes interleaved across engines: every counter and gauge of the
    pool equals the reference's after every batch, and in the series the sinks export."""
    names = ["e0", "e1", "e2", "e3"]
    hits = dict(zip(names, hit_reports, strict=True))
    engines = fleet(names, hits)
    ref = ReferencePool(hits)
    pending: dict[str, list[Row]] = defaultdict(list)
    for i, (e, op, h, m, g, left, ends) in enumerate(rows):
        name = names[e]
        pending[name].append(Row(op, h * 0x9E3779B97F4A7C15 % 2**64, i * 0.1, m, g, left,
                                 0, 16, 0))  # fmt: skip
        if ends:
            feed(engines, ref, name, pending.pop(name))
            assert_same(snapshot(engines), ref)
    for name, left_rows in pending.items():
        feed(engines, ref, name, left_rows)
    assert_same(snapshot(engines), ref)
    out = series([p.view() for p in engines.values()])
    distinct, _ = ref.gauges()
    for medium, count in distinct.items():
        labels = (("pool", "p"), ("medium", medium))
        assert out["kvcache_pool_distinct_resident_blocks"][labels] == count
    for (engine, medium), count in ref.elsewhere.items():
        labels = (("pool", "p"), ("engine", engine), ("medium", medium))
        assert out["kvcache_pool_stores_resident_elsewhere_total"][labels] == count


@pytest.mark.skipif(not table_module.COMPILED, reason="compiled block table disabled")
@settings(max_examples=100, deadline=None)
@given(
    rows=stream_rows,
    removed_memory=st.sampled_from([0, 2, 1_000_000]),
    max_tracked=st.sampled_from([3, 4_000_000]),
    compiled_apply=st.booleans(),
)
def test_the_same_transitions_with_either_block_table(
    rows: list[tuple[int, int, int, int, int, int | None, bool]],
    removed_memory: int,
    max_tracked: int,
    compiled_apply: bool,
) -> None:
    """The collectors' residency transitions come from their block tables: with the compiled
    table and with the numpy reference (``KVCACHE_EXPORTER_NO_EXTENSION=1``), fed the same
    stream with ghosts expiring and tables full, every batch's transitions and every pool
    figure are the same. The compiled table is run in rounds, or by the compiled apply
    loop away from the tracked-blocks limit (at it, the loop decides which new keys fit in
    stream order, the rounds a round at a time: see test_collector_apply.py)."""
    if compiled_apply:
        assume(apply_module.COMPILED and max_tracked > 3)
    names = ["e0", "e1", "e2", "e3"]
    config = {"removed_memory": removed_memory, "max_tracked_blocks": max_tracked}
    fast = fleet(names, **config)
    with mock.patch.object(table_module, "COMPILED", False):
        ref = fleet(names, **config)
    assert fast["e0"].collector.table.compiled and not ref["e0"].collector.table.compiled
    with mock.patch.object(
        apply_module, "_KERNEL", apply_module._KERNEL if compiled_apply else None
    ):
        assert fast["e0"].collector._compiled_apply is compiled_apply
        _same_transitions(fast, ref, names, rows)


def _same_transitions(
    fast: dict[str, Pipeline],
    ref: dict[str, Pipeline],
    names: list[str],
    rows: list[tuple[int, int, int, int, int, int | None, bool]],
) -> None:

    def apply(name: str, piece: list[Row]) -> None:
        for engines in (fast, ref):
            engines[name].apply(make_batch(piece, engines[name].collector))
        a = fast[name].collector.residency_changes
        b = ref[name].collector.residency_changes
        for column in ("row", "key", "place", "delta"):
            np.testing.assert_array_equal(getattr(a, column), getattr(b, column))

    pending: dict[str, list[Row]] = defaultdict(list)
    for i, (e, op, h, m, g, left, ends) in enumerate(rows):
        name = names[e]
        pending[name].append(Row(op, h * 0x9E3779B97F4A7C15 % 2**64, i * 0.1, m, g, left,
                                 0, 16, 0))  # fmt: skip
        if ends:
            apply(name, pending.pop(name))
    for name, piece in pending.items():
        apply(name, piece)
    x, y = snapshot(fast), snapshot(ref)
    assert x.media == y.media and x.nbytes == y.nbytes
    for name in ("distinct", "duplicate", "seen"):
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    for p, q in zip(x.engines, y.engines, strict=True):
        np.testing.assert_array_equal(p.stored, q.stored)
        np.testing.assert_array_equal(p.elsewhere, q.elsewhere)


@pytest.mark.parametrize(
    "compiled",
    [
        pytest.param(True, marks=pytest.mark.skipif(not table_module.COMPILED, reason="disabled")),
        False,
    ],
)
def test_index_survives_growth_and_deletion(compiled: bool) -> None:
    """Many keys through the tables (rebuilds that move every slot, deleted slots reused),
    with either block table: exact throughout."""
    with mock.patch.object(table_module, "COMPILED", compiled):
        engines = fleet(["a", "b"])
    ref = ReferencePool({"a": False, "b": False})
    rng = np.random.default_rng(3)
    for step in range(30):
        for name in engines:
            hashes = rng.integers(0, 6000, 400)
            ops = rng.choice([S, S, R], 400)
            rows = [
                Row(int(o), int(h), float(step), tokens=16)
                for o, h in zip(ops, hashes, strict=True)
            ]
            feed(engines, ref, name, rows)
    assert_same(snapshot(engines), ref)
    assert snapshot(engines).nbytes > 0


def test_round_robin_fleet_over_the_bundled_trace() -> None:
    """Four simulated replicas behind round-robin over the bundled trace, fed through the
    engines' streams as wire payloads: the pool's figures equal the reference's, and
    replicas of one model do store blocks another replica holds."""
    names = ["r0", "r1", "r2", "r3"]
    engines = fleet(names)
    ref = ReferencePool(dict.fromkeys(names, False))
    sims = [PrefixCacheSimulator(3000, 0) for _ in names]
    seqs = [0] * len(names)
    decoder = msgspec.msgpack.Decoder()
    for i, request in enumerate(read_mooncake(bundled_trace_path())):
        if i >= 400:
            break
        k = i % len(names)
        events = sims[k].step(request)
        if not events:
            continue
        payload = encode_batch(request.timestamp_s, events)
        engines[names[k]].stream.handle(frames("", seqs[k], payload))
        engines[names[k]].stream.flush()
        seqs[k] += 1
        ts, wire, *_ = decoder.decode(payload)
        ref.feed(names[k], ts, wire)
    assert_same(snapshot(engines), ref)
    snap = snapshot(engines)
    gpu = snap.media.index("GPU")
    assert sum(int(e.elsewhere[gpu]) for e in snap.engines) > 0
    assert int(snap.duplicate[gpu]) > 0


def test_adapters_and_reasons_do_not_change_identity() -> None:
    """The key is (medium, group, hash): a removal's reason or a store's adapter is no part of
    it (requests with a cache_salt or an adapter already hash differently at the engine)."""
    assert len(ADAPTERS) > 1 and len(REASONS) > 1
    engines = fleet(["a", "b"])
    ref = ReferencePool({"a": False, "b": False})
    feed(engines, ref, "a", [Row(S, 5, 0.0, adapter=1, tokens=16)])
    feed(engines, ref, "b", [Row(S, 5, 0.0, adapter=2, tokens=16)])
    assert_same(snapshot(engines), ref)
    assert int(snapshot(engines).duplicate[snapshot(engines).media.index("GPU")]) == 1


def test_sources_form_pools_and_a_pool_of_one_has_no_index() -> None:
    """Sources that name no pool share ``default``; ``pool=`` puts a source elsewhere; a pool
    of one engine gets no index (nothing can be resident elsewhere)."""
    from kvcache_exporter.app import Exporter
    from kvcache_exporter.config import ExporterConfig
    from kvcache_exporter.sources.spec import SourceSpec

    specs = tuple(
        SourceSpec.parse(text)
        for text in (
            "a=tcp://127.0.0.1:1",
            "b=tcp://127.0.0.1:2",
            "c=tcp://127.0.0.1:3,pool=solo",
        )
    )
    exporter = Exporter(ExporterConfig(sources=specs))
    try:
        assert list(exporter.pools) == ["default"]
        members = {e.name: e.pipeline.pool for e in exporter.engines}
        assert members["c"] is None
        assert {m.name for m in exporter.pools["default"].members} == {"a", "b"}
    finally:
        exporter.context.destroy(linger=0)


def test_a_restored_collector_rejoins_the_index() -> None:
    """After a checkpoint restore the collectors' resident keys are the index's, counted as
    neither stores nor stores resident elsewhere."""
    before = fleet(["a", "b"])
    for name, hashes in (("a", [1, 2, 3]), ("b", [3, 4])):
        rows = [Row(S, h, 0.0, tokens=16) for h in hashes]
        before[name].apply(make_batch(rows, before[name].collector))
    after = fleet(["a", "b"])
    for name, pipeline in after.items():
        old = before[name].collector
        pipeline.collector.media.restore(old.media.names)  # as a checkpoint restore does
        pipeline.collector.groups.restore(old.groups.names)
        pipeline.collector.load_state(old.state())
        assert pipeline.pool is not None
        pipeline.pool.load()
    snap = snapshot(after)
    gpu = snap.media.index("GPU")
    assert (int(snap.distinct[gpu]), int(snap.duplicate[gpu])) == (4, 1)
    assert [int(e.stored.sum()) for e in snap.engines] == [0, 0]
