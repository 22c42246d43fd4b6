"""What `modelfs cache ...` does: list, verify, collect garbage, evict, clear.

Works on the index and chunk files alone (no origin), while a daemon or a
prefetch may use the same cache: every change is an LMDB transaction followed
by deleting files that no index entry names any more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..types import FileEntry
from .chunk_cache import ChunkCache, FileCheck

FRESH = 60.0  # seconds: an unindexed chunk file younger than this may be mid-store


@dataclass(slots=True)
class FileState:
    path: str
    size: int
    cached: int  # bytes of the file that are cached
    content_id: str
    check: FileCheck | None = None


@dataclass(slots=True)
class RevisionState:
    source: str
    repo_id: str
    revision: str
    commit: str
    pinned: bool
    files: list[FileState] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached(self) -> int:
        return sum(f.cached for f in self.files)


@dataclass(frozen=True, slots=True)
class GcResult:
    unindexed_files: int  # chunk files no index entry names (e.g. after kill -9)
    missing_files: int  # index entries whose file is gone
    old_chunks: int  # chunks of file versions no known revision uses any more
    freed: int  # bytes


def _cached_bytes(cache: ChunkCache, entry: FileEntry) -> int:
    best = 0
    for cs in cache.index.chunk_sizes(entry.content_id):
        chunks = cache.index.file_chunks(entry.content_id, cs)
        best = max(best, sum(min(cs, entry.size - i * cs) for i in chunks if i * cs < entry.size))
    return best


def _matches(repo_id: str, revision: str, want: str | None) -> bool:
    if want is None:
        return True
    repo, _, rev = want.partition("@")
    return repo == repo_id and (not rev or rev == revision)


def list_cache(cache: ChunkCache, repo: str | None = None) -> list[RevisionState]:
    """Every revision the index knows (optionally one `ORG/NAME[@REV]`), per file."""
    pins = set(cache.index.pins())
    out = []
    for r in sorted(cache.index.revisions(), key=lambda r: (r.repo_id, r.revision)):
        if not _matches(r.repo_id, r.revision, repo):
            continue
        snap = cache.index.get_snapshot(r.source, r.repo_id, r.commit)
        state = RevisionState(r.source, r.repo_id, r.revision, r.commit,
                              (r.source, r.repo_id, r.revision) in pins)
        for entry in snap.files if snap else ():
            state.files.append(FileState(entry.path, entry.size, _cached_bytes(cache, entry),
                                         entry.content_id))
        out.append(state)
    return out


def verify(cache: ChunkCache, repo: str | None = None) -> list[RevisionState]:
    """Check every cached chunk (and the whole-file hash where known) of the selected
    revisions; damaged chunks are dropped, so the next read fetches them again."""
    out = list_cache(cache, repo)
    for state in out:
        snap = cache.index.get_snapshot(state.source, state.repo_id, state.commit)
        by_path = {e.path: e for e in snap.files} if snap else {}
        for f in state.files:
            entry = by_path[f.path]
            checks = [cache.check_file(entry, cs)
                      for cs in sorted(cache.index.chunk_sizes(entry.content_id))]
            if checks:
                f.check = FileCheck(sum(c.chunks for c in checks), sum(c.damaged for c in checks),
                                    any(c.complete for c in checks),
                                    next((c.sha256_ok for c in checks
                                          if c.sha256_ok is not None), None),
                                    checks[0].kind)
                f.cached = _cached_bytes(cache, entry)
    return out


def gc(cache: ChunkCache) -> GcResult:
    """Remove chunk files the index does not name, index entries whose file is gone,
    and chunks of file versions that no revision in the index (or pin) uses."""
    before = cache.index.usage()
    live: set[str] = set()
    for r in cache.index.revisions():
        snap = cache.index.get_snapshot(r.source, r.repo_id, r.commit)
        if snap:
            live.update(f.content_id for f in snap.files)
    live |= cache.index.pinned_content()
    blobs = {b.digest for b in cache.index.blobs()}
    on_disk = set(cache.store.digests())
    unindexed = []
    freed = 0
    for d in on_disk - blobs:
        try:
            st = cache.store.path_for(d).stat()
        except OSError:
            continue
        if time.time() - st.st_mtime < FRESH:
            continue  # a writer may be about to index it
        freed += st.st_blocks * 512
        cache.store.delete(d)
        unindexed.append(d)
    missing = blobs - on_disk
    for d in missing:
        cache.index.drop_blob(d)
    old = 0
    for d in blobs - missing:
        users = cache.index.blob_contents(d)
        if users and users.isdisjoint(live):
            for cid in users:
                cache.drop_content(cid)
            old += 1
    return GcResult(len(unindexed), len(missing), old, freed + max(0, before - cache.index.usage()))


def evict_repo(cache: ChunkCache, repo: str) -> int:
    """Drop the cached chunks of `ORG/NAME[@REV]` (every revision without @REV),
    except those a pinned revision also uses. Returns the number of files dropped."""
    pinned = cache.index.pinned_content()
    dropped = 0
    for state in list_cache(cache, repo):
        for f in state.files:
            if f.cached and f.content_id not in pinned:
                cache.drop_content(f.content_id)
                dropped += 1
    return dropped


def clear(cache: ChunkCache) -> int:
    """Forget and delete every chunk (listings and pins stay). Returns files deleted."""
    cache.index.clear_chunks()
    n = 0
    for d in list(cache.store.digests()):
        cache.store.delete(d)
        n += 1
    return n
