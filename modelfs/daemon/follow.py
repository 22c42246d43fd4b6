"""Revision following: branches, tags and plain URLs are re-resolved every
`revision_ttl`, and a repo that moved gets its new tree swapped in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..cache import ChunkCache
from ..errors import ModelfsError
from ..fetch import load_snapshot
from ..fs.tree import ROOT_INODE, Tree
from ..types import RepoRef, Snapshot
from .layout import HF_VIEW, MountedRepo, add_hf_view, add_repo, hf_dir_name


class Wake:
    """A re-armable event: `set` from anywhere in the loop, `wait` with a timeout."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._event.wait()
        self._event = trio.Event()


log = logging.getLogger(__name__)


class RevisionFollower:
    """Swaps the trees of moved repos into the mount through `replace(parent, name,
    build)` and drops what the kernel cached of a file version gone for good through
    `invalidate(content_id)` (both the FUSE operations'). A read that found its file
    stale sets `wake`, for a check now rather than at the next scheduled one."""

    def __init__(self, cache: ChunkCache, repos: list[MountedRepo], ttl: float, wake: Wake, *,
                 tree: Tree,
                 replace: Callable[[int, str, Callable[[Tree], object]], Awaitable[None]],
                 invalidate: Callable[[str], Awaitable[None]],
                 swapped: Callable[[], None] = lambda: None) -> None:
        self._cache = cache
        self._repos = repos
        self._ttl = ttl
        self._wake = wake
        self._tree = tree
        self._replace = replace
        self._invalidate = invalidate
        self._swapped = swapped  # after each swap: the mount's state is saved

    async def run(self) -> None:
        """Until cancelled. An origin that cannot be reached keeps the current tree
        (logged once per outage); one repo's failure never ends the others' service."""
        failing: set[RepoRef] = set()
        while True:
            await self._wake.wait(self._ttl)
            for r in self._repos:
                if r.ref.is_commit:
                    continue
                try:
                    commit = await r.source.resolve(r.ref)
                    if commit != r.snap.commit:
                        snap, resolved_at = await load_snapshot(r.source, self._cache.index,
                                                                r.ref, commit=commit)
                except Exception as exc:
                    if r.ref not in failing:
                        log.warning("cannot re-resolve %s (%s); still serving %s", r.ref, exc,
                                    r.snap.commit[:12],
                                    exc_info=not isinstance(exc, ModelfsError))
                        failing.add(r.ref)
                    continue
                if r.ref in failing:
                    log.info("%s: origin reachable again", r.ref)
                    failing.discard(r.ref)
                if commit == r.snap.commit:
                    continue
                try:
                    await self.swap_in(r, snap, resolved_at)
                except Exception:  # a bug tripped by this repo's tree: its old tree stays
                    log.exception("%s: could not swap in %s; still serving %s", r.ref,
                                  commit[:12], r.snap.commit[:12])

    async def swap_in(self, r: MountedRepo, snap: Snapshot, resolved_at: float) -> None:
        """Show `snap` for `r` from now on (a moved branch, tag or URL). Files whose
        version is an ETag (plain HTTP) can never be fetched at their old version
        again: their chunks are dropped and the kernel's pages of them invalidated."""
        parent = self._tree.mkdirs(ROOT_INODE, r.ref.parent, int(resolved_at * 1e9))
        await self._replace(parent.inode, r.ref.mount_name,
                            lambda tree: add_repo(tree, r.source, r.ref, snap, resolved_at))
        log.info("%s moved %s -> %s: new opens see the new tree", r.ref, r.snap.commit[:12],
                 snap.commit[:12])
        now = {f.path: f.content_id for f in snap.files}
        # An S3 object's old version stays readable by its VersionId: its chunks stay.
        gone = [old for old in r.snap.files
                if old.etag and not old.version and now.get(old.path) != old.content_id]
        r.snap, r.resolved_at = snap, resolved_at
        for old in gone:
            log.info("%s/%s changed (ETag %s): dropping the old version", r.ref, old.path,
                     old.etag)
            await trio.to_thread.run_sync(self._cache.drop_content, old.content_id)
            await self._invalidate(old.content_id)
        if r.hub:
            hub = self._tree.mkdirs(ROOT_INODE, HF_VIEW, 0)
            same = [x for x in self._repos if x.ref.repo_id == r.ref.repo_id]
            await self._replace(hub.inode, hf_dir_name(r.ref.repo_id),
                                lambda tree: add_hf_view(tree, same))
        self._swapped()
