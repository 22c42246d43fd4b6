"""Fixtures of the kernel-free tests: a Hub source on the origin fixture, files of
it as the mount sees them, and chunk readers over fresh caches."""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from modelfs.cache import CacheConfig, ChunkCache, ChunkStore, Index
from modelfs.fetch import ChunkReader, FetchConfig, Priority
from modelfs.remote.config import HttpConfig, HubConfig
from modelfs.remote.hf import HubSource
from modelfs.testing.origin import Origin
from modelfs.types import RemoteFile, RepoRef

MiB = 1 << 20
FAST = HttpConfig(retries=2, backoff=0.01, timeout=5)


class Kit:
    """Builds what a test of the fetch layer needs, on one origin and one tmp_path;
    closes the indexes it opened."""

    def __init__(self, origin: Origin, tmp_path: Path) -> None:
        self.origin = origin
        self.tmp_path = tmp_path
        self._indexes: list[Index] = []
        self._sources: list[HubSource] = []

    def source(self, token: str | None = None, **kw: int) -> HubSource:
        src = HubSource(HubConfig(endpoint=self.origin.url, http=FAST, **kw), token)
        self._sources.append(src)
        return src

    @staticmethod
    async def remote_file(src: HubSource, path: str = "model.safetensors") -> RemoteFile:
        """`path` of org/model at main, as the mount would see it."""
        commit = await src.resolve(RepoRef.parse("org/model"))
        entry = next(e for e in (await src.list_files("org/model", commit)).files
                     if e.path == path)
        return RemoteFile(src, "org/model", commit, entry)

    def reader(self, cfg: FetchConfig | None = None) -> tuple[Index, ChunkReader]:
        """A chunk reader over the cache under tmp_path (index under ix/, chunks
        under store/): a second one sees what the first stored, as after a restart."""
        index = Index(self.tmp_path / "ix")
        self._indexes.append(index)
        cache = ChunkCache(index, ChunkStore(self.tmp_path / "store"), CacheConfig())
        return index, ChunkReader(cache, cfg or FetchConfig(chunk_size=MiB))

    async def cache_chunks(self, f: RemoteFile, count: int) -> None:
        """Fetch the first `count` chunks of `f` into the cache, with a reader that is
        then gone (what a restarted daemon finds on disk)."""
        index, reader = self.reader()
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            for i in range(count):
                await reader.ensure(f, i, Priority.DEMAND)
            nursery.cancel_scope.cancel()
        index.close()

    async def aclose(self) -> None:
        for src in self._sources:
            await src.aclose()
        for index in self._indexes:
            index.close()


@pytest.fixture
async def kit(origin: Origin, tmp_path: Path) -> AsyncIterator[Kit]:
    k = Kit(origin, tmp_path)
    yield k
    await k.aclose()


@contextlib.asynccontextmanager
async def generators_left() -> AsyncIterator[list[str]]:
    """The async generators left half-consumed inside the block, as trio's warnings
    about collecting them (filled on exit): under `-W error` each one fails
    whatever test runs when it is collected."""
    left: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield left
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()
    left += [str(w.message) for w in caught if "garbage collected" in str(w.message)]
