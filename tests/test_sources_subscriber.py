"""Sources over real ZeroMQ sockets with CURVE: who is heard, who is not, and how it shows.

Every test that says a publisher is not heard runs it beside one that is, on the same
ingest loop, so "nothing arrived" cannot pass because nothing could have arrived.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import zmq

from kvcache_exporter.collector import CollectorConfig
from kvcache_exporter.curve import CurveRole, client_role, server_role
from kvcache_exporter.pipeline import Pipeline, new_pipeline
from kvcache_exporter.publisher import KVEventPublisher, Stored, encode_batch, frames
from kvcache_exporter.sources import subscriber
from kvcache_exporter.sources.authenticator import PublisherAuthenticator
from kvcache_exporter.sources.spec import SourceSpec
from kvcache_exporter.sources.subscriber import IngestLoop, SubscriberSource

from .conftest import free_port
from .test_sources_replay import applied, assert_matches, batch_events, wait_until


@dataclass
class Keys:
    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> Keys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@contextmanager
def running(
    sources: list[tuple[str, CurveRole | None]], authenticate: bool = True
) -> Iterator[dict[str, tuple[Pipeline, SubscriberSource]]]:
    """Real sources (spec text, CURVE role) on one ingest loop, with the ZAP authenticator the
    exporter starts for the server roles among them (unless ``authenticate`` is false)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    running: dict[str, tuple[Pipeline, SubscriberSource]] = {}
    roles = {}
    for text, role in sources:
        spec = SourceSpec.parse(text)
        pipeline = new_pipeline(spec.name, CollectorConfig())
        running[spec.name] = (
            pipeline,
            SubscriberSource(spec, context, pipeline.stream, curve=role),
        )
        if role is not None:
            roles[spec.name] = role
    authenticator = PublisherAuthenticator(context, roles if authenticate else {})
    authenticator.start()
    for _, source in running.values():
        source.open()
    stop = threading.Event()
    loop = IngestLoop([source for _, source in running.values()])
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        yield running
    finally:
        stop.set()
        thread.join(5)
        for _, source in running.values():
            source.close()
        authenticator.stop()
        context.term()


def publish_until(
    publishers: list[KVEventPublisher], heard: Pipeline, count: int, timeout: float = 10.0
) -> None:
    """Every publisher sends a batch every 20 ms (a PUB drops what it sends before the
    handshake) until ``heard`` has applied ``count`` of them."""
    deadline = time.monotonic() + timeout
    sent = 0
    while applied(heard) < count:
        assert time.monotonic() < deadline, f"heard {applied(heard)} of {count} batches"
        for pub in publishers:
            pub.send_batch(100.0 + sent, [Stored([1000 + sent], token_count=16)])
        sent += 1
        time.sleep(0.02)


def test_engine_key_the_right_engine_is_heard_and_an_impostor_is_not() -> None:
    """``curve.engine-key``: the exporter is the CURVE client of two endpoints and expects the
    same engine key on both. The engine with that key is heard; a publisher with any other key
    never completes the handshake: nothing it sends is counted, the failures are."""
    engine, impostor, exporter = Keys.new(), Keys.new(), Keys.new()
    role = client_role(exporter.secret, engine.public)
    real_port, fake_port = free_port(), free_port()
    with ExitStack() as stack:
        real = stack.enter_context(
            KVEventPublisher(
                f"tcp://127.0.0.1:{real_port}", bind=True, curve_secret_key=engine.secret
            )
        )
        fake = stack.enter_context(
            KVEventPublisher(
                f"tcp://127.0.0.1:{fake_port}", bind=True, curve_secret_key=impostor.secret
            )
        )
        sources = [
            (f"real=tcp://127.0.0.1:{real_port}", role),
            (f"fake=tcp://127.0.0.1:{fake_port}", role),
        ]
        with running(sources) as engines:
            (heard, real_source), (unheard, fake_source) = engines["real"], engines["fake"]
            wait_until(lambda: real_source.stats.up)
            publish_until([real, fake], heard, 20)
            wait_until(lambda: fake_source.stats.handshake_failures["closed"] >= 2)
            assert real_source.stats.messages >= 20
            assert fake_source.stats.messages == 0 and applied(unheard) == 0
            assert not fake_source.stats.up
            assert real_source.stats.handshake_failures == {"auth": 0, "protocol": 0, "closed": 0}


def test_engine_key_a_publisher_without_curve_is_not_heard() -> None:
    """A plain (NULL mechanism) publisher on a CURVE source fails the handshake as a protocol
    mismatch, and the other way round: a CURVE engine on a plain source."""
    engine, exporter = Keys.new(), Keys.new()
    role = client_role(exporter.secret, engine.public)
    ports = [free_port() for _ in range(3)]
    with ExitStack() as stack:
        real, plain, curve_only = (
            stack.enter_context(KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True, **keys))
            for port, keys in zip(
                ports,
                ({"curve_secret_key": engine.secret}, {}, {"curve_secret_key": engine.secret}),
                strict=True,
            )
        )
        sources = [
            (f"real=tcp://127.0.0.1:{ports[0]}", role),
            (f"plain=tcp://127.0.0.1:{ports[1]}", role),
            (f"nocurve=tcp://127.0.0.1:{ports[2]}", None),
        ]
        with running(sources) as engines:
            heard = engines["real"][0]
            publish_until([real, plain, curve_only], heard, 10)
            for name in ("plain", "nocurve"):
                source = engines[name][1]
                wait_until(lambda s=source: s.stats.handshake_failures["protocol"] >= 1)
                assert source.stats.messages == 0 and not source.stats.up


def test_allow_list_only_listed_publishers_are_heard() -> None:
    """``curve.allow``: the exporter binds as the CURVE server and asks the ZAP handler about
    every publisher. Three connect to the same socket: the listed one is heard, one with an
    unlisted key is refused (``auth``), one without CURVE fails (``protocol``); the source
    counts exactly one live peer."""
    exporter, allowed, stranger = Keys.new(), Keys.new(), Keys.new()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    role = server_role(exporter.secret, "agent", frozenset([allowed.public]))
    with running([(f"agent={endpoint},bind", role)]) as engines:
        pipeline, source = engines["agent"]
        with ExitStack() as stack:
            good, refused = (
                stack.enter_context(
                    KVEventPublisher(
                        endpoint,
                        bind=False,
                        curve_secret_key=keys.secret,
                        curve_server_key=exporter.public,
                    )
                )
                for keys in (allowed, stranger)
            )
            plain = stack.enter_context(KVEventPublisher(endpoint, bind=False))
            publish_until([good, refused, plain], pipeline, 15)
            failures = source.stats.handshake_failures
            # Who notices a mechanism mismatch first is a race: the plain publisher shows as
            # "protocol" or as a hang-up ("closed").
            wait_until(
                lambda: failures["auth"] >= 1 and failures["protocol"] + failures["closed"] >= 1
            )
            # Only the listed publisher's batches: all three send the same blocks, so a second
            # publisher heard would add messages that store nothing new (re-announcements).
            # Read once nothing moves any more (a message is counted as its batch is applied).
            before, counts = None, (applied(pipeline), source.stats.messages)
            while counts != before:
                time.sleep(0.3)
                before, counts = counts, (applied(pipeline), source.stats.messages)
            stored, messages = counts
            assert stored == messages
            assert source.stats.connections == 1
            assert source.stats.duplicates == 0 and source.stats.engine_restarts == 0
        wait_until(lambda: source.stats.connections == 0)
        assert not source.stats.up


def test_replay_runs_over_curve_too() -> None:
    """The replay DEALER takes the source's role: an exporter that starts after the engine
    published 20 batches recovers them from the CURVE engine's replay ROUTER."""
    engine, exporter = Keys.new(), Keys.new()
    port, replay_port = free_port(), free_port()
    with KVEventPublisher(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        bind=True,
        curve_secret_key=engine.secret,
    ) as pub:
        for i in range(20):
            pub.send_batch(100.0 + i, batch_events(i))
        spec = f"e=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{replay_port}"
        with running([(spec, client_role(exporter.secret, engine.public))]) as engines:
            pipeline, source = engines["e"]
            wait_until(lambda: source.stats.up)
            time.sleep(0.3)  # the subscription reaches the publisher
            for i in range(20, 25):
                pub.send_batch(100.0 + i, batch_events(i))
            wait_until(lambda: applied(pipeline) == 25, what=lambda: str(source.stats))
            assert source.stats.batches_replayed >= 20  # the held live ones may come too
            assert source.stats.batches_lost == 0
            assert_matches(pipeline, 25)


def test_connect_again_after_a_refused_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """libzmq gives up on an endpoint after a protocol failure (here: an engine without CURVE,
    on both its sockets). The source connects both again by itself, so once the engine comes
    back with its key it is heard, and its replay buffer read, without restarting the exporter:
    the 20 batches it publishes before the source is back come from replay."""
    monkeypatch.setattr(subscriber, "REFUSED_RECONNECT_SECONDS", 3.0)
    engine, exporter = Keys.new(), Keys.new()
    endpoint, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    role = client_role(exporter.secret, engine.public)
    with running([(f"e={endpoint},replay={replay}", role)]) as engines:
        pipeline, source = engines["e"]
        with KVEventPublisher(endpoint, bind=True, replay_endpoint=replay):
            wait_until(lambda: source.stats.handshake_failures["protocol"] >= 1)
        with bind_when_free(endpoint, engine.secret, replay) as fixed:
            for i in range(20):  # no subscriber yet: only the replay buffer keeps them
                fixed.send_batch(100.0 + i, batch_events(i))
            wait_until(lambda: source.stats.up)
            time.sleep(0.3)  # the subscription reaches the publisher
            for i in range(20, 25):
                fixed.send_batch(100.0 + i, batch_events(i))
            wait_until(lambda: applied(pipeline) == 25, what=lambda: str(source.stats))
            assert source.stats.batches_lost == 0
            assert_matches(pipeline, 25)


@pytest.mark.parametrize(
    ("spec_text", "reason", "reconnects"),
    [
        ("e=tcp://127.0.0.1:1", "protocol", True),
        ("e=tcp://127.0.0.1:1", "auth", True),
        ("e=tcp://127.0.0.1:1", "closed", False),  # libzmq retries a hang-up itself
        ("e=tcp://*:1", "protocol", False),  # a bound source: the publisher connects
    ],
)
def test_which_refusals_make_the_source_connect_again(
    spec_text: str, reason: str, reconnects: bool
) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    spec = SourceSpec.parse(spec_text)
    source = SubscriberSource(spec, context, new_pipeline("e", CollectorConfig()).stream)
    try:
        for name, value in (("connected", 5), (reason, 0), ("disconnected", 5)):
            source.on_monitor_event(EVENTS[name], value, spec.endpoint)
        assert (source.reconnect_at is not None) is reconnects
    finally:
        source.close()
        context.term()


def test_an_allow_list_without_its_zap_handler_lets_no_one_in() -> None:
    """Should the ZAP handler not run, a ``curve.allow`` source refuses every publisher, even
    a listed one, instead of admitting anyone who knows the exporter's public key."""
    exporter, listed = Keys.new(), Keys.new()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    role = server_role(exporter.secret, "agent", frozenset([listed.public]))
    with running([(f"agent={endpoint},bind", role)], authenticate=False) as engines:
        _, source = engines["agent"]
        with KVEventPublisher(
            endpoint, bind=False, curve_secret_key=listed.secret, curve_server_key=exporter.public
        ) as pub:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                pub.send_batch(100.0, [Stored([1000], token_count=16)])
                time.sleep(0.02)
            wait_until(lambda: sum(source.stats.handshake_failures.values()) >= 1)
            assert source.stats.messages == 0 and not source.stats.up


def test_a_publisher_speaking_zmtp_2_is_up_once_it_sends() -> None:
    """A ZMTP 2.0 peer (libzmq 3.x) reports no handshake event; its first message proves it."""
    port = free_port()
    with running([(f"old=tcp://127.0.0.1:{port},bind", None)]) as engines:
        pipeline, source = engines["old"]
        with socket.create_connection(("127.0.0.1", port)) as peer:
            peer.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x01\x01")  # ZMTP 2.0 greeting, PUB
            peer.recv(64)  # the SUB's greeting
            peer.sendall(b"\x00\x00")  # an empty identity
            time.sleep(0.3)
            assert not source.stats.up  # connected, not proven
            payload = encode_batch(100.0, [Stored([1000], token_count=16)])
            for flags, frame in zip(b"\x01\x01\x00", frames("kv", 0, payload), strict=True):
                peer.sendall(bytes([flags, len(frame)]) + frame)  # short frames (< 256 bytes)
            wait_until(lambda: applied(pipeline) == 1)
            assert source.stats.up
        wait_until(lambda: not source.stats.up)


def bind_when_free(endpoint: str, secret: bytes, replay: str) -> KVEventPublisher:
    """A CURVE publisher bound where one was just closed (libzmq frees the port a moment
    after close returns)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return KVEventPublisher(
                endpoint, bind=True, curve_secret_key=secret, replay_endpoint=replay
            )
        except zmq.ZMQError:
            assert time.monotonic() < deadline, f"{endpoint} stays in use"
            time.sleep(0.05)


MONITOR_SEQUENCES = [
    pytest.param(
        [("accepted", 10), ("succeeded", 0)], 1, id="an engine",
    ),
    pytest.param(
        # A peer with a ZMTP 1.0 greeting: dropped with no handshake event at all.
        [("accepted", 10), ("succeeded", 0), ("accepted", 11), ("disconnected", 11)],
        1,
        id="a stray peer leaves, the engine stays",
    ),
    pytest.param(
        [("accepted", 10), ("succeeded", 0), ("accepted", 11), ("auth", 0),
         ("disconnected", 11), ("accepted", 12), ("protocol", 0), ("disconnected", 12)],
        1,
        id="refused peers come and go, the engine stays",
    ),
    pytest.param(
        [("accepted", 10), ("succeeded", 0), ("accepted", 11), ("succeeded", 0),
         ("disconnected", 10)],
        1,
        id="two engines, one leaves",
    ),
    pytest.param(
        [("accepted", 10), ("succeeded", 0), ("disconnected", 10)], 0, id="the engine leaves",
    ),
    pytest.param(
        [("accepted", 11), ("auth", 0), ("accepted", 12)], 0, id="only refused and unproven peers",
    ),
    pytest.param(
        [("connected", 5), ("closed", 0), ("disconnected", 5), ("socket_closed", 6),
         ("connected", 7), ("succeeded", 0)],
        1,
        id="connect: a wrong engine key, then the right engine",
    ),
    pytest.param(
        [("accepted", 10), ("succeeded", 0), ("disconnected", 10), ("accepted", 10)],
        0,
        id="a descriptor reused by an unproven peer",
    ),
]  # fmt: skip

EVENTS = {
    "accepted": zmq.EVENT_ACCEPTED,
    "connected": zmq.EVENT_CONNECTED,
    "succeeded": zmq.EVENT_HANDSHAKE_SUCCEEDED,
    "auth": zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    "protocol": zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    "closed": zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    "disconnected": zmq.EVENT_DISCONNECTED,
    "socket_closed": zmq.EVENT_CLOSED,
}


@pytest.mark.parametrize(("events", "connections"), MONITOR_SEQUENCES)
def test_connections_from_monitor_event_sequences(
    events: list[tuple[str, int]], connections: int
) -> None:
    """Event sequences as libzmq 4.3 reports them (seen over real sockets): a source is up
    while a connection is open and a publisher proved itself since none was, whatever
    strays and refused peers do beside it."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    spec = SourceSpec.parse("e=tcp://127.0.0.1:1")
    source = SubscriberSource(spec, context, new_pipeline("e", CollectorConfig()).stream)
    try:
        for name, value in events:
            source.on_monitor_event(EVENTS[name], value, spec.endpoint)
        assert source.stats.connections == connections
        assert source.stats.up is (connections > 0)
        failures = source.stats.handshake_failures
        for reason in ("auth", "protocol", "closed"):
            assert failures[reason] == sum(name == reason for name, _ in events)
    finally:
        source.close()
        context.term()
