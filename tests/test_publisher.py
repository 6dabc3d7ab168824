"""The engine-side publisher: wire forms against the engines' real bytes, and real ZeroMQ."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from kvcache_exporter.protocol.batch import OP_ACCESS, OP_CLEAR, OP_REMOVE, OP_STORE, LabelTable
from kvcache_exporter.protocol.decode import PayloadDecoder
from kvcache_exporter.publisher import (
    END_SEQ,
    Accessed,
    Cleared,
    Event,
    KVEventPublisher,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    endpoint_binds,
    frames,
)

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
TIMEOUT_MS = 5000


def load_vector(name: str) -> list[list[bytes]]:
    lines = (VECTORS / f"{name}.jsonl").read_text().splitlines()[1:]
    return [[bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines]


def events_of(payload: bytes) -> tuple[float, list[Event], int]:
    """Rebuild publisher records from a real engine's map-form payload."""
    ts, raw_events, dp_rank = msgspec.msgpack.decode(payload)
    events: list[Event] = []
    for e in raw_events:
        if e["type"] == "BlockStored":
            events.append(
                Stored(
                    e["block_hashes"],
                    e["parent_block_hash"],
                    e["token_ids"],
                    block_size=e["block_size"],
                    lora_id=e["lora_id"],
                    medium=e.get("medium"),
                    lora_name=e.get("lora_name"),
                )
            )
        elif e["type"] == "BlockRemoved":
            events.append(Removed(e["block_hashes"], e.get("medium")))
        else:
            assert e == {"type": "AllBlocksCleared"}
            events.append(Cleared())
    return ts, events, dp_rank


def decode(payload: bytes) -> tuple[PayloadDecoder, Any]:
    decoder = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
    decoder.feed(payload)
    return decoder, decoder.flush()


# --- wire forms -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vector", "form", "topic"),
    [("vllm-0.25.0", WireForm.VLLM, "kv-events"), ("sglang-0.5.23", WireForm.SGLANG, "")],
)
def test_map_forms_are_byte_identical_to_the_engines(
    vector: str, form: WireForm, topic: str
) -> None:
    for seq, message in enumerate(load_vector(vector)):
        ts, events, dp_rank = events_of(message[2])
        payload = encode_batch(ts, events, form, dp_rank)
        assert payload == message[2]
        assert frames(topic, seq, payload) == message


def test_vllm_form_reads_like_a_live_vllm_033_capture() -> None:
    # vLLM 0.33 declares more than 15 BlockStored fields, so msgspec gives it a map16 header;
    # everything else, field order included, is the same.
    for message in load_vector("vllm-0.33.0"):
        ts, events, dp_rank = events_of(message[2])
        payload = encode_batch(ts, events, WireForm.VLLM, dp_rank)
        assert msgspec.msgpack.decode(payload) == msgspec.msgpack.decode(message[2])
        assert list(msgspec.msgpack.decode(payload)[1][0]) == list(
            msgspec.msgpack.decode(message[2])[1][0]
        )


@pytest.mark.parametrize("vector", ["vllm-0.23.0", "vllm-0.18.0"])
def test_array_form_has_the_positions_of_old_vllm(vector: str) -> None:
    maps = load_vector("vllm-0.25.0")  # the same script in map form, to rebuild the records
    for message, same in zip(load_vector(vector), maps, strict=True):
        ts, events, dp_rank = events_of(same[2])
        mine = msgspec.msgpack.decode(encode_batch(ts, events, "vllm-array", dp_rank))
        theirs = msgspec.msgpack.decode(message[2])
        assert mine[0] == theirs[0] and mine[2] == theirs[2]
        for my_event, their_event in zip(mine[1], theirs[1], strict=True):
            # Same values at every position we send; what old vLLM adds is null padding.
            assert their_event[: len(my_event)] == my_event
            assert all(v is None for v in their_event[len(my_event) :])
            if my_event[0] == "BlockStored":
                assert len(my_event) == 8
            elif my_event[0] == "BlockRemoved":
                assert len(my_event) == 3


def test_extension_events_in_each_form() -> None:
    events: list[Event] = [Accessed([5, 6]), Removed([5], "CPU", reason="freed"), Removed([6])]
    vllm = msgspec.msgpack.decode(encode_batch(1.0, events, WireForm.VLLM))[1]
    assert vllm == [
        {"type": "BlockAccessed", "block_hashes": [5, 6], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU", "reason": "freed"},
        {"type": "BlockRemoved", "block_hashes": [6], "medium": "GPU"},
    ]
    array = msgspec.msgpack.decode(encode_batch(1.0, events, WireForm.VLLM_ARRAY))[1]
    assert array == [
        ["BlockAccessed", [5, 6], "GPU"],
        ["BlockRemoved", [5], "CPU", None, None, "freed"],
        ["BlockRemoved", [6], "GPU"],
    ]
    sglang = msgspec.msgpack.decode(encode_batch(1.0, [*events, Removed([7], None)], "sglang"))
    assert sglang[1][1] == {
        "type": "BlockRemoved",
        "block_hashes": [5],
        "medium": "CPU",
        "reason": "freed",
    }
    assert sglang[1][3] == {"type": "BlockRemoved", "block_hashes": [7]}  # null medium left out
    assert sglang[2] == 0  # the batch always has three elements


def test_token_ids_and_counts() -> None:
    payload = encode_batch(
        0.0,
        [
            Stored([1], token_ids=[7, 8, 9]),
            Stored([2, 3], token_count=20),
            Stored([4, 5], block_size=512),  # neither: full blocks
            Stored([6], token_count=70_000, block_size=16),
        ],
    )
    events = msgspec.msgpack.decode(payload)[1]
    assert events[0]["token_ids"] == [7, 8, 9]
    assert events[1]["token_ids"] == [0] * 20
    assert events[2]["token_ids"] == [0] * 1024
    assert len(events[3]["token_ids"]) == 70_000
    decoder, _ = decode(payload)
    # Tokens a block holds: block_size, fewer for a partial last block; 70,000 token ids over
    # one 16-token block (as a sliding-window store sends) are still one block's 16 tokens.
    assert decoder.stats.tokens_stored == 3 + 20 + 1024 + 16
    with pytest.raises(ValueError, match="token_count"):
        encode_batch(0.0, [Stored([1], token_count=-1)])


def test_numpy_hashes_and_u64_extremes() -> None:
    hashes = np.array([0, 1, (1 << 64) - 1, 1 << 63], dtype=np.uint64)
    payload = encode_batch(2.5, [Stored(hashes, parent_block_hash=(1 << 64) - 1)])
    assert msgspec.msgpack.decode(payload)[1][0]["block_hashes"] == hashes.tolist()
    _, batch = decode(payload)
    assert batch.block_hash.tolist() == hashes.tolist()


@pytest.mark.parametrize("form", list(WireForm))
def test_round_trip_through_the_exporter_decoder(form: WireForm) -> None:
    events: list[Event] = [
        Stored([11, 12], token_count=32, medium="GPU"),
        Accessed([11]),
        Stored([12], parent_block_hash=11, medium="CPU"),
        Removed([12], reason="offloaded"),
        Cleared(),
        Stored([13], medium=None),
    ]
    decoder, batch = decode(encode_batch(123.25, events, form, dp_rank=3))
    assert batch.op.tolist() == [
        OP_STORE, OP_STORE, OP_ACCESS, OP_STORE, OP_REMOVE, OP_CLEAR, OP_STORE
    ]  # fmt: skip
    assert batch.block_hash.tolist()[:5] == [11, 12, 11, 12, 12]
    assert batch.block_hash.tolist()[6] == 13
    assert set(batch.ts.tolist()) == {123.25}
    media = [decoder.media.names[i] for i in batch.medium.tolist()]
    assert media[:5] == ["GPU", "GPU", "GPU", "CPU", "GPU"] and media[6] == "unknown"
    assert decoder.reasons.names[int(batch.reason[4])] == "offloaded"
    assert decoder.last_dp_rank == 3
    assert decoder.stats.tokens_stored == 32 + 16 + 16


def test_frames_and_bind_rule() -> None:
    assert frames("kv", 1, b"x") == [b"kv", b"\x00" * 7 + b"\x01", b"x"]
    assert frames(b"", (1 << 64) - 1, b"") == [b"", END_SEQ, b""]
    for endpoint in ("tcp://*:5557", "tcp://0.0.0.0:5557", "tcp://[::]:5557"):
        assert endpoint_binds(endpoint), endpoint
    for endpoint in ("ipc:///tmp/kv.sock", "inproc://kv"):
        assert endpoint_binds(endpoint), endpoint
    for endpoint in (
        "tcp://127.0.0.1:5557",
        "tcp://localhost:5557",
        "tcp://[::1]:5557",
        "tcp://10.0.0.1:5557",
        "tcp://127.0.0.1:0;10.0.0.2:5557",
    ):
        assert not endpoint_binds(endpoint), endpoint


# --- real sockets -----------------------------------------------------------------------------
def recv(sock: zmq.Socket[Any]) -> list[bytes]:
    assert sock.poll(TIMEOUT_MS), "nothing arrived"
    return sock.recv_multipart()


def wait_for_subscription(pub: KVEventPublisher, sub: zmq.Socket[Any]) -> int:
    """Send empty batches until the SUB gets one (ZeroMQ's slow joiner); the seq that did."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        pub.publish()
        if sub.poll(20):
            seq = int.from_bytes(sub.recv_multipart()[1], "big")
            while sub.poll(50):  # probes still in flight
                seq = int.from_bytes(sub.recv_multipart()[1], "big")
            return seq
    raise AssertionError("the subscription never reached the publisher")


@pytest.mark.parametrize("publisher_binds", [True, False])
def test_pub_to_sub_over_tcp(publisher_binds: bool) -> None:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    try:
        if publisher_binds:
            pub = KVEventPublisher("tcp://*:*")
            port = pub.last_endpoint.rsplit(":", 1)[1]
            sub.connect(f"tcp://127.0.0.1:{port}")
        else:
            port = sub.bind_to_random_port("tcp://127.0.0.1")
            pub = KVEventPublisher(f"tcp://127.0.0.1:{port}")  # a host: the engine connects
        assert pub.binds is publisher_binds
        with pub:
            probe = wait_for_subscription(pub, sub)
            pub.stored([1, 2], token_count=32)
            pub.removed([1], reason="freed")
            assert pub.pending == 2
            assert pub.publish(ts=1000.5) == probe + 1
            assert pub.send_batch(1001.0, [Cleared()]) == probe + 2
            first, second = recv(sub), recv(sub)
        assert first[0] == b"kv-events"
        assert int.from_bytes(first[1], "big") == probe + 1
        assert int.from_bytes(second[1], "big") == probe + 2
        decoder = PayloadDecoder(LabelTable("unknown"), LabelTable("evicted"))
        decoder.feed(first[2])
        decoder.feed(second[2])
        batch = decoder.flush()
        assert batch.op.tolist() == [OP_STORE, OP_STORE, OP_REMOVE, OP_CLEAR]
        assert batch.ts.tolist() == [1000.5, 1000.5, 1000.5, 1001.0]
        assert decoder.reasons.names[int(batch.reason[2])] == "freed"
    finally:
        sub.close()


def test_seq_counts_from_zero_and_publish_after_close_fails() -> None:
    pub = KVEventPublisher("inproc://kvcache-test-seq", form="sglang", topic="")
    assert [pub.publish(ts=1.0) for _ in range(3)] == [0, 1, 2]
    assert pub.next_seq == 3
    pub.close()
    pub.close()  # idempotent
    assert pub.closed
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish()


def replay(endpoint: str, start_seq: int) -> list[list[bytes]]:
    """Ask a replay ROUTER from a DEALER, as the exporter does; every answer up to the end."""
    dealer: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
        answers = []
        while True:
            answer = recv(dealer)
            answers.append(answer)
            if END_SEQ in answer:
                return answers
    finally:
        dealer.close()


@pytest.mark.parametrize("topic_frame", [True, False])
def test_replay_answers_a_dealer(topic_frame: bool) -> None:
    with KVEventPublisher(
        "tcp://*:*",
        replay_endpoint="tcp://127.0.0.1:*",
        replay_buffer=4,
        replay_topic_frame=topic_frame,
    ) as pub:
        payloads = {}
        for i in range(6):  # nobody subscribes: the batches are only in the replay ring
            pub.accessed([i])
            seq = pub.publish(ts=float(i))
            payloads[seq] = encode_batch(float(i), [Accessed([i])])
        endpoint = pub.replay_last_endpoint
        assert endpoint is not None
        answers = replay(endpoint, 3)
        everything = replay(endpoint, 0)  # the ring kept the last four only
        nothing = replay(endpoint, 100)
    if topic_frame:
        # vLLM >= 0.26: [b"", topic, seq, payload] and [b"", b"", END_SEQ, b""]
        assert answers == [
            [b"", b"kv-events", (3).to_bytes(8, "big"), payloads[3]],
            [b"", b"kv-events", (4).to_bytes(8, "big"), payloads[4]],
            [b"", b"kv-events", (5).to_bytes(8, "big"), payloads[5]],
            [b"", b"", END_SEQ, b""],
        ]
    else:
        # vLLM < 0.26 and SGLang: [b"", seq, payload] and [b"", END_SEQ, b""]
        assert answers == [
            [b"", (3).to_bytes(8, "big"), payloads[3]],
            [b"", (4).to_bytes(8, "big"), payloads[4]],
            [b"", (5).to_bytes(8, "big"), payloads[5]],
            [b"", END_SEQ, b""],
        ]
    seq_frame = 2 if topic_frame else 1
    assert [int.from_bytes(a[seq_frame], "big") for a in everything[:-1]] == [2, 3, 4, 5]
    assert len(nothing) == 1 and END_SEQ in nothing[0]


def test_replay_ignores_malformed_requests_and_keeps_serving() -> None:
    with KVEventPublisher(
        "inproc://kvcache-test-replay", replay_endpoint="tcp://127.0.0.1:*"
    ) as pub:
        pub.publish(ts=1.0)
        endpoint = pub.replay_last_endpoint
        assert endpoint is not None
        dealer: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint)
            dealer.send_multipart([b"", b"x", b"y"])  # four frames at the ROUTER: ignored
            assert not dealer.poll(100)
        finally:
            dealer.close()
        assert len(replay(endpoint, 0)) == 2


def test_ipv6_wildcard_binds_and_bad_endpoints_fail_cleanly() -> None:
    try:
        pub = KVEventPublisher("tcp://[::]:*", replay_endpoint="tcp://[::1]:*")
    except zmq.ZMQError as exc:  # a host without IPv6
        pytest.skip(f"no IPv6 here: {exc}")
    with pub:
        assert pub.binds and pub.last_endpoint.startswith("tcp://[::]:")
        assert (pub.replay_last_endpoint or "").startswith("tcp://[::1]:")
    with pytest.raises(zmq.ZMQError):
        KVEventPublisher("tcp://*:not-a-port")
    with pytest.raises(zmq.ZMQError):
        KVEventPublisher("tcp://*:*", replay_endpoint="tcp://*:not-a-port")
    with pytest.raises(ValueError, match="replay_buffer"):
        KVEventPublisher("tcp://*:*", replay_buffer=0)
