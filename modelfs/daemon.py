"""The mount daemon: open the cache, resolve repos, mount, serve until unmounted.

Start-up order matters for "fail with a reason and leave nothing mounted":
everything that can fail for a user reason (bad repo, no token, origin down)
happens before `pyfuse3.init`; readiness is reported only after the mount
answers a `stat`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from .cache import ChunkCache, ChunkStore, Index
from .config import MountConfig
from .errors import ConfigError, ModelfsError
from .fetch import ChunkReader, OpenPrefetcher, RemoteFile, load_snapshot
from .fs import Operations, Tree
from .fs.tree import ROOT_INODE
from .remote import HubSource, Source
from .types import RepoRef, Snapshot

log = logging.getLogger(__name__)

# FUSE requests of up to 1 MiB: the kernel sizes reads from the bdi's read-ahead.
READ_AHEAD_KB = 1024
# Concurrent background (read-ahead) requests the kernel sends us; Mountpoint and
# hf-mount use 64 too.
MAX_BACKGROUND = 64
# Access times of chunks (for LRU eviction) are written to the index this often.
ACCESS_FLUSH_INTERVAL = 10.0


def add_repo(tree: Tree, source: Source, ref: RepoRef, snap: Snapshot, resolved_at: float) -> None:
    """`MOUNT/<org>/<name>[@rev]/...` for one snapshot."""
    mtime = int(resolved_at * 1e9)
    org = ref.repo_id.split("/")[0]
    top = tree.mkdirs(tree.mkdirs(ROOT_INODE, org, mtime).inode, ref.mount_name, mtime)
    for d in snap.directories:
        tree.mkdirs(top.inode, d, mtime)
    for entry in snap.files:
        tree.add_file(top.inode, entry.path,
                      RemoteFile(source, ref.repo_id, snap.commit, entry), mtime)


def build_tree(source: Source, snaps: list[tuple[RepoRef, Snapshot, float]]) -> Tree:
    tree = Tree(time.time_ns())
    for ref, snap, resolved_at in snaps:
        add_repo(tree, source, ref, snap, resolved_at)
    return tree


def check_mountpoint(path: Path) -> None:
    # Mounted first: a dead FUSE mount answers stat() with ENOTCONN.
    if is_mounted(path):
        raise ConfigError(f"mountpoint {path}: something is already mounted there "
                          f"(a stale mount? `modelfs umount {path}`)")
    if not path.is_dir():
        raise ConfigError(f"mountpoint {path}: not an existing directory")


def is_mounted(path: Path) -> bool:
    target = str(path.absolute())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f)


def tune_kernel(mountpoint: Path) -> None:
    """Kernel knobs of this mount, settable only after mounting (and only as root).

    - the bdi's `read_ahead_kb`: the kernel sizes FUSE read requests from it, so
      1024 turns 128 KiB requests into 1 MiB ones;
    - the FUSE connection's `max_background` (default 12): how many read-ahead
      requests the kernel keeps in flight to the daemon at once.
    Without root the defaults stay, which only costs speed.
    """
    knobs = []
    try:
        with open("/proc/self/mountinfo") as f:
            bdi = next((ln.split()[2] for ln in f if ln.split()[4] == str(mountpoint)), None)
        if bdi:
            knobs.append((Path("/sys/class/bdi") / bdi / "read_ahead_kb", READ_AHEAD_KB))
        conn = Path("/sys/fs/fuse/connections") / str(os.minor(os.stat(mountpoint).st_dev))
        knobs += [(conn / "max_background", MAX_BACKGROUND),
                  (conn / "congestion_threshold", MAX_BACKGROUND * 3 // 4)]
    except OSError as exc:
        log.info("cannot tune kernel knobs of %s: %s", mountpoint, exc.strerror)
    for path, value in knobs:
        try:
            path.write_text(str(value))
        except OSError as exc:
            log.info("could not set %s (%s); using the kernel default", path, exc.strerror)


async def serve(config: MountConfig, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled. Raises `ModelfsError` on start-up failure."""
    check_mountpoint(config.mountpoint)
    index = Index(config.cache_dir / "index")
    cache = ChunkCache(index, ChunkStore(config.cache_dir), config.cache)
    source = HubSource(config.hub, config.token)
    try:
        snaps = []
        for ref in config.repos:
            snap, resolved_at = await load_snapshot(source, index, ref, force=config.force)
            snaps.append((ref, snap, resolved_at))
            if config.force:
                for entry in snap.files:
                    await trio.to_thread.run_sync(cache.drop_content, entry.content_id)
        tree = build_tree(source, snaps)
        reader = ChunkReader(cache, config.fetch)
        prefetcher = OpenPrefetcher(reader, config.prefetch) if config.prefetch.on_open else None
        ops = Operations(tree, reader, config.fs, prefetcher)
        options = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
        if config.allow_other:
            options.add("allow_other")
        pyfuse3.init(ops, str(config.mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.run)
                nursery.start_soon(_main_then_cancel, nursery)
                nursery.start_soon(_stop_on_signal)
                nursery.start_soon(_flush_access, cache)
                reader.on_content_dropped = functools.partial(
                    nursery.start_soon, ops.invalidate_content)
                commits = {ref: snap.commit for ref, snap, _ in snaps}
                if any(not ref.is_commit for ref in config.repos):
                    nursery.start_soon(_follow_revisions, config, source, index, ops, commits)
                await trio.to_thread.run_sync(os.stat, config.mountpoint)
                tune_kernel(config.mountpoint)
                log.info("mounted %s at %s", ", ".join(map(str, config.repos)), config.mountpoint)
                ready()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", config.mountpoint)
    finally:
        await source.aclose()
        index.close()


async def _follow_revisions(config: MountConfig, source: Source, index: Index, ops: Operations,
                            commits: dict[RepoRef, str]) -> None:
    """Re-resolve branches and tags every `revision_ttl`; when one moved, swap in the
    new tree. An origin that cannot be reached keeps the current tree (logged once
    per outage)."""
    failing: set[RepoRef] = set()
    while True:
        await trio.sleep(config.revision_ttl)
        for ref in config.repos:
            if ref.is_commit:
                continue
            try:
                commit = await source.resolve(ref)
                if commit != commits[ref]:
                    snap, resolved_at = await load_snapshot(source, index, ref, commit=commit)
            except ModelfsError as exc:
                if ref not in failing:
                    log.warning("cannot re-resolve %s (%s); still serving %s", ref, exc,
                                commits[ref][:12])
                    failing.add(ref)
                continue
            if ref in failing:
                log.info("%s: origin reachable again", ref)
                failing.discard(ref)
            if commit == commits[ref]:
                continue
            org = ops.tree.child(ROOT_INODE, ref.repo_id.split("/")[0])
            assert org is not None
            ops.replace(org.inode, ref.mount_name,
                        lambda tree, ref=ref, snap=snap, at=resolved_at:
                        add_repo(tree, source, ref, snap, at))
            log.info("%s moved %s -> %s: new opens see the new tree", ref, commits[ref][:12],
                     commit[:12])
            commits[ref] = commit


async def _flush_access(cache: ChunkCache) -> None:
    """Write chunk access times to the index now and then (they drive eviction), and
    bring an over-full cache (a lowered limit) back under its limit."""
    limit = cache.config.limit
    if limit is not None and cache.index.usage() > limit:
        await trio.to_thread.run_sync(cache.evict, int(limit * cache.config.low_water))
    while True:
        await trio.sleep(ACCESS_FLUSH_INTERVAL)
        await trio.to_thread.run_sync(cache.index.flush_access)


async def _main_then_cancel(nursery: trio.Nursery) -> None:
    """pyfuse3.main returns when the file system is unmounted (or terminated)."""
    try:
        await pyfuse3.main()
    finally:
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


__all__ = ["build_tree", "check_mountpoint", "is_mounted", "serve", "tune_kernel"]
