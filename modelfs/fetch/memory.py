"""One memory budget for every chunk buffer the daemon holds.

A chunk's bytes live in one page-aligned buffer (`LoadBuffers`), reused from
chunk to chunk, whether it is fetched into it or loaded from disk (so it is
written to and read from the disk with O_DIRECT, without a copy). Whoever
holds a buffer holds a `Block` of it: the fetch filling it, the chunks kept for
readers (`recent.RecentChunks`), the whole-file hash waiting for it
(`integrity.FileChecks`), the spare load buffers. A block is charged to the
budget from its creation until its last holder releases it, so the budget's
`used` is every byte those rooms keep alive, counted once however many of them
share it.

Room for a new buffer is made by the one who owns the rooms (the reader's
`reclaim`): spare load buffers first, then chunks held for hashing (read back
from disk later), then the least recently used chunks kept for readers. A
fetch that still finds no room waits for bytes to be released; everything
charged is either reclaimable or on its way to be released (a fetch or a load
in flight), so that wait ends.

A request in flight also reserves `remote.config.RECEIVE_HELD` for the HTTP
client's reads of its body, together with its chunk buffer (`LoadBuffers.take`).
Not charged, and what a memory limit must leave room for: the interpreter and
its libraries (about 50 MiB), views of a released chunk still being copied
into a FUSE reply, and a compressed chunk's bytes while they are decompressed
in a worker thread.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable

import trio

from ..cache.store import direct_buffer


class Block:
    """A buffer some rooms hold; charged to its budget until the last lets go."""

    __slots__ = ("_budget", "_free", "_holds", "data", "nbytes")

    def __init__(self, data: bytearray | memoryview, nbytes: int, budget: MemoryBudget,
                 free: Callable[[Block], None]) -> None:
        self.data = data
        self.nbytes = nbytes  # what it is charged (a load buffer's whole size)
        self._holds = 1
        self._budget = budget
        self._free = free

    def retain(self) -> Block:
        if self._holds <= 0:
            raise RuntimeError("retain of a released block")
        self._holds += 1
        return self

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            self._free(self)
        elif self._holds < 0:
            raise RuntimeError("block released more often than held")
        # Freed, or now held only by rooms that can let it go: either way a
        # reservation waiting for room may find some.
        self._budget.wake()


class MemoryBudget:
    """Bytes charged against `limit`; trio-thread only. `reclaim()` is asked to
    release one held thing (False: nothing is left to release) while a
    reservation does not fit."""

    def __init__(self, limit: int, reclaim: Callable[[], bool]) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._reclaim = reclaim
        self._freed = trio.Event()

    def fits(self, nbytes: int) -> bool:
        # One buffer larger than the whole budget may still be had alone.
        return self.used + nbytes <= self.limit or not self.used

    def reclaim_once(self) -> bool:
        return self._reclaim()

    def try_reserve(self, nbytes: int) -> bool:
        while not self.fits(nbytes):
            if not self._reclaim():
                return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    async def released(self) -> None:
        """Return at the next release (or a block becoming reclaimable)."""
        await self._freed.wait()

    def unreserve(self, nbytes: int) -> None:
        self.used -= nbytes
        if self.used < 0:
            raise RuntimeError("memory budget released more than was charged")
        self.wake()

    def wake(self) -> None:
        """Have waiting reservations look again: bytes were freed, or became
        reclaimable (a chunk handed from its fetch to the rooms that keep it)."""
        freed, self._freed = self._freed, trio.Event()
        freed.set()


# How many times `LoadBuffers.take` lets other tasks run, when the budget is full and
# every spare buffer is still referred to, before it sheds one for a new buffer.
SPARE_PATIENCE = 4


class LoadBuffers:
    """Page-aligned buffers to load chunks into with O_DIRECT, reused: fresh
    memory is what costs on a VM that hands freed pages back to its host.

    A buffer goes back here when the block of the chunk loaded into it is
    released; it is reused only when nothing else refers to it. Every view of
    a loaded chunk is made from the buffer itself (`view`), so it holds a
    reference to the buffer (CPython): a spare buffer referred to from anywhere
    but here may still be read (a FUSE reply being assembled, a waiter not yet
    run), so it is skipped, not overwritten, and stays charged until it is free
    (usually a moment later) or shed. Dropping such buffers instead made a
    CDN-like prefetch map a new buffer for nearly every chunk: 124 fresh 4 MiB
    buffers for 128 chunks, and zeroing their pages was 28% of its CPU.
    """

    def __init__(self, budget: MemoryBudget, chunk_size: int) -> None:
        self._budget = budget
        self._length = chunk_size + 1  # +1: a longer file shows
        # Charged: the pages a load can touch (a buffer's mapping may be longer,
        # rounded to a huge page, but pages never touched cost nothing).
        self.size = -(-self._length // mmap.PAGESIZE) * mmap.PAGESIZE
        self._spare: list[mmap.mmap] = []

    async def take(self, extra: int = 0) -> mmap.mmap:
        """A spare buffer, else a new one, and `extra` bytes more charged beside it
        (what a request receiving into it holds): both or neither, so a fetch
        waiting for room holds none (two fetches each holding a buffer and
        waiting for the other's room would wait for ever). When the budget is
        full, one thing is reclaimed at a time: a chunk let go brings its buffer
        back here. A checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        patience = SPARE_PATIENCE
        while True:
            buf = self._free_spare()
            if buf is not None:
                if self._budget.try_reserve(extra):
                    break
                self._spare.append(buf)
                buf = None  # not held here while waiting: someone else may take it
                await self._budget.released()
            elif self._spare and patience and not self._budget.fits(self.size + extra):
                # Every spare is still referred to, usually by a waiter woken but not
                # yet run: let it run, rather than shed a buffer and map a new one.
                patience -= 1
                await trio.lowlevel.checkpoint()
            elif self._budget.fits(self.size + extra) or not self._budget.reclaim_once():
                if self._budget.try_reserve(self.size + extra):
                    buf = direct_buffer(self._length)
                    break
                await self._budget.released()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return buf

    def try_take(self) -> mmap.mmap | None:
        """A spare buffer nothing else refers to, or None: never a new one (for a
        buffer that only speeds something up). A buffer mapped for that and left
        untouched would come back as the most recent spare, and the next fetch would
        take it and fault in fresh pages rather than reuse warm ones."""
        return self._free_spare()

    def _free_spare(self) -> mmap.mmap | None:
        """The most recently given spare that nothing else refers to (its pages are
        the likeliest to be warm), taken out of the spares."""
        for i in range(len(self._spare) - 1, -1, -1):
            if sys.getrefcount(self._spare[i]) == 2:  # the list and the argument
                return self._spare.pop(i)
        return None

    @property
    def spare_bytes(self) -> int:
        return len(self._spare) * self.size

    def give(self, buf: mmap.mmap) -> None:
        """`buf` (charged) is not needed any more: kept for the next chunk. Spares
        are the first thing the budget's reclaim lets go, so keeping every one
        costs nothing another buffer needs; a fresh one costs page faults.
        A `take` waiting for room is woken: the spare is room for it (a hash step
        giving its buffers back woke nobody, and a fetch waiting on them slept
        until its deadline when nothing else moved)."""
        self._spare.append(buf)
        self._budget.wake()

    def shed(self) -> bool:
        """Let one spare buffer go, one still referred to first (it cannot be
        reused yet); False when there is none."""
        if not self._spare:
            return False
        busy = next((i for i, b in enumerate(self._spare) if sys.getrefcount(b) != 3), -1)
        self._spare.pop(busy)  # 3: the list, `b` and the argument
        self._budget.unreserve(self.size)
        return True

    def block(self, buf: mmap.mmap, n: int) -> Block:
        """The block of a chunk of `n` bytes loaded into `buf`."""
        return Block(memoryview(buf)[:n], self.size, self._budget, lambda _: self.give(buf))


def view(data: bytearray | memoryview, start: int, end: int) -> memoryview:
    """Bytes [start, end) of a chunk in memory, made from its buffer itself, so that
    it holds a reference to the buffer (see `LoadBuffers`)."""
    if isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
        return memoryview(data.obj)[start:end]
    return memoryview(data)[start:end]
