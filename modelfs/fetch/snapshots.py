"""Repo revision -> snapshot (file listing), through the index when possible."""

from __future__ import annotations

import logging
import time

from ..cache import Index
from ..errors import ModelfsError, RemoteProtocolError, RemoteUnavailable
from ..types import RepoRef, Snapshot, Source, printable

log = logging.getLogger(__name__)


async def load_snapshot(source: Source, index: Index, ref: RepoRef, *, force: bool = False,
                        commit: str | None = None) -> tuple[Snapshot, float]:
    """The snapshot `ref` names now, and when its revision was first resolved.

    This is the boundary of one repo: whatever goes wrong with what its origin
    sent is a `ModelfsError` naming the repo (anything else, a `RemoteProtocolError`
    with the traceback at debug level), so a caller fails this repo alone.
    """
    try:
        return await _load_snapshot(source, index, ref, force=force, commit=commit)
    except ModelfsError:
        raise
    except Exception as exc:
        log.debug("%s: unusable answer from the origin", ref, exc_info=True)
        raise RemoteProtocolError(
            f"repo {ref}: the origin sent something modelfs cannot use "
            f"({type(exc).__name__}: {printable(str(exc), 160)})") from None


async def _load_snapshot(source: Source, index: Index, ref: RepoRef, *, force: bool,
                         commit: str | None) -> tuple[Snapshot, float]:
    """`load_snapshot` without the boundary.

    A commit sha with a cached listing needs no request; branches and tags are
    resolved (cheap) and their listing fetched only for a commit not seen before
    (or always, with `force`); `commit` skips the resolve. When the origin is unreachable, a branch or tag
    the index has seen before is served at the commit it last resolved to.
    """
    known = index.get_revision(source.key, ref.repo_id, ref.revision)
    if ref.is_commit:
        commit = ref.revision
    elif commit is None:
        try:
            commit = await source.resolve(ref)
        except RemoteUnavailable as exc:
            if known is None or index.get_snapshot(source.key, ref.repo_id, known[0]) is None:
                raise
            log.warning("%s; serving %s at %s from the cache (last resolved %s)", exc, ref,
                        known[0][:12], time.strftime("%Y-%m-%d %H:%M:%S",
                                                     time.localtime(known[1])))
            commit = known[0]
    resolved_at = known[1] if known and known[0] == commit else time.time()
    snap = None if force else index.get_snapshot(source.key, ref.repo_id, commit)
    if snap is None:
        snap = await source.list_files(ref.repo_id, commit)
        index.put_snapshot(source.key, snap)
    if known is None or known[0] != commit:
        index.put_revision(source.key, ref.repo_id, ref.revision, commit, resolved_at)
    log.info("%s -> %s (%d files)", ref, commit, len(snap.files))
    return snap, resolved_at
