"""The mount daemon: open the cache, resolve repos, mount, serve until unmounted.

Start-up order matters for "fail with a reason and leave nothing mounted":
everything that can fail for a user reason (bad repo, no token, origin down)
happens before `pyfuse3.init`; readiness is reported only after the mount
answers a `stat`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .cache import ChunkCache, ChunkStore, Index
from .config import MountConfig
from .control.server import ControlContext, check_socket_free, serve_control
from .errors import CacheCorrupt, ConfigError, ModelfsError, RemoteUnavailable
from .fetch import ChunkReader, OpenPrefetcher, load_snapshot
from .fs.operations import Operations
from .fs.tree import ROOT_INODE, StaticFile, Tree
from .jobs import JobManager
from .remote.config import HttpSourceConfig
from .remote.hf import HubSource
from .remote.http import HttpSource
from .types import RemoteFile, RepoRef, Snapshot, Source

log = logging.getLogger(__name__)

# FUSE requests of up to 1 MiB: the kernel sizes reads from the bdi's read-ahead.
READ_AHEAD_KB = 1024
# Concurrent background (read-ahead) requests the kernel sends us; Mountpoint and
# hf-mount use 64 too.
MAX_BACKGROUND = 64
# Access times of chunks (for LRU eviction) are written to the index this often.
ACCESS_FLUSH_INTERVAL = 10.0
# Resolving the repos of a mount (before anything is mounted) may take this long in all.
START_TIMEOUT = 300.0
# A stop (signal or unmount) waits this long for requests in flight, then cancels them.
STOP_GRACE = 3.0
# How often the daemon looks whether its mount is still there.
UNMOUNT_POLL = 1.0


# The Hugging Face cache view: `HF_HUB_CACHE=MOUNT/.hf-cache/hub HF_HUB_OFFLINE=1`.
HF_VIEW = ".hf-cache/hub"


def hf_dir_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def add_hf_view(tree: Tree, repos: list[_Mounted]) -> None:
    """`MOUNT/.hf-cache/hub/models--ORG--NAME/{refs/REV, snapshots/COMMIT/...}` for the
    Hub repos among `repos` (all of one repo id when called for an update), laid out
    like huggingface_hub's cache so unchanged code loads from the mount offline."""
    repos = [r for r in repos if isinstance(r.source, HubSource)]
    hub = tree.mkdirs(ROOT_INODE, HF_VIEW, 0) if repos else None
    for r in repos:
        assert hub is not None
        mtime = int(r.resolved_at * 1e9)
        top = tree.mkdirs(hub.inode, hf_dir_name(r.ref.repo_id), mtime)
        tree.mkdirs(top.inode, "refs", mtime)
        if not r.ref.is_commit:
            tree.add_file(top.inode, f"refs/{r.ref.revision}",
                          StaticFile(r.snap.commit.encode()), mtime)
        snap_dir = f"snapshots/{r.snap.commit}"
        if tree.child(tree.mkdirs(top.inode, "snapshots", mtime).inode, r.snap.commit):
            continue  # two refs at one commit share a snapshot
        add_snapshot(tree, tree.mkdirs(top.inode, snap_dir, mtime).inode, r.source, r.ref,
                     r.snap, mtime)


def add_snapshot(tree: Tree, top: int, source: Source, ref: RepoRef, snap: Snapshot,
                 mtime: int) -> None:
    for d in snap.directories:
        tree.mkdirs(top, d, mtime)
    for entry in snap.files:
        tree.add_file(top, entry.path, RemoteFile(source, ref.repo_id, snap.commit, entry), mtime)


def add_repo(tree: Tree, source: Source, ref: RepoRef, snap: Snapshot, resolved_at: float) -> None:
    """`MOUNT/<org>/<name>[@rev]/...` for one snapshot."""
    mtime = int(resolved_at * 1e9)
    org = ref.repo_id.split("/")[0]
    top = tree.mkdirs(tree.mkdirs(ROOT_INODE, org, mtime).inode, ref.mount_name, mtime)
    add_snapshot(tree, top.inode, source, ref, snap, mtime)


def check_mountpoint(path: Path) -> None:
    # Mounted first: a dead FUSE mount answers stat() with ENOTCONN.
    if is_mounted(path) and not _clear_dead_mount(path):
        raise ConfigError(f"mountpoint {path}: something is already mounted there "
                          f"(a stale mount? `modelfs umount {path}`)")
    if not path.is_dir():
        raise ConfigError(f"mountpoint {path}: not an existing directory")


def _clear_dead_mount(path: Path) -> bool:
    """A modelfs mount whose daemon died (kill -9, OOM) answers ENOTCONN; unmount it,
    so a restart (systemd's Restart=on-failure) can mount again. Anything else
    mounted there is left alone."""
    with open("/proc/self/mounts") as f:
        fstype = next((ln.split()[2] for ln in f if ln.split()[1] == str(path.absolute())), "")
    if fstype != "fuse.modelfs":
        return False
    try:
        os.listdir(path)  # a stat may be answered from cached attributes; a listing is not
        return False  # alive: another daemon serves it
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    res = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or is_mounted(path):
        return False
    log.warning("mountpoint %s: cleared the dead mount of a daemon that did not exit cleanly",
                path)
    return True


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
    _mount_fusectl()
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


@dataclass(slots=True)
class _Mounted:
    """One repo of the mount and the snapshot it shows now."""

    ref: RepoRef
    source: Source
    snap: Snapshot
    resolved_at: float


def _sources(config: MountConfig, hub: HubSource) -> list[tuple[RepoRef, Source]]:
    pairs: list[tuple[RepoRef, Source]] = [(ref, hub) for ref in config.repos]
    if config.urls:
        http = HttpSource(HttpSourceConfig(urls={r.repo_id: u for r, u in config.urls},
                                           max_file_size=config.hub.max_file_size,
                                           http=config.hub.http))
        pairs += [(ref, http) for ref, _ in config.urls]
    return pairs


def sd_notify(state: str) -> None:
    """Tell systemd (`Type=notify`) about our state: `READY=1`, `STOPPING=1`. A no-op
    outside systemd. The protocol is one datagram to $NOTIFY_SOCKET (sd_notify(3))."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", addr, exc.strerror)


def _describe(config: MountConfig, repos: list[_Mounted]) -> dict[str, Any]:
    """The mount part of `/v1/status`."""
    return {"mountpoint": str(config.mountpoint), "cache_dir": str(config.cache_dir),
            "repos": [{"id": r.ref.repo_id, "revision": r.ref.revision, "source": r.source.key,
                       "commit": r.snap.commit, "resolved_at": r.resolved_at,
                       "path": str(config.mountpoint / r.ref.repo_id.split("/")[0]
                                   / r.ref.mount_name),
                       "files": len(r.snap.files)} for r in repos]}


def _local_path(config: MountConfig, repos: list[_Mounted]) -> Callable[[str, str, str], str | None]:
    """Where a job's file shows under the mount: its repo mounted at that revision."""
    def find(repo: str, revision: str, path: str) -> str | None:
        for r in repos:
            if r.ref.repo_id == repo and r.ref.revision == revision:
                return str(config.mountpoint / repo.split("/")[0] / r.ref.mount_name / path)
        return None
    return find


def _mount_fusectl() -> None:
    """The FUSE control file system (`/sys/fs/fuse/connections`) holds
    `max_background`; systemd mounts it at boot, a container or a minimal VM may not."""
    conns = Path("/sys/fs/fuse/connections")
    if os.geteuid() != 0 or not conns.is_dir() or any(conns.iterdir()):
        return
    with open("/proc/self/mounts") as f:
        if any(line.split()[2] == "fusectl" for line in f):
            return
    res = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        log.info("cannot mount fusectl on %s: %s", conns, res.stderr.strip())


def keep_freed_memory() -> None:
    """Have glibc keep freed chunk buffers for reuse instead of returning them.

    Every fetch and load allocates a chunk-sized buffer (4 MiB). glibc serves
    those from fresh `mmap`s and unmaps them when freed, so each chunk's bytes
    land in newly faulted pages, which costs (on a VM that hands freed memory
    back to its host: 4 shards loaded at once, 12.7 s -> 11.4 s). With these
    thresholds they come from the heap and its pages are reused. The heap's
    peak stays bounded by the fetch memory limit plus the recent-chunks budget.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 512 << 20)


async def serve(config: MountConfig, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled. Raises `ModelfsError` on start-up failure.
    The caller has checked the cache directory (`check_cache_dir`): the CLI does, before
    it opens the log there."""
    keep_freed_memory()
    check_mountpoint(config.mountpoint)
    if config.control_socket:
        check_socket_free(config.control_socket)
    index = open_index(config)
    cache = ChunkCache(index, ChunkStore(config.cache_dir), config.cache)
    hub = HubSource(config.hub, config.token)
    pairs = _sources(config, hub)
    try:
        repos = []
        with trio.move_on_after(START_TIMEOUT) as starting:
            for ref, source in pairs:
                snap, resolved_at = await load_snapshot(source, index, ref, force=config.force)
                repos.append(_Mounted(ref, source, snap, resolved_at))
                if config.force:
                    for entry in snap.files:
                        await trio.to_thread.run_sync(cache.drop_content, entry.content_id)
        if starting.cancelled_caught:
            left = [str(ref) for ref, _ in pairs[len(repos):]]
            raise RemoteUnavailable(f"repos {', '.join(left)} not resolved within "
                                    f"{START_TIMEOUT:.0f}s; nothing mounted")
        tree = Tree(time.time_ns())
        for r in repos:
            add_repo(tree, r.source, r.ref, r.snap, r.resolved_at)
        add_hf_view(tree, repos)
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
                stop = trio.Event()
                nursery.start_soon(_main_then_cancel, nursery)
                nursery.start_soon(_stop_on_signal, stop)
                nursery.start_soon(_bounded_stop, nursery, config.mountpoint, stop)
                nursery.start_soon(_flush_access, cache)
                nursery.start_soon(ops.watch_readers)
                reader.on_content_dropped = functools.partial(
                    nursery.start_soon, ops.invalidate_content)
                moving = [r for r in repos if not r.ref.is_commit]
                if moving:
                    wake = _Wake()
                    reader.on_stale = wake.set
                    nursery.start_soon(_follow_revisions, config, cache, ops, repos, wake)
                by_repo = {r.ref.repo_id: r.source for r in repos}
                jobs = JobManager(reader, lambda repo: by_repo.get(repo, hub), config.jobs,
                                  local_path=_local_path(config, repos))
                await nursery.start(jobs.run)
                if config.control_socket:
                    ctx = ControlContext(jobs, reader, lambda: _describe(config, repos))
                    await nursery.start(serve_control, ctx, config.control_socket)
                await trio.to_thread.run_sync(os.stat, config.mountpoint)
                tune_kernel(config.mountpoint)
                log.info("mounted %s at %s", ", ".join(str(r.ref) for r in repos),
                         config.mountpoint)
                ready()
                sd_notify(f"READY=1\nSTATUS=serving {config.mountpoint}")
        finally:
            sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", config.mountpoint)
    finally:
        for source in {id(s): s for s in [hub, *(s for _, s in pairs)]}.values():
            await source.aclose()
        index.close()


def open_index(config: MountConfig) -> Index:
    """The cache index; a damaged one is refused, or with `rebuild_index` rebuilt."""
    try:
        return Index(config.cache_dir / "index")
    except CacheCorrupt as exc:
        if not config.rebuild_index:
            raise
        log.warning("%s: rebuilding it", exc)
    from .cache.rebuild import rebuild_index

    r = rebuild_index(config.cache_dir)
    log.warning("rebuilt the cache index: kept %d chunks that check out, dropped %d; the "
                "damaged one is at %s%s", r.chunks_kept, r.chunks_dropped, r.moved_to,
                f" (copying stopped early: {r.salvage_error})" if r.salvage_error else "")
    return Index(config.cache_dir / "index")


class _Wake:
    """A re-armable event: `set` from anywhere in the loop, `wait` with a timeout."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._event.wait()
        self._event = trio.Event()


async def _follow_revisions(config: MountConfig, cache: ChunkCache, ops: Operations,
                            repos: list[_Mounted], wake: _Wake) -> None:
    """Re-resolve branches, tags and plain URLs every `revision_ttl`; when one moved,
    swap in the new tree. Files whose version is an ETag (plain HTTP) can never be
    fetched at their old version again: their chunks are dropped and the kernel's
    pages of them invalidated. An origin that cannot be reached keeps the current
    tree (logged once per outage). A read that found its file stale wakes it early."""
    failing: set[RepoRef] = set()
    while True:
        await wake.wait(config.revision_ttl)
        for r in repos:
            if r.ref.is_commit:
                continue
            try:
                commit = await r.source.resolve(r.ref)
                if commit != r.snap.commit:
                    snap, resolved_at = await load_snapshot(r.source, cache.index, r.ref,
                                                            commit=commit)
            except Exception as exc:  # one repo's failure never ends the others' service
                if r.ref not in failing:
                    log.warning("cannot re-resolve %s (%s); still serving %s", r.ref, exc,
                                r.snap.commit[:12], exc_info=not isinstance(exc, ModelfsError))
                    failing.add(r.ref)
                continue
            if r.ref in failing:
                log.info("%s: origin reachable again", r.ref)
                failing.discard(r.ref)
            if commit == r.snap.commit:
                continue
            try:
                await _swap_in(cache, ops, repos, r, snap, resolved_at)
            except Exception:  # a bug tripped by this repo's tree: its old tree stays
                log.exception("%s: could not swap in %s; still serving %s", r.ref, commit[:12],
                              r.snap.commit[:12])


async def _swap_in(cache: ChunkCache, ops: Operations, repos: list[_Mounted], r: _Mounted,
                   snap: Snapshot, resolved_at: float) -> None:
    """Show `snap` for `r` from now on (a moved branch, tag or URL)."""
    org = ops.tree.child(ROOT_INODE, r.ref.repo_id.split("/")[0])
    assert org is not None
    ops.replace(org.inode, r.ref.mount_name,
                lambda tree: add_repo(tree, r.source, r.ref, snap, resolved_at))
    log.info("%s moved %s -> %s: new opens see the new tree", r.ref, r.snap.commit[:12],
             snap.commit[:12])
    now = {f.path: f.content_id for f in snap.files}
    gone = [old for old in r.snap.files if old.etag and now.get(old.path) != old.content_id]
    r.snap, r.resolved_at = snap, resolved_at
    for old in gone:
        log.info("%s/%s changed (ETag %s): dropping the old version", r.ref, old.path, old.etag)
        await trio.to_thread.run_sync(cache.drop_content, old.content_id)
        await ops.invalidate_content(old.content_id)
    if isinstance(r.source, HubSource):
        hub = ops.tree.mkdirs(ROOT_INODE, HF_VIEW, 0)
        same = [x for x in repos if x.ref.repo_id == r.ref.repo_id]
        ops.replace(hub.inode, hf_dir_name(r.ref.repo_id),
                    lambda tree: add_hf_view(tree, same))


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


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            stop.set()
            pyfuse3.terminate()
            return


async def _bounded_stop(nursery: trio.Nursery, mountpoint: Path, stop: trio.Event) -> None:
    """Once stopping (a signal, or the mount gone: `fusermount3 -u`), give requests in
    flight `STOP_GRACE` seconds to finish, then cancel everything: pyfuse3's main loop
    waits for its handlers, and a handler may wait on an origin that never answers."""
    while not stop.is_set():
        with trio.move_on_after(UNMOUNT_POLL):
            await stop.wait()
        if not stop.is_set() and not is_mounted(mountpoint):
            log.info("%s was unmounted", mountpoint)
            break
    await trio.sleep(STOP_GRACE)
    log.warning("requests still in flight %gs after the stop began; cancelling them", STOP_GRACE)
    nursery.cancel_scope.cancel()


__all__ = ["add_repo", "check_mountpoint", "is_mounted", "serve", "tune_kernel"]
