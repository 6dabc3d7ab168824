"""One engine's message stream, independent of where the frames come from.

Framing, sequence tracking and decoding live here so that the live subscriber, a recording
read back offline and the benchmarks all produce the same batches and the same counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..catalog import HANDSHAKE_FAILURE_REASONS
from ..protocol.batch import EventBatch, LabelTable
from ..protocol.compiled import new_payload_decoder
from ..protocol.decode import DecodeError, DecodeLimits
from ..protocol.framing import Message, parse_live
from .sequence import SequenceTracker, Verdict

log = logging.getLogger("kvcache_exporter.source")


# Why a ZeroMQ handshake with a publisher failed (``auth``: a key refused; ``protocol``: e.g.
# CURVE on one side only; ``closed``: the peer hung up mid-handshake, as a CURVE server does
# when the client has the wrong server key). All three are exported from zero.


def _no_handshake_failures() -> dict[str, int]:
    return dict.fromkeys(HANDSHAKE_FAILURE_REASONS, 0)


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
    handshake_failures: dict[str, int] = field(default_factory=_no_handshake_failures)
    connections: int = 0  # open connections once a publisher proved itself; not checkpointed

    @property
    def up(self) -> bool:
        return self.connections > 0

    def add_error(self, reason: str) -> None:
        self.decode_errors[reason] = self.decode_errors.get(reason, 0) + 1


BatchSink = Callable[[EventBatch], None]
RestartSink = Callable[[float], None]
# (first missing seq, the message that revealed the gap, at start-up?) -> took the message?
GapHandler = Callable[[int, Message, bool], bool]


class EventStream:
    """Turns one publisher's multipart messages into batches for ``on_batch``.

    Call :meth:`handle` per message and :meth:`flush` after a burst; nothing read from the
    wire raises out of here: unusable messages are counted by reason and skipped.
    """

    def __init__(
        self,
        name: str,
        on_batch: BatchSink,
        on_restart: RestartSink,
        media: LabelTable,
        reasons: LabelTable,
        limits: DecodeLimits | None = None,
        groups: LabelTable | None = None,
        adapters: LabelTable | None = None,
    ) -> None:
        self.name = name
        self.stats = SourceStats()
        self.decoder = new_payload_decoder(media, reasons, limits, groups, adapters)
        self.sequence = SequenceTracker()
        self._on_batch = on_batch
        self._on_restart = on_restart
        self.on_gap: GapHandler | None = None  # set by a source that can replay
        self._fed_through: int | None = None  # seq of the last message given to the decoder
        self.applied_through: int | None = None  # ... and of the last one the collector has
        self._unflushed_messages = 0
        self._replayed_through = -1  # highest seq a replay applied (for late live copies)
        self._log = log.getChild(name)

    def handle(
        self, frames: list[bytes], arrival: float | None = None, counted: bool = False
    ) -> None:
        """One received multipart message (counted once what it holds is applied;
        ``counted`` if :meth:`count_received` already did)."""
        if not counted:
            self._unflushed_messages += 1
            self.stats.last_arrival = time.time() if arrival is None else arrival
        try:
            message = parse_live(frames)
        except DecodeError as exc:
            self.stats.add_error(exc.reason)
            return
        self.handle_message(message)

    def handle_message(self, message: Message) -> None:
        """A parsed live message: sequence check, then decode."""
        if 0 < message.seq <= self._replayed_through:
            # A live copy still in the socket's queue of a batch a replay already applied,
            # however far behind: not a restarted publisher (that starts again at 0).
            self.stats.duplicates += 1
            return
        first = self.sequence.expected is None
        verdict = self.sequence.check(message.seq)
        if verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
            return
        # Started after the engine: ask it for what it still holds.
        if first and message.seq > 0 and self.on_gap is not None and self.on_gap(0, message, True):
            return
        if verdict is Verdict.GAP:
            self.stats.sequence_gaps += 1
            missing = self.sequence.missing
            if self.on_gap is not None and self.on_gap(message.seq - missing, message, False):
                return
            self.stats.batches_lost += missing
            self._log.warning(
                "sequence gap: batches lost", extra={"missing": missing, "seq": message.seq}
            )
        elif verdict is Verdict.RESTART:
            self._replayed_through = -1  # the new publisher numbers from 0 again
            self.flush()
            self.stats.engine_restarts += 1
            self._log.warning(
                "publisher restarted (sequence went back); the engine's cache starts empty",
                extra={"seq": message.seq},
            )
            self._on_restart(self.decoder.last_ts or self.stats.last_arrival or time.time())
        self._feed(message)

    def _feed(self, message: Message) -> None:
        self._fed_through = message.seq
        try:
            self.decoder.feed(message.payload)
        except DecodeError as exc:
            self.stats.add_error(exc.reason)
            self._log.debug("message skipped", extra={"reason": exc.reason, "seq": message.seq})
            return
        self.stats.last_event_ts = self.decoder.last_ts
        if self.decoder.batch_due:
            self.flush()

    def resume_at(self, next_seq: int) -> None:
        """Continue a checkpointed stream: ``next_seq`` is the first batch not applied yet."""
        self.sequence.expected = next_seq
        self._fed_through = self.applied_through = next_seq - 1

    def count_received(self, arrival: float) -> None:
        """A live message the replay client holds back: received now, applied later."""
        self._unflushed_messages += 1
        self.stats.last_arrival = arrival

    def apply_recovered(
        self,
        batches: list[tuple[int, Message, bool]],
        first_missing: int,
        startup: bool,
    ) -> None:
        """Apply what a replay and the live stream brought, in sequence order.

        ``batches`` holds ``(seq, message, replayed)`` sorted by seq, duplicates already
        removed. Sequence numbers from ``first_missing`` to the last one that are in neither
        are lost (at start-up, those before the first one predate the exporter instead).
        """
        if not batches:
            return
        present = [seq for seq, _, _ in batches]
        start = present[0] if startup else first_missing
        missing = (present[-1] - start + 1) - sum(1 for seq in present if seq >= start)
        if startup and present[0] > 0:
            self._log.info(
                "batches from before start-up no longer in the engine's replay buffer",
                extra={"batches": present[0]},
            )
        if missing:
            self.stats.batches_lost += missing
            self._log.warning(
                "sequence gap: batches lost after replay",
                extra={"missing": missing, "from_seq": start, "to_seq": present[-1]},
            )
        for _, message, replayed in batches:
            if replayed:
                self.stats.batches_replayed += 1
            self._feed(message)
        # Exactly the next one: the live messages after these (the one that revealed the gap
        # among them) come through the tracker again, and a hole before them is a new gap.
        self.sequence.expected = present[-1] + 1
        self._replayed_through = present[-1]

    def flush(self) -> None:
        """Hand everything decoded since the last flush on as one batch.

        Messages are counted only after their batch is applied, so a scrape that sees
        ``messages_total`` reach N also sees the effect of those N messages."""
        batch = self.decoder.flush()
        if len(batch):
            self._on_batch(batch)
        self.applied_through = self._fed_through
        self.stats.messages += self._unflushed_messages
        self._unflushed_messages = 0

    def decode_errors(self) -> dict[str, int]:
        """Errors of whole messages and of single events, together by reason."""
        total = dict(self.stats.decode_errors)
        for reason, count in dict(self.decoder.stats.errors).items():
            total[reason] = total.get(reason, 0) + count
        return total
