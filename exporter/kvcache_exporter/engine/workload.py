"""A seeded synthetic workload: shared system prompts, multi-turn chats, Zipf popularity.

Each request is one turn of a conversation. Its prompt is the conversation's system prompt
(shared by many conversations), the conversation's history so far, and the new user message;
after the turn the history grows by the message and the answer, so the next turn of the same
conversation re-reads a longer prefix. Which conversation speaks next follows a Zipf law over
a fixed pool of live conversations (a few are very busy, most are quiet); a conversation that
reaches its last turn is replaced by a new one. Arrivals are Poisson at ``rate`` per second.

Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same configuration
always yields the same requests.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .trace import Request, U64Array, spread_hash

__all__ = ["WorkloadConfig", "synthetic_workload"]


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Knobs of :func:`synthetic_workload`; lengths are in blocks."""

    rate: float = 5.0
    """Mean arrivals per second (Poisson)."""
    num_requests: int | None = 10_000
    """Requests to yield; None for an endless stream."""
    seed: int = 0
    system_prompts: int = 8
    """Distinct system prompts; conversations pick one by Zipf popularity."""
    system_prompt_blocks: tuple[int, int] = (4, 32)
    """Length range of a system prompt."""
    conversations: int = 256
    """Conversations alive at any time."""
    zipf_s: float = 1.1
    """Zipf exponent of conversation (and system prompt) popularity."""
    turns: tuple[int, int] = (1, 12)
    """Range of a conversation's number of turns."""
    message_blocks: tuple[int, int] = (1, 6)
    """Range of a user message's length."""
    answer_blocks: tuple[int, int] = (0, 4)
    """Range of an answer's length (it joins the history of the next turn)."""
    max_prompt_blocks: int = 512
    """A conversation ends early once its prompt would exceed this."""
    block_tokens: int = 16
    """Tokens per block, for the requests' ``input_length`` / ``output_length``."""

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.system_prompts < 1 or self.conversations < 1:
            raise ValueError("system_prompts and conversations must be >= 1")
        for name in ("system_prompt_blocks", "turns", "message_blocks", "answer_blocks"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high")
        if self.turns[0] < 1 or self.message_blocks[0] < 1:
            raise ValueError("a conversation has >= 1 turn and a message >= 1 block")


def _zipf_cdf(n: int, s: float) -> list[float]:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    normalized: list[float] = (cdf / cdf[-1]).tolist()
    return normalized


class _Draws:
    """Uniform draws from the seeded generator, fetched in chunks (one numpy call per 4096)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buffer: list[float] = []

    def uniform(self) -> float:
        if not self._buffer:
            self._buffer = self._rng.random(4096).tolist()
            self._buffer.reverse()
        return self._buffer.pop()

    def span(self, bounds: tuple[int, int]) -> int:
        low, high = bounds
        return low + min(int(self.uniform() * (high - low + 1)), high - low)

    def pick(self, cdf: list[float]) -> int:
        return min(bisect_right(cdf, self.uniform()), len(cdf) - 1)

    def exponential(self, mean: float) -> float:
        return -mean * math.log1p(-self.uniform())


class _Ids:
    """Fresh block hashes: consecutive ids spread to 64 bits, prepared in chunks."""

    def __init__(self) -> None:
        self._next = 0
        self._chunk: U64Array = np.zeros(0, dtype=np.uint64)
        self._used = 0

    def take(self, count: int) -> U64Array:
        if self._used + count > len(self._chunk):
            size = max(count, 65_536)
            self._chunk = spread_hash(np.arange(self._next, self._next + size, dtype=np.uint64))
            self._next += size
            self._used = 0
        taken = self._chunk[self._used : self._used + count]
        self._used += count
        return taken


def synthetic_workload(config: WorkloadConfig | None = None) -> Iterator[Request]:
    """Yield the requests of ``config`` (default :class:`WorkloadConfig`), in arrival order."""
    cfg = config or WorkloadConfig()
    draws = _Draws(np.random.default_rng(cfg.seed))
    ids = _Ids()
    prompts = [
        ids.take(max(1, draws.span(cfg.system_prompt_blocks))) for _ in range(cfg.system_prompts)
    ]
    prompt_cdf = _zipf_cdf(cfg.system_prompts, cfg.zipf_s)
    conv_cdf = _zipf_cdf(cfg.conversations, cfg.zipf_s)

    def new_conversation() -> tuple[U64Array, int]:
        return prompts[draws.pick(prompt_cdf)], draws.span(cfg.turns)

    live = [new_conversation() for _ in range(cfg.conversations)]
    mean_gap = 1.0 / cfg.rate
    longest_message = cfg.message_blocks[1]
    now = 0.0
    emitted = 0
    while cfg.num_requests is None or emitted < cfg.num_requests:
        now += draws.exponential(mean_gap)
        slot = draws.pick(conv_cdf)
        history, turns_left = live[slot]
        prompt = np.concatenate((history, ids.take(draws.span(cfg.message_blocks))))
        answer = draws.span(cfg.answer_blocks)
        yield Request(
            timestamp_s=now,
            hash_ids=prompt,
            input_length=len(prompt) * cfg.block_tokens,
            output_length=answer * cfg.block_tokens,
        )
        emitted += 1
        turns_left -= 1
        if turns_left <= 0 or len(prompt) + answer + longest_message > cfg.max_prompt_blocks:
            live[slot] = new_conversation()
        else:
            live[slot] = (np.concatenate((prompt, ids.take(answer))), turns_left)
