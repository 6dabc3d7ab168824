"""Recovering missed batches from an engine's replay buffer (SPEC §2.1, vLLM's replay ROUTER).

When a source's stream shows a gap, a DEALER socket asks the engine for everything from the
first missing sequence number: ``[b"", start_seq]``. The engine answers each buffered batch
(``[b"", topic, seq, payload]``, or ``[b"", seq, payload]`` before vLLM 0.26) and ends with
``seq = -1``. It sends all it holds from that point, up to its newest batch, so one replay
also covers what was dropped after the gap that started it.

While a replay is in flight the live messages are held back. At its end the replayed and the
held batches are merged by sequence number and applied in order, each once; numbers in
neither are counted as lost. One replay at a time per source; a replay that does not end
within its timeout, or a hold queue that fills up, ends with what it brought.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import zmq

from ..curve import CurveRole
from ..protocol.decode import DecodeError
from ..protocol.framing import REPLAY_END, Message, parse_live, parse_replay
from .stream import EventStream

log = logging.getLogger("kvcache_exporter.source")

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_MAX_HELD: Final = 100_000
_MAX_ANSWERS_PER_READ: Final = 4096


class ReplayRecovery:
    """One source's replay client and the state of its replay in flight."""

    def __init__(
        self,
        stream: EventStream,
        context: zmq.Context[Any],
        endpoint: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_held: int = DEFAULT_MAX_HELD,
        curve: CurveRole | None = None,
    ) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_held = max_held
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # a whole replay buffer must fit in
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(endpoint)
        self.active = False
        # Requests whose end marker has not come back yet. A replay that timed out may still
        # answer later; its end marker must not end the replay in flight then.
        self._outstanding = 0
        self._first_missing = 0
        self._startup = False
        self._replayed: dict[int, Message] = {}
        self._live: dict[int, Message] = {}
        self._unparsed: list[tuple[list[bytes], float]] = []
        self._deadline = 0.0
        self._log = log.getChild(stream.name)
        stream.on_gap = self.start

    def start(self, first_missing: int, gap: Message, startup: bool) -> bool:
        """Ask for ``first_missing`` onwards; False (the caller counts the loss) while another
        replay is in flight or the request cannot be sent."""
        if self.active:
            return False
        try:
            self.socket.send_multipart([b"", first_missing.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._log.warning("replay request not sent", extra={"error": str(exc)})
            return False
        self.active = True
        self._outstanding += 1
        self._first_missing = first_missing
        self._startup = startup
        self._replayed = {}
        self._live = {gap.seq: gap}
        self._unparsed = []
        self._deadline = time.monotonic() + self.timeout
        self._log.info(
            "catching up from the replay buffer" if startup else "replaying missed batches",
            extra={"from_seq": first_missing, "gap_seq": gap.seq, "endpoint": self.endpoint},
        )
        return True

    def hold(self, frames: list[bytes], arrival: float) -> None:
        """A live message that arrived while the replay is in flight."""
        self.stream.count_received(arrival)
        try:
            message = parse_live(frames)
        except DecodeError:
            self._unparsed.append((frames, arrival))  # the stream counts it when released
        else:
            if message.seq in self._live:
                self.stream.stats.duplicates += 1
            else:
                self._live[message.seq] = message
        if len(self._live) + len(self._unparsed) >= self.max_held:
            self._log.warning("replay took too long: live messages piled up; ending it")
            self.finish()

    def read_answers(self) -> None:
        """Collect what the engine sends back (called when the DEALER socket is readable)."""
        for _ in range(_MAX_ANSWERS_PER_READ):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = parse_replay(frames)
            except DecodeError as exc:
                self.stream.stats.add_error(exc.reason)
                continue
            if message.seq == REPLAY_END:
                self._outstanding = max(0, self._outstanding - 1)
                if self.active and self._outstanding == 0:
                    self.finish()  # the end of the replay in flight, not of an older one
            elif not self.active:
                continue  # the late tail of a replay that already ended
            elif message.seq >= self._first_missing:
                self._replayed[message.seq] = message

    def check_timeout(self, now: float) -> None:
        if self.active and now >= self._deadline:
            self._log.warning("replay timed out", extra={"timeout_s": self.timeout})
            # Its end marker is not coming (the engine gave up on a slow reader, or is gone);
            # waiting for it would make every later replay run into the timeout too.
            self._outstanding = 0
            self.finish()

    def finish(self) -> None:
        """Merge replayed and held batches, apply them in order, count what is missing."""
        if not self.active:
            return
        self.active = False
        replayed, live, unparsed = self._replayed, self._live, self._unparsed
        self._replayed, self._live, self._unparsed = {}, {}, []
        duplicates = sum(1 for seq in live if seq in replayed)
        self.stream.stats.duplicates += duplicates
        merged = [(seq, message, True) for seq, message in replayed.items()]
        merged += [(seq, message, False) for seq, message in live.items() if seq not in replayed]
        merged.sort(key=lambda item: item[0])
        # Live messages beyond a hole the replay could not fill (the engine's buffer ended
        # before them) are new traffic: they go through the stream, which may replay again.
        covered = _contiguous_prefix(merged, replayed)
        self.stream.apply_recovered(merged[:covered], self._first_missing, self._startup)
        for seq, message, _ in merged[covered:]:
            if self.active:  # it revealed another gap: a new replay holds the rest
                self._live[seq] = message
            else:
                self.stream.handle_message(message)
        for frames, arrival in unparsed:
            self.stream.handle(frames, arrival, counted=True)
        self.stream.flush()

    def close(self) -> None:
        self.socket.close(linger=0)


def _contiguous_prefix(
    merged: list[tuple[int, Message, bool]], replayed: dict[int, Message]
) -> int:
    """How many of ``merged`` (sorted) the replay vouches for: everything up to the newest
    replayed batch; after it, only what continues without a hole."""
    newest = max(replayed, default=-1)
    count = 0
    previous: int | None = None
    for seq, _, _ in merged:
        if seq > newest and previous is not None and seq != previous + 1:
            break
        count += 1
        previous = seq
    return count
