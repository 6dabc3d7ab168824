"""Replay recovery over real ZeroMQ sockets: the exporter side against the engine-side
publisher's vLLM-compatible replay ROUTER, and against the exchanges recorded off the real
engines' replay ROUTERs (``tests/fixtures/vectors/replay``, see SOURCE.md there)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.protocol.batch import (
    OP_ACCESS,
    OP_CLEAR,
    OP_REMOVE,
    OP_STORE,
    EventBatch,
    LabelTable,
)
from kvcache_exporter.protocol.framing import Message
from kvcache_exporter.publisher import KVEventPublisher, Removed, Stored
from kvcache_exporter.sources.replay import ReplayRecovery
from kvcache_exporter.sources.spec import SourceSpec
from kvcache_exporter.sources.stream import EventStream
from kvcache_exporter.sources.subscriber import IngestLoop, SubscriberSource

from .conftest import free_port
from .reference import ReferenceCollector


def batch_events(i: int) -> list[Stored | Removed]:
    """Batch i stores block i and removes block i - 3: every batch changes the state."""
    events: list[Stored | Removed] = [Stored([1000 + i], token_count=16)]
    if i >= 3:
        events.append(Removed([1000 + i - 3]))
    return events


def reference(count: int) -> ReferenceCollector:
    ref = ReferenceCollector()
    for i in range(count):
        ref.feed(
            100.0 + i,
            [
                {"type": "BlockStored", "block_hashes": [1000 + i], "medium": "GPU"},
                *(
                    [{"type": "BlockRemoved", "block_hashes": [1000 + i - 3], "medium": "GPU"}]
                    if i >= 3
                    else []
                ),
            ],
        )
    return ref


@contextmanager
def running_source(
    spec_text: str, rcvhwm: int = 200_000, timeout: float | None = None
) -> Iterator[tuple[Pipeline, SubscriberSource, Callable[[], None]]]:
    """A real source feeding a pipeline, polled by an IngestLoop thread."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    spec = SourceSpec.parse(spec_text)
    pipeline = new_pipeline(spec.name, CollectorConfig())
    source = SubscriberSource(spec, context, pipeline.stream, rcvhwm=rcvhwm)
    if timeout is not None and source.replay is not None:
        source.replay.timeout = timeout
    source.open()
    stop = threading.Event()
    loop = IngestLoop([source])
    thread = threading.Thread(target=loop.run, args=(stop,))

    def start_loop() -> None:
        thread.start()

    try:
        yield pipeline, source, start_loop
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        source.close()
        context.term()


def wait_until(
    check: Callable[[], bool], timeout: float = 10.0, what: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not reached in time {what()}"
        time.sleep(0.02)


def assert_matches(pipeline: Pipeline, count: int) -> None:
    snap = pipeline.collector.snapshot()
    ref = reference(count)
    gpu = snap.place("GPU")
    assert gpu is not None
    assert int(snap.stored[gpu]) == ref.stored["GPU"] == count
    assert int(snap.resident[gpu]) == ref.resident_count("GPU")
    assert int(snap.removed[gpu].sum()) == ref.removed[("GPU", "evicted")]
    assert snap.unknown_removals == ref.unknown_removals == 0


def applied(pipeline: Pipeline) -> int:
    """Batches applied: each test batch stores one block no other batch stores."""
    return int(pipeline.collector.snapshot().stored.sum())


def wait_connected(source: SubscriberSource) -> None:
    wait_until(lambda: source.stats.up)
    time.sleep(0.3)  # the subscription reaches the publisher


def test_started_late_the_replay_brings_it_level() -> None:
    """An exporter that subscribes after the engine published 20 batches asks the replay
    buffer for them and ends with the state of all 25, nothing counted as lost."""
    port, replay_port = free_port(), free_port()
    with KVEventPublisher(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay_port}", bind=True
    ) as pub:
        for i in range(20):
            pub.send_batch(100.0 + i, batch_events(i))
        spec = f"e=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{replay_port}"
        with running_source(spec) as (pipeline, source, start):
            start()
            wait_connected(source)
            for i in range(20, 25):
                pub.send_batch(100.0 + i, batch_events(i))
            wait_until(lambda: applied(pipeline) == 25)
            assert source.stats.batches_replayed >= 20
            assert source.stats.sequence_gaps == 0
            assert source.stats.batches_lost == 0
            assert_matches(pipeline, 25)


@pytest.mark.parametrize(("replay_buffer", "recoverable"), [(10_000, True), (50, False)])
def test_dropped_messages_are_recovered_in_order(replay_buffer: int, recoverable: bool) -> None:
    """With tiny high-water marks a burst overflows and ZeroMQ drops messages; the gaps are
    seen, replayed from the engine's buffer and applied in order. What the buffer no longer
    holds is counted as lost, exactly: received + replayed + lost = sent."""
    port, replay_port = free_port(), free_port()
    sent = 3000
    with KVEventPublisher(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        bind=True,
        sndhwm=10,
        replay_buffer=replay_buffer,
    ) as pub:
        spec = f"e=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{replay_port}"
        with running_source(spec, rcvhwm=10) as (pipeline, source, start):
            start()
            wait_connected(source)
            pub.send_batch(99.0, [])  # seq 0: the baseline, so later gaps count as gaps
            wait_until(lambda: source.stats.messages == 1)
            for i in range(sent):
                pub.send_batch(100.0 + i, batch_events(i))
            # A loss at the very end shows only when a later batch arrives: send one once the
            # burst has drained, as an engine's next step would.
            time.sleep(1.0)
            pub.send_batch(100.0 + sent, [])
            stats = source.stats
            # Every batch is applied once or counted lost, never both, never neither. A slow
            # reader can make the publisher abandon a replay: then the 5 s timeout ends it.
            # Under a loaded CI machine a run of replays can take a while; the invariant is
            # what matters, not the speed.
            wait_until(
                lambda: applied(pipeline) + stats.batches_lost == sent,
                timeout=90,
                what=lambda: f"applied {applied(pipeline)}, {stats}",
            )
            time.sleep(0.3)
            assert applied(pipeline) + stats.batches_lost == sent
            assert stats.sequence_gaps > 0  # the burst really overflowed
            assert stats.messages < sent  # ZeroMQ dropped some on the live path
            if recoverable:
                assert stats.batches_lost == 0
                assert stats.batches_replayed > 0
                assert_matches(pipeline, sent)
            else:
                assert stats.batches_lost > 0


def test_a_replay_nobody_answers_times_out_and_the_stream_goes_on() -> None:
    """The replay endpoint is dead: the gap is counted as lost after the timeout, and the live
    messages held meanwhile are applied, in order."""
    port, dead = free_port(), free_port()
    with KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True) as pub:
        spec = f"e=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{dead}"
        with running_source(spec, timeout=0.5) as (pipeline, source, start):
            start()
            wait_connected(source)
            pub.send_batch(99.0, [])
            wait_until(lambda: source.stats.messages == 1)
            # Skip seq 1..5 on the wire: the publisher's own counter moves on.
            pub._next_seq += 5  # a gap the publisher would never make by itself
            for i in range(10):
                pub.send_batch(100.0 + i, [Stored([5000 + i])])
            wait_until(lambda: applied(pipeline) == 10)
            assert source.stats.messages == 11
            assert source.stats.sequence_gaps == 1
            assert source.stats.batches_lost == 5
            assert source.replay is not None and not source.replay.active


def test_replay_endpoint_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        SourceSpec.parse("e=tcp://127.0.0.1:5557,replay=tcp://*:5558")


# --- the exchanges recorded off the real engines' replay ROUTERs -----------------------------
#
# Each ``replay/NAME.json`` is what a DEALER got back from an engine's replay ROUTER after
# ``NAME.jsonl``'s five live batches (seq 0..4), asking for seq >= 1. Here a ROUTER on
# loopback stands in for the engine and answers with exactly those frames.

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
REPLAY_FILES = sorted((VECTORS / "replay").glob("*.json"))
REPLAY_IDS = [path.stem for path in REPLAY_FILES]
END_SEQ = b"\xff" * 8
# The end marker of each engine's replay, as a DEALER sees it (the vectors' README).
END_MARKERS = {
    "sglang-0.5.19-live": [b"", END_SEQ, b""],  # SGLang <= 0.5.21: no topic frame
    "sglang-0.5.23-live": [b"", b"", END_SEQ, b""],  # SGLang >= 0.5.22: an empty topic
    "trtllm-main-13599e9": [b"", b"", END_SEQ, b""],
}
OP_NAMES = {
    OP_STORE: "BlockStored",
    OP_REMOVE: "BlockRemoved",
    OP_ACCESS: "BlockAccessed",
    OP_CLEAR: "AllBlocksCleared",
}
# (event type, folded hash, ts, medium, reason): the medium and the reason only where they
# mean something (a clear has neither, only a removal has a reason).
Row = tuple[str, int | None, float, str | None, str | None]


@dataclass(frozen=True)
class LiveMessage:
    seq: int
    frames: list[bytes]
    expected: dict[str, Any]


@dataclass(frozen=True)
class Exchange:
    producer: str
    request: list[bytes]
    replies: list[list[bytes]]  # the replayed batches, then the end marker
    live: list[LiveMessage]  # the live stream the replay was asked about

    @property
    def batches(self) -> list[list[bytes]]:
        return self.replies[:-1]

    @property
    def end(self) -> list[bytes]:
        return self.replies[-1]


def load_exchange(path: Path) -> Exchange:
    record = json.loads(path.read_text())
    header, *lines = (VECTORS / f"{path.stem}.jsonl").read_text().splitlines()
    assert record["producer"] == json.loads(header)["producer"] == path.stem
    live = []
    for line in lines:
        item = json.loads(line)
        frames = [bytes.fromhex(f) for f in item["frames_hex"]]
        live.append(LiveMessage(item["seq"], frames, item["expected"]))
    return Exchange(
        producer=record["producer"],
        request=[bytes.fromhex(f) for f in record["request_frames_hex"]],
        replies=[[bytes.fromhex(f) for f in reply] for reply in record["reply_frames_hex"]],
        live=live,
    )


def expected_rows(expected: dict[str, Any]) -> list[Row]:
    """The rows a vector's ``expected`` block implies (hashes folded to uint64)."""
    ts = expected["ts"]
    out: list[Row] = []
    for event in expected["events"]:
        kind = event["type"]
        if kind == "AllBlocksCleared":
            out.append((kind, None, ts, None, None))
            continue
        medium = event.get("medium") or "unknown"
        reason = "evicted" if kind == "BlockRemoved" else None
        out.extend((kind, h & (2**64 - 1), ts, medium, reason) for h in event["block_hashes"])
    return out


def rows_of(batch: EventBatch, media: LabelTable, reasons: LabelTable) -> list[Row]:
    out: list[Row] = []
    for op, h, ts, medium, reason in zip(
        batch.op.tolist(),
        batch.block_hash.tolist(),
        batch.ts.tolist(),
        batch.medium.tolist(),
        batch.reason.tolist(),
        strict=True,
    ):
        if op == OP_CLEAR:
            out.append((OP_NAMES[op], None, ts, None, None))
        else:
            out.append(
                (
                    OP_NAMES[op],
                    h,
                    ts,
                    media.names[medium],
                    reasons.names[reason] if op == OP_REMOVE else None,
                )
            )
    return out


@dataclass
class Collected:
    """A real EventStream and the rows it handed on, in order."""

    stream: EventStream
    rows: list[Row]
    restarts: list[float]


def collecting_stream(name: str) -> Collected:
    media, reasons = LabelTable("unknown"), LabelTable("evicted")
    rows: list[Row] = []
    restarts: list[float] = []
    stream = EventStream(
        name,
        on_batch=lambda batch: rows.extend(rows_of(batch, media, reasons)),
        on_restart=restarts.append,
        media=media,
        reasons=reasons,
    )
    return Collected(stream, rows, restarts)


# What the replay client hands the stream: (seq, topic, payload, replayed) per batch, the first
# missing seq, at start-up?
Recovered = tuple[list[tuple[int, bytes, bytes, bool]], int, bool]


def record_recovered(monkeypatch: pytest.MonkeyPatch, stream: EventStream) -> list[Recovered]:
    """Note what reaches ``stream.apply_recovered``, which still does its real work."""
    calls: list[Recovered] = []
    real = stream.apply_recovered

    def apply_recovered(
        batches: list[tuple[int, Message, bool]], first_missing: int, startup: bool
    ) -> None:
        seen = [(seq, m.topic, bytes(m.payload), replayed) for seq, m, replayed in batches]
        calls.append((seen, first_missing, startup))
        real(batches, first_missing, startup)

    monkeypatch.setattr(stream, "apply_recovered", apply_recovered)
    return calls


def replay_router(context: zmq.Context[zmq.Socket[bytes]]) -> tuple[zmq.Socket[bytes], str]:
    """The engine's replay ROUTER, bound on a random loopback port."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, f"tcp://127.0.0.1:{port}"


def receive_request(router: zmq.Socket[bytes], timeout: float = 10.0) -> tuple[bytes, list[bytes]]:
    """The next request reaching the ROUTER: the requester's identity and the frames after it."""
    assert router.poll(int(timeout * 1000), zmq.POLLIN), "no replay request reached the engine"
    identity, *frames = router.recv_multipart()
    return identity, frames


def pump(replay: ReplayRecovery, done: Callable[[], bool], timeout: float) -> bool:
    """Let the replay client read the engine's answers, as the ingest loop does, until
    ``done`` (True) or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if replay.socket.poll(max(1, int(min(remaining, 0.05) * 1000)), zmq.POLLIN):
            replay.read_answers()
    return True


@pytest.mark.parametrize("path", REPLAY_FILES, ids=REPLAY_IDS)
def test_recorded_exchanges_are_what_the_vectors_readme_says(path: Path) -> None:
    """The fixtures themselves: a request ``[b"", 1]``; one answer per live batch from seq 1
    on with the live payload bytes (a topic frame in the 4-frame form); the engine's end
    marker. The tests below rely on this."""
    exchange = load_exchange(path)
    assert exchange.request == [b"", (1).to_bytes(8, "big")]
    assert exchange.end == END_MARKERS[exchange.producer]
    width = len(exchange.end)
    assert [m.seq for m in exchange.live] == [0, 1, 2, 3, 4]
    assert len(exchange.batches) == 4
    for reply, live in zip(exchange.batches, exchange.live[1:], strict=True):
        assert len(reply) == width
        assert reply[0] == b""
        if width == 4:
            assert reply[1] == live.frames[0]  # the live topic
        assert reply[-2] == live.frames[1] == live.seq.to_bytes(8, "big")
        assert reply[-1] == live.frames[2]


@pytest.mark.parametrize("path", REPLAY_FILES, ids=REPLAY_IDS)
def test_replay_client_speaks_each_engines_recorded_exchange(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter's DEALER against a ROUTER answering with the engine's recorded frames.
    After seq 0, seq 4 arrives live: the client asks with exactly the recorded request
    (start seq 1), takes seq 1..4 with their payload bytes from the answers (the replayed copy
    of 4 over the held live one), ends the replay on that engine's end marker and not before,
    and the stream applies all five batches in order, each once."""
    exchange = load_exchange(path)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router, endpoint = replay_router(context)
    got = collecting_stream(exchange.producer)
    stream = got.stream
    # Only the end marker can end the replay here: the timeout is never checked, and is long.
    replay = ReplayRecovery(stream, context, endpoint, timeout=60.0)
    recovered = record_recovered(monkeypatch, stream)
    first, newest = exchange.live[0], exchange.live[-1]
    try:
        stream.handle(first.frames)
        stream.flush()
        assert got.rows == expected_rows(first.expected)
        stream.handle(newest.frames)  # seq 1..3 lost on the way
        assert replay.active
        identity, request = receive_request(router)
        assert request == exchange.request

        for reply in exchange.batches:
            router.send_multipart([identity, *reply])
        assert not pump(replay, lambda: not replay.active, timeout=0.5)
        assert recovered == []  # the batches alone do not end the replay
        assert got.rows == expected_rows(first.expected)

        router.send_multipart([identity, *exchange.end])
        assert pump(replay, lambda: not replay.active, timeout=10.0), "end marker not seen"
        topic = first.frames[0]
        assert recovered == [
            ([(m.seq, topic, m.frames[2], True) for m in exchange.live[1:]], 1, False)
        ]
        assert got.rows == [row for m in exchange.live for row in expected_rows(m.expected)]
        stats = stream.stats
        assert (stats.batches_replayed, stats.batches_lost, stats.sequence_gaps) == (4, 0, 1)
        assert stats.duplicates == 1  # the live seq 4, replayed too
        assert stats.engine_restarts == 0 and got.restarts == []
        assert stream.decode_errors() == {}
        assert stream.sequence.expected == 5
        assert router.poll(200, zmq.POLLIN) == 0  # one request, no second replay
    finally:
        replay.close()
        router.close(linger=0)
        context.term()


@pytest.mark.parametrize("revealed_by", ["next-batch", "newest-live"])
@pytest.mark.parametrize("path", REPLAY_FILES, ids=REPLAY_IDS)
def test_a_live_gap_is_filled_from_the_recorded_replay(path: Path, revealed_by: str) -> None:
    """The whole live path: a SubscriberSource on an IngestLoop thread, subscribed to a
    stand-in engine PUB (an XPUB, so the test knows when the subscription is in), its replay
    DEALER connected to a ROUTER that answers with the recorded frames. The engine's seq 0
    arrives; seq 1..4 never do; then the gap shows, by a later batch (seq 5, empty, which the
    recorded buffer predates) or by the newest live one (seq 4, also replayed). The rows the
    stream hands on are exactly the five live batches' expected rows, in order, nothing lost;
    the next live batch after the replay is applied as usual."""
    exchange = load_exchange(path)
    name = exchange.producer
    first, newest = exchange.live[0], exchange.live[-1]
    topic = first.frames[0]

    def empty_batch(seq: int) -> list[bytes]:
        ts = newest.expected["ts"] + seq
        return [topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode([ts, [], 0])]

    revealing = empty_batch(5) if revealed_by == "next-batch" else newest.frames
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    engine = context.socket(zmq.XPUB)
    engine.setsockopt(zmq.LINGER, 0)
    pub_port = engine.bind_to_random_port("tcp://127.0.0.1")
    router, replay_endpoint = replay_router(context)
    got = collecting_stream(name)
    spec = SourceSpec.parse(f"{name}=tcp://127.0.0.1:{pub_port},replay={replay_endpoint}")
    source = SubscriberSource(spec, context, got.stream)
    assert source.replay is not None
    replay = source.replay
    replay.timeout = 60.0  # within the test, only the end marker can end the replay
    stats = source.stats
    source.open()
    stop = threading.Event()
    thread = threading.Thread(target=IngestLoop([source]).run, args=(stop,))
    thread.start()
    try:
        assert engine.poll(10_000, zmq.POLLIN), "the exporter never subscribed"
        assert engine.recv() == b"\x01"  # to every topic
        engine.send_multipart(first.frames)
        wait_until(lambda: stats.messages == 1)
        assert got.rows == expected_rows(first.expected)

        engine.send_multipart(revealing)
        identity, request = receive_request(router)
        assert request == exchange.request
        for reply in exchange.replies:
            router.send_multipart([identity, *reply])
        want = [row for m in exchange.live for row in expected_rows(m.expected)]
        wait_until(
            lambda: not replay.active and len(got.rows) >= len(want),
            what=lambda: f"active={replay.active}, {len(got.rows)} rows, {stats}",
        )
        time.sleep(0.2)  # nothing more arrives
        assert got.rows == want
        assert (stats.batches_replayed, stats.batches_lost, stats.sequence_gaps) == (4, 0, 1)
        assert stats.duplicates == (1 if revealed_by == "newest-live" else 0)
        assert stats.engine_restarts == 0 and got.restarts == []
        assert got.stream.decode_errors() == {}
        assert stats.messages == 2  # live ones; the replayed batches are not messages

        # Back on the live path: the next batch is in order, no second replay.
        following = 6 if revealed_by == "next-batch" else 5
        engine.send_multipart(empty_batch(following))
        wait_until(lambda: stats.messages == 3, what=lambda: str(stats))
        assert got.stream.applied_through == following
        assert (stats.sequence_gaps, stats.batches_lost) == (1, 0)
        assert not replay.active
        assert router.poll(200, zmq.POLLIN) == 0
    finally:
        stop.set()
        thread.join(5)
        source.close()
        engine.close(linger=0)
        router.close(linger=0)
        context.term()
