"""Whole-file integrity: every file whose origin vouches for a hash (the LFS
sha256, or a small Hub file's git blob id) is checked whole as its chunks are
stored, within the memory budget.

- A file of one chunk is checked before any byte of it is served or stored
  (`check_single`).
- A larger one is hashed in file order by one task (`FileHasher`), fed the
  chunks just stored; the chunks it holds for that are blocks charged to the
  budget, and under pressure the reader's reclaim takes them back (`shed`):
  the hash then reads them back from disk, into a load buffer charged too.
- A file that fails its check loses its cached chunks (and the kernel's copy)
  and is fetched again once; failing again, it is bad: every read of it fails
  with `IntegrityError` until a check at a later open (`reopened`) finds the
  origin serving the right bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..cache import ChunkCache, FileHasher
from ..errors import IntegrityError, ModelfsError
from ..threads import run_letting_go
from ..types import RemoteFile
from .memory import Block, LoadBuffers
from .stats import ReaderStats

log = logging.getLogger(__name__)

# Chunks read back from disk at once, beside the one being hashed.
READ_AHEAD = 2


@dataclass(slots=True, eq=False)
class _Check:
    hasher: FileHasher
    wake: trio.Event = field(default_factory=trio.Event)
    held: dict[int, Block] = field(default_factory=dict)  # chunks offered to the hasher
    stepping: bool = False  # a worker thread is hashing (its held chunks are in use)

    def release_hashed(self) -> None:
        for idx in [i for i in self.held if i < self.hasher.position]:
            self.hasher.forget(idx)
            self.held.pop(idx).release()

    def release_all(self) -> None:
        for idx, block in self.held.items():
            self.hasher.forget(idx)
            block.release()
        self.held.clear()


class FileChecks:
    def __init__(self, cache: ChunkCache, chunk_size: int, buffers: LoadBuffers,
                 io: trio.CapacityLimiter, stats: ReaderStats, *,
                 spawn: Callable[..., None], refetch: Callable[[RemoteFile], Awaitable[None]],
                 on_failed: Callable[[RemoteFile], None]) -> None:
        self._cache = cache
        self._cs = chunk_size
        self._buffers = buffers
        self._io = io
        self._stats = stats
        self._spawn = spawn
        self._refetch = refetch  # fetch every chunk of a file again
        self._on_failed = on_failed  # its bytes in memory and the kernel's are dropped
        self._checks: dict[str, _Check] = {}  # files being hashed, by content id
        self._mismatched: set[str] = set()  # failed once: refetched
        # Files whose bytes failed their check after a refetch: content id -> the
        # error every read of them gets.
        self._bad: dict[str, str] = {}
        self._rechecking: set[str] = set()
        self._recheck_again: set[str] = set()

    def bad(self, content_id: str) -> str | None:
        return self._bad.get(content_id)

    @property
    def held_bytes(self) -> int:
        return sum(b.nbytes for c in self._checks.values() for b in c.held.values())

    async def check_single(self, f: RemoteFile, data: bytearray | memoryview) -> None:
        """`data` is the whole of the one-chunk file `f`: raise unless it hashes to
        what the origin vouches for."""
        known = f.entry.whole_hash()
        if known is None:
            return
        hasher, expected, kind = known
        await run_letting_go(hasher.update, data, limiter=self._io)
        if (digest := hasher.hexdigest()) != expected:
            self._mark_bad(f, digest, expected, kind)
            raise IntegrityError(self._bad[f.entry.content_id])
        if self._bad.pop(f.entry.content_id, None) is not None:
            log.info("%s: the origin serves the right bytes again", f.name)

    def stored(self, f: RemoteFile, idx: int, block: Block) -> None:
        """Chunk `idx` of `f` was stored: feed the file's whole-file check."""
        cid = f.entry.content_id
        if not f.entry.checkable:
            return
        check = self._checks.get(cid)
        if check is None:
            if self._cache.index.is_checked(cid):
                return
            check = self._checks[cid] = _Check(FileHasher(self._cache, f.entry, self._cs))
            self._spawn(self._hash_task, f, check)
        if check.hasher.wants(idx) and not check.stepping:
            check.hasher.offer(idx, block.data)
            check.held[idx] = block.retain()
        check.wake.set()

    def shed(self) -> bool:
        """Let the chunks held for one file's hash go (it reads them back from
        disk); False when none are held outside a running step."""
        for check in self._checks.values():
            if check.held and not check.stepping:
                check.release_all()
                return True
        return False

    async def _hash_task(self, f: RemoteFile, check: _Check) -> None:
        """One per file being checked: hash on (in a worker thread) whenever a chunk
        was stored, until the whole file is hashed."""
        cid = f.entry.content_id
        try:
            while True:
                await check.wake.wait()
                check.wake = trio.Event()
                buf = await self._buffers.take()
                # Buffers to read the next chunks back into while one is hashed, if
                # spare ones are free now (see `FileHasher.step`).
                ahead = [b for b in (self._buffers.try_take() for _ in range(READ_AHEAD)) if b]
                check.stepping = True
                try:
                    verdict = await run_letting_go(lambda bufs: check.hasher.step(*bufs),
                                                   [buf, *ahead], limiter=self._io)
                finally:
                    check.stepping = False
                    for b in (buf, *ahead):
                        self._buffers.give(b)
                    del buf, ahead, b  # held here while waiting, they could not be reused
                    check.release_hashed()
                if verdict is not None:
                    break
        finally:
            check.release_all()
            if self._checks.get(cid) is check:
                del self._checks[cid]
        self._file_checked(f, verdict, check.hasher)

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
        self._on_failed(f)
        if again:
            return  # reads fetch what they need; no refetch loop against a bad origin
        self._mismatched.add(cid)
        self._spawn(self._refetch, f)

    def reopened(self, f: RemoteFile) -> None:
        """`f` was opened: if its bytes were found bad, check again (in the background)
        whether the origin now serves the right ones; reads fail until it does."""
        cid = f.entry.content_id
        if cid not in self._bad:
            return
        if f.entry.size <= self._cs:
            del self._bad[cid]  # one chunk: its next fetch is checked before it is served
            return
        if cid in self._rechecking:
            self._recheck_again.add(cid)  # opened during a check: check once more after it
            return
        self._rechecking.add(cid)
        self._spawn(self._recheck, f)

    async def _recheck(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        try:
            await trio.to_thread.run_sync(self._cache.drop_content, cid)
            await self._refetch(f)  # its whole-file check ends the recheck (`_file_checked`)
        except ModelfsError as exc:
            log.warning("%s: checking again whether the origin serves good bytes failed: %s",
                        f.name, exc)
            self._rechecking.discard(cid)
