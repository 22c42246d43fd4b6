"""Whole-file prefetch: in the background on open, or for `modelfs prefetch`.

Chunks are fetched `per_file` at a time at PREFETCH priority (demand reads and
read-ahead go first), in an order that follows the file's reader: the next
missing chunk at or after where it reads now, then the rest. What is already
cached costs nothing, so a rerun fetches only what is missing.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import ModelfsError
from .chunks import chunk_count
from .reader import ChunkReader, RemoteFile
from .scheduler import Priority

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """`on_open`: basename patterns of files prefetched whole when opened (empty:
    never); `per_file`: concurrent chunk fetches for one file; `start_delay`: how
    long an on-open prefetch waits first, so the reads that follow an open (a
    loader's header) have the origin to themselves."""

    on_open: tuple[str, ...] = WEIGHT_PATTERNS
    per_file: int = 8
    start_delay: float = 0.2


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


async def prefetch_file(reader: ChunkReader, f: RemoteFile, *, parallel: int,
                        priority: Priority = Priority.PREFETCH,
                        progress: Callable[[int, bool], None] | None = None) -> None:
    """Fetch every missing chunk of `f`. `progress(n, fetched)` is called for every
    chunk with its size, and whether it came from the origin (False: already cached),
    so progress always reaches the file size."""
    cs = reader.config.chunk_size
    total = chunk_count(f.entry.size, cs)
    missing: list[int] = []
    for idx in range(total):
        if reader.is_cached(f, idx):
            if progress:
                progress(min(cs, f.entry.size - idx * cs), False)
        else:
            missing.append(idx)

    def next_index() -> int | None:
        if not missing:
            return None
        pos = reader.position(f)
        at = 0
        if pos is not None:
            want = pos // cs
            at = next((i for i, idx in enumerate(missing) if idx >= want), 0)
        return missing.pop(at)

    async def worker() -> None:
        while (idx := next_index()) is not None:
            fetched = await reader.ensure(f, idx, priority)
            if progress:
                progress(min(cs, f.entry.size - idx * cs), fetched > 0)

    async with trio.open_nursery() as nursery:
        for _ in range(min(parallel, len(missing))):
            nursery.start_soon(worker)


class OpenPrefetcher:
    """Starts a background whole-file prefetch when a matching file is opened.

    It starts `start_delay` after the open, and only if the file is still open
    then: a quick probe (open, read a header, close) fetches only what it read.
    """

    def __init__(self, reader: ChunkReader, config: PrefetchConfig) -> None:
        self._reader = reader
        self._config = config
        self._running: set[str] = set()
        self._open: dict[str, int] = {}

    def on_open(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        self._open[cid] = self._open.get(cid, 0) + 1
        if cid in self._running or not matches(f.entry.path, self._config.on_open):
            return
        self._running.add(cid)
        self._reader.spawn(self._run, f)

    def on_release(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        left = self._open.get(cid, 0) - 1
        if left > 0:
            self._open[cid] = left
        else:
            self._open.pop(cid, None)

    async def _run(self, f: RemoteFile) -> None:
        try:
            await trio.sleep(self._config.start_delay)
            if f.entry.content_id not in self._open:
                return  # closed again already: a probe, not a loader
            await prefetch_file(self._reader, f, parallel=self._config.per_file)
            log.info("prefetched %s (%d bytes)", f.name, f.entry.size)
        except* Exception as group:
            # Demand reads retry whatever is still missing; a prefetch never ends the mount.
            exc = group.exceptions[0]
            if isinstance(exc, ModelfsError):
                log.warning("background prefetch of %s stopped: %s", f.name, exc)
            else:
                log.error("background prefetch of %s failed", f.name, exc_info=exc)
        finally:
            self._running.discard(f.entry.content_id)
