"""Serve byte ranges of remote files from the chunk cache, fetching what is missing.

This is where the cache and the sources meet. A read maps to fixed chunks and
is answered from chunks in memory (`_recent`, a view: no copy before the FUSE
reply). A missing chunk is fetched whole with one ranged GET, stored (temp file
+ rename) and indexed in a worker thread, and kept in memory for a while.

Chunk lifecycle: missing -> fetching (a `_Flight` in `_inflight`) -> stored
(a file under `chunks/` and an index entry; for a while also in `_recent`).
A stored chunk that is not in memory is loaded by a flight too: read whole with
O_DIRECT in a worker thread and checked against its checksum
(`ChunkCache.load`), fetched again if it is damaged. So the event loop never
waits on the disk, and a chunk file never goes through the page cache (its
bytes are on their way to the mount's page cache: a second copy would cost a
copy and memory).

- Loads run ahead of readers (`load_ahead`): within `LOAD_AHEAD` chunks of a
  sequential stream here, and in loader order by the on-open prefetch
  (`prefetch.follow_reader`), so a warm reader rarely waits on the disk.
- Load buffers are reused: a loaded chunk evicted from `_recent` gives its
  buffer back once no view of it is alive (`_take_buffer`). Fresh memory is
  what costs on a VM that hands freed pages back to its host.

- Single flight: a fetch is registered in `_inflight` before the first
  checkpoint and runs in the reader's own nursery, so concurrent readers of one
  missing chunk share one origin request, and a reader that goes away does not
  cancel a fetch others wait for.
- Every fetch goes through the `FetchScheduler` with a priority: a demand read
  (DEMAND) beats a sequential stream's read-ahead (READAHEAD) beats whole-file
  prefetch (PREFETCH); a demand reader that joins a queued fetch promotes it.
- Read-ahead follows streams per file version (`readahead.StreamTracker`).
"""

from __future__ import annotations

import logging
import mmap
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import trio

from ..cache import ChunkCache, FileHasher
from ..cache.store import direct_buffer
from ..chunks import Piece, chunk_count, chunk_extent, pieces
from ..errors import IntegrityError, ModelfsError, RemoteStale, RemoteUnavailable
from ..types import RemoteFile
from .readahead import ReadAheadConfig, StreamTracker
from .scheduler import FetchScheduler, Priority, SchedulerConfig, Ticket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """`chunk_size` is the unit of caching and of one origin request;
    `recent_bytes` bounds the chunks kept in memory (just fetched, or loaded
    from disk), from which every read is answered without a copy or a syscall;
    `io_threads` bounds the threads that hash, store and load chunks;
    `read_deadline` is the longest a read waits for the origin before it fails
    with EIO (the origin's own deadlines are the HTTP client's)."""

    chunk_size: int = 4 << 20
    io_threads: int = 8
    read_deadline: float = 60.0
    recent_bytes: int = 128 << 20
    readahead: ReadAheadConfig = field(default_factory=ReadAheadConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# Cached chunks loaded into memory ahead of a sequential reader (32 MiB at 4 MiB
# chunks): enough to keep the disk busy, well within `recent_bytes`.
LOAD_AHEAD = 8
# Load buffers kept for reuse beyond those of the chunks in `_recent`.
SPARE_BUFFERS = 8
# Files whose chunks delivered whole to the kernel are remembered (most recent).
DELIVERED_FILES = 1024

# Upper bounds (seconds) of the fetch-latency histogram's buckets; the last is +Inf.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


@dataclass(slots=True)
class ReaderStats:
    """Counters since start, plain data: the control plane turns them into metrics."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    fetch_errors: int = 0
    bytes_fetched: int = 0
    loads: int = 0  # cached chunks a read found neither in memory nor being loaded
    loads_ahead: int = 0  # cached chunks loaded into memory ahead of their reader
    bytes_served: int = 0
    in_flight: int = 0  # chunk fetches holding an origin request now
    errors: dict[str, int] = field(default_factory=dict)  # by `ModelfsError.kind`
    # Chunk fetch latency, slot granted to last byte: counts per LATENCY_BUCKETS, and the sum.
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_counts[next(i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b)] += 1


@dataclass(slots=True, eq=False)
class _Flight:
    """A chunk being fetched. `buf` exists once the fetch holds a slot; its first
    `filled` bytes have arrived (from a validated response) and may be served
    before the rest: a reader waits only for the bytes it asked for. Once `done`,
    `buf` is the whole chunk unless `error` is set."""

    ticket: Ticket
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    buf: bytes | bytearray | None = None
    filled: int = 0
    error: BaseException | None = None
    keep: bool = False  # hold the bytes in `_recent` even at PREFETCH priority
    ahead: bool = False  # started ahead of a reader (not by a demand read)
    waiters: int = 0  # tasks waiting for it now
    scope: trio.CancelScope | None = None  # the fetch task's, to stop an abandoned fetch
    on_progress: Callable[[Ticket], None] | None = None

    def advance(self, filled: int) -> None:
        self.filled = filled
        if self.on_progress is not None:
            self.on_progress(self.ticket)
        changed, self.changed = self.changed, trio.Event()
        changed.set()


class ChunkReader:
    def __init__(self, cache: ChunkCache, config: FetchConfig) -> None:
        self.cache = cache
        self.config = config
        self.scheduler = FetchScheduler(config.scheduler)
        self._inflight: dict[tuple[str, int], _Flight] = {}
        self._streams: dict[str, StreamTracker] = {}
        self._recent: OrderedDict[tuple[str, int], bytes | bytearray | memoryview] = \
            OrderedDict()
        self._served: dict[tuple[str, int], int] = {}  # bytes served of chunks in `_recent`
        # Per content id, chunks whose every byte went to the kernel (its page cache
        # has them): not worth loading ahead again. Bounded by files; a read still
        # loads whatever it asks for.
        self._delivered: OrderedDict[str, set[int]] = OrderedDict()
        # Whole-file sha256 in progress, per file version with a known sha256: the
        # hasher, and the event its task waits on for the next stored chunk.
        self._hashers: dict[str, tuple[FileHasher, trio.Event]] = {}
        self._mismatched: set[str] = set()
        # File versions whose bytes failed their whole-file check after a refetch:
        # content id -> the error every read of them gets, until a check at a later
        # open (`reopened`) finds the origin serving the right bytes.
        self._bad: dict[str, str] = {}
        self._rechecking: set[str] = set()
        self._recheck_again: set[str] = set()
        self._spare: list[mmap.mmap] = []  # load buffers evicted from `_recent`
        self._moved: dict[str, trio.Event] = {}  # per content id: set at its next read
        self._in_order: set[str] = set()  # content ids whose loads ahead follow_reader does
        self._last_end: dict[str, int] = {}  # per content id: where its latest read ended
        # Told when a file version's cached bytes were found bad and dropped, so the
        # mount can drop the kernel's copy of them too.
        self.on_content_dropped: Callable[[str], None] | None = None
        # Told when the origin serves another version than the one being read, so the
        # mount re-resolves now rather than at its next scheduled check.
        self.on_stale: Callable[[], None] | None = None
        self._recent_size = 0
        self._io = trio.CapacityLimiter(config.io_threads)
        self._nursery: trio.Nursery | None = None
        self._stats = ReaderStats()

    def statistics(self) -> ReaderStats:
        s = self._stats
        return replace(s, errors=dict(s.errors), latency_counts=list(s.latency_counts))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that fetches (and background jobs) run in; returns when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.scheduler.run)
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

        A read within one chunk that was just fetched is a memoryview of it (no copy).
        """
        parts = pieces(offset, size, f.entry.size, self.config.chunk_size)
        if not parts:
            return b""
        if (bad := self._bad.get(f.entry.content_id)) is not None:
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
            if isinstance(exc, RemoteStale) and self.on_stale:
                self.on_stale()
            raise
        self._stats.bytes_served += sum(map(len, out))
        return out[0] if len(out) == 1 else b"".join(out)

    async def _read_piece(self, f: RemoteFile, p: Piece) -> bytes | memoryview:
        key = (f.entry.content_id, p.index)
        recent = self._recent.get(key)
        if recent is not None:
            self._recent.move_to_end(key)
            self._stats.hits += 1
            view = _view(recent, p.start, p.end)
            self._served_from_memory(key, len(view), len(recent))
            return view
        if p.index in self._delivered.get(key[0], ()):
            # The kernel dropped pages it had (memory pressure, a reread after a cache
            # drop): what else it had of this file may be gone too; load ahead again.
            del self._delivered[key[0]]
        if self.is_cached(f, p.index):
            self._stats.hits += 1  # on disk: loaded (and checked) in a worker thread
        else:
            self._stats.misses += 1
        data = await self._wait(f, p.index, Priority.DEMAND, need=p.end)
        view = _view(data, p.start, p.end)
        if key in self._recent:
            self._served_from_memory(key, len(view), len(data))
        return view

    def reopened(self, f: RemoteFile) -> None:
        """`f` was opened: if its bytes were found bad, check again (in the background)
        whether the origin now serves the right ones; reads fail until it does."""
        cid = f.entry.content_id
        if cid not in self._bad or self._nursery is None:
            return
        if f.entry.size <= self.config.chunk_size:
            del self._bad[cid]  # one chunk: its next fetch is checked before it is served
            return
        if cid in self._rechecking:
            self._recheck_again.add(cid)  # opened during a check: check once more after it
            return
        self._rechecking.add(cid)
        self.spawn(self._recheck, f)

    async def _recheck(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        try:
            await trio.to_thread.run_sync(self.cache.drop_content, cid)
            await self._refetch(f)  # its whole-file check ends the recheck (`_file_checked`)
        except ModelfsError as exc:
            log.warning("%s: checking again whether the origin serves good bytes failed: %s",
                        f.name, exc)
            self._rechecking.discard(cid)

    def _served_from_memory(self, key: tuple[str, int], n: int, size: int) -> None:
        """Count bytes served of a chunk in memory. Once every byte has been served,
        the mount's page cache holds them (`keep_cache`): the chunk is dropped, so
        its memory (a load buffer) goes to chunks ahead of readers rather than
        fresh memory being taken for them. A range read twice only makes this
        early; a later read loads the chunk again."""
        served = self._served.get(key, 0) + n
        if served < size:
            self._served[key] = served
            return
        self._served.pop(key, None)
        delivered = self._delivered.get(key[0])
        if delivered is None:
            delivered = self._delivered[key[0]] = set()
            if len(self._delivered) > DELIVERED_FILES:
                self._delivered.popitem(last=False)
        self._delivered.move_to_end(key[0])
        delivered.add(key[1])
        data = self._recent.pop(key, None)
        if data is not None:
            self._recent_size -= len(data)
            self._give_buffer(data)

    # Fetching -----------------------------------------------------------------------

    async def cached_chunks(self, f: RemoteFile) -> set[int]:
        """Indices of the chunks of `f` that are cached (on disk or in memory): one index
        scan in a worker thread, costing what is cached, not the file's size."""
        cid = f.entry.content_id
        found = await trio.to_thread.run_sync(self.cache.index.file_chunks, cid,
                                              self.config.chunk_size, limiter=self._io)
        return set(found) | {idx for c, idx in self._recent if c == cid}

    def is_cached(self, f: RemoteFile, idx: int) -> bool:
        return (f.entry.content_id, idx) in self._recent or self.cache.lookup(
            f.entry.content_id, self.config.chunk_size, idx) is not None

    async def ensure(self, f: RemoteFile, idx: int, priority: Priority,
                     keep: bool = False) -> int:
        """Make chunk `idx` cached; return the bytes fetched for it: 0 if it was cached,
        or if someone else's fetch of it was already under way (it is theirs to count).
        `keep`: a reader has the file open, so hold the fetched bytes in memory too
        (it will read them soon; reading them back from disk would cost a copy)."""
        if self.is_cached(f, idx):
            return 0
        joined = (f.entry.content_id, idx) in self._inflight
        data = await self._wait(f, idx, priority, keep=keep)
        return 0 if joined else len(data)

    def follow_order(self, f: RemoteFile, on: bool) -> None:
        """Whether the reader of `f` follows an order other than offsets (tensors by
        name), whose follower loads ahead for it: then sequential streams within
        it do not load ahead in offset order (what they would load is the next
        tensor on disk, not the next one read)."""
        if on:
            self._in_order.add(f.entry.content_id)
        else:
            self._in_order.discard(f.entry.content_id)

    def load_ahead(self, f: RemoteFile, idx: int) -> None:
        """Start loading chunk `idx` of `f` into memory for a reader that will want it
        soon, if it is cached on disk and not in memory or on its way already
        (fetching what is not cached is the prefetch's and read-ahead's business)."""
        key = (f.entry.content_id, idx)
        if key in self._recent or key in self._inflight \
                or idx in self._delivered.get(key[0], ()) or self._nursery is None:
            return
        if self.cache.lookup(f.entry.content_id, self.config.chunk_size, idx) is not None:
            self._start(f, idx, Priority.READAHEAD)

    def position(self, f: RemoteFile) -> int | None:
        """Where the file's most recent reader is, to prefetch in an order that follows it."""
        t = self._streams.get(f.entry.content_id)
        return t.position() if t else None

    def last_read_end(self, f: RemoteFile) -> int | None:
        """Where the latest read of `f` ended (unlike `position`, also after a jump
        back within a stream)."""
        return self._last_end.get(f.entry.content_id)

    async def reader_moved(self, f: RemoteFile) -> None:
        """Return at the next read of `f` (by anyone)."""
        cid = f.entry.content_id
        event = self._moved.get(cid)
        if event is None:
            event = self._moved[cid] = trio.Event()
        await event.wait()

    async def _wait(self, f: RemoteFile, idx: int, priority: Priority,
                    need: int | None = None, keep: bool = False) -> bytes | bytearray:
        """Chunk `idx`, sharing any fetch already in flight: the whole chunk, or with
        `need`, as soon as its first `need` bytes have arrived."""
        while True:
            flight = self._start(f, idx, priority)
            flight.keep = flight.keep or keep
            flight.waiters += 1
            try:
                while not flight.done.is_set():
                    if need is not None and flight.buf is not None and flight.filled >= need:
                        return flight.buf
                    await flight.changed.wait()
            except BaseException:
                if flight.waiters == 1 and flight.scope and not (flight.keep or flight.ahead):
                    # Every reader of a demand fetch went away (a signal, its
                    # deadline): stop it rather than hold the origin for nobody.
                    flight.scope.cancel()
                raise
            finally:
                flight.waiters -= 1
            if flight.error is None and flight.buf is not None:
                return flight.buf
            if isinstance(flight.error, Exception):
                raise flight.error
            # The fetch was cancelled (shutdown): try again, or be cancelled ourselves.
            await trio.lowlevel.checkpoint()

    def _start(self, f: RemoteFile, idx: int, priority: Priority) -> _Flight:
        key = (f.entry.content_id, idx)
        flight = self._inflight.get(key)
        if flight is not None:
            self.scheduler.promote(flight.ticket, priority)
            return flight
        if self._nursery is None:
            raise RuntimeError("ChunkReader.run() is not running")
        _, length = chunk_extent(idx, f.entry.size, self.config.chunk_size)
        flight = self._inflight[key] = _Flight(self.scheduler.ticket(priority, length),
                                               ahead=priority != Priority.DEMAND,
                                               on_progress=self.scheduler.progress)
        self._nursery.start_soon(self._fetch_task, f, idx, flight)
        return flight

    async def _fetch_task(self, f: RemoteFile, idx: int, flight: _Flight) -> None:
        with trio.CancelScope() as flight.scope:
            await self._fetch(f, idx, flight)

    async def _fetch(self, f: RemoteFile, idx: int, flight: _Flight) -> None:
        cs = self.config.chunk_size
        cid = f.entry.content_id
        try:
            digest = self.cache.lookup(cid, cs, idx)
            if digest is not None:
                buf = self._take_buffer()
                loaded = await trio.to_thread.run_sync(self.cache.load, digest, False, buf,
                                                       limiter=self._io)
                if not (isinstance(loaded, memoryview) and loaded.obj is buf):
                    self._give_buffer(buf)  # damaged, gone, or compressed: not used
                if loaded is not None:
                    if flight.ahead:
                        self._stats.loads_ahead += 1
                    else:
                        self._stats.loads += 1
                    flight.buf = loaded
                    flight.filled = len(loaded)
                    self._remember(cid, idx, loaded)
                    return
            start, length = chunk_extent(idx, f.entry.size, cs)
            # A file of one chunk with a known hash (a small Hub file: its git blob id)
            # is checked before any byte of it is served or stored.
            whole = f.entry.whole_hash() if length == f.entry.size else None
            async with self.scheduler.slot(flight.ticket):
                data = bytearray(length)
                if whole is None:
                    flight.buf = data
                t0 = trio.current_time()
                self._stats.in_flight += 1
                try:
                    await f.source.read(f.repo_id, f.commit, f.entry, start, length, into=data,
                                        progress=flight.advance if whole is None else None)
                finally:
                    self._stats.in_flight -= 1
                self._stats.observe(trio.current_time() - t0)
            self._stats.fetches += 1
            self._stats.bytes_fetched += len(data)
            if whole is not None:
                hasher, expected, kind = whole
                await trio.to_thread.run_sync(hasher.update, data, limiter=self._io)
                if (digest := hasher.hexdigest()) != expected:
                    self._mark_bad(f, digest, expected, kind)
                    raise IntegrityError(self._bad[cid])
                if self._bad.pop(cid, None) is not None:
                    log.info("%s: the origin serves the right bytes again", f.name)
                flight.buf = data
                flight.filled = length
            if flight.keep or flight.ticket.priority != Priority.PREFETCH:
                self._remember(cid, idx, data)  # a reader will want it soon
            try:
                # A file with a known sha256 is checked whole (`_hash_on`): its chunks
                # are named by position, which saves hashing each one.
                await trio.to_thread.run_sync(self.cache.put, cid, cs, idx, data,
                                              f.entry.sha256 is not None, limiter=self._io)
                if whole is not None:
                    await trio.to_thread.run_sync(self.cache.index.set_checked, cid)
            except (OSError, ModelfsError) as exc:
                # The bytes are good; only caching them failed (e.g. ENOSPC): serve them.
                self._stats.count_error(getattr(exc, "kind", "cache"))
                log.error("could not store chunk %d of %s (%s); serving it uncached",
                          idx, f.name, exc)
            else:
                self._hash_on(f, idx, data)
        except Exception as exc:
            self._stats.fetch_errors += 1
            self._stats.count_error(exc.kind if isinstance(exc, ModelfsError) else "internal")
            flight.error = exc
            if not isinstance(exc, ModelfsError):
                log.exception("fetching chunk %d of %s failed", idx, f.name)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[(cid, idx)]
            flight.done.set()
            flight.changed.set()

    def _hash_on(self, f: RemoteFile, idx: int, data: bytearray) -> None:
        """A chunk of `f` was stored: feed the file's whole-file check."""
        cid = f.entry.content_id
        if not f.entry.checkable:
            return
        state = self._hashers.get(cid)
        if state is None:
            if self.cache.index.is_checked(cid):
                return
            state = self._hashers[cid] = (
                FileHasher(self.cache, f.entry, self.config.chunk_size), trio.Event())
            self.spawn(self._hash_task, f)
        hasher, wake = state
        hasher.offer(idx, data)
        wake.set()

    async def _hash_task(self, f: RemoteFile) -> None:
        """One per file being checked: hash on (in a worker thread) whenever a chunk
        was stored, until the whole file is hashed."""
        cid = f.entry.content_id
        while True:
            hasher, wake = self._hashers[cid]
            await wake.wait()
            self._hashers[cid] = (hasher, trio.Event())
            verdict = await trio.to_thread.run_sync(hasher.step, limiter=self._io)
            if verdict is not None:
                del self._hashers[cid]
                self._file_checked(f, verdict, hasher)
                return

    def _mark_bad(self, f: RemoteFile, digest: str, expected: str, kind: str) -> None:
        self._stats.count_error("integrity")
        self._bad[f.entry.content_id] = (
            f"repo {f.repo_id}: {f.entry.path}: its bytes hash to {digest}, not to the "
            f"{kind} {expected} of the listing; not served until the origin sends the right "
            "bytes (checked again at the next open)")
        log.error("INTEGRITY: %s", self._bad[f.entry.content_id])

    def _file_checked(self, f: RemoteFile, ok: bool, hasher: FileHasher) -> None:
        cid = f.entry.content_id
        self._rechecking.discard(cid)
        if not ok and cid in self._bad and cid in self._recheck_again:
            self._recheck_again.discard(cid)
            self.reopened(f)  # opened again while this check ran: check once more
        if ok:
            log.info("%s: whole file cached, %s verified", f.name, hasher.kind)
            self._mismatched.discard(cid)
            if self._bad.pop(cid, None) is not None:
                log.info("%s: the origin serves the right bytes again", f.name)
            return
        again = cid in self._mismatched
        if again:
            self._mark_bad(f, hasher.digest or "?", hasher.expected, hasher.kind)
        else:
            self._stats.count_error("integrity")
            log.error("INTEGRITY: %s hashes to %s, not to its %s %s; dropped its cached "
                      "chunks, fetching it again", f.name, hasher.digest, hasher.kind,
                      hasher.expected)
        for key in [k for k in self._recent if k[0] == cid]:
            self._recent_size -= len(self._recent.pop(key))
            self._served.pop(key, None)
        self._delivered.pop(cid, None)
        if self.on_content_dropped:
            self.on_content_dropped(cid)
        if again:
            return  # reads fetch what they need; no refetch loop against a bad origin
        self._mismatched.add(cid)
        self.spawn(self._refetch, f)

    async def _refetch(self, f: RemoteFile) -> None:
        for idx in range(chunk_count(f.entry.size, self.config.chunk_size)):
            await self.ensure(f, idx, Priority.PREFETCH)

    def _remember(self, cid: str, idx: int, data: bytes | bytearray | memoryview) -> None:
        """Keep a just-fetched chunk in memory, evicting the oldest beyond `recent_bytes`."""
        budget = self.config.recent_bytes
        if len(data) > budget:
            return
        self._recent[(cid, idx)] = data
        self._recent_size += len(data)
        while self._recent_size > budget:
            old_key, old = self._recent.popitem(last=False)
            self._recent_size -= len(old)
            self._served.pop(old_key, None)
            self._give_buffer(old)

    def _give_buffer(self, data: object) -> None:
        """Keep a load buffer (or the buffer under a loaded chunk's view) for reuse."""
        buf = data.obj if isinstance(data, memoryview) else data
        if isinstance(buf, mmap.mmap) and len(self._spare) < SPARE_BUFFERS:
            self._spare.append(buf)

    def _take_buffer(self) -> mmap.mmap:
        """A buffer to load a chunk into: a spare one whose bytes nobody still reads,
        or a new one. Every view handed out is made from the buffer itself
        (`_view`), so it holds a reference to it (CPython): a spare referred to
        from anywhere but here may still be read (a reply being assembled, a
        waiter not yet run) and is dropped rather than overwritten."""
        while self._spare:
            buf = self._spare.pop()
            if sys.getrefcount(buf) == 2 and len(buf) > self.config.chunk_size:
                return buf  # referred to only by `buf` and getrefcount's argument
        return direct_buffer(self.config.chunk_size + 1)  # +1: a longer file shows

    def _read_ahead(self, f: RemoteFile, offset: int, end: int) -> None:
        """Ahead of a sequential reader: fetch what is not cached (the stream's
        read-ahead window), and load what is cached into memory (up to
        `LOAD_AHEAD` chunks: what it reads next, not what it may read later)."""
        cid = f.entry.content_id
        self._last_end[cid] = end
        moved = self._moved.pop(cid, None)
        if moved is not None:
            moved.set()
        tracker = self._streams.get(cid)
        if tracker is None:
            tracker = self._streams[cid] = StreamTracker(self.config.readahead)
        span = tracker.on_read(offset, end, f.entry.size)
        cs = self.config.chunk_size
        count = chunk_count(f.entry.size, cs)
        if span is not None:
            for idx in range(span[0] // cs, min(count, -(-span[1] // cs))):
                if (cid, idx) not in self._inflight and (cid, idx) not in self._recent \
                        and self.cache.lookup(cid, cs, idx) is None:
                    self._start(f, idx, Priority.READAHEAD)
        ahead = tracker.ahead()
        if ahead is not None and cid not in self._in_order:
            stop = min(ahead[1], ahead[0] + LOAD_AHEAD * cs)
            for idx in range(ahead[0] // cs, min(count, -(-stop // cs))):
                self.load_ahead(f, idx)


def _view(data: bytes | bytearray | memoryview, start: int, end: int) -> memoryview:
    """Bytes [start, end) of a chunk. A loaded chunk's view is made from its buffer
    itself, so that it holds a reference to the buffer (see `_take_buffer`)."""
    if isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
        return memoryview(data.obj)[start:end]
    return memoryview(data)[start:end]
