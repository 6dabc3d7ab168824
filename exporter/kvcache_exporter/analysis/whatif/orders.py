"""Order statistics in numpy passes, for the what-if model's ranks and stack distances.

:func:`earlier_greater` counts inversions per element; :class:`Order` keeps marks (ghosts,
references) in the order they happened, over a :class:`Fenwick` tree, so that the live marks
between two positions are counted for a whole array of positions at once. Nothing here knows
about blocks or caches.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

_U64 = npt.NDArray[np.uint64]
_I64 = npt.NDArray[np.int64]
_BOOL = npt.NDArray[np.bool_]

_MIN_ORDER: Final = 1024
_LEAF: Final = 32  # earlier_greater compares blocks of this many elements directly


def earlier_greater(values: _I64) -> _I64:
    """For each element, how many elements before it are greater (ties do not count).

    Blocks of 32 count among themselves with one comparison array; then a bottom-up merge
    count: at each level, every element of a right-hand block counts the greater elements of
    its left sibling block with one ``searchsorted`` into the level's sorted (block, value)
    keys — O(n log² n) in numpy passes instead of a loop per element.
    """
    n = int(values.shape[0])
    if n <= _LEAF:
        greater = values[None, :] > values[:, None]  # [i, j]: v_j > v_i
        small: _I64 = np.tril(greater, -1).sum(axis=1).astype(np.int64)
        return small
    rank = np.unique(values, return_inverse=True)[1].astype(np.int64).reshape(n)
    padded = np.full(-(-n // _LEAF) * _LEAF, n, np.int64)  # padding comes last: counts nothing
    padded[:n] = rank
    leaves = padded.reshape(-1, _LEAF)
    earlier = np.tril(np.ones((_LEAF, _LEAF), bool), -1)
    out = ((leaves[:, None, :] > leaves[:, :, None]) & earlier).sum(axis=2).reshape(-1)[:n]
    position = np.arange(n, dtype=np.int64)
    width = _LEAF
    order = np.argsort((position // width) * n + rank, kind="stable")  # sorted within leaves
    while width < n:
        block = position // width
        keys = block[order] * n + rank[order]
        # Merging sorted runs: the stable sort's run detection makes each level near-linear.
        step = np.argsort(keys, kind="stable")
        order, keys = order[step], keys[step]
        right = np.flatnonzero(block & 1)
        left = block[right] - 1
        # The left sibling is whole and occupies sorted positions [left w, (left + 1) w).
        out[right] += (left + 1) * width - np.searchsorted(
            keys, left * n + rank[right], side="right"
        )
        width *= 2
    result: _I64 = out.astype(np.int64)
    return result


class Fenwick:
    """A binary indexed tree over counts at positions 0..size-1, queried and updated with
    numpy passes (one per tree level), built from a 0/1 array in one pass."""

    def __init__(self, alive: _BOOL) -> None:
        self.size = int(alive.shape[0])
        prefix = np.zeros(self.size + 1, np.int64)
        np.cumsum(alive, out=prefix[1:])
        index = np.arange(1, self.size + 1)
        self.tree = np.zeros(self.size + 1, np.int64)  # 1-based; tree[0] stays 0
        self.tree[1:] = prefix[index] - prefix[index - (index & -index)]

    def prefix(self, positions: _I64) -> _I64:
        """Sum of the counts at positions [0, p) for each p."""
        total = np.zeros(positions.shape[0], np.int64)
        index = positions.astype(np.int64)  # 1-based index p covers positions < p
        while index.any():
            total += self.tree[index]
            index &= index - 1
        return total

    def add(self, positions: _I64, delta: int) -> None:
        index = positions.astype(np.int64) + 1
        while index.size:
            np.add.at(self.tree, index, delta)
            index = index + (index & -index)
            index = index[index <= self.size]


class Order:
    """Marks at increasing positions, in the order things happened (evictions, or references):
    live marks counted between two positions, marks appended at the end and killed anywhere,
    positions renumbered (compacted) when they run out."""

    def __init__(self, with_keys: bool) -> None:
        self.alive = np.zeros(_MIN_ORDER, bool)
        self.keys = np.zeros(_MIN_ORDER if with_keys else 0, np.uint64)
        self.end = 0  # next position
        self.start = 0  # every position before it is dead
        self.live = 0
        self.tree = Fenwick(self.alive)

    @property
    def nbytes(self) -> int:
        return self.alive.nbytes + self.keys.nbytes + self.tree.tree.nbytes

    def between(self, low: _I64, high: int) -> _I64:
        """Live marks at positions [low, high) for each low (high <= end)."""
        return self.tree.prefix(np.full(low.shape[0], high, np.int64)) - self.tree.prefix(low)

    def kill(self, positions: _I64) -> None:
        """Positions must be live and distinct."""
        if positions.size:
            self.alive[positions] = False
            self.live -= int(positions.size)
            self.tree.add(positions, -1)

    def make_room(self, count: int) -> _I64 | None:
        """Room for ``count`` more positions. When that takes a renumbering, returns the old
        positions of the live marks (ascending): a live mark at old position p is now at
        ``searchsorted(old, p)``, and the caller moves what it holds the same way."""
        if self.end + count <= self.alive.shape[0]:
            return None
        old = np.flatnonzero(self.alive[: self.end]).astype(np.int64)
        size = max(_MIN_ORDER, 2 * (old.size + count))
        alive = np.zeros(size, bool)
        alive[: old.size] = True
        if self.keys.size:
            keys = np.zeros(size, np.uint64)
            keys[: old.size] = self.keys[old]
            self.keys = keys
        self.alive, self.end, self.start = alive, int(old.size), 0
        self.tree = Fenwick(alive)
        return old

    def append(self, alive: _BOOL, keys: _U64 | None = None) -> int:
        """Marks at the next positions (after :meth:`make_room`); returns the first one."""
        base, count = self.end, int(alive.shape[0])
        self.alive[base : base + count] = alive
        if keys is not None and self.keys.size:
            self.keys[base : base + count] = keys
        self.end += count
        self.live += int(np.count_nonzero(alive))
        fresh = base + np.flatnonzero(alive)
        if fresh.size * max(1, self.tree.size.bit_length()) > self.tree.size:
            self.tree = Fenwick(self.alive)  # cheaper than that many updates
        else:
            self.tree.add(fresh, 1)
        return base

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """The marks up to ``end`` (and their keys), and ``start``: what to continue from."""
        state: dict[str, npt.NDArray[np.generic]] = {
            "alive": self.alive[: self.end].copy(),
            "start": np.array([self.start], np.int64),
        }
        if self.keys.size:
            state["keys"] = self.keys[: self.end].copy()
        return state

    @classmethod
    def from_state(cls, state: dict[str, npt.NDArray[np.generic]], with_keys: bool) -> Order:
        """An order continuing :meth:`state`, with room to grow."""
        alive = state["alive"].astype(bool)
        end = int(alive.shape[0])
        order = cls(with_keys)
        if end + 1 > order.alive.shape[0]:
            order.alive = np.zeros(2 * end, bool)
            if with_keys:
                order.keys = np.zeros(2 * end, np.uint64)
        order.alive[:end] = alive
        if with_keys:
            order.keys[:end] = state["keys"].astype(np.uint64)
        order.end, order.start = end, int(state["start"][0])
        order.live = int(np.count_nonzero(alive))
        order.tree = Fenwick(order.alive)
        return order

    def oldest(self, count: int) -> _I64:
        """The ``count`` live marks with the lowest positions (the caller kills them)."""
        found: list[_I64] = []
        at = self.start
        while count > 0 and at < self.end:
            stop = min(self.end, at + max(4 * count, 4096))
            live = at + np.flatnonzero(self.alive[at:stop])[:count]
            found.append(live)
            count -= int(live.size)
            at = int(live[-1]) + 1 if count == 0 else stop
        self.start = at
        return np.concatenate(found) if found else np.zeros(0, np.int64)
