"""Engine-side publisher: emit KV-cache events in the engines' wire format over ZeroMQ
(SPEC §2.1, §2.2).

An engine written in Python emits the stream this exporter reads with a few lines::

    from kvcache_exporter.publisher import KVEventPublisher

    with KVEventPublisher("tcp://*:5557", replay_endpoint="tcp://*:5558") as pub:
        pub.stored([h1, h2], parent_block_hash=h0, token_count=32)
        pub.accessed([h0])
        pub.removed([h9], reason="evicted")
        pub.publish()  # one batch, next sequence number

The bytes are :mod:`kvcache_exporter.protocol.encode`'s (its names are re-exported here;
:func:`encode_batch` and :func:`frames` give them without a socket); this module adds the PUB
socket, the replay ROUTER and its thread. See docs/protocol.md for the wire form, for engines
not written in Python, and docs/security.md for CURVE keys (``load_key_pair``,
``load_public_key``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice
from types import TracebackType
from typing import Any, Final, Self

import zmq

from .curve import CurveRole, client_role, load_key_pair, load_public_key, server_role
from .protocol.encode import (
    END_SEQ,
    Accessed,
    Cleared,
    Event,
    Hash,
    Hashes,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    encode_wire_events,
    frames,
    seq_frame,
    wire_converter,
)

__all__ = [
    "END_SEQ",
    "Accessed",
    "Cleared",
    "Event",
    "Hash",
    "Hashes",
    "KVEventPublisher",
    "Removed",
    "Stored",
    "WireForm",
    "encode_batch",
    "endpoint_binds",
    "frames",
    "load_key_pair",
    "load_public_key",
]

log = logging.getLogger(__name__)

_BIND_HOSTS: Final = frozenset({"*", "0.0.0.0", "::", "[::]"})


def _tcp_host(endpoint: str) -> str | None:
    if not endpoint.startswith("tcp://"):
        return None
    address = endpoint[len("tcp://") :].split(";")[-1]  # "source;destination" connect syntax
    return address.rsplit(":", 1)[0] if ":" in address else address


def _open(ctx: zmq.Context[Any], kind: int, endpoint: str) -> zmq.Socket[Any]:
    """A socket of ``kind``; IPv6 switched on when the endpoint names an IPv6 host."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    host = _tcp_host(endpoint)
    if host is not None and ":" in host:  # ZeroMQ refuses "[::]" and "[::1]" without it
        sock.setsockopt(zmq.IPV6, 1)
    return sock


def _last_endpoint(sock: zmq.Socket[Any]) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def endpoint_binds(endpoint: str) -> bool:
    """Whether the stable side binds ``endpoint``: a wildcard tcp host, or ipc / inproc.

    vLLM and SGLang decide with a substring test (``"*"`` or ``"::"`` anywhere, or an ipc /
    inproc scheme); this looks at the host instead, so ``tcp://[::1]:5557`` connects (vLLM
    would bind it) and ``tcp://0.0.0.0:5557`` binds (vLLM would connect to it). For the
    endpoints engines are normally given (``tcp://*:5557``, ``tcp://<host>:5557``, ipc) both
    agree, and the rule is the exporter's own (SPEC §2.1), so the two sides pair up.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    return _tcp_host(endpoint) in _BIND_HOSTS


class KVEventPublisher:
    """A ZeroMQ PUB publisher of KV events with optional replay, wire-compatible with vLLM.

    Events are queued with :meth:`stored`, :meth:`removed`, :meth:`accessed` and
    :meth:`cleared` and sent as one batch by :meth:`publish`. The endpoint is bound or
    connected by :func:`endpoint_binds` unless ``bind`` says otherwise.

    With ``replay_endpoint``, a ROUTER socket is bound there and the last ``replay_buffer``
    batches are kept. A DEALER sends ``[b"", start_seq (8 bytes big-endian)]`` and gets
    ``[b"", topic, seq, payload]`` for every kept batch with ``seq >= start_seq``, then
    ``[b"", b"", END_SEQ, b""]``; with ``replay_topic_frame=False``, ``[b"", seq, payload]``
    and ``[b"", END_SEQ, b""]`` (vLLM before 0.26, SGLang). A background thread answers, so
    replay works while the engine is idle.

    ``dp_rank`` is written into every batch. Unlike vLLM, the endpoint is used as given: a
    data-parallel engine gives rank k its own endpoint (vLLM adds k to the port).

    CURVE (Z85 keys, see :mod:`kvcache_exporter.curve`): with ``curve_secret_key``
    alone both sockets are CURVE servers, for an exporter that has this engine's public key
    (``curve.engine-key=``); with ``curve_server_key`` too they are clients of an exporter
    that holds that key and allows this engine's public key (``curve.allow=``).

    Not thread-safe: one thread queues and publishes (the replay thread is internal).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        topic: str = "kv-events",
        form: WireForm | str = WireForm.VLLM,
        replay_endpoint: str | None = None,
        replay_buffer: int = 10_000,
        dp_rank: int | None = 0,
        sndhwm: int = 100_000,
        context: zmq.Context[Any] | None = None,
        replay_topic_frame: bool = True,
        bind: bool | None = None,
        linger_ms: int = 1000,
        curve_secret_key: bytes | None = None,
        curve_server_key: bytes | None = None,
    ) -> None:
        if replay_buffer < 1:
            raise ValueError(f"replay_buffer must be >= 1, not {replay_buffer}")
        if curve_server_key is not None and curve_secret_key is None:
            raise ValueError("curve_server_key needs curve_secret_key (this engine's own key)")
        curve: CurveRole | None = None
        if curve_secret_key is not None:
            curve = (
                server_role(curve_secret_key)
                if curve_server_key is None
                else client_role(curve_secret_key, curve_server_key)
            )
        self.endpoint = endpoint
        self.topic = topic
        self.form = WireForm(form)
        self.dp_rank = dp_rank
        self.replay_topic_frame = replay_topic_frame
        self._topic_bytes = topic.encode("utf-8")
        self._to_wire = wire_converter(self.form)
        self._pending: list[Any] = []
        self._next_seq = 0
        self._linger_ms = linger_ms
        self._closed = True  # until fully built, so __del__ leaves a half-made one alone
        self._ctx: zmq.Context[Any] = context if context is not None else zmq.Context.instance()
        self.binds = endpoint_binds(endpoint) if bind is None else bind

        self._pub = _open(self._ctx, zmq.PUB, endpoint)
        try:
            self._pub.setsockopt(zmq.SNDHWM, sndhwm)
            if curve is not None:
                curve.apply(self._pub)
            if self.binds:
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
        except BaseException:
            self._pub.close(linger=0)
            raise

        self._ring = _ReplayRing(replay_buffer)
        self._replay: _ReplayServer | None = None
        if replay_endpoint is not None:
            try:
                topic_frame = self._topic_bytes if replay_topic_frame else None
                self._replay = _ReplayServer(
                    self._ctx, replay_endpoint, self._ring, topic_frame, curve
                )
            except BaseException:
                self._pub.close(linger=0)
                raise
        self._closed = False

    # --- queueing ---------------------------------------------------------------------
    def stored(
        self,
        block_hashes: Hashes,
        parent_block_hash: Hash | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        token_count: int | None = None,
        block_size: int = 16,
        lora_id: int | None = None,
        medium: str | None = "GPU",
        lora_name: str | None = None,
    ) -> None:
        """Queue a ``BlockStored`` (see :class:`Stored`)."""
        self.add(
            Stored(
                block_hashes,
                parent_block_hash,
                token_ids,
                token_count,
                block_size,
                lora_id,
                medium,
                lora_name,
            )
        )

    def removed(
        self, block_hashes: Hashes, medium: str | None = "GPU", reason: str | None = None
    ) -> None:
        """Queue a ``BlockRemoved``; ``reason`` is sent only when given."""
        self.add(Removed(block_hashes, medium, reason))

    def accessed(self, block_hashes: Hashes, medium: str | None = "GPU") -> None:
        """Queue a ``BlockAccessed`` (cache hits on resident blocks)."""
        self.add(Accessed(block_hashes, medium))

    def cleared(self) -> None:
        """Queue an ``AllBlocksCleared``."""
        self.add(Cleared())

    def add(self, event: Event) -> None:
        """Queue one event record."""
        # Converted now, so a bad event fails at the call that made it, not at publish().
        self._pending.append(self._to_wire(event))

    @property
    def pending(self) -> int:
        """Events queued for the next :meth:`publish`."""
        return len(self._pending)

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._next_seq

    # --- sending ----------------------------------------------------------------------
    def publish(self, ts: float | None = None) -> int:
        """Send the queued events as one batch (even none) and return its sequence number.

        ``ts`` is the engine's clock for the batch, ``time.time()`` by default.
        """
        events, self._pending = self._pending, []
        return self._send(time.time() if ts is None else ts, events)

    def send_batch(self, ts: float, events: Iterable[Event]) -> int:
        """Send ``events`` as one batch right away (the queue is left alone); returns its seq."""
        return self._send(ts, list(map(self._to_wire, events)))

    def _send(self, ts: float, wire_events: list[Any]) -> int:
        if self._closed:
            raise RuntimeError("the publisher is closed")
        payload = encode_wire_events(ts, wire_events, self.dp_rank)
        seq = self._next_seq
        self._next_seq = seq + 1
        # PUB never blocks: past SNDHWM, ZeroMQ drops for that subscriber (the exporter then
        # sees a seq gap and can replay).
        self._pub.send_multipart((self._topic_bytes, seq_frame(seq), payload), copy=False)
        if self._replay is not None:
            self._ring.append(seq, payload)
        return seq

    def replay_batches(self, start_seq: int) -> list[tuple[int, bytes]]:
        """The kept ``(seq, payload)`` pairs with ``seq >= start_seq``, oldest first."""
        return self._ring.since(start_seq)

    # --- endpoints and lifetime -----------------------------------------------------------
    @property
    def last_endpoint(self) -> str:
        """The PUB socket's resolved endpoint (the real port after binding port ``*`` or 0)."""
        return _last_endpoint(self._pub)

    @property
    def replay_last_endpoint(self) -> str | None:
        """The replay ROUTER's resolved endpoint, or None without replay."""
        return None if self._replay is None else self._replay.last_endpoint

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the replay thread and close the sockets. Idempotent; queued events are dropped.

        The context is left alone (it may be shared); sent messages linger up to
        ``linger_ms`` in it.
        """
        if self._closed:
            return
        self._closed = True
        if self._replay is not None:
            self._replay.stop()
        self._pub.close(linger=self._linger_ms)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten publisher must not leave its replay thread polling forever; the thread
        # holds only the ring, not the publisher, so this does run.
        if not getattr(self, "_closed", True):
            self.close()


class _ReplayRing:
    """The last ``capacity`` ``(seq, payload)`` pairs, shared by the sender and replay thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[int, bytes]] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, seq: int, payload: bytes) -> None:
        with self._lock:
            self._items.append((seq, payload))

    def since(self, start_seq: int) -> list[tuple[int, bytes]]:
        with self._lock:
            if not self._items:
                return []
            # Seqs in the ring are consecutive, so the first wanted one is found by offset.
            skip = max(0, start_seq - self._items[0][0])
            return list(islice(self._items, skip, None))


_stop_ids = iter(range(1 << 62))


class _ReplayServer:
    """The replay ROUTER and the thread that answers it.

    Frames follow vLLM's ``ZmqEventPublisher._service_replay`` (vllm/distributed/kv_events.py,
    topic frame added by vllm-project/vllm#45177, vLLM >= 0.26): the request is
    ``[identity, b"", start_seq]`` (exactly three frames, anything else is ignored); each kept
    batch goes back as ``[identity, b"", topic, seq, payload]``, and the end marker as
    ``[identity, b"", b"", END_SEQ, b""]`` (an empty topic frame, as vLLM sends it). Without
    the topic frame (older vLLM, SGLang) these are ``[identity, b"", seq, payload]`` and
    ``[identity, b"", END_SEQ, b""]``.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        ring: _ReplayRing,
        topic: bytes | None,
        curve: CurveRole | None,
    ) -> None:
        self._ring = ring
        self._topic = topic
        capacity = ring.capacity
        self._router = _open(ctx, zmq.ROUTER, endpoint)
        if curve is not None:
            curve.apply(self._router)
        # Report unroutable peers instead of dropping silently, and let one full replay fit in
        # the pipe; a client too slow for that loses the rest of its answer, not the engine.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.SNDHWM, capacity + 16)
        self._router.setsockopt(zmq.LINGER, 0)
        # A PAIR over inproc wakes the thread at once on stop (no polling interval).
        wake = f"inproc://kvcache-publisher-stop-{id(self)}-{next(_stop_ids)}"
        self._wake_rx: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self._wake_tx: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        try:
            self._router.bind(endpoint)
            self._wake_rx.bind(wake)
            self._wake_tx.connect(wake)
        except BaseException:
            for sock in (self._router, self._wake_rx, self._wake_tx):
                sock.close(linger=0)
            raise
        self.last_endpoint = _last_endpoint(self._router)
        self._thread = threading.Thread(
            target=self._run, name="kvcache-publisher-replay", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_rx in ready:
                    return
                if self._router in ready:
                    self._serve_one()
        finally:
            self._router.close(linger=0)
            self._wake_rx.close(linger=0)

    def _serve_one(self) -> None:
        request = self._router.recv_multipart()
        if len(request) != 3:
            log.warning("ignoring a replay request of %d frames", len(request))
            return
        identity, _, start_bytes = request
        start_seq = int.from_bytes(start_bytes, "big")
        topic = self._topic
        send = self._router.send_multipart
        try:
            for seq, payload in self._ring.since(start_seq):
                seq_bytes = seq_frame(seq)
                if topic is None:
                    send((identity, b"", seq_bytes, payload), flags=zmq.NOBLOCK, copy=False)
                else:
                    send((identity, b"", topic, seq_bytes, payload), flags=zmq.NOBLOCK, copy=False)
            if topic is None:
                send((identity, b"", END_SEQ, b""), flags=zmq.NOBLOCK)
            else:
                send((identity, b"", b"", END_SEQ, b""), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or its pipe full (EAGAIN)
            log.warning("replay to a client abandoned: %s", exc)

    def stop(self) -> None:
        try:
            self._wake_tx.send(b"")
        finally:
            self._thread.join(timeout=5)
            self._wake_tx.close(linger=0)
