"""Whole-file prefetch: in the background on open, or for `modelfs prefetch`.

Chunks are fetched `per_file` requests at a time at PREFETCH priority (demand
reads and read-ahead go first), each request for a run of consecutive missing
chunks of up to `FetchConfig.request_size` (`ChunkReader.ensure_run`; one chunk
for a file being read), in an order that follows the file's reader: the next
missing chunk at or after where it reads now, then the rest. On open of a
safetensors file "after" means in the order loaders consume it: tensors by name
(`tensors.py`), so a loader calling `get_tensor` over sorted keys finds the next
tensor being fetched or already cached, and its faults join those fetches. What is already
cached costs nothing, so a rerun fetches only what is missing.

While a file opened by a loader stays open, `follow_reader` keeps the next
chunks in that order in memory, loading cached ones from disk ahead of the
reader: a warm loader (cache on disk, nothing in memory) then finds its chunks
loaded and checked.

Loaders read the shards of a checkpoint one after another
(`model-00001-of-00004.safetensors`, then `-00002-`): once one has been read in
order for `SEQUENTIAL_BYTES` and is fetched whole, the next is prefetched
(`next_shard`), so its fetch overlaps the loader's work on this one instead of
starting at its open. Not sooner: on an origin where the daemon's CPU is the
limit, fetching the next shard beside this one slowed this one's reader. One
shard ahead at most, and only for a reader that reads in order (a random reader
wants no next shard), still open after the start delay and not under a span
plan.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..chunks import chunk_count
from ..errors import ModelfsError
from ..types import RemoteFile
from .order import ChunkOrder, Frontier
from .reader import NOTHING, ChunkReader, Got
from .scheduler import WINDOW_INTERVAL, WINDOW_STEP, Priority
from .tensors import plan_loader_order, safetensors_header_size

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth")
# Largest safetensors header read for the loader order: a shard of 10,000 tensors has ~1.5 MB.
DEFAULT_MAX_HEADER = 16 << 20


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """`on_open`: basename patterns of files prefetched whole when opened (empty:
    never); `per_file`: concurrent chunk fetches for one file; `start_delay`: how
    long an on-open prefetch waits first, so the reads that follow an open (a
    loader's header) have the origin to themselves; `max_header_size`: a
    safetensors header larger than this is not read for the loader order."""

    on_open: tuple[str, ...] = WEIGHT_PATTERNS
    per_file: int = 8
    start_delay: float = 0.2
    max_header_size: int = DEFAULT_MAX_HEADER


# While a file's reader keeps reading, an on-open prefetch runs at most this many
# chunks ahead of it (in the prefetch order), so the chunks it holds in memory for
# the reader are read before the recent-chunks budget evicts them (4 shards
# loaded at once re-read ~15% of their bytes from disk without it). A reader idle
# for LEAD_IDLE seconds no longer holds the fetches back. `follow_reader` loads
# this many cached chunks ahead of the reader.
LEAD_CHUNKS = 8
LEAD_IDLE = 0.5
# A move of the reader by at most this many chunks (or ranks) is "next".
NEAR = 2
# Bytes read in offset order (one sequential stream, `ChunkReader.streamed`) that
# make a reader a loader, for the next shard. Counting moves forward instead
# misread fio's random reads (each block once), which run forward in short
# stretches near their end, and missed loaders behind the kernel's read-ahead.
SEQUENTIAL_BYTES = 64 << 20
# Files whose loader order (parsed from the header) is kept for the next open.
ORDERS_KEPT = 256


_SHARD = re.compile(r"(.*?)(\d+)-of-(\d+)(\.[^/]+)")


def next_shard(name: str) -> str | None:
    """The name of the shard a loader reads after `name` (`model-00002-of-00004.safetensors`
    after `model-00001-of-00004.safetensors`), or None: not a shard, or the last."""
    m = _SHARD.fullmatch(name)
    if m is None:
        return None
    prefix, number, total, ext = m.groups()
    n = int(number) + 1
    return f"{prefix}{n:0{len(number)}d}-of-{total}{ext}" if n <= int(total) else None


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


async def loader_order(reader: ChunkReader, f: RemoteFile,
                       max_header: int = DEFAULT_MAX_HEADER) -> ChunkOrder | None:
    """For a safetensors file, the chunk order loaders consume it in (tensors by
    name); None for other files, a header larger than `max_header`, or one that does
    not parse. Reads the header through the cache (a loader needs it first anyway)
    and parses it in a worker thread."""
    if not f.entry.path.endswith(".safetensors") or f.entry.size < 8:
        return None
    data_start = safetensors_header_size(bytes(await reader.read(f, 0, 8)), max_header)
    if data_start is None or data_start > f.entry.size:
        return None
    header = bytes(await reader.read(f, 8, data_start - 8))
    return await trio.to_thread.run_sync(plan_loader_order, header, data_start, f.entry.size,
                                         reader.config.chunk_size)


async def prefetch_file(reader: ChunkReader, f: RemoteFile, *, parallel: int,
                        priority: Priority = Priority.PREFETCH,
                        progress: Callable[[int, Got], None] | None = None,
                        order: ChunkOrder | None = None,
                        stopped: Callable[[], bool] | None = None,
                        keep: bool = False) -> None:
    """Fetch every missing chunk of `f`. `progress(n, got)` is called for every
    chunk with its size, and the bytes of it fetched from the origin or the shared
    tier (`NOTHING`: already cached), so progress always reaches the file size.
    `order` is the chunk order to fetch in (default: by offset); the reader's
    position picks where in it to go on.
    Once `stopped()` is true no new chunk is started; those under way finish and
    are counted (a pause that loses nothing and refetches nothing). With `keep`,
    fetched chunks are also held in memory for a reader of the file (see
    `ChunkReader.ensure`), and the prefetch stays within `LEAD_CHUNKS` of that
    reader while it reads.

    Planning costs what is cached and the runs of `order`, not the file's size:
    the chunks still to fetch are a `Frontier` of ranks."""
    cs = reader.config.chunk_size
    total = chunk_count(f.entry.size, cs)
    order = order if order is not None else ChunkOrder.offsets(total)
    cached = await reader.cached_chunks(f)
    if progress:
        for idx in cached:
            progress(min(cs, f.entry.size - idx * cs), NOTHING)
    todo = Frontier(total)
    # For a file being read (`keep`), one chunk a request: a reader's read-ahead then
    # adds connections of its own instead of joining runs under way, and on an origin
    # that caps each connection (a CDN) that is what a cold read's speed comes from
    # (docs/benchmarks.md: 16 MiB runs made a cold `cat` 0.84x as fast there).
    run_chunks = 1 if keep else max(1, reader.config.request_size // cs)
    missing = total - len(cached)

    # With a shared tier and no reader, start at a random chunk: nodes of a fleet
    # that warm one file at once then fetch different chunks from the origin and
    # find the rest in the tier (cooperative warm-up).
    first = random.randrange(total) if reader.tier is not None and total else 0

    def rank_of(pos: int | None) -> int:
        return order.rank(pos // cs) if pos is not None and 0 <= pos // cs < total else first

    def next_index() -> int | None:
        while not (stopped is not None and stopped()):
            r = todo.take(rank_of(reader.position(f)))
            if r is None:
                return None
            if (idx := order.at(r)) not in cached:
                return idx
        return None

    async def near_reader(idx: int) -> None:
        while (pos := reader.position(f)) is not None \
                and order.rank(idx) - rank_of(pos) > LEAD_CHUNKS:
            with trio.move_on_after(LEAD_IDLE) as idle:
                await reader.reader_moved(f)
            if idle.cancelled_caught:
                return

    def run_from(idx: int) -> int:
        """How many chunks from `idx` on one request takes: the next ones in offset
        order while they are missing, not handed out and next in `order` too. Near
        the end, no more than this worker's share of what is left: the file is done
        when its last request is, and on an origin that caps each connection a
        16 MiB request started last would keep the others waiting for it."""
        most = min(run_chunks, 1 + todo.left // max(1, min(workers, reader.scheduler.window.size)))
        n = 1
        while n < most and idx + n < total and idx + n not in cached \
                and not (stopped is not None and stopped()) \
                and order.rank(idx + n) == order.rank(idx) + n \
                and todo.take_exact(order.rank(idx + n)):
            n += 1
        return n

    def done(idx: int, got: Got) -> None:
        if progress:
            progress(min(cs, f.entry.size - idx * cs), got)

    workers = 0
    exhausted = False

    async def worker() -> None:
        nonlocal exhausted
        while (idx := next_index()) is not None:
            if keep:
                await near_reader(idx)
            count = run_from(idx)
            await reader.ensure_run(f, idx, count, priority, done, keep=keep, stopped=stopped)
        exhausted = True

    async def more_workers(nursery: trio.Nursery) -> None:
        """`parallel` is where a file starts; then keep more workers than the
        connection window has slots, by the window's next step: the window grows
        only while requests wait for slots, and judges a step by the throughput
        right after it, so the requests to fill a larger window must be waiting
        already. A waiting worker holds no memory, only its claim on a run."""
        nonlocal workers
        while not exhausted:
            await trio.sleep(WINDOW_INTERVAL)
            want = int(reader.scheduler.window.size * WINDOW_STEP) + 2
            while not exhausted and workers < min(want, missing):
                workers += 1
                nursery.start_soon(worker)

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            workers = min(parallel, missing)
            for _ in range(workers):
                nursery.start_soon(worker)
            if workers and reader.scheduler.config.adaptive and not keep:
                outer.start_soon(more_workers, nursery)
        outer.cancel_scope.cancel()  # the workers are done: so is adding them


async def follow_reader(reader: ChunkReader, f: RemoteFile, order: ChunkOrder,
                        is_open: Callable[[], bool]) -> None:
    """While `is_open()`, keep the `LEAD_CHUNKS` chunks that follow the reader's
    position in `order` in memory, if the reader follows `order`: cached ones
    are loaded from disk (and checked) before it asks, so a warm loader jumping
    from tensor to tensor does not wait on the disk.

    Each read wakes it. Within a tensor, loader order and offset order agree;
    where the reader moves to a chunk that only one of them predicts, that one
    takes over: this loads ahead in loader order, or leaves it to the reader's
    offset-order read-ahead (`ChunkReader.follow_order`). Chunks loaded by the
    wrong one would be read back from disk twice. A random reader, or an idle
    one, makes it load nothing."""
    cs = reader.config.chunk_size
    last: tuple[int, int] | None = None  # chunk, rank
    by_loader = False
    try:
        while is_open():
            end = reader.last_read_end(f)
            cur = max(end - 1, 0) // cs if end is not None else None  # the chunk read last
            at = order.rank(cur) if cur is not None and cur < len(order) else None
            if at is not None and cur is not None:
                here = (cur, at)
                if last is not None and here != last:
                    by_order = 0 <= at - last[1] <= NEAR
                    by_offset = 0 <= here[0] - last[0] <= NEAR
                    if by_order != by_offset:
                        by_loader = by_order
                        reader.follow_order(f, by_loader)
                    if by_loader and by_order:
                        for idx in order.window(at + 1, LEAD_CHUNKS):
                            reader.load_ahead(f, idx)
                last = here
            with trio.move_on_after(LEAD_IDLE):
                await reader.reader_moved(f)
    finally:
        reader.follow_order(f, False)


class OpenPrefetcher:
    """Starts a background whole-file prefetch when a matching file is opened.

    It starts `start_delay` after the open, and only if the file is still open
    then: a quick probe (open, read a header, close) fetches only what it read.
    A file cached whole starts at once and fetches nothing. While the file stays
    open, `follow_reader` loads cached chunks ahead of its reader.
    """

    def __init__(self, reader: ChunkReader, config: PrefetchConfig) -> None:
        self._reader = reader
        self._config = config
        self._running: set[str] = set()
        self._open: dict[str, int] = {}
        # Loader order per content id (immutable, like the bytes), most recent
        # ORDERS_KEPT: a reopen needs no header read. Reading it again would load
        # its chunk from disk while the loader reads the mount's page cache.
        self._orders: OrderedDict[str, ChunkOrder] = OrderedDict()
        self._ahead: set[str] = set()  # next shards being prefetched

    def on_open(self, f: RemoteFile, following: RemoteFile | None = None) -> None:
        """`f` was opened; `following`: the shard after it in the same directory
        (`next_shard`), prefetched once `f` is read in order and fetched whole."""
        cid = f.entry.content_id
        self._open[cid] = self._open.get(cid, 0) + 1
        if cid in self._running or not matches(f.entry.path, self._config.on_open):
            return
        self._running.add(cid)
        self._reader.spawn(self._run, f, following)

    def on_release(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        left = self._open.get(cid, 0) - 1
        if left > 0:
            self._open[cid] = left
        else:
            self._open.pop(cid, None)

    async def _run(self, f: RemoteFile, following: RemoteFile | None = None) -> None:
        cid = f.entry.content_id
        try:
            cs = self._reader.config.chunk_size
            total = chunk_count(f.entry.size, cs)
            cached = len(await self._reader.cached_chunks(f)) == total
            if not cached:
                await trio.sleep(self._config.start_delay)
                if cid not in self._open:
                    return  # closed again already: a probe, not a loader
            if cid in self._reader.planned:
                return  # its loader said what it reads (a span plan): only that
            order = self._orders.get(cid)
            if order is None:
                order = await loader_order(self._reader, f, self._config.max_header_size) \
                    or ChunkOrder.offsets(total)
                self._orders[cid] = order
                if len(self._orders) > ORDERS_KEPT:
                    self._orders.popitem(last=False)
            self._orders.move_to_end(cid)
            fetched = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_reader, self._reader, f, order,
                                   lambda: cid in self._open)
                if following is not None:
                    nursery.start_soon(self._next_when_read_in_order, f, following, fetched)
                if not cached:
                    await prefetch_file(self._reader, f, parallel=self._config.per_file,
                                        order=order, keep=True)
                    log.info("prefetched %s (%d bytes)", f.name, f.entry.size)
                fetched.set()
        except* Exception as group:
            _stopped(f"background prefetch of {f.name}", group.exceptions[0])
        finally:
            self._running.discard(f.entry.content_id)

    async def _next_when_read_in_order(self, f: RemoteFile, following: RemoteFile,
                                       fetched: trio.Event) -> None:
        """While `f` stays open: once its reader has read `SEQUENTIAL_BYTES` of it in
        order (or half of it, if smaller; a loader, not a random reader, which would
        not want the next shard) and it is fetched whole, prefetch the next shard."""
        cid = f.entry.content_id
        enough = min(SEQUENTIAL_BYTES, f.entry.size // 2)
        while cid in self._open and self._reader.streamed(f) < enough:
            with trio.move_on_after(LEAD_IDLE):
                await self._reader.reader_moved(f)
        while cid in self._open and not fetched.is_set():
            with trio.move_on_after(LEAD_IDLE):
                await fetched.wait()
        if cid in self._open:
            self._start_ahead(following)

    def _start_ahead(self, f: RemoteFile) -> None:
        cid = f.entry.content_id
        if cid in self._running or cid in self._ahead or cid in self._reader.planned \
                or not matches(f.entry.path, self._config.on_open):
            return
        self._ahead.add(cid)
        self._reader.spawn(self._run_ahead, f)

    async def _run_ahead(self, f: RemoteFile) -> None:
        """Prefetch the next shard whole (in runs, as `modelfs prefetch` does); its
        own open later joins what is in flight and finds the rest cached."""
        try:
            await prefetch_file(self._reader, f, parallel=self._config.per_file)
            log.info("prefetched %s ahead of its loader (%d bytes)", f.name, f.entry.size)
        except* Exception as group:
            _stopped(f"prefetch of {f.name} ahead of its loader", group.exceptions[0])
        finally:
            self._ahead.discard(f.entry.content_id)


def _stopped(what: str, exc: BaseException) -> None:
    """A background prefetch that stopped: demand reads retry whatever is still
    missing, and a prefetch never ends the mount, so it is only logged."""
    if isinstance(exc, ModelfsError):
        log.warning("%s stopped: %s", what, exc)
    else:
        log.error("%s failed", what, exc_info=exc)
