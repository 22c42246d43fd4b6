"""Serve byte ranges of remote files from the chunk cache, fetching what is missing.

This is where the cache and the sources meet. A read maps to fixed chunks;
a cached chunk is read from its file, a missing one is fetched whole with one
ranged GET, stored (temp file + rename), indexed, and served.

Single flight: every fetch is registered in `_inflight` before its first
checkpoint and runs in the reader's own nursery, so concurrent readers of one
missing chunk wait on the same fetch (one origin request), and a reader that
goes away does not cancel the fetch others wait for.

Read-ahead (kept minimal here): when a file is read sequentially, the next
`readahead_chunks` chunks are fetched in the background.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from ..cache import ChunkStore, Index
from ..errors import ModelfsError
from ..remote import Source
from ..types import FileEntry
from .chunks import Piece, chunk_count, chunk_extent, pieces

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """`chunk_size` is the unit of caching and of a single fetch; `max_fetches`
    bounds concurrent origin requests (and so memory in flight:
    max_fetches * chunk_size); `readahead_chunks` is how far a sequential
    reader is fetched ahead; `recent_bytes` bounds the just-fetched chunks kept
    in memory, from which reads are answered without a copy or a syscall."""

    chunk_size: int = 4 << 20
    max_fetches: int = 16
    readahead_chunks: int = 8
    io_threads: int = 8
    recent_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One version of one file: what a FUSE file handle reads."""

    source: Source
    repo_id: str
    commit: str
    entry: FileEntry

    @property
    def name(self) -> str:
        return f"{self.repo_id}/{self.entry.path}"


@dataclass(slots=True)
class ReaderStats:
    hits: int = 0
    misses: int = 0
    fetches: int = 0
    fetch_errors: int = 0
    bytes_fetched: int = 0


@dataclass(slots=True)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Stream:
    next_offset: int
    ahead_until: int = 0  # chunks below this index were already asked for


_SEQ_TOLERANCE = 1 << 20  # small forward/backward jumps still count as sequential


class ChunkReader:
    def __init__(self, index: Index, store: ChunkStore, config: FetchConfig) -> None:
        self._index = index
        self._store = store
        self.config = config
        self._inflight: dict[tuple[str, int], _Flight] = {}
        self._streams: dict[str, _Stream] = {}
        self._recent: OrderedDict[tuple[str, int], bytearray] = OrderedDict()
        self._recent_size = 0
        self._fetch_slots = trio.Semaphore(config.max_fetches)
        self._io = trio.CapacityLimiter(config.io_threads)
        self._nursery: trio.Nursery | None = None
        self._stats = ReaderStats()

    def statistics(self) -> ReaderStats:
        s = self._stats
        return ReaderStats(s.hits, s.misses, s.fetches, s.fetch_errors, s.bytes_fetched)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that fetches run in; returns only when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def read(self, f: RemoteFile, offset: int, size: int) -> bytes | memoryview:
        """Bytes [offset, offset+size) of `f`, clipped at its end.

        A read within one chunk that was just fetched is a memoryview of it (no copy).
        """
        cs = self.config.chunk_size
        parts = pieces(offset, size, f.entry.size, cs)
        if not parts:
            return b""
        self._read_ahead(f, offset, offset + size, parts[-1].index)
        try:
            out = [await self._read_piece(f, p) for p in parts]
        except ModelfsError as exc:
            log.error("read of %s at offset %d (%d bytes) failed: %s", f.name, offset, size, exc)
            raise
        return out[0] if len(out) == 1 else b"".join(out)

    async def _read_piece(self, f: RemoteFile, p: Piece) -> bytes | memoryview:
        cid, cs = f.entry.content_id, self.config.chunk_size
        recent = self._recent.get((cid, p.index))
        if recent is not None:
            self._recent.move_to_end((cid, p.index))
            self._stats.hits += 1
            return memoryview(recent)[p.start:p.end]
        digest = self._index.get_chunk(cid, cs, p.index)
        if digest is not None:
            data = self._store.read(digest, p.start, p.end - p.start)
            if data is not None and len(data) == p.end - p.start:
                self._stats.hits += 1
                return data
            log.warning("chunk %d of %s missing or short on disk; fetching again", p.index, f.name)
            self._index.drop_chunk(cid, cs, p.index)
        self._stats.misses += 1
        data = await self._fetch(f, p.index)
        return memoryview(data)[p.start:p.end]

    async def _fetch(self, f: RemoteFile, idx: int) -> bytearray:
        """The whole chunk `idx`, sharing any fetch already in flight."""
        while True:
            flight = self._start(f, idx)
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if isinstance(flight.error, Exception):
                raise flight.error
            # The fetch was cancelled (shutdown): try again, or be cancelled ourselves.
            await trio.lowlevel.checkpoint()

    def _start(self, f: RemoteFile, idx: int) -> _Flight:
        key = (f.entry.content_id, idx)
        flight = self._inflight.get(key)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("ChunkReader.run() is not running")
            flight = self._inflight[key] = _Flight()
            self._nursery.start_soon(self._fetch_task, f, idx, flight)
        return flight

    async def _fetch_task(self, f: RemoteFile, idx: int, flight: _Flight) -> None:
        cs = self.config.chunk_size
        try:
            start, length = chunk_extent(idx, f.entry.size, cs)
            async with self._fetch_slots:
                data = await f.source.read(f.repo_id, f.commit, f.entry, start, length)
            self._stats.fetches += 1
            self._stats.bytes_fetched += len(data)
            digest = await trio.to_thread.run_sync(self._store.put, data, limiter=self._io)
            self._index.put_chunk(f.entry.content_id, cs, idx, digest, len(data), len(data))
            self._remember(f.entry.content_id, idx, data)
            flight.data = data
        except Exception as exc:
            self._stats.fetch_errors += 1
            flight.error = exc
            if not isinstance(exc, ModelfsError):
                log.exception("fetching chunk %d of %s failed", idx, f.name)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[(f.entry.content_id, idx)]
            flight.done.set()

    def _remember(self, cid: str, idx: int, data: bytearray) -> None:
        """Keep a just-fetched chunk in memory, evicting the oldest beyond `recent_bytes`."""
        budget = self.config.recent_bytes
        if len(data) > budget:
            return
        self._recent[(cid, idx)] = data
        self._recent_size += len(data)
        while self._recent_size > budget:
            _, old = self._recent.popitem(last=False)
            self._recent_size -= len(old)

    def _read_ahead(self, f: RemoteFile, offset: int, end: int, last_index: int) -> None:
        """Start background fetches ahead of a sequential reader.

        Streams are tracked per file version (not per handle), so readers that
        share a descriptor still look sequential. A read counts as sequential
        when it starts within `_SEQ_TOLERANCE` of where the previous one ended;
        a first read never triggers read-ahead, so a lone small read fetches
        only the chunk it touches.
        """
        n = self.config.readahead_chunks
        cid = f.entry.content_id
        st = self._streams.get(cid)
        if st is None:
            st = self._streams[cid] = _Stream(next_offset=end)
            return
        sequential = abs(offset - st.next_offset) <= _SEQ_TOLERANCE
        st.next_offset = max(end, st.next_offset) if sequential else end
        if not sequential or n <= 0:
            st.ahead_until = 0
            return
        total = chunk_count(f.entry.size, self.config.chunk_size)
        first = max(last_index + 1, st.ahead_until)
        stop = min(total, last_index + 1 + n)
        for idx in range(first, stop):
            if (cid, idx) not in self._inflight and self._index.get_chunk(
                    cid, self.config.chunk_size, idx) is None:
                self._start(f, idx)
        st.ahead_until = max(st.ahead_until, stop)
