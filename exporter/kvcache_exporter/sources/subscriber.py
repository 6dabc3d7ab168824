"""A ZeroMQ SUB socket on one engine's event stream, and the loop that polls them all.

Messages are drained in bursts and decoded into one pending batch, so a fast stream of small
messages reaches the collector as a few large numpy batches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..curve import CurveRole
from .replay import ReplayRecovery
from .spec import SourceSpec
from .stream import EventStream, SourceStats

DEFAULT_RCVHWM: Final = 200_000
MAX_DRAIN: Final = 4096  # messages read before giving other sockets a turn
POLL_MS: Final = 100
TICK_SECONDS: Final = 1.0  # wall-clock checks (stalled sources) run this often

_HANDSHAKE_FAILURES: Final[dict[int, str]] = {  # event -> one of HANDSHAKE_FAILURE_REASONS
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "closed",
}
# libzmq does not reconnect after a handshake that failed with a protocol error (a refused
# key is one): a connecting source tries again itself after this long.
REFUSED_RECONNECT_SECONDS: Final = 5.0
_MONITOR_EVENTS: Final = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_ACCEPTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
)

log = logging.getLogger("kvcache_exporter.source")


class SubscriberSource:
    """One ``--source``: its SUB socket, its monitor and the :class:`EventStream` it feeds.

    With ``curve``, the SUB socket and the replay socket take that CURVE role: a publisher
    without the right key never completes the handshake, so nothing it sends is read.
    """

    def __init__(
        self,
        spec: SourceSpec,
        context: zmq.Context[Any],
        stream: EventStream,
        rcvhwm: int = DEFAULT_RCVHWM,
        curve: CurveRole | None = None,
    ) -> None:
        self.spec = spec
        self.stream = stream
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self.socket.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
        if curve is not None:
            curve.apply(self.socket)
        self.monitor = self.socket.get_monitor_socket(_MONITOR_EVENTS)
        self.replay = (
            ReplayRecovery(stream, context, spec.replay, curve=curve)
            if spec.replay is not None
            else None
        )
        # Open connections by file descriptor (the monitor names them in accept/connect and
        # disconnect events), and whether a publisher on them proved itself: a handshake that
        # succeeded, or a message. Handshake events carry no descriptor, so the source is up
        # while some connection is open and one was proven since the last time none was (an
        # unproven one still open when the engine leaves keeps it up until libzmq's handshake
        # timeout, 30 s, closes it).
        self._open: set[int] = set()
        self._proven = False
        self._failing = False  # a failure was logged; the next ones only count until success
        self.reconnect_at: float | None = None  # monotonic time of the next connect, if refused
        self._reconnect_logged = False
        self._log = log.getChild(spec.name)

    @property
    def stats(self) -> SourceStats:
        return self.stream.stats

    def open(self) -> None:
        """Bind or connect as SPEC §2.1 says. Raises zmq.ZMQError when a bind fails."""
        if self.spec.binds:
            self.socket.bind(self.spec.zmq_endpoint)
            self._log.info("bound; engines connect here", extra={"endpoint": self.spec.endpoint})
        else:
            self.socket.connect(self.spec.zmq_endpoint)
            self._log.info("connecting to engine", extra={"endpoint": self.spec.endpoint})

    def drain(self) -> int:
        """Read what is waiting (up to MAX_DRAIN messages), then flush one batch."""
        arrival = time.time()
        received = 0
        replay = self.replay
        while received < MAX_DRAIN:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            if replay is not None and replay.active:
                replay.hold(frames, arrival)  # applied after the recovered batches
            else:
                self.stream.handle(frames, arrival)
        if received:
            self.stream.flush()
            # A peer that speaks an older ZMTP reports no handshake; its messages prove it.
            # (Not after the last connection closed: those are its predecessor's leftovers.)
            if self._open and not self._proven:
                self._proven = True
                self._update_connections()
        return received

    def handle_monitor(self) -> None:
        """Track connection state from the socket monitor (source_up, readiness)."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_monitor_event(
                int(event["event"]), int(event["value"]), event["endpoint"].decode(errors="replace")
            )

    def on_monitor_event(self, kind: int, value: int, endpoint: str) -> None:
        """One socket-monitor event (``value``: the connection's descriptor where it has one)."""
        if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
            self._open.add(value)
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._proven = True
            self._failing = self._reconnect_logged = False
            self._log.info("engine connected", extra={"endpoint": endpoint})
        elif kind in _HANDSHAKE_FAILURES:
            reason = _HANDSHAKE_FAILURES[kind]
            failures = self.stream.stats.handshake_failures
            failures[reason] = failures.get(reason, 0) + 1
            if not self._failing:
                self._failing = True
                self._log.warning(
                    "handshake with a publisher failed; it is not heard (wrong CURVE key, "
                    "or CURVE on one side only?)",
                    extra={"endpoint": endpoint, "reason": reason},
                )
            # A hang-up ("closed") libzmq retries itself; reconnecting then could cut the
            # connection it has just made again.
            if reason != "closed" and not self.spec.binds and self.reconnect_at is None:
                self.reconnect_at = time.monotonic() + REFUSED_RECONNECT_SECONDS
        elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            self._open.discard(value)
            if not self._open and self._proven:
                self._proven = False
                self._log.warning("engine disconnected", extra={"endpoint": endpoint})
        self._update_connections()

    def _update_connections(self) -> None:
        self.stream.stats.connections = len(self._open) if self._proven else 0

    def check_reconnect(self, now: float) -> None:
        """Connect again, the replay socket too, once a refused handshake's wait is over
        (``now``: monotonic). Never raises: a failure waits for the next turn."""
        if self.reconnect_at is None or now < self.reconnect_at:
            return
        self.reconnect_at = None
        if self._open:  # connected meanwhile
            return
        sockets = [(self.socket, self.spec.zmq_endpoint)]
        if self.replay is not None:
            sockets.append((self.replay.socket, self.replay.endpoint))
        try:
            for sock, endpoint in sockets:
                with contextlib.suppress(zmq.ZMQError):  # libzmq may have dropped it already
                    sock.disconnect(endpoint)
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.reconnect_at = now + REFUSED_RECONNECT_SECONDS
            self._log.warning("cannot connect again", extra={"error": str(exc)})
            return
        # Once per failing streak: a source that stays refused retries every few seconds.
        level = logging.DEBUG if self._reconnect_logged else logging.INFO
        self._reconnect_logged = True
        self._log.log(
            level,
            "connecting again after a refused handshake",
            extra={"endpoint": self.spec.endpoint},
        )

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


class IngestLoop:
    """Polls every source's socket and monitor on one thread until ``stop`` is set."""

    def __init__(
        self, sources: list[SubscriberSource], on_tick: Callable[[float], None] | None = None
    ) -> None:
        self._on_tick = on_tick
        self._poller = zmq.Poller()
        self._sources = sources
        self._handlers: dict[Any, Callable[[], object]] = {}
        for source in sources:
            # The monitor first: a connection is known before the messages it brought.
            self._handlers[source.monitor] = source.handle_monitor
            self._handlers[source.socket] = source.drain
            if source.replay is not None:
                self._handlers[source.replay.socket] = source.replay.read_answers
        for sock in self._handlers:
            self._poller.register(sock, zmq.POLLIN)

    def run(self, stop: threading.Event) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while not stop.is_set():
            for sock, _ in self._poller.poll(POLL_MS):
                self._handlers[sock]()
            now = time.monotonic()
            for source in self._sources:
                source.check_reconnect(now)
                if source.replay is not None:
                    source.replay.check_timeout(now)
            if self._on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECONDS
                self._on_tick(time.time())
