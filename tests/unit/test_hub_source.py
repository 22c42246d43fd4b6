"""The Hub source client against the real origin fixture (no mocks)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from modelfs.cache import CacheConfig, ChunkCache, ChunkStore, Index
from modelfs.errors import (
    ListingRejected,
    RemoteAuthError,
    RemoteNotFound,
    RemoteStale,
    RemoteUnavailable,
)
from modelfs.fetch import (
    ChunkReader,
    FetchConfig,
    Priority,
    ReadAheadConfig,
    prefetch_file,
)
from modelfs.remote.config import HttpConfig, HubConfig
from modelfs.remote.hf import HubSource
from modelfs.testing.origin import Origin
from modelfs.types import RemoteFile, RepoRef

from ..conftest import MiB

FAST = HttpConfig(retries=2, backoff=0.01, timeout=5)


def source(origin: Origin, token: str | None = None, **kw: int) -> HubSource:
    return HubSource(HubConfig(endpoint=origin.url, http=FAST, **kw), token)


async def remote_file(src: HubSource, path: str = "model.safetensors") -> RemoteFile:
    """`path` of org/model at main, as the mount would see it."""
    commit = await src.resolve(RepoRef.parse("org/model"))
    entry = next(e for e in (await src.list_files("org/model", commit)).files if e.path == path)
    return RemoteFile(src, "org/model", commit, entry)


async def test_resolve_and_paginated_listing(origin: Origin, repo_data) -> None:
    src = source(origin)
    commit = await src.resolve(RepoRef.parse("org/model"))
    assert commit == origin.commit_of("org/model", "main")
    snap = await src.list_files("org/model", commit)
    assert {f.path: f.size for f in snap.files} == {
        p: len(d) for p, d in repo_data["org/model@main"].items()}
    assert snap.directories == ("sub", "sub/dir")
    weights = next(f for f in snap.files if f.path == "model.safetensors")
    assert weights.sha256 == weights.content_id and len(weights.sha256) == 64
    config = next(f for f in snap.files if f.path == "config.json")
    assert config.sha256 is None and len(config.content_id) == 40
    pages = [r for r in origin.records if "/tree/" in r.path]
    assert len(pages) == 3  # 8 entries, 3 a page
    await src.aclose()


async def test_listing_cap(origin: Origin) -> None:
    src = source(origin, max_listing_entries=4)
    commit = await src.resolve(RepoRef.parse("org/model"))
    with pytest.raises(ListingRejected, match="more than 4 entries; raise max_listing_entries"):
        await src.list_files("org/model", commit)
    await src.aclose()


async def test_errors_name_repo_revision_and_path(origin: Origin) -> None:
    src = source(origin)
    with pytest.raises(RemoteNotFound, match="repo org/missing revision 'main'.*RepoNotFound"):
        await src.resolve(RepoRef.parse("org/missing"))
    with pytest.raises(RemoteNotFound, match="repo org/model revision 'v9'.*RevisionNotFound"):
        await src.resolve(RepoRef.parse("org/model@v9"))
    origin.require_token["org/model"] = "tok"
    with pytest.raises(RemoteAuthError, match="gated or private repo org/model: set HF_TOKEN"):
        await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


async def test_ranges_redirects_and_token_scope(origin: Origin, repo_data) -> None:
    origin.require_token["org/model"] = "tok"
    src = source(origin, token="tok")
    commit = await src.resolve(RepoRef.parse("org/model"))
    snap = await src.list_files("org/model", commit)
    files = {f.path: f for f in snap.files}
    w = repo_data["org/model@main"]["model.safetensors"]
    assert await src.read("org/model", commit, files["model.safetensors"], 5, 1000) == w[5:1005]
    assert await src.read("org/model", commit, files["model.safetensors"], len(w) - 3, 3) == w[-3:]
    c = repo_data["org/model@main"]["config.json"]
    assert await src.read("org/model", commit, files["config.json"], 2, 5) == c[2:7]
    cdn = [r for r in origin.records if r.server == "cdn"]
    assert cdn and not any(r.authorized for r in cdn)
    assert all(r.authorized for r in origin.records if r.server == "hub")
    with pytest.raises(RemoteNotFound, match="beyond end of file"):
        await src.read("org/model", commit, files["config.json"], 2, 500)
    await src.aclose()


async def test_reset_is_resumed_and_retries_are_bounded(origin: Origin, repo_data,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    src = source(origin)
    f = await remote_file(src)
    commit, entry = f.commit, f.entry
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.reset_next(2, after_bytes=100_000, match="model.safetensors")
    assert await src.read("org/model", commit, entry, 0, 2 * MiB) == w[:2 * MiB]
    origin.fail_next(10, 502, match="model.safetensors")
    with pytest.raises(RemoteUnavailable, match=r"model.safetensors at offset 7: HTTP 502 \(gave up"):
        await src.read("org/model", commit, entry, 7, 10)
    assert "retry 1/2" in caplog.text
    await src.aclose()


async def test_old_commit_still_reads_after_push(origin: Origin, repo_data) -> None:
    src = source(origin)
    old = await src.resolve(RepoRef.parse("org/model"))
    files = {f.path: f for f in (await src.list_files("org/model", old)).files}
    new = origin.put_file("org/model", "main", "model.safetensors", b"new weights" * 1000)
    assert new != old
    w = repo_data["org/model@main"]["model.safetensors"]
    assert await src.read("org/model", old, files["model.safetensors"], 100, 50) == w[100:150]
    await src.aclose()


@pytest.mark.parametrize(("path", "size"), [("model.safetensors", 10 * MiB + 12345),
                                            ("model.safetensors", 5 * MiB),
                                            ("config.json", 34), ("config.json", 12)])
async def test_changed_content_is_stale_never_mixed(origin: Origin, repo_data, path: str,
                                                    size: int) -> None:
    src = source(origin)
    f = await remote_file(src, path)
    commit, entry = f.commit, f.entry
    first = await src.read("org/model", commit, entry, 0, 10)
    assert first == repo_data["org/model@main"][path][:10]
    # A misbehaving mirror now serves other bytes (same or other size) for the same commit.
    origin.swap_content("org/model", path, bytes(reversed(repo_data["org/model@main"][path]))[:size]
                        .ljust(size, b"z"))
    fresh = source(origin)  # no remembered redirect: asks the endpoint, which names the new bytes
    with pytest.raises(RemoteStale):
        await fresh.read("org/model", commit, entry, 0, 10)
    await src.aclose()
    await fresh.aclose()


def make_reader(tmp_path: Path, cfg: FetchConfig | None = None) -> tuple[Index, ChunkReader]:
    """A chunk reader over a fresh cache (index under ix/, chunks under store/)."""
    index = Index(tmp_path / "ix")
    cache = ChunkCache(index, ChunkStore(tmp_path / "store"), CacheConfig())
    return index, ChunkReader(cache, cfg or FetchConfig(chunk_size=MiB))


async def test_reader_single_flight_and_cache(origin: Origin, repo_data, tmp_path: Path) -> None:
    src = source(origin)
    f = await remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = make_reader(tmp_path)
    origin.delay = 0.2
    results: list[bytes] = [b""] * 8
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)

        async def one(i: int) -> None:
            results[i] = await reader.read(f, 3 * MiB + i * 1000, 500)

        async with trio.open_nursery() as readers:
            for i in range(8):
                readers.start_soon(one, i)
        assert results == [w[3 * MiB + i * 1000:3 * MiB + i * 1000 + 500] for i in range(8)]
        ranges = [r.range for r in origin.records if r.server == "cdn"]
        # one request for the chunk all eight read; read-ahead may fetch later chunks
        assert ranges.count(f"bytes={3 * MiB}-{4 * MiB - 1}") == 1
        assert await reader.ensure(f, 3, Priority.DEMAND) in (0, MiB)  # the chunk is complete
        assert await reader.read(f, 3 * MiB, 10) == w[3 * MiB:3 * MiB + 10]
        assert reader.statistics().hits == 1
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def cache_chunks(tmp_path: Path, f: RemoteFile, count: int) -> None:
    """Fetch the first `count` chunks of `f` into the cache under tmp_path, with a
    reader that is then gone (what a restarted daemon finds on disk)."""
    index, reader = make_reader(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        for i in range(count):
            await reader.ensure(f, i, Priority.DEMAND)
        nursery.cancel_scope.cancel()
    index.close()


async def test_load_buffers_are_reused_only_once_no_view_of_them_is_alive(
        origin: Origin, repo_data, tmp_path: Path) -> None:
    """Chunks loaded from disk live in reused buffers. A view still held across
    awaits (as by a read spanning two chunks) keeps its buffer from being
    overwritten by later loads; once it is dropped, buffers are reused."""
    src = source(origin)
    f = await remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    await cache_chunks(tmp_path, f, 6)
    # A restart, with room for 2 chunks in memory and no read-ahead: every read loads.
    index, reader = make_reader(tmp_path, FetchConfig(
        chunk_size=MiB, recent_bytes=2 * MiB, readahead=ReadAheadConfig(trigger=1 << 40)))
    origin.reset_stats()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        held = await reader.read(f, 100, 50)
        for i in range(1, 6):
            assert bytes(await reader.read(f, i * MiB, 10)) == w[i * MiB:i * MiB + 10]
        assert bytes(held) == w[100:150]  # not overwritten by the five loads after it
        del held
        buffers = set()
        for _ in range(2):
            for i in range(6):
                view = await reader.read(f, i * MiB + 7, 10)
                assert bytes(view) == w[i * MiB + 7:i * MiB + 17]
                assert isinstance(view, memoryview)
                buffers.add(id(view.obj))
                del view
        assert reader.statistics().loads == 18
        assert len(buffers) <= 4  # 2 in memory, 1 being loaded, and a spare
        assert origin.data_requests() == []
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_follow_reader_loads_ahead_in_loader_order_only_while_the_reader_follows_it(
        origin: Origin, repo_data, tmp_path: Path) -> None:
    """A warm reader of a cached file, in an order other than offsets (tensors by
    name): `follow_reader` loads the next chunks in that order before they are
    read, once the reader has made a move only that order predicts; a move only
    offset order predicts hands loading ahead back to the offset read-ahead."""
    import trio.testing

    from modelfs.fetch.order import ChunkOrder
    from modelfs.fetch.prefetch import follow_reader

    src = source(origin)
    f = await remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]  # 11 chunks of 1 MiB
    await cache_chunks(tmp_path, f, 11)
    index, reader = make_reader(tmp_path)  # a restart: nothing in memory
    # "Tensors" of 2 chunks, not in offset order: 0 1 6 7 2 3 8 9 4 5 10.
    order = ChunkOrder([(0, 2), (6, 8), (2, 4), (8, 10), (4, 6), (10, 11)], 11)
    cid = f.entry.content_id

    async def read_chunk(i: int) -> None:
        assert bytes(await reader.read(f, i * MiB, MiB)) == w[i * MiB:(i + 1) * MiB]
        await trio.testing.wait_all_tasks_blocked()  # the follower has seen the move

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        nursery.start_soon(follow_reader, reader, f, order, lambda: True)
        await read_chunk(0)
        await read_chunk(1)
        assert cid not in reader._in_order  # 0 -> 1: both orders predict it
        await read_chunk(6)  # only loader order predicts 1 -> 6
        assert cid in reader._in_order
        for i in list(order)[3:]:
            await read_chunk(i)
        s = reader.statistics()
        assert s.loads == 3 and s.loads_ahead == 8, s  # 0, 1, 6 on the reads' own time
        # Then offset order: 10 -> 5 is neither order's next; 5 -> 6 only offset
        # order's (rank 9 -> 2), which hands loading back to the offset read-ahead.
        await read_chunk(5)
        assert cid in reader._in_order
        await read_chunk(6)
        assert cid not in reader._in_order
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_redirect_target_is_reused_and_refreshed(origin: Origin, repo_data) -> None:
    src = source(origin)
    f = await remote_file(src)
    commit, entry = f.commit, f.entry
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.reset_stats()
    for i in range(3):
        assert await src.read("org/model", commit, entry, i * MiB, 100) == w[i * MiB:i * MiB + 100]
    assert [r.server for r in origin.data_requests()] == ["hub", "cdn", "cdn", "cdn"]
    origin.reset_stats()
    origin.fail_next(1, 404, match="/cdn/")  # the remembered CDN URL went away
    assert await src.read("org/model", commit, entry, 5 * MiB, 100) == w[5 * MiB:5 * MiB + 100]
    assert [(r.server, r.status) for r in origin.data_requests()] == [
        ("cdn", 404), ("hub", 302), ("cdn", 206)]
    await src.aclose()


async def test_prefetch_follows_the_reader(origin: Origin, repo_data, tmp_path: Path) -> None:
    src = source(origin)
    f = await remote_file(src)
    cfg = FetchConfig(chunk_size=MiB, readahead=ReadAheadConfig(min_window=MiB, max_window=MiB))
    index, reader = make_reader(tmp_path, cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        await reader.read(f, 6 * MiB, 100)  # a reader is at 6 MiB
        await reader.ensure(f, 6, Priority.DEMAND)  # (and its chunk is complete)
        origin.reset_stats()
        await prefetch_file(reader, f, parallel=1)
        starts = [int(r.range.removeprefix("bytes=").split("-")[0]) // MiB
                  for r in origin.records if r.server == "cdn"]
        # From where the reader is to the end, then the beginning; each chunk once.
        assert starts == [*range(7, 11), *range(0, 6)]
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_a_reader_gets_its_bytes_before_the_whole_chunk_arrives(
        origin: Origin, repo_data, tmp_path: Path) -> None:
    src = source(origin)
    f = await remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = make_reader(tmp_path)
    origin.throttle = 2 * MiB  # 1 MiB chunk: about half a second
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        assert bytes(await reader.read(f, 4 * MiB, 100)) == w[4 * MiB:4 * MiB + 100]
        assert reader.statistics().fetches == 0  # still in flight: served from what arrived
        # Joining the read's fetch under way: the bytes are the read's to count, not ours.
        assert await reader.ensure(f, 4, Priority.DEMAND) == 0
        assert reader.statistics().fetches == 1
        assert reader.statistics().bytes_fetched == MiB
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_a_chunk_that_cannot_be_stored_is_still_served(origin: Origin, repo_data,
                                                             tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    src = source(origin)
    f = await remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = make_reader(tmp_path)
    (tmp_path / "store" / "tmp").rmdir()
    (tmp_path / "store" / "tmp").write_bytes(b"")  # a chunk can no longer be written (ENOTDIR)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        assert bytes(await reader.read(f, 0, 1000)) == w[:1000]
        await reader.ensure(f, 0, Priority.DEMAND)  # the read's fetch, to its end
        assert reader.cache.lookup(f.entry.content_id, MiB, 0) is None  # served, not stored
        nursery.cancel_scope.cancel()
    assert "could not store chunk 0 of org/model/model.safetensors" in caplog.text
    index.close()
    await src.aclose()
