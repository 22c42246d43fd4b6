"""Single flight: one task per chunk on its way into memory, however many wait.

A `Flight` is registered in its table before the first checkpoint and its task
runs in the reader's nursery, so concurrent readers of one chunk share one
origin request (or one disk load), and a reader that goes away does not cancel
work others wait for. The reader keeps two tables, because the two kinds differ:

- fetches from the origin hold a scheduler `Ticket` and, once granted, a slot;
  the first `filled` bytes of `buf` may be served before the rest arrive (a
  reader waits only for what it asked for);
- loads from the disk hold no ticket (they never ask for a slot: granting one
  would leak it) and deliver the whole chunk, checked, or nothing: a damaged or
  vanished chunk ends its load with neither `buf` nor `error`, and its waiters
  go on to fetch it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..chunks import ChunkKey
from .scheduler import Ticket


@dataclass(slots=True, eq=False)
class Flight:
    ticket: Ticket | None = None  # a fetch's; None for a load
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    buf: bytearray | memoryview | None = None
    filled: int = 0
    whole: bool = False  # its chunk arrived whole (`buf` may be let go once it ends)
    error: BaseException | None = None
    keep: bool = False  # hold the bytes for readers even at PREFETCH priority
    ahead: bool = False  # started ahead of a reader (not by a demand read)
    shared: bool = False  # a fetch served by the fleet's shared tier, not the origin
    waiters: int = 0  # tasks waiting for it now
    scope: trio.CancelScope | None = None  # its task's, to stop an abandoned fetch
    on_progress: Callable[[Ticket, int], None] | None = None

    def advance(self, filled: int) -> None:
        more, self.filled = filled - self.filled, filled
        if self.on_progress is not None and self.ticket is not None:
            self.on_progress(self.ticket, more)
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    def finish(self) -> None:
        self.done.set()
        self.changed.set()


class Flights:
    """The flights of one kind in progress, by chunk."""

    def __init__(self) -> None:
        self._by_key: dict[ChunkKey, Flight] = {}

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: ChunkKey) -> Flight | None:
        return self._by_key.get(key)

    def add(self, key: ChunkKey, flight: Flight) -> Flight:
        if key in self._by_key:
            raise RuntimeError(f"a second flight for chunk {key}")
        self._by_key[key] = flight
        return flight

    def end(self, key: ChunkKey, flight: Flight) -> None:
        """`flight` is over (whatever its outcome): later readers start anew. Those
        waiting now are woken and get its bytes; when none waits, nobody can ask for
        them any more, so the view goes: one kept (by a caller holding the flight to
        learn its outcome, see `outcome`) keeps the chunk's buffer from reuse."""
        if self._by_key.get(key) is flight:
            del self._by_key[key]
        flight.finish()
        if not flight.waiters and flight.whole:
            flight.buf = None

    @staticmethod
    async def outcome(flight: Flight) -> bool:
        """Wait for `flight` to end, for its outcome only: True when its chunk arrived
        whole, False when it ended with nothing; a failure is raised. Not counted as
        waiting for its bytes, so a flight ending with no other waiter lets go of its
        buffer at once: the buffer is then reused by the next chunk, not left
        referred to until this task runs again (a busy event loop may take a few
        ms, and a chunk arrives every few ms; a new buffer costs fresh pages)."""
        await flight.done.wait()
        if flight.error is None:
            return flight.whole or flight.buf is not None
        if isinstance(flight.error, Exception):
            raise flight.error
        return False

    @staticmethod
    async def wait(flight: Flight, need: int | None = None) -> bytearray | memoryview | None:
        """The flight's bytes: all of them, or with `need`, as soon as its first `need`
        have arrived. None when it ended with nothing (a load that found the chunk
        damaged, a fetch cancelled at shutdown): look again. A failure is raised.

        When every waiter of a demand fetch goes away (a signal, its deadline), the
        fetch is stopped rather than hold the origin for nobody."""
        flight.waiters += 1
        try:
            while not flight.done.is_set():
                if need is not None and flight.buf is not None and flight.filled >= need:
                    return flight.buf
                await flight.changed.wait()
        except BaseException:
            if flight.waiters == 1 and flight.scope and flight.ticket is not None \
                    and not (flight.keep or flight.ahead):
                flight.scope.cancel()
            raise
        finally:
            flight.waiters -= 1
        if flight.error is None:
            return flight.buf
        if isinstance(flight.error, Exception):
            raise flight.error
        return None
