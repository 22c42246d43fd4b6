"""The order a file's chunks are fetched in, as runs (sans-I/O).

A prefetch walks every chunk of a file once, in offset order or in the order
loaders consume it (tensors by name), going on from wherever its reader is.
Both structures here hold runs of consecutive chunk indices, so planning costs
the number of runs (tensors), never the number of chunks: a listing that
declares a file of a petabyte costs no more to plan than one of a megabyte.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class ChunkOrder:
    """Every chunk index in [0, count) exactly once: the given runs first, each chunk
    where it first appears, then the chunks no run named, in offset order."""

    def __init__(self, runs: Iterable[tuple[int, int]], count: int) -> None:
        self.count = count
        covered_starts: list[int] = []
        covered_ends: list[int] = []
        out: list[tuple[int, int]] = []
        for a, b in [*runs, (0, count)]:
            a, b = max(0, a), min(count, b)
            if a < b:
                for part in _claim(covered_starts, covered_ends, a, b):
                    if out and out[-1][1] == part[0]:
                        out[-1] = (out[-1][0], part[1])  # continues the previous run
                    else:
                        out.append(part)
        self._runs = out
        self._ranks: list[int] = []  # rank of each run's first chunk
        rank = 0
        for a, b in out:
            self._ranks.append(rank)
            rank += b - a
        by_start = sorted(range(len(out)), key=lambda i: out[i][0])
        self._starts = [out[i][0] for i in by_start]
        self._by_start = by_start

    @classmethod
    def offsets(cls, count: int) -> ChunkOrder:
        return cls([(0, count)], count)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        for a, b in self._runs:
            yield from range(a, b)

    @property
    def runs(self) -> list[tuple[int, int]]:
        return list(self._runs)

    def rank(self, idx: int) -> int:
        """Where chunk `idx` comes in the order."""
        if not 0 <= idx < self.count:
            raise IndexError(idx)
        run = self._by_start[bisect_right(self._starts, idx) - 1]
        return self._ranks[run] + idx - self._runs[run][0]

    def at(self, rank: int) -> int:
        """The chunk at position `rank`."""
        if not 0 <= rank < self.count:
            raise IndexError(rank)
        run = bisect_right(self._ranks, rank) - 1
        return self._runs[run][0] + rank - self._ranks[run]

    def window(self, rank: int, n: int) -> list[int]:
        """The chunks at ranks [rank, rank + n) (fewer at the end)."""
        return [self.at(r) for r in range(max(rank, 0), min(rank + n, self.count))]


def _claim(starts: list[int], ends: list[int], a: int, b: int) -> list[tuple[int, int]]:
    """The parts of [a, b) not yet in the sorted disjoint intervals (starts, ends);
    then add [a, b) to them, merged with what it overlaps or touches."""
    i = bisect_right(ends, a)  # the first interval ending after a
    free = []
    pos, j = a, i
    while j < len(starts) and starts[j] < b:
        if starts[j] > pos:
            free.append((pos, starts[j]))
        pos = max(pos, ends[j])
        j += 1
    if pos < b:
        free.append((pos, b))
    lo = min(a, starts[i]) if i < j else a
    hi = max(b, ends[j - 1]) if i < j else b
    if i > 0 and ends[i - 1] == lo:
        i -= 1
        lo = starts[i]
    if j < len(starts) and starts[j] == hi:
        hi = ends[j]
        j += 1
    starts[i:j] = [lo]
    ends[i:j] = [hi]
    return free


class Frontier:
    """The ranks of an order not handed out yet, as sorted disjoint intervals."""

    def __init__(self, count: int) -> None:
        self._los = [0] if count else []
        self._his = [count] if count else []
        self.left = count  # ranks not handed out yet

    def __bool__(self) -> bool:
        return bool(self._los)

    def take(self, want: int) -> int | None:
        """The first rank not handed out at or after `want`, else the first of all;
        None when every rank was."""
        if not self._los:
            return None
        i = bisect_right(self._his, want)
        if i == len(self._los):
            i, want = 0, self._los[0]
        lo, hi = self._los[i], self._his[i]
        r = max(lo, want)
        pieces = [(x, y) for x, y in ((lo, r), (r + 1, hi)) if x < y]
        self._los[i:i + 1] = [x for x, _ in pieces]
        self._his[i:i + 1] = [y for _, y in pieces]
        self.left -= 1
        return r

    def take_exact(self, r: int) -> bool:
        """Hand out rank `r` if it was not yet; False if it was."""
        i = bisect_right(self._his, r)
        if i == len(self._los) or self._los[i] > r:
            return False
        lo, hi = self._los[i], self._his[i]
        pieces = [(x, y) for x, y in ((lo, r), (r + 1, hi)) if x < y]
        self._los[i:i + 1] = [x for x, _ in pieces]
        self._his[i:i + 1] = [y for _, y in pieces]
        self.left -= 1
        return True


__all__ = ["ChunkOrder", "Frontier"]
