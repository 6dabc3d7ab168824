"""A ZeroMQ SUB socket on one engine's event stream, and the loop that polls them all.

Messages are drained in bursts and decoded into one pending batch, so a fast stream of small
messages reaches the collector as a few large numpy batches. Nothing read from the wire can
raise out of here: unusable messages are counted by reason and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..protocol.batch import EventBatch, LabelTable
from ..protocol.decode import DecodeError, DecodeLimits, PayloadDecoder
from ..protocol.framing import parse_live
from .sequence import SequenceTracker, Verdict
from .spec import SourceSpec

DEFAULT_RCVHWM: Final = 200_000
MAX_DRAIN: Final = 4096  # messages read before giving other sockets a turn
FLUSH_EVENTS: Final = 65_536  # pending events that force a flush inside a drain
POLL_MS: Final = 100

_MONITOR_EVENTS: Final = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_LISTENING
    | zmq.EVENT_BIND_FAILED
    | zmq.EVENT_CLOSED
)

log = logging.getLogger("kvcache_exporter.source")


@dataclass(slots=True)
class SourceStats:
    """What one source has seen, as counters for the exposition."""

    messages: int = 0
    decode_errors: dict[str, int] = field(default_factory=dict)
    sequence_gaps: int = 0
    batches_lost: int = 0
    batches_replayed: int = 0
    duplicates: int = 0
    engine_restarts: int = 0
    last_event_ts: float | None = None
    last_arrival: float | None = None
    connections: int = 0
    listening: bool = False

    @property
    def up(self) -> bool:
        return self.connections > 0

    def add_error(self, reason: str) -> None:
        self.decode_errors[reason] = self.decode_errors.get(reason, 0) + 1


BatchSink = Callable[[EventBatch], None]
RestartSink = Callable[[float], None]


class SubscriberSource:
    """One ``--source``: its SUB socket, monitor, decoder and sequence tracker."""

    def __init__(
        self,
        spec: SourceSpec,
        context: zmq.Context[Any],
        on_batch: BatchSink,
        on_restart: RestartSink,
        media: LabelTable,
        reasons: LabelTable,
        rcvhwm: int = DEFAULT_RCVHWM,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.spec = spec
        self.stats = SourceStats()
        self.decoder = PayloadDecoder(media, reasons, limits)
        self.sequence = SequenceTracker()
        self._on_batch = on_batch
        self._on_restart = on_restart
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self.socket.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
        self.monitor = self.socket.get_monitor_socket(_MONITOR_EVENTS)
        self._log = log.getChild(spec.name)

    def open(self) -> None:
        """Bind or connect as SPEC §2.1 says. Raises zmq.ZMQError when a bind fails."""
        if self.spec.binds:
            self.socket.bind(self.spec.zmq_endpoint)
            self._log.info("bound, waiting for engines to connect", extra={"endpoint": self.spec.endpoint})
        else:
            self.socket.connect(self.spec.zmq_endpoint)
            self._log.info("connecting to engine", extra={"endpoint": self.spec.endpoint})

    def drain(self) -> int:
        """Read what is waiting (up to MAX_DRAIN messages), decode, hand batches on."""
        received = 0
        arrival = time.time()
        for _ in range(MAX_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            received += 1
            self._handle(frames)
            if self.decoder.pending_events >= FLUSH_EVENTS:
                self._flush()
        if received:
            self.stats.messages += received
            self.stats.last_arrival = arrival
            self._flush()
        return received

    def _handle(self, frames: list[bytes]) -> None:
        try:
            message = parse_live(frames)
        except DecodeError as exc:
            self.stats.add_error(exc.reason)
            return
        verdict = self.sequence.check(message.seq)
        if verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
            return
        if verdict is Verdict.GAP:
            self.stats.sequence_gaps += 1
            self.stats.batches_lost += self.sequence.missing
            self._log.warning(
                "sequence gap: batches lost", extra={"missing": self.sequence.missing, "seq": message.seq}
            )
        elif verdict is Verdict.RESTART:
            self._flush()
            self.stats.engine_restarts += 1
            self._log.warning("engine restarted (sequence went back); its cache starts empty",
                              extra={"seq": message.seq})
            self._on_restart(self.decoder.last_ts or time.time())
        try:
            self.decoder.feed(message.payload)
        except DecodeError as exc:
            self.stats.add_error(exc.reason)
            self._log.debug("message skipped", extra={"reason": exc.reason, "seq": message.seq})
            return
        self.stats.last_event_ts = self.decoder.last_ts

    def _flush(self) -> None:
        batch = self.decoder.flush()
        if len(batch):
            self._on_batch(batch)

    def handle_monitor(self) -> None:
        """Track connection state from the socket monitor (source_up, readiness)."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self.stats.connections += 1
                self._log.info("engine connected", extra={"peer": event["endpoint"].decode(errors="replace")})
            elif kind == zmq.EVENT_DISCONNECTED:
                self.stats.connections = max(0, self.stats.connections - 1)
                self._log.warning("engine disconnected", extra={"peer": event["endpoint"].decode(errors="replace")})
            elif kind == zmq.EVENT_LISTENING:
                self.stats.listening = True
            elif kind == zmq.EVENT_CLOSED:
                self.stats.connections = 0

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


class IngestLoop:
    """Polls every source's socket and monitor on one thread until ``stop`` is set."""

    def __init__(self, sources: list[SubscriberSource]) -> None:
        self.sources = sources
        self._poller = zmq.Poller()
        self._by_socket: dict[Any, tuple[SubscriberSource, bool]] = {}
        for source in sources:
            self._poller.register(source.socket, zmq.POLLIN)
            self._poller.register(source.monitor, zmq.POLLIN)
            self._by_socket[source.socket] = (source, True)
            self._by_socket[source.monitor] = (source, False)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for sock, _ in self._poller.poll(POLL_MS):
                source, is_data = self._by_socket[sock]
                if is_data:
                    source.drain()
                else:
                    source.handle_monitor()
