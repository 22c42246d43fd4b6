"""Repo revision -> snapshot (file listing), through the index when possible."""

from __future__ import annotations

import logging
import time

from ..cache import Index
from ..remote import Source
from ..types import RepoRef, Snapshot

log = logging.getLogger(__name__)


async def load_snapshot(source: Source, index: Index, ref: RepoRef) -> tuple[Snapshot, float]:
    """The snapshot `ref` names now, and when its revision was first resolved.

    A commit sha with a cached listing needs no request; branches and tags are
    resolved (cheap) and their listing fetched only for a commit not seen before.
    """
    if ref.is_commit:
        commit = ref.revision
    else:
        commit = await source.resolve(ref)
    known = index.get_revision(source.key, ref.repo_id, ref.revision)
    resolved_at = known[1] if known and known[0] == commit else time.time()
    snap = index.get_snapshot(source.key, ref.repo_id, commit)
    if snap is None:
        snap = await source.list_files(ref.repo_id, commit)
        index.put_snapshot(source.key, snap)
    if known is None or known[0] != commit:
        index.put_revision(source.key, ref.repo_id, ref.revision, commit, resolved_at)
    log.info("%s -> %s (%d files)", ref, commit, len(snap.files))
    return snap, resolved_at
