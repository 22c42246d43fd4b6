"""The memory budget holds every chunk buffer the reader keeps: the invariant,
under a workload that goes through every path that holds chunk bytes (fetches,
read-ahead, loads from disk, chunks kept for readers, chunks held for a
whole-file hash, the on-open prefetch), on the real origin fixture."""

from __future__ import annotations

import functools
import gc
import mmap
import random
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from modelfs.cache.store import direct_buffer
from modelfs.errors import RemoteUnavailable
from modelfs.fetch import FetchConfig, Priority, ReadAheadConfig, SchedulerConfig, memory, prefetch_file
from modelfs.fetch.flights import Flight, Flights
from modelfs.fetch.memory import Block, LoadBuffers, MemoryBudget
from modelfs.testing.origin import Origin
from modelfs.threads import run_letting_go
from modelfs.types import RemoteFile

from .conftest import Kit, MiB

LIMIT = 8 * MiB  # eight 1 MiB chunks
CONNECTIONS = 4
# What the budget does not cover and this workload allocates: views being
# assembled, the HTTP client's small objects, the interpreter's own.
SLACK = 2 * MiB


async def test_budget_accounts_for_blocks_shared_by_rooms() -> None:
    freed: list[int] = []
    budget = MemoryBudget(100, lambda: False)
    assert budget.try_reserve(60)
    block = Block(bytearray(60), 60, budget, lambda b: budget.unreserve(b.nbytes))
    block.retain()  # a second room holds it
    block.release()
    assert budget.used == 60  # still held
    block.release()
    assert budget.used == 0
    assert budget.try_reserve(100) and not budget.try_reserve(1)
    budget.unreserve(100)
    # A buffer (and the room beside it) that does not fit waits for a release.
    pool = LoadBuffers(MemoryBudget(3 * 4096, lambda: False), 4095)  # one page a buffer
    assert await pool.take(extra=4096) is not None
    async with trio.open_nursery() as n:
        async def second() -> None:
            await pool.take(extra=4096)
            freed.append(pool._budget.used)
        n.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert freed == []
        pool._budget.unreserve(2 * 4096)
    assert freed == [2 * 4096]


async def test_a_load_buffer_is_reused_through_reclaim_not_reallocated() -> None:
    kept: list[Block] = []

    def reclaim() -> bool:
        if not kept:
            return False
        kept.pop(0).release()
        return True

    budget = MemoryBudget(3 * (MiB + 4096), reclaim)
    pool = LoadBuffers(budget, MiB)
    first = await pool.take()
    kept.append(pool.block(first, 10))
    first_id = id(first)
    del first  # a reference held here would (rightly) keep it from reuse
    for _ in range(2):
        kept.append(pool.block(await pool.take(), 10))
    assert budget.used == 3 * pool.size
    # Full: the oldest loaded chunk is let go and its buffer taken again.
    again = await pool.take()
    assert id(again) == first_id and budget.used == 3 * pool.size


async def test_a_buffer_given_back_wakes_a_take_waiting_for_room() -> None:
    # As a hash step does: buffers taken for a while (nothing can shed them), given
    # back when done. A fetch that found no room meanwhile takes one at once.
    pool = LoadBuffers(MemoryBudget(2 * (MiB + 4096), lambda: pool.shed()), MiB)
    held = [await pool.take(), await pool.take()]
    got: list[mmap.mmap] = []
    async with trio.open_nursery() as n:
        async def fetch() -> None:
            got.append(await pool.take())
        n.start_soon(fetch)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        for buf in held:
            pool.give(buf)
        del buf, held
        await trio.testing.wait_all_tasks_blocked()  # the fetch ran, if it was woken
        assert len(got) == 1
    assert pool._budget.used == 2 * pool.size


def _big_file(origin: Origin, name: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    origin.put_file("org/model", "main", name, data)
    return data


async def test_no_path_holds_chunk_memory_outside_the_budget(kit: Kit, origin: Origin) -> None:
    files = {f"w{i}.safetensors": _big_file(origin, f"w{i}.safetensors", 24 * MiB + 5, i)
             for i in range(4)}
    src = kit.source()
    remote: dict[str, RemoteFile] = {p: await kit.remote_file(src, p) for p in files}
    cfg = FetchConfig(chunk_size=MiB, memory_limit=LIMIT,
                      scheduler=SchedulerConfig(max_fetches=CONNECTIONS, demand_reserve=1),
                      readahead=ReadAheadConfig(min_window=2 * MiB, max_window=16 * MiB,
                                                trigger=MiB))
    _, reader = kit.reader(cfg)
    rng = random.Random(5)

    async def sequential(path: str) -> None:
        f, data = remote[path], files[path]
        for off in range(0, len(data), 256 << 10):
            got = await reader.read(f, off, 256 << 10)
            assert bytes(got) == data[off:off + (256 << 10)]

    async def out_of_order(path: str) -> None:
        """Chunks 1, 2, 3, ... but never 0: every stored chunk waits for the hash."""
        f, data = remote[path], files[path]
        for idx in rng.sample(range(1, 24), 23):
            off = idx * MiB + 100
            assert bytes(await reader.read(f, off, 1000)) == data[off:off + 1000]

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        async with trio.open_nursery() as work:
            work.start_soon(sequential, "w0.safetensors")
            work.start_soon(out_of_order, "w1.safetensors")
            work.start_soon(out_of_order, "w2.safetensors")
            work.start_soon(functools.partial(prefetch_file, reader, remote["w3.safetensors"],
                                              parallel=2, keep=True))
        async with trio.open_nursery() as work:  # warm: everything is loaded from disk now
            work.start_soon(sequential, "w3.safetensors")
            work.start_soon(sequential, "w0.safetensors")
        for i in range(25):  # finish w1 and w2 (25 chunks) so their whole-file hashes end
            for p in ("w1.safetensors", "w2.safetensors"):
                await reader.ensure(remote[p], i, Priority.PREFETCH)
        # Quiet once the last loads and hash steps (in worker threads) are over; a
        # charge nobody releases never is.
        with trio.fail_after(10):
            while reader.memory()["in_flight"] or not all(  # noqa: ASYNC110 -- threads end it
                    reader.cache.index.is_checked(f.entry.content_id) for f in remote.values()):
                await trio.sleep(0.05)
        _, traced_peak = tracemalloc.get_traced_memory()
        mem = reader.memory()
        nursery.cancel_scope.cancel()
    tracemalloc.stop()
    await src.aclose()
    assert 0 < reader.budget.peak <= LIMIT
    # Python-allocated memory (fetch buffers are bytearrays; load buffers are maps,
    # charged but not traced) stayed within the limit plus what it does not cover.
    assert traced_peak - base <= LIMIT + SLACK, (traced_peak - base) / MiB
    # Quiet: every charged byte is accounted for by a room (nothing leaked).
    assert mem["used"] == mem["readers"] + mem["spare"]
    assert mem["hashing"] == 0  # every whole-file hash finished


async def test_a_spare_still_referred_to_is_waited_for_not_overwritten_or_dropped() -> None:
    budget = MemoryBudget(2 * (MiB + 4096), lambda: False)
    pool = LoadBuffers(budget, MiB)
    a, b = await pool.take(), await pool.take()
    a_id = id(a)
    view = memoryview(a)[:10]  # a waiter woken with a view of it, not yet run
    pool.give(a)
    pool.give(b)
    del a, b
    # A free spare is taken first; the one still viewed is never handed out.
    first = await pool.take()
    assert id(first) != a_id
    async with trio.open_nursery() as n:
        async def reader_runs() -> None:
            nonlocal view
            view.release()
            view = None
        n.start_soon(reader_runs)
        # Full budget, one spare, still viewed: take lets the holder run and then
        # reuses that buffer rather than shedding it and mapping a new one.
        again = await pool.take()
    assert id(again) == a_id and budget.used == 2 * pool.size


async def test_a_prefetch_reuses_its_buffers(kit: Kit, origin: Origin,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh memory is what costs (the kernel zeroes it; on a VM the host may have to
    hand it back first): a prefetch maps about a budget's worth of buffers, not one
    per chunk. (When finished chunks' buffers were dropped while a view of them was
    still alive, a prefetch mapped one for nearly every chunk.)"""
    _big_file(origin, "w.safetensors", 96 * MiB + 5, 9)
    src = kit.source()
    f = await kit.remote_file(src, "w.safetensors")
    limit = 16 * MiB
    cfg = FetchConfig(chunk_size=MiB, memory_limit=limit, request_size=4 * MiB,
                      scheduler=SchedulerConfig(max_fetches=CONNECTIONS, demand_reserve=1))
    _, reader = kit.reader(cfg)
    mapped: list[int] = []

    def counting(size: int) -> mmap.mmap:
        mapped.append(size)
        return direct_buffer(size)

    monkeypatch.setattr(memory, "direct_buffer", counting)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        await prefetch_file(reader, f, parallel=CONNECTIONS)
        with trio.fail_after(10):
            while not reader.cache.index.is_checked(f.entry.content_id):  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await src.aclose()
    # Every chunk was fetched and the file's sha256 matched (checked above), with
    # one to two budgets' worth of buffers mapped (14-29 seen, the most under a
    # whole test run's load), where dropping busy spares mapped 48-54:
    per_budget = limit // (MiB + 4096) + 1
    assert len(mapped) <= 2 * per_budget + 6, (len(mapped), per_budget)



async def test_a_buffer_handed_to_a_worker_thread_is_not_held_by_the_job_after_the_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """trio's worker thread keeps its job (the function and its arguments) until after
    it has handed the result back; on a busy event loop the caller may run on before
    that, find the chunk's buffer still referred to, and map a new one. Here the job
    is kept alive the same way, past the result, and must not refer to the buffer."""
    buf = direct_buffer(MiB)
    alone = sys.getrefcount(buf)
    seen: list[int] = []
    run_sync = trio.to_thread.run_sync

    async def keeping_the_job(sync_fn: Callable[..., object], *args: object,
                              **kw: Any) -> object:
        result = await run_sync(sync_fn, *args, **kw)
        seen.append(sys.getrefcount(buf))  # `sync_fn` and `args` are still alive here
        return result

    monkeypatch.setattr(trio.to_thread, "run_sync", keeping_the_job)
    assert await run_letting_go(lambda b: len(b), memoryview(buf)[:4096]) == 4096
    # The plain call, for contrast, holds the view in its arguments:
    assert await trio.to_thread.run_sync(len, memoryview(buf)[:4096]) == 4096
    assert seen == [alone, alone + 1]

async def test_a_flight_awaited_for_its_outcome_lets_go_of_its_bytes_when_it_ends() -> None:
    """A prefetch waits on each chunk of a run only to learn that it arrived; the
    chunk's buffer must be free for the next chunk as soon as the flight ends, not
    when that waiter runs again. One waiting for the bytes keeps them."""
    flights = Flights()
    outcomes: list[bool] = []
    got: list[object] = []
    async with trio.open_nursery() as nursery:
        quiet, reading = Flight(), Flight()
        for key, flight in ((("c", 0), quiet), (("c", 1), reading)):
            flights.add(key, flight)
            flight.buf = memoryview(bytearray(8))
        nursery.start_soon(lambda: _append(outcomes, Flights.outcome(quiet)))
        nursery.start_soon(lambda: _append(got, Flights.wait(reading)))
        await trio.testing.wait_all_tasks_blocked()
        for key, flight in ((("c", 0), quiet), (("c", 1), reading)):
            flight.whole = True
            flights.end(key, flight)
        assert quiet.buf is None  # before its waiter has run again
        assert reading.buf is not None
    assert outcomes == [True]
    assert isinstance(got[0], memoryview) and len(got[0]) == 8
    # A flight that ended with nothing, or failed:
    cut, failed = Flight(), Flight()
    cut.finish()
    failed.error = RemoteUnavailable("origin down")
    failed.finish()
    assert await Flights.outcome(cut) is False
    with pytest.raises(RemoteUnavailable):
        await Flights.outcome(failed)


async def _append(out: list[object], result: Awaitable[object]) -> None:
    out.append(await result)
