"""Turn an origin's file listing (untrusted JSON) into safe `FileEntry`s.

Sans-I/O so it is tested directly. A path that could escape the mount or
shadow another entry is skipped with a warning, never followed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from ..errors import RemoteProtocolError
from ..types import FileEntry, Snapshot, printable

log = logging.getLogger(__name__)

# Largest file size believed (1 PiB): a listing that declares more is hostile, and
# such sizes break `stat` (st_size is a signed 64-bit value) and `df`.
MAX_FILE_SIZE = 1 << 50
# Skipped entries logged one by one per listing; the rest are counted.
LOGGED_SKIPS = 20

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_OID = re.compile(r"[0-9a-f]{40}")


def bad_path_reason(path: object) -> str | None:
    """Why `path` may not appear in the mount, or None when it is fine."""
    if not isinstance(path, str) or not path:
        return "empty or not a string"
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if len(encoded) > 4096:
        return "longer than 4096 bytes"
    if "\0" in path:
        return "contains NUL"
    if path.startswith("/"):
        return "absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    if any(len(part.encode()) > 255 for part in path.split("/")):
        return "has a component longer than 255 bytes"
    return None


def bad_size_reason(size: object, max_size: int = MAX_FILE_SIZE) -> str | None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"bad size {printable(size, 40)}"
    if size > max_size:
        return f"declared size {size} is beyond max_file_size ({max_size})"
    return None


def hub_entry(raw: dict[str, Any], max_size: int = MAX_FILE_SIZE) -> FileEntry | str:
    """One Hub tree entry of type `file` -> FileEntry, or the reason it is unusable."""
    path = raw.get("path")
    lfs = raw.get("lfs") if isinstance(raw.get("lfs"), dict) else None
    size = lfs.get("size", raw.get("size")) if lfs else raw.get("size")
    if (bad := bad_size_reason(size, max_size)) is not None:
        return bad
    assert isinstance(size, int)
    if lfs:
        oid = lfs.get("oid")
        if not isinstance(oid, str) or not _SHA256.fullmatch(oid):
            return "bad lfs.oid"
        return FileEntry(str(path), size, oid, sha256=oid)
    oid = raw.get("oid")
    if not isinstance(oid, str) or not _GIT_OID.fullmatch(oid):
        return "bad oid"
    return FileEntry(str(path), size, oid)


def clean_listing(
    repo: str, files: Iterable[FileEntry | tuple[str, str]], directories: Iterable[str] = ()
) -> tuple[tuple[FileEntry, ...], tuple[str, ...]]:
    """Drop unsafe and colliding entries, logging why; return (files, directories).

    `files` may hold `(path, reason)` pairs for entries already found unusable,
    so every skip is logged in one place. Directories implied by file paths are
    added; a file whose path is also a directory, or a second entry with the
    same path, is skipped.
    """
    kept: dict[str, FileEntry] = {}
    dirs: set[str] = set()
    skipped = 0

    def skip(what: str, path: object, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        if skipped <= LOGGED_SKIPS:
            log.warning("%s: skipping listing %s %s: %s", repo, what, printable(path), reason)

    for entry in files:
        if isinstance(entry, tuple):
            skip("entry", entry[0], entry[1])
            continue
        reason = bad_path_reason(entry.path)
        if reason is None and (entry.path in kept or entry.path in dirs):
            reason = "collides with another entry"
        parents = _parents(entry.path) if reason is None else []
        if reason is None and any(p in kept for p in parents):
            reason = "lies under a path that is a file"
        if reason:
            skip("entry", entry.path, reason)
            continue
        kept[entry.path] = entry
        dirs.update(parents)
    for d in directories:
        reason = bad_path_reason(d)
        if reason is None and (d in kept or any(p in kept for p in _parents(d))):
            reason = "collides with a file"
        if reason:
            skip("directory", d, reason)
            continue
        dirs.add(d)
        dirs.update(_parents(d))
    if skipped > LOGGED_SKIPS:
        log.warning("%s: skipped %d more listing entries", repo, skipped - LOGGED_SKIPS)
    return tuple(sorted(kept.values(), key=lambda e: e.path)), tuple(sorted(dirs))


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class Listings:
    """The newest listing per repo of a source without commits (S3, plain HTTP,
    `file://`), whose "commit" is a hash of every file's version: it changes exactly
    when a file does. Only the newest is kept per repo, so a URL that changes for
    months does not grow this (older listings live in the index)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}

    def add(self, repo_id: str, files: tuple[FileEntry, ...], directories: tuple[str, ...]) -> str:
        """Remember a cleaned listing; return its commit."""
        commit = hashlib.sha1("\n".join(
            f"{f.path}\0{f.size}\0{f.etag}" + (f"\0{f.version}" if f.version else "")
            for f in files).encode()).hexdigest()
        self._snapshots[repo_id] = Snapshot(repo_id, commit, files, directories)
        return commit

    def get(self, repo_id: str, commit: str) -> Snapshot:
        snap = self._snapshots.get(repo_id)
        if snap is None or snap.commit != commit:
            raise RemoteProtocolError(f"{repo_id}: listing {commit[:12]} is no longer known")
        return snap
