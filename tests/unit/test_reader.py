"""The chunk reader on the real origin fixture (no mount, no mocks): single
flight, loads and their buffers, read-ahead and loader order, partial chunks,
failures to store."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from modelfs.fetch import FetchConfig, Got, Priority, ReadAheadConfig, prefetch_file
from modelfs.fetch.reader import NOTHING
from modelfs.remote.config import RECEIVE_HELD
from modelfs.testing.origin import Origin

from .conftest import Kit, MiB, generators_left


async def test_reader_single_flight_and_cache(kit: Kit, origin: Origin, repo_data, tmp_path: Path) -> None:
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = kit.reader()
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
        assert await reader.ensure(f, 3, Priority.DEMAND) in (NOTHING, Got(MiB, 0))  # complete
        assert await reader.read(f, 3 * MiB, 10) == w[3 * MiB:3 * MiB + 10]
        assert reader.statistics().hits == 1
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_load_buffers_are_reused_only_once_no_view_of_them_is_alive(kit: Kit,
        origin: Origin, repo_data, tmp_path: Path) -> None:
    """Chunks loaded from disk live in reused buffers. A view still held across
    awaits (as by a read spanning two chunks) keeps its buffer from being
    overwritten by later loads; once it is dropped, buffers are reused."""
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    await kit.cache_chunks(f, 6)
    # A restart, with room for 2 chunks in memory and no read-ahead: every read loads.
    index, reader = kit.reader(FetchConfig(
        chunk_size=MiB, memory_limit=2 * MiB + 3 * 4096, readahead=ReadAheadConfig(trigger=1 << 40)))
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


async def test_follow_reader_loads_ahead_in_loader_order_only_while_the_reader_follows_it(kit: Kit,
        origin: Origin, repo_data, tmp_path: Path) -> None:
    """A warm reader of a cached file, in an order other than offsets (tensors by
    name): `follow_reader` loads the next chunks in that order before they are
    read, once the reader has made a move only that order predicts; a move only
    offset order predicts hands loading ahead back to the offset read-ahead."""
    import trio.testing

    from modelfs.fetch.order import ChunkOrder
    from modelfs.fetch.prefetch import follow_reader

    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]  # 11 chunks of 1 MiB
    await kit.cache_chunks(f, 11)
    index, reader = kit.reader()  # a restart: nothing in memory
    # "Tensors" of 2 chunks, not in offset order: 0 1 6 7 2 3 8 9 4 5 10.
    order = ChunkOrder([(0, 2), (6, 8), (2, 4), (8, 10), (4, 6), (10, 11)], 11)

    async def read_chunk(i: int) -> None:
        assert bytes(await reader.read(f, i * MiB, MiB)) == w[i * MiB:(i + 1) * MiB]
        await trio.testing.wait_all_tasks_blocked()  # the follower has seen the move

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        nursery.start_soon(follow_reader, reader, f, order, lambda: True)
        await read_chunk(0)
        await read_chunk(1)
        assert not reader.follows_order(f)  # 0 -> 1: both orders predict it
        await read_chunk(6)  # only loader order predicts 1 -> 6
        assert reader.follows_order(f)
        for i in list(order)[3:]:
            await read_chunk(i)
        s = reader.statistics()
        assert s.loads == 3 and s.loads_ahead == 8, s  # 0, 1, 6 on the reads' own time
        # Then offset order: 10 -> 5 is neither order's next; 5 -> 6 only offset
        # order's (rank 9 -> 2), which hands loading back to the offset read-ahead.
        await read_chunk(5)
        assert reader.follows_order(f)
        await read_chunk(6)
        assert not reader.follows_order(f)
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_prefetch_follows_the_reader(kit: Kit, origin: Origin, repo_data, tmp_path: Path) -> None:
    src = kit.source()
    f = await kit.remote_file(src)
    cfg = FetchConfig(chunk_size=MiB, readahead=ReadAheadConfig(min_window=MiB, max_window=MiB))
    index, reader = kit.reader(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        await reader.read(f, 6 * MiB, 100)  # a reader is at 6 MiB
        await reader.ensure(f, 6, Priority.DEMAND)  # (and its chunk is complete)
        origin.reset_stats()
        await prefetch_file(reader, f, parallel=1)
        spans = [[int(x) for x in r.range.removeprefix("bytes=").split("-")]
                 for r in origin.records if r.server == "cdn"]
        chunks = [c for a, b in spans for c in range(a // MiB, b // MiB + 1)]
        # From where the reader is to the end, then the beginning; each chunk once,
        # consecutive missing chunks in one request.
        assert chunks == [*range(7, 11), *range(0, 6)]
        assert len(spans) == 2
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_prefetch_splits_the_last_runs_among_its_connections(kit: Kit, origin: Origin,
                                                                   repo_data) -> None:
    """Runs of chunks go in one request, but no request takes more than its share of
    what is left: on an origin that caps each connection, a long request started
    last would keep the file waiting while the other connections sit idle."""
    src = kit.source()
    f = await kit.remote_file(src)
    total = -(-len(repo_data["org/model@main"]["model.safetensors"]) // MiB)
    index, reader = kit.reader(FetchConfig(chunk_size=MiB, request_size=8 * MiB))
    origin.reset_stats()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        await prefetch_file(reader, f, parallel=4)
        nursery.cancel_scope.cancel()
    spans = [[int(x) for x in r.range.removeprefix("bytes=").split("-")]
             for r in origin.records if r.server == "cdn"]
    sizes = [b // MiB - a // MiB + 1 for a, b in spans]
    chunks = sorted(c for a, b in spans for c in range(a // MiB, b // MiB + 1))
    assert chunks == list(range(total))  # each once
    # At most 1 + (what was left) // 4 chunks a request; 8 without the split.
    assert total > 8 and max(sizes) <= 1 + (total - 1) // 4 and max(sizes) > 1, sizes
    index.close()
    await src.aclose()


async def test_a_reader_gets_its_bytes_before_the_whole_chunk_arrives(kit: Kit,
        origin: Origin, repo_data, tmp_path: Path) -> None:
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = kit.reader()
    origin.throttle = 2 * MiB  # 1 MiB chunk: about half a second
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        assert bytes(await reader.read(f, 4 * MiB, 100)) == w[4 * MiB:4 * MiB + 100]
        assert reader.statistics().fetches == 0  # still in flight: served from what arrived
        # Joining the read's fetch under way: the bytes are the read's to count, not ours.
        assert await reader.ensure(f, 4, Priority.DEMAND) == NOTHING
        assert reader.statistics().fetches == 1
        assert reader.statistics().bytes_fetched == MiB
        nursery.cancel_scope.cancel()
    index.close()
    await src.aclose()


async def test_a_chunk_that_cannot_be_stored_is_still_served(kit: Kit, origin: Origin, repo_data,
                                                             tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = kit.reader()
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



async def test_a_chunk_read_whole_is_stored_even_when_the_reader_stops_at_once(kit: Kit,
        origin: Origin, repo_data, tmp_path: Path) -> None:
    """An unmount right after the last read cancels everything: the chunk that
    read had fetched is still stored, so a file read whole is cached whole."""
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    index, reader = kit.reader(FetchConfig(chunk_size=MiB,
                                           readahead=ReadAheadConfig(trigger=1 << 40)))
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        # The chunk's last bytes: the read returns as they arrive, before the store.
        assert bytes(await reader.read(f, 3 * MiB - 100, 100)) == w[3 * MiB - 100:3 * MiB]
        nursery.cancel_scope.cancel()
    assert reader.cache.lookup(f.entry.content_id, MiB, 2) is not None
    index.close()
    await src.aclose()


async def test_a_prefetch_run_is_one_request_resumed_where_it_broke_within_memory_for_three_chunks(
        kit: Kit, origin: Origin, repo_data, tmp_path: Path) -> None:
    """Consecutive missing chunks go in one ranged GET; each chunk's buffer is taken
    as its bytes arrive and stored when complete, so a request of 8 chunks gets by
    with memory for 3; a body cut mid-way resumes where it broke."""
    src = kit.source()
    f = await kit.remote_file(src)
    w = repo_data["org/model@main"]["model.safetensors"]
    # Memory for three chunks (and a request's receive buffers): the run must make do.
    index, reader = kit.reader(FetchConfig(chunk_size=MiB, request_size=8 * MiB,
                                           memory_limit=3 * (MiB + 4096) + RECEIVE_HELD))
    origin.reset_stats()
    origin.reset_next(1, after_bytes=5 * MiB // 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        with trio.fail_after(20):
            await prefetch_file(reader, f, parallel=1)
        nursery.cancel_scope.cancel()
    ranges = [r.range for r in origin.records if r.server == "cdn"]
    # (The resume starts at what arrived before the reset, which drops what was in transit.)
    assert len(ranges) == 3
    assert ranges[0] == f"bytes=0-{8 * MiB - 1}" and ranges[2] == f"bytes={8 * MiB}-{len(w) - 1}"
    resumed = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed <= 5 * MiB // 2 and ranges[1].endswith(f"-{8 * MiB - 1}")
    assert reader.budget.peak <= reader.budget.limit
    # Every chunk is stored whole and right: a new reader serves it without the origin.
    index.close()
    origin.reset_stats()
    index, reader = kit.reader(FetchConfig(chunk_size=MiB))
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        assert bytes(await reader.read(f, 0, len(w))) == w
        nursery.cancel_scope.cancel()
    assert origin.data_requests() == []
    index.close()
    await src.aclose()


@pytest.mark.parametrize("length", [256 * 1024, 4 * MiB])  # through h11; off the socket
async def test_a_body_read_given_up_mid_way_leaves_no_generator_for_the_collector(
        kit: Kit, length: int) -> None:
    """An attempt cut while a body is being read (its deadline, while the bytes wait
    for a buffer) ends httpx's generators there: one left to the garbage collector
    makes trio warn, and that warning fails whatever test is running then."""
    src = kit.source()
    f = await kit.remote_file(src)

    class NoRoom:  # the memory budget never has room
        async def next(self) -> memoryview:
            await trio.sleep_forever()
            raise AssertionError

    async with generators_left() as left:
        with trio.move_on_after(0.5) as cut:
            await f.source.read(f.repo_id, f.commit, f.entry, 0, length, into=NoRoom())
        assert cut.cancelled_caught
    assert left == []
    await src.aclose()
