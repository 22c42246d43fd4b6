"""Serve byte ranges of remote files from memory, the chunk cache or the origin.

`ChunkReader` is where the cache and the sources meet, and the one owner of the
rooms that read path goes through:

- `recent.RecentChunks`: chunks in memory for readers; a read within one is a
  view of it (no copy before the FUSE reply);
- `flights.Flights` x2: single flight for origin fetches (scheduled, with a
  ticket and a slot) and, apart from them, for disk loads (no ticket);
- `memory.MemoryBudget` and `memory.LoadBuffers`: every buffer above is charged
  to one budget (`FetchConfig.memory_limit`); `_reclaim` makes room;
- `integrity.FileChecks`: whole-file hashes, bad files, rechecks;
- `files.FileStates`: per file version, its streams, read-ahead, follower and
  delivered chunks, one bounded record each.

Chunk lifecycle: missing -> fetching (a flight) -> stored (a file under
`chunks/` and an index entry; for a while also in memory). A stored chunk not
in memory is loaded: read whole with O_DIRECT in a worker thread and checked
against its checksum (`ChunkCache.load`), fetched again if it is damaged. So
the event loop never waits on the disk, and a chunk file never goes through the
page cache (its bytes are on their way to the mount's page cache: a second
copy would cost a copy and memory).

- Every fetch goes through the `FetchScheduler` with a priority: a demand read
  (DEMAND) beats a sequential stream's read-ahead (READAHEAD) beats whole-file
  prefetch (PREFETCH); a demand reader that joins a queued fetch promotes it.
- Loads run ahead of readers (`load_ahead`): within `LOAD_AHEAD` chunks of a
  sequential stream here, and in loader order by the on-open prefetch
  (`prefetch.follow_reader`), so a warm reader rarely waits on the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

import trio

from ..cache import ChunkCache
from ..chunks import ChunkKey, Piece, chunk_count, chunk_extent, pieces
from ..errors import IntegrityError, ModelfsError, RemoteStale, RemoteUnavailable
from ..remote.config import RECEIVE_HELD
from ..threads import run_letting_go
from ..types import RemoteFile
from .files import FileStates
from .flights import Flight, Flights
from .integrity import FileChecks
from .memory import Block, LoadBuffers, MemoryBudget, view
from .readahead import ReadAheadConfig
from .recent import RecentChunks
from .scheduler import FetchScheduler, Priority, SchedulerConfig
from .stats import ReaderStats

if TYPE_CHECKING:  # the tier's module loads httpx: commands that only read the cache do not
    from ..remote.tier import SharedTier

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 192 << 20
# Per byte, a 16 MiB ranged GET costs the HTTP client about 0.7x the CPU of four
# 4 MiB ones (httpx on trio, one local S3 server: bench/request_size.py).
DEFAULT_REQUEST_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """`chunk_size` is the unit of caching and of a demand read's origin request;
    `request_size` is the most one prefetch request asks for (consecutive missing
    chunks in one ranged GET);
    `memory_limit` bounds every chunk buffer the daemon holds (fetches in flight,
    chunks kept for readers or for a whole-file hash, load buffers);
    `io_threads` bounds the threads that hash, store and load chunks (a store
    spends most of its ~20 ms waiting for the disk and the index commit, so more
    threads than cores: 16 rather than 8 made an S3 prefetch 5% faster);
    `read_deadline` is the longest a read waits for the origin before it fails
    with EIO (the origin's own deadlines are the HTTP client's)."""

    chunk_size: int = 4 << 20
    request_size: int = DEFAULT_REQUEST_SIZE
    io_threads: int = 16
    read_deadline: float = 60.0
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    readahead: ReadAheadConfig = field(default_factory=ReadAheadConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# Memory limits below this many chunks leave too little for read-ahead and loads.
MIN_MEMORY_CHUNKS = 8
# Cached chunks loaded into memory ahead of a sequential reader (32 MiB at 4 MiB
# chunks): enough to keep the disk busy, well within the memory budget.
LOAD_AHEAD = 8
# Chunk writes to the shared tier in flight at most (each holds a copy of its chunk),
# and chunks queued for them (keys only: a writer reads its chunk back from disk).
TIER_WRITES = 8
TIER_QUEUE = 100_000
# Chunks queued for the tier past which a prefetch waits before fetching more
# (`_share_room`), and how often it looks again.
SHARE_BACKLOG = 2 * TIER_WRITES
SHARE_POLL = 0.05
# A fetched chunk waits at most this long for a thread to store it in.
STORE_WAIT = 10.0
# What a run's list of flights holds for a chunk handed to `_finish`.
_DONE = Flight()


class Got(NamedTuple):
    """Bytes of a chunk fetched for whoever asked: from the origin, or from the
    fleet's shared tier."""

    origin: int
    shared: int


NOTHING = Got(0, 0)


class _RunCut(Exception):
    """A run's request ends early: its prefetch was paused or cancelled."""


class ChunkReader:
    def __init__(self, cache: ChunkCache, config: FetchConfig, *,
                 on_content_dropped: Callable[[str], None] | None = None,
                 on_stale: Callable[[], None] | None = None,
                 tier: SharedTier | None = None) -> None:
        """`on_content_dropped(content_id)`: a file version's cached bytes were found
        bad and dropped (the mount drops the kernel's copy too); `on_stale()`: the
        origin serves another version than the one being read (the mount
        re-resolves now rather than at its next scheduled check); `tier`: the
        fleet's shared chunk tier, asked before the origin and written after it."""
        self.cache = cache
        self.tier = tier
        # Chunks on their way to the shared tier: queued keys, then written by
        # `TIER_WRITES` tasks (`_tier_writer`).
        self._share_send, self._share_receive = trio.open_memory_channel[tuple[str, int]](
            TIER_QUEUE)
        self._sharing = 0  # queued or being written
        self._shares_done = trio.Event()  # set (and replaced) as each ends
        self.config = config
        self.scheduler = FetchScheduler(config.scheduler)
        self._on_content_dropped = on_content_dropped
        self._on_stale = on_stale
        self._stats = ReaderStats()
        self._io = trio.CapacityLimiter(config.io_threads)
        self._nursery: trio.Nursery | None = None
        self.budget = MemoryBudget(config.memory_limit, self._reclaim)
        self._buffers = LoadBuffers(self.budget, config.chunk_size)
        self._recent = RecentChunks()
        self._fetches = Flights()
        self._loads = Flights()
        self._files = FileStates(config.readahead)
        # Content ids of files a loader declared its reads of (`plans.py`): no stream
        # read-ahead and no whole-file prefetch for them, only what was asked.
        self.planned: set[str] = set()
        self._checks = FileChecks(cache, config.chunk_size, self._buffers, self._io,
                                  self._stats, spawn=self.spawn, refetch=self._refetch,
                                  on_failed=self._content_failed)

    def statistics(self) -> ReaderStats:
        s = self._stats
        return replace(s, errors=dict(s.errors), latency_counts=list(s.latency_counts))

    def memory(self) -> dict[str, int]:
        """Where the memory budget goes now: chunks kept for readers, held for a
        whole-file hash, spare load buffers, and the rest (fetches and loads in
        flight). The parts share blocks at most (a kept chunk also held for its
        hash counts in both), so they may add up to more than `used`."""
        recent = self._recent.nbytes
        hashing = self._checks.held_bytes
        spare = self._buffers.spare_bytes
        return {"limit": self.budget.limit, "used": self.budget.used, "peak": self.budget.peak,
                "readers": recent, "hashing": hashing, "spare": spare,
                "in_flight": max(0, self.budget.used - recent - hashing - spare)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that fetches (and background jobs) run in; returns when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.scheduler.run)
            if self.tier is not None:
                for _ in range(TIER_WRITES):
                    nursery.start_soon(self._tier_writer, self.tier)
            task_status.started()
            await trio.sleep_forever()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a background job (e.g. a whole-file prefetch) beside the fetches."""
        if self._nursery is None:
            raise RuntimeError("ChunkReader.run() is not running")
        self._nursery.start_soon(fn, *args)

    # Demand reads -------------------------------------------------------------------

    async def read(self, f: RemoteFile, offset: int, size: int) -> bytes | memoryview:
        """Bytes [offset, offset+size) of `f`, clipped at its end.

        A read within one chunk in memory is a memoryview of it (no copy).
        """
        parts = pieces(offset, size, f.entry.size, self.config.chunk_size)
        if not parts:
            return b""
        if (bad := self._checks.bad(f.entry.content_id)) is not None:
            self._stats.count_error("integrity")
            raise IntegrityError(bad)
        self._read_ahead(f, offset, offset + size)
        try:
            out = []
            with trio.move_on_after(self.config.read_deadline) as waited:
                out = [await self._read_piece(f, p) for p in parts]
            if waited.cancelled_caught:
                self._stats.count_error("deadline")
                raise RemoteUnavailable(f"{f.name}: no answer from the origin within "
                                        f"read_deadline ({self.config.read_deadline:g}s)")
        except ModelfsError as exc:
            log.error("read of %s at offset %d (%d bytes) failed: %s", f.name, offset, size, exc)
            if isinstance(exc, RemoteStale) and self._on_stale:
                self._on_stale()
            raise
        self._stats.bytes_served += sum(map(len, out))
        return out[0] if len(out) == 1 else b"".join(out)

    async def _read_piece(self, f: RemoteFile, p: Piece) -> memoryview:
        key = (f.entry.content_id, p.index)
        block = self._recent.get(key)
        if block is not None:
            self._stats.hits += 1
            piece = view(block.data, p.start, p.end)
            self._served(key, len(piece))
            return piece
        state = self._files.get(key[0])
        if state is not None and p.index in state.delivered:
            # The kernel dropped pages it had (memory pressure, a reread after a cache
            # drop): what else it had of this file may be gone too; load ahead again.
            state.delivered.clear()
        if self.is_cached(f, p.index):
            self._stats.hits += 1  # on disk: loaded (and checked) in a worker thread
        else:
            self._stats.misses += 1
        data = await self._wait(f, p.index, Priority.DEMAND, need=p.end)
        piece = view(data, p.start, p.end)
        if key in self._recent:
            self._served(key, len(piece))
        return piece

    def _served(self, key: ChunkKey, n: int) -> None:
        """Count bytes of a chunk in memory that went to the kernel; once all have,
        the chunk leaves memory (`RecentChunks`) and is delivered."""
        if self._recent.served(key, n):
            self._files.touch(key[0]).delivered.add(key[1])

    def reopened(self, f: RemoteFile) -> None:
        """`f` was opened: a file found bad is checked again in the background."""
        if self._nursery is not None:
            self._checks.reopened(f)

    # What is where ------------------------------------------------------------------

    async def cached_chunks(self, f: RemoteFile) -> set[int]:
        """Indices of the chunks of `f` that are cached (on disk or in memory): one index
        scan in a worker thread, costing what is cached, not the file's size."""
        cid = f.entry.content_id
        found = await trio.to_thread.run_sync(self.cache.index.file_chunks, cid,
                                              self.config.chunk_size, limiter=self._io)
        return set(found) | self._recent.indices(cid)

    def is_cached(self, f: RemoteFile, idx: int) -> bool:
        return (f.entry.content_id, idx) in self._recent or self._stored(f, idx) is not None

    def _stored(self, f: RemoteFile, idx: int) -> str | None:
        return self.cache.lookup(f.entry.content_id, self.config.chunk_size, idx)

    def position(self, f: RemoteFile) -> int | None:
        """Where the file's most recent reader is, to prefetch in an order that follows it."""
        state = self._files.get(f.entry.content_id)
        return state.stream.position() if state else None

    def streamed(self, f: RemoteFile) -> int:
        """How much one reader of the file has read in offset order (0 for random
        readers)."""
        state = self._files.get(f.entry.content_id)
        return state.stream.streamed() if state else 0

    def last_read_end(self, f: RemoteFile) -> int | None:
        """Where the latest read of `f` ended (unlike `position`, also after a jump
        back within a stream)."""
        state = self._files.get(f.entry.content_id)
        return state.last_end if state else None

    async def reader_moved(self, f: RemoteFile) -> None:
        """Return at the next read of `f` (by anyone)."""
        state = self._files.touch(f.entry.content_id)
        if state.moved is None:
            state.moved = trio.Event()
        await state.moved.wait()

    def follow_order(self, f: RemoteFile, on: bool) -> None:
        """Whether the reader of `f` follows an order other than offsets (tensors by
        name), whose follower loads ahead for it: then sequential streams within
        it do not load ahead in offset order (what they would load is the next
        tensor on disk, not the next one read)."""
        self._files.touch(f.entry.content_id).in_order = on

    def follows_order(self, f: RemoteFile) -> bool:
        state = self._files.get(f.entry.content_id)
        return state is not None and state.in_order

    # Getting chunks into memory -----------------------------------------------------

    async def ensure(self, f: RemoteFile, idx: int, priority: Priority,
                     keep: bool = False) -> Got:
        """Make chunk `idx` cached; return the bytes fetched for it, from the origin or
        the fleet's tier: none if it was cached, or if someone else's fetch of it was
        already under way (it is theirs to count).
        `keep`: a reader has the file open, so hold the fetched bytes in memory too
        (it will read them soon; reading them back from disk would cost a copy)."""
        if self.is_cached(f, idx):
            return NOTHING
        if (f.entry.content_id, idx) in self._fetches:
            await self._wait(f, idx, priority, keep=keep)
            return NOTHING
        flight = self._start_fetch(f, idx, priority)
        flight.keep = flight.keep or keep
        n = len(await self._wait(f, idx, priority, keep=keep))
        return Got(0, n) if flight.shared else Got(n, 0)

    async def ensure_run(self, f: RemoteFile, first: int, count: int, priority: Priority,
                         done: Callable[[int, Got], None], *, keep: bool = False,
                         stopped: Callable[[], bool] | None = None) -> None:
        """`ensure` for chunks [first, first + count), with one origin request for
        them when none is cached or under way: per byte, one large request costs
        the HTTP client far less CPU than several small ones. `done(idx, got)` is
        called for each chunk, in order, as soon as it is cached, with the bytes
        fetched for it as `ensure` returns them. A chunk not begun when `stopped()`
        turned true (a pause or a cancel) is left out: the request ends at the
        chunk under way, as separate requests would."""
        key0 = f.entry.content_id
        idxs = range(first, first + count)
        # With a shared tier, chunk by chunk: each is asked of the tier first.
        ours = count > 1 and self._nursery is not None and self.tier is None and all(
            not self.is_cached(f, i) and (key0, i) not in self._fetches
            and (key0, i) not in self._loads for i in idxs)
        if not ours:
            for i in idxs:
                done(i, await self.ensure(f, i, priority, keep=keep))
            return
        flights = self._start_run(f, first, count, priority, keep, stopped)
        flights.reverse()
        for i in idxs:
            # Popped: a flight kept alive keeps its chunk's buffer from being reused.
            flight = flights.pop()
            if await Flights.outcome(flight):
                done(i, Got(flight.filled, 0))
            elif stopped is None or not stopped():
                # The run was cut (a shutdown) before this chunk: on its own.
                done(i, await self.ensure(f, i, priority, keep=keep))
            del flight

    def _start_run(self, f: RemoteFile, first: int, count: int, priority: Priority,
                   keep: bool, stopped: Callable[[], bool] | None) -> list[Flight]:
        assert self._nursery is not None
        cs, size = self.config.chunk_size, f.entry.size
        length = min(size, (first + count) * cs) - first * cs
        ticket = self.scheduler.ticket(priority, length)
        scope = trio.CancelScope()
        flights = [self._fetches.add((f.entry.content_id, i),
                                     Flight(ticket, ahead=priority != Priority.DEMAND, keep=keep,
                                            scope=scope, on_progress=self.scheduler.progress))
                   for i in range(first, first + count)]
        self._nursery.start_soon(self._run_task, f, first, list(flights), stopped, scope)
        return flights

    async def _run_task(self, f: RemoteFile, first: int, flights: list[Flight],
                        stopped: Callable[[], bool] | None, scope: trio.CancelScope) -> None:
        with scope:
            await self._fetch_run(f, first, flights, stopped)

    async def _fetch_run(self, f: RemoteFile, first: int, flights: list[Flight],
                         stopped: Callable[[], bool] | None) -> None:
        """Fetch consecutive chunks with one ranged read. Each chunk's buffer is taken
        when its bytes arrive (`Segments`), and each chunk is stored as soon as it is
        complete, while the rest arrive: the memory held stays about one chunk per
        request in flight. Once `stopped()`, the request ends where the next chunk
        would begin: the chunks not begun end with nothing, not an error."""
        cs, size = self.config.chunk_size, f.entry.size
        start = first * cs
        length = min(size, (first + len(flights)) * cs) - start
        ticket = flights[0].ticket
        assert ticket is not None
        # The chunks between their buffer and their hand-off to `_finish`, by position
        # in the run; then dropped here: a view kept alive keeps a buffer from reuse.
        blocks: dict[int, Block] = {}
        taken = 0  # buffers taken
        complete = 0  # chunks received whole, handed to `_finish`
        reserved = 0
        reader = self

        class Buffers:
            async def next(self) -> memoryview:
                nonlocal reserved, taken
                if taken and stopped is not None and stopped():
                    raise _RunCut
                extra = 0 if taken else RECEIVE_HELD
                buf = await reader._buffers.take(extra)
                reserved += extra
                block = reader._buffers.block(buf, chunk_extent(first + taken, size, cs)[1])
                blocks[taken] = block
                flights[taken].buf = block.data
                taken += 1
                return memoryview(block.data)

        # Stores run in their own nursery; the request's errors are handled inside it, so
        # they reach the flights as they are (never wrapped in an exception group).
        async with trio.open_nursery() as stores:
            def received(n: int) -> None:
                nonlocal complete
                while complete < taken:
                    got = n - complete * cs
                    whole = len(blocks[complete].data)
                    flight = flights[complete]
                    flight.advance(min(got, whole))
                    if got < whole:
                        return
                    stores.start_soon(self._finish, f, first + complete, flight,
                                      blocks.pop(complete))
                    flights[complete] = _DONE
                    complete += 1

            try:
                async with self.scheduler.slot(ticket):
                    t0 = trio.current_time()
                    self._stats.in_flight += 1
                    try:
                        await f.source.read(f.repo_id, f.commit, f.entry, start, length,
                                            into=Buffers(), progress=received)
                    finally:
                        self._stats.in_flight -= 1
                        self.budget.unreserve(reserved)
                    self._stats.observe(trio.current_time() - t0)
            except _RunCut:
                # Nothing of the rest is served: a chunk's part in its buffer is no chunk.
                for j in range(complete, len(flights)):
                    flights[j].buf = None
                    self._fetches.end((f.entry.content_id, first + j), flights[j])
                for block in blocks.values():
                    block.release()
            except BaseException as exc:
                if complete < len(flights):
                    self._stats.fetch_errors += 1
                    if isinstance(exc, Exception):
                        self._stats.count_error(exc.kind if isinstance(exc, ModelfsError)
                                                else "internal")
                        if isinstance(exc, RemoteUnavailable):
                            self.scheduler.refused()  # fewer requests at once
                        if not isinstance(exc, ModelfsError):
                            log.exception("fetching chunks %d-%d of %s failed", first,
                                          first + len(flights) - 1, f.name)
                for j in range(complete, len(flights)):
                    flights[j].error = exc
                    self._fetches.end((f.entry.content_id, first + j), flights[j])
                for block in blocks.values():
                    block.release()
                if not isinstance(exc, Exception):
                    raise

    async def _finish(self, f: RemoteFile, idx: int, flight: Flight, block: Block) -> None:
        """A chunk of a run received whole: keep it for readers, store it, end its flight."""
        key = (f.entry.content_id, idx)
        flight.whole = True
        try:
            self._stats.fetches += 1
            self._stats.bytes_fetched += len(block.data)
            assert flight.ticket is not None
            if flight.keep or flight.ticket.priority != Priority.PREFETCH:
                self._recent.add(key, block)
            if await self._store(f, idx, block.data, False):
                self._checks.stored(f, idx, block)
        finally:
            self._fetches.end(key, flight)
            block.release()

    def load_ahead(self, f: RemoteFile, idx: int) -> None:
        """Start loading chunk `idx` of `f` into memory for a reader that will want it
        soon, if it is cached on disk and not in memory or on its way already
        (fetching what is not cached is the prefetch's and read-ahead's business)."""
        key = (f.entry.content_id, idx)
        if key in self._recent or key in self._loads or key in self._fetches \
                or self._nursery is None:
            return
        state = self._files.get(key[0])
        if state is not None and idx in state.delivered:
            return
        digest = self._stored(f, idx)
        if digest is not None:
            self._start_load(f, idx, digest, ahead=True)

    async def _wait(self, f: RemoteFile, idx: int, priority: Priority,
                    need: int | None = None, keep: bool = False) -> bytearray | memoryview:
        """Chunk `idx`, from memory, a load or a fetch, sharing any already under way:
        the whole chunk, or with `need`, as soon as its first `need` bytes are here."""
        key = (f.entry.content_id, idx)
        while True:
            block = self._recent.get(key)
            if block is not None:
                return block.data
            flight = self._loads.get(key)
            if flight is None and key not in self._fetches:
                digest = self._stored(f, idx)
                if digest is not None:
                    flight = self._start_load(f, idx, digest, ahead=False)
            if flight is None:
                flight = self._start_fetch(f, idx, priority)
                flight.keep = flight.keep or keep
            data = await Flights.wait(flight, need)
            if data is not None:
                return data
            # A load found the chunk damaged (now fetch it), or the flight was
            # cancelled (shutdown): look again, or be cancelled ourselves.
            await trio.lowlevel.checkpoint()

    def _start_load(self, f: RemoteFile, idx: int, digest: str, *, ahead: bool) -> Flight:
        if self._nursery is None:
            raise RuntimeError("ChunkReader.run() is not running")
        key = (f.entry.content_id, idx)
        flight = self._loads.add(key, Flight(ahead=ahead))
        self._nursery.start_soon(self._load, key, digest, flight)
        return flight

    async def _load(self, key: ChunkKey, digest: str, flight: Flight) -> None:
        """Read a stored chunk into a load buffer and keep it for readers; a damaged
        or vanished one ends the flight with nothing (its waiters fetch it)."""
        try:
            buf = await self._buffers.take()
            try:
                loaded = await run_letting_go(lambda b: self.cache.load(digest, False, b),
                                              buf, limiter=self._io)
            except BaseException:
                self._buffers.give(buf)
                raise
            if loaded is None:
                self._buffers.give(buf)
                return
            if not (isinstance(loaded, memoryview) and loaded.obj is buf):
                buf[:len(loaded)] = loaded  # decompressed into bytes of its own
            block = self._buffers.block(buf, len(loaded))
            if flight.ahead:
                self._stats.loads_ahead += 1
            else:
                self._stats.loads += 1
            self._recent.add(key, block)
            flight.buf = block.data
            flight.filled = len(loaded)
            block.release()  # the flight's hold: the chunk is the readers' now
        except Exception as exc:
            self._stats.count_error(exc.kind if isinstance(exc, ModelfsError) else "internal")
            flight.error = exc
            if not isinstance(exc, ModelfsError):
                log.exception("loading chunk %d of %s failed", key[1], key[0])
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._loads.end(key, flight)

    def _start_fetch(self, f: RemoteFile, idx: int, priority: Priority) -> Flight:
        key = (f.entry.content_id, idx)
        flight = self._fetches.get(key)
        if flight is not None:
            assert flight.ticket is not None
            self.scheduler.promote(flight.ticket, priority)
            return flight
        if self._nursery is None:
            raise RuntimeError("ChunkReader.run() is not running")
        _, length = chunk_extent(idx, f.entry.size, self.config.chunk_size)
        flight = self._fetches.add(key, Flight(self.scheduler.ticket(priority, length),
                                               ahead=priority != Priority.DEMAND,
                                               on_progress=self.scheduler.progress))
        self._nursery.start_soon(self._fetch_task, f, idx, flight)
        return flight

    async def _fetch_task(self, f: RemoteFile, idx: int, flight: Flight) -> None:
        with trio.CancelScope() as flight.scope:
            await self._fetch(f, idx, flight)

    async def _fetch(self, f: RemoteFile, idx: int, flight: Flight) -> None:
        """Fetch chunk `idx` from the origin into a charged buffer, keep it for readers
        (unless it is prefetch nobody reads yet), store it, feed the file's check."""
        assert flight.ticket is not None
        cs = self.config.chunk_size
        key = (f.entry.content_id, idx)
        block: Block | None = None
        try:
            start, length = chunk_extent(idx, f.entry.size, cs)
            # A file of one chunk with a known hash (a small Hub file: its git blob id)
            # is checked before any byte of it is served or stored.
            single = length == f.entry.size and f.entry.checkable

            def received(n: int) -> None:
                if n == length and flight.scope is not None:
                    flight.scope.shield = True  # received whole: it is stored (`_store`)
                flight.advance(n)

            await self._share_room(flight)
            async with self.scheduler.slot(flight.ticket):
                # The HTTP client's reads of the body are buffers too.
                # Into a reused page-aligned buffer, written to disk from it as it
                # is (O_DIRECT, no copy).
                buf = await self._buffers.take(RECEIVE_HELD)
                block = self._buffers.block(buf, length)
                data = block.data
                if not single:
                    flight.buf = data
                t0 = trio.current_time()
                self._stats.in_flight += 1
                try:
                    # The fleet's copy, into the chunk's buffer; on a miss, one node
                    # claims the chunk and the others wait for its write
                    # (`SharedTier.read`).
                    hit = flight.shared = self.tier is not None and await self.tier.read(
                        key[0], cs, idx, memoryview(data))
                    if hit:
                        if not single:
                            received(length)
                    else:
                        await f.source.read(f.repo_id, f.commit, f.entry, start, length,
                                            into=data, progress=None if single else received)
                finally:
                    self._stats.in_flight -= 1
                    self.budget.unreserve(RECEIVE_HELD)
                self._stats.observe(trio.current_time() - t0)
            if not hit:
                self._stats.fetches += 1
                self._stats.bytes_fetched += length
            if single:
                await self._checks.check_single(f, data)
                flight.buf = data
                flight.filled = length
            if flight.keep or flight.ticket.priority != Priority.PREFETCH:
                self._recent.add(key, block)  # a reader will want it soon
            if await self._store(f, idx, data, single):
                if not hit:
                    self._share(f, idx)
                if not single:
                    self._checks.stored(f, idx, block)
        except Exception as exc:
            self._stats.fetch_errors += 1
            self._stats.count_error(exc.kind if isinstance(exc, ModelfsError) else "internal")
            if isinstance(exc, RemoteUnavailable):
                self.scheduler.refused()  # the origin pushed back: fewer requests at once
            flight.error = exc
            if not isinstance(exc, ModelfsError):
                log.exception("fetching chunk %d of %s failed", idx, f.name)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._fetches.end(key, flight)
            if block is not None:
                block.release()  # the flight's hold

    async def _share_room(self, flight: Flight) -> None:
        """With a shared tier, a prefetch fetches no faster than it writes to the tier:
        wait while `SHARE_BACKLOG` chunks are queued for it. Other nodes wait for
        the chunks this one claimed, and give up on a claim older than the tier's
        `LEASE_TTL`; a backlog of writes longer than that sends them all to the
        origin for the same chunks (8 nodes warming 1 GiB here: 2.6x the origin
        bytes). Reads (a prefetch a reader joins) never wait for it."""
        assert flight.ticket is not None
        while (self.tier is not None and self.tier.writable
               and flight.ticket.priority == Priority.PREFETCH
               and self._sharing >= SHARE_BACKLOG):
            with trio.move_on_after(SHARE_POLL):  # or promoted meanwhile: look again
                await self._shares_done.wait()

    async def shared_written(self) -> None:
        """Return when no tier write is under way: a prefetch that exits at once would
        cancel the writes other nodes read from."""
        while self._sharing:
            await self._shares_done.wait()

    def _share(self, f: RemoteFile, idx: int) -> None:
        """Queue a chunk fetched from the origin (and stored here) for the shared tier:
        writers read it back from the local cache, so a queued chunk holds no memory
        and its reader never waits. A full queue (a tier slower than the origin)
        skips the chunk: the next node to fetch it writes it."""
        if self.tier is None or not self.tier.writable:
            return
        try:
            self._share_send.send_nowait((f.entry.content_id, idx))
        except trio.WouldBlock:
            self.tier.stats.writes_skipped += 1
            return
        self._sharing += 1

    async def _tier_writer(self, tier: SharedTier) -> None:
        cs = self.config.chunk_size
        async for content_id, idx in self._share_receive:
            try:
                digest = self.cache.lookup(content_id, cs, idx)
                data = None if digest is None else await trio.to_thread.run_sync(
                    self.cache.load, digest, False, None, limiter=self._io)
                if data is not None:
                    await tier.put(content_id, cs, idx, data)
                del data
            except (OSError, ModelfsError) as exc:
                log.warning("could not read chunk %d of %s back for the shared cache (%s)",
                            idx, content_id[:16], exc)
            finally:
                self._sharing -= 1
                done, self._shares_done = self._shares_done, trio.Event()
                done.set()

    async def _store(self, f: RemoteFile, idx: int, data: bytearray | memoryview,
                     single: bool) -> bool:
        """Write a fetched chunk to the cache; False if it stays uncached.

        Shielded, as is the fetch once its last byte is in (`received`): a daemon
        that stops (an unmount cancels everything) still keeps the chunks it has
        fetched, and often already served, so a file read whole before a restart
        is whole in the cache after it. The wait for a store
        thread is bounded by `STORE_WAIT`; the store itself is one file write and
        one index commit."""
        content_id = f.entry.content_id
        try:
            with trio.CancelScope(shield=True) as storing:
                storing.deadline = trio.current_time() + STORE_WAIT
                # A file with a known sha256 is checked whole (`FileChecks`), and a content
                # id of S3, plain HTTP and file:// names one immutable version: their
                # chunks are named by position, which saves hashing each one.
                cs, versioned = self.config.chunk_size, f.entry.versioned
                await run_letting_go(
                    lambda d: self.cache.put(content_id, cs, idx, d, versioned, True),
                    data, limiter=self._io)
                if single:
                    await trio.to_thread.run_sync(self.cache.index.set_checked, content_id)
        except (OSError, ModelfsError) as exc:
            # The bytes are good; only caching them failed (e.g. ENOSPC): serve them.
            self._stats.count_error(getattr(exc, "kind", "cache"))
            log.error("could not store chunk %d of %s (%s); serving it uncached",
                      idx, f.name, exc)
            return False
        if storing.cancelled_caught:
            log.error("could not store chunk %d of %s (no store thread free within %gs); "
                      "serving it uncached", idx, f.name, STORE_WAIT)
            return False
        return True

    async def _refetch(self, f: RemoteFile) -> None:
        for idx in range(chunk_count(f.entry.size, self.config.chunk_size)):
            await self.ensure(f, idx, Priority.PREFETCH)

    def _content_failed(self, f: RemoteFile) -> None:
        """`f` failed its whole-file check: its bytes in memory, what the kernel was
        given and what we remember of that are dropped."""
        cid = f.entry.content_id
        self._recent.drop_content(cid)
        self._files.forget_delivered(cid)
        if self._on_content_dropped:
            self._on_content_dropped(cid)

    def _reclaim(self) -> bool:
        """Release one thing for the budget: a spare load buffer, else the chunks
        held for one file's hash (read back from disk later), else the least
        recently used chunk kept for readers. False when nothing is left."""
        return self._buffers.shed() or self._checks.shed() or self._recent.evict_oldest()

    def _read_ahead(self, f: RemoteFile, offset: int, end: int) -> None:
        """Ahead of a sequential reader: fetch what is not cached (the stream's
        read-ahead window), and load what is cached into memory (up to
        `LOAD_AHEAD` chunks: what it reads next, not what it may read later)."""
        cid = f.entry.content_id
        state = self._files.touch(cid)
        state.last_end = end
        state.wake()
        # Each file being read now gets an equal share of half the memory budget for
        # its read-ahead: one may run far ahead, four at once may not.
        span = state.stream.on_read(offset, end, f.entry.size,
                                    cap=self.budget.limit // (2 * max(1, self._files.active())))
        cs = self.config.chunk_size
        count = chunk_count(f.entry.size, cs)
        if span is not None and cid not in self.planned:
            for idx in range(span[0] // cs, min(count, -(-span[1] // cs))):
                key = (cid, idx)
                if key not in self._fetches and key not in self._recent \
                        and key not in self._loads and self._stored(f, idx) is None:
                    self._start_fetch(f, idx, Priority.READAHEAD)
        ahead = state.stream.ahead()
        if ahead is not None and not state.in_order:
            stop = min(ahead[1], ahead[0] + LOAD_AHEAD * cs)
            for idx in range(ahead[0] // cs, min(count, -(-stop // cs))):
                self.load_ahead(f, idx)
