"""The daemon's lifecycle: open the cache, resolve repos, mount, serve until
unmounted or signalled, and undo each step in reverse.

Start-up order matters for "fail with a reason and leave nothing mounted":
everything that can fail for a user reason (bad repo, no token, origin down)
happens before `pyfuse3.init`; readiness is reported only after the mount
answers a `stat`. Each resource is entered on one `AsyncExitStack`, so a
failure at any step closes exactly what was opened before it; the tasks run in
one nursery, and any of them ending the mount (unmount, signal, bounded stop)
cancels the rest.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pyfuse3
import trio

from ..cache import ChunkCache, ChunkStore, Index
from ..config import MountConfig
from ..control.server import ControlContext, check_socket_free, serve_control
from ..errors import CacheCorrupt, ConfigError, RemoteUnavailable
from ..fetch import ChunkReader, OpenPrefetcher, load_snapshot
from ..fetch.plans import Plans
from ..fs.operations import SOCKET_XATTR, Operations
from ..fs.tree import Tree
from ..jobs import JobManager
from ..remote.sources import Sources
from ..types import RepoSpec, Source, source_kind
from . import session, state
from .connection import Connection
from .follow import RevisionFollower, Wake
from .kernel import sd_notify, tune_kernel
from .layout import MountedRepo, add_hf_view, add_repo, describe, local_path
from .mountpoint import check_mountpoint, modelfs_mounted
from .supervisor import REPLY_FILE, state_dir

log = logging.getLogger(__name__)

# Access times of chunks (for LRU eviction) are written to the index this often.
ACCESS_FLUSH_INTERVAL = 10.0
# Resolving the repos of a mount (before anything is mounted) may take this long in all.
START_TIMEOUT = 300.0
# A stop (signal or unmount) waits this long for requests in flight, then cancels them.
STOP_GRACE = 3.0
# How often the daemon looks whether its mount is still there.
UNMOUNT_POLL = 1.0


async def _resolve(config: MountConfig, index: Index, cache: ChunkCache,
                   sources: Sources) -> list[MountedRepo]:
    """Every repo's snapshot, within `START_TIMEOUT` in all."""
    repos: list[MountedRepo] = []
    with trio.move_on_after(START_TIMEOUT) as starting:
        for spec in config.repos:
            source = sources.for_spec(spec)
            snap, resolved_at = await load_snapshot(source, index, spec.ref, force=config.force)
            repos.append(MountedRepo(spec.ref, source, snap, resolved_at, hub=spec.url is None,
                                     url=spec.url))
            if config.force:
                for entry in snap.files:
                    await trio.to_thread.run_sync(cache.drop_content, entry.content_id)
    if starting.cancelled_caught:
        left = [str(spec) for spec in config.repos[len(repos):]]
        raise RemoteUnavailable(f"repos {', '.join(left)} not resolved within "
                                f"{START_TIMEOUT:.0f}s; nothing mounted")
    return repos


def _job_sources(sources: Sources, repos: list[MountedRepo]) -> Callable[[str, str | None],
                                                                       Source]:
    """The source a job's repo is read from. A `file://` repo is read only when it is
    mounted: the API must not make the daemon copy any local directory into the cache."""
    mounted = {(r.ref.repo_id, r.url) for r in repos}

    def get(repo: str, url: str | None) -> Source:
        if source_kind(url) == "file" and (repo, url) not in mounted:
            raise ConfigError("a file:// repo is prefetched through the daemon only when it is "
                              "mounted", setting="repos", subject=f"{repo}={url}")
        return sources.get(url)
    return get


async def serve(config: MountConfig, ready: Callable[[], None],
                conn: Connection | None = None) -> bool:
    """Mount and serve until unmounted or signalled. Raises `ModelfsError` on start-up failure.
    The caller has checked the cache directory (`check_cache_dir`): the CLI does, before
    it opens the log there.

    With `conn` (a connection the supervisor mounted), serve that: the first daemon of
    the mount builds its tree, a successor takes its predecessor's (`state.load`).
    Returns True when it stopped for a successor (SIGUSR1: `modelfs restart`)."""
    if conn is None:
        check_mountpoint(config.mountpoint)
    if config.control_socket:
        check_socket_free(config.control_socket)
    state_path = state_dir(config.cache_dir) / state.STATE_FILE
    stop = _Stop()
    async with AsyncExitStack() as stack:
        index = open_index(config)
        stack.callback(index.close)
        cache = ChunkCache(index, ChunkStore(config.cache_dir), config.cache)
        sources = Sources(config.sources, config.token)
        stack.push_async_callback(sources.aclose)
        successor = conn is not None and not conn.first
        if successor:
            try:
                repos, tree = await state.load(state_path, config.mountpoint, sources, index)
            except ValueError as exc:
                raise CacheCorrupt(f"cannot take over the mount {config.mountpoint}: {exc}") \
                    from None
            _warn_changed_repos(config, repos)
        else:
            repos = await _resolve(config, index, cache, sources)
            tree = Tree(time.time_ns())
            for r in repos:
                add_repo(tree, r.source, r.ref, r.snap, r.resolved_at)
            add_hf_view(tree, repos)
        tier = await sources.tier()  # before anything is mounted: it may be required

        # Bytes found bad go to the kernel's cache too: handed over to a task, as
        # invalidation must not run inside a FUSE request.
        dropped_send, dropped = trio.open_memory_channel[str](math.inf)
        wake = Wake()
        reader = ChunkReader(cache, config.fetch, on_content_dropped=dropped_send.send_nowait,
                             on_stale=wake.set, tier=tier)
        prefetcher = OpenPrefetcher(reader, config.prefetch) if config.prefetch.on_open else None
        # Loaders find the daemon of a mounted path by this attribute of the mount's
        # root (`modelfs.spans`): the API socket.
        xattrs = {SOCKET_XATTR: os.fsencode(config.control_socket)} if config.control_socket \
            else {}
        ops = Operations(tree, reader, config.fs, prefetcher, inherited=successor,
                         root_xattrs=xattrs)
        plans = Plans(reader, per_file=config.prefetch.per_file,
                      run_chunks=max(1, config.fetch.request_size // config.fetch.chunk_size))

        def save_state() -> None:
            if conn is not None:
                state.save(state_path, config.mountpoint, repos, ops.tree)

        follower = RevisionFollower(cache, repos, config.revision_ttl, wake, tree=tree,
                                    replace=ops.replace, invalidate=ops.invalidate_content,
                                    swapped=save_state)
        jobs = JobManager(reader, cache, _job_sources(sources, repos), config.jobs,
                          local_path=local_path(config.mountpoint, repos))

        options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
        if config.allow_other:
            options.add("allow_other")
        adoption = None
        if conn is None:
            pyfuse3.init(ops, str(config.mountpoint), options)
            stack.callback(log.info, "unmounted %s", config.mountpoint)
        else:
            save_state()  # before the kernel can learn an inode of this tree
            adoption = session.init(ops, conn, options)
        stack.callback(pyfuse3.close, unmount=conn is None)
        if conn is None:
            stack.callback(sd_notify, "STOPPING=1")

        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(reader.run)
        nursery.start_soon(_main_then_cancel, nursery, adoption,
                           state_dir(config.cache_dir) / REPLY_FILE)
        nursery.start_soon(_stop_on_signal, stop, ops, conn is not None)
        nursery.start_soon(_bounded_stop, nursery, config.mountpoint, stop,
                           conn is not None and conn.resend)
        nursery.start_soon(_flush_access, cache)
        nursery.start_soon(ops.watch_readers)
        nursery.start_soon(_invalidate_dropped, dropped, ops)
        if any(not r.ref.is_commit for r in repos):
            nursery.start_soon(follower.run)
        # The mount answers before the API does: a client that reached the API may
        # unmount at once, and a stat still in flight would make that fail (EBUSY).
        await trio.to_thread.run_sync(os.stat, config.mountpoint)
        await nursery.start(jobs.run)
        if config.control_socket:
            ctx = ControlContext(jobs, reader, cache,
                                 lambda: describe(config.mountpoint, config.cache_dir, repos),
                                 plans=plans, resolve=ops.file_at)
            await nursery.start(serve_control, ctx, config.control_socket)
        tune_kernel(config.mountpoint)
        if tier is not None:
            log.info("chunks missing here are read from the shared cache %s first", tier.url)
        log.info("%s %s at %s", "took over" if successor else "mounted",
                 ", ".join(str(r.ref) for r in repos), config.mountpoint)
        ready()
        if conn is None:
            sd_notify(f"READY=1\nSTATUS=serving {config.mountpoint}")
    return stop.handover


def _warn_changed_repos(config: MountConfig, repos: list[MountedRepo]) -> None:
    now = {str(s) for s in config.repos}
    served = {str(RepoSpec(r.ref, r.url)) for r in repos}
    if now != served:
        log.warning("the configured repos differ from the ones this mount serves (%s); a "
                    "restart keeps the mount as it is: remount to change them",
                    ", ".join(sorted(now ^ served)))


def open_index(config: MountConfig) -> Index:
    """The cache index; a damaged one is refused, or with `rebuild_index` rebuilt."""
    try:
        return Index(config.cache_dir / "index")
    except CacheCorrupt as exc:
        if not config.rebuild_index:
            raise
        log.warning("%s: rebuilding it", exc)
    from ..cache.rebuild import rebuild_index

    r = rebuild_index(config.cache_dir)
    log.warning("rebuilt the cache index: kept %d chunks that check out, dropped %d; the "
                "damaged one is at %s%s", r.chunks_kept, r.chunks_dropped, r.moved_to,
                f" (copying stopped early: {r.salvage_error})" if r.salvage_error else "")
    return Index(config.cache_dir / "index")


async def _invalidate_dropped(dropped: trio.MemoryReceiveChannel[str], ops: Operations) -> None:
    async for content_id in dropped:
        await ops.invalidate_content(content_id)


async def _flush_access(cache: ChunkCache) -> None:
    """Write chunk access times to the index now and then (they drive eviction), and
    bring an over-full cache (a lowered limit) back under its limit."""
    limit = cache.config.limit
    if limit is not None and cache.index.usage() > limit:
        await trio.to_thread.run_sync(cache.evict, int(limit * cache.config.low_water))
    while True:
        await trio.sleep(ACCESS_FLUSH_INTERVAL)
        await trio.to_thread.run_sync(cache.index.flush_access)


class _Stop:
    """Stopping: set once, by a signal or the mount going away; `handover` when the
    mount stays for a successor."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.handover = False


async def _main_then_cancel(nursery: trio.Nursery, adoption: session.Adoption | None,
                            reply_file: Path) -> None:
    """pyfuse3.main returns when the file system is unmounted (or terminated)."""
    try:
        if adoption is None:
            await pyfuse3.main()
        else:
            await adoption.run(reply_file)
    finally:
        nursery.cancel_scope.cancel()


async def _stop_on_signal(stop: _Stop, ops: Operations, supervised: bool) -> None:
    """SIGTERM, SIGINT, SIGHUP: stop (and unmount, unless the supervisor owns the
    mount). SIGUSR1 (supervised only): stop reading requests, for a successor."""
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    if supervised:
        signals.append(signal.SIGUSR1)
    with trio.open_signal_receiver(*signals) as received:
        async for signum in received:
            stop.handover = signum == signal.SIGUSR1
            log.info("received %s: %s", signal.Signals(signum).name,
                     "handing the mount over" if stop.handover else "stopping")
            if not stop.handover and not supervised:
                sd_notify("STOPPING=1")
            ops.stopping = True
            stop.event.set()
            pyfuse3.terminate()
            return


async def _bounded_stop(nursery: trio.Nursery, mountpoint: Path, stop: _Stop,
                        resend: bool) -> None:
    """Once stopping (a signal, or the mount gone: `fusermount3 -u`), give requests in
    flight `STOP_GRACE` seconds to finish, then cancel everything: pyfuse3's main loop
    waits for its handlers, and a handler may wait on an origin that never answers.

    A cancelled request is not answered. On a stop the supervisor then aborts the
    connection (the reader gets ENOTCONN); on a handover the successor has the kernel
    resend it, where the kernel can (`Connection.resend`): elsewhere a handover waits
    for every request in flight, which `read_deadline` bounds."""
    while not stop.event.is_set():
        with trio.move_on_after(UNMOUNT_POLL):
            await stop.event.wait()
        if not stop.event.is_set() and not modelfs_mounted(mountpoint):
            log.info("%s was unmounted", mountpoint)
            break
    if stop.handover and not resend:
        return
    await trio.sleep(STOP_GRACE)
    log.warning("requests still in flight %gs after the %s began; cancelling them",
                STOP_GRACE, "handover" if stop.handover else "stop")
    nursery.cancel_scope.cancel()
