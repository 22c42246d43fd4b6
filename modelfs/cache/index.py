"""The cache index in LMDB (the one home of `lmdb`).

Sub-databases:

- `revs`:   source \\0 repo \\0 revision  -> JSON {commit, resolved_at}
- `snaps`:  source \\0 repo \\0 commit    -> zstd(JSON listing)
- `chunks`: content_id \\0 chunk_size \\0 index (u64 BE) -> chunk sha256 (32 bytes)
- `blobs`:  chunk sha256 (32 bytes)      -> (stored_size u64, raw_size u64, codec u8, last_access f64)

Every transaction is short and synchronous; callers never hold one across an
`await`. LMDB allows several processes (daemon, `modelfs prefetch`) at once.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..errors import CacheCorrupt, CacheError
from ..types import FileEntry, Snapshot
from . import codec

_BLOB = struct.Struct(">QQBd")
CODEC_RAW = 0


@dataclass(frozen=True, slots=True)
class IndexStats:
    revisions: int
    snapshots: int
    chunk_refs: int
    blobs: int


def chunk_key(content_id: str, chunk_size: int, index: int) -> bytes:
    return f"{content_id}\0{chunk_size}\0".encode() + index.to_bytes(8, "big")


class Index:
    # LMDB's map is address space, not disk: the file grows only as pages are
    # written. 1 TiB means the index never fills (it would take billions of
    # chunks), so no resize dance across processes and threads is needed.
    def __init__(self, path: Path, *, map_size: int = 1 << 40) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True)
        except OSError as exc:
            raise CacheError(f"cache index {path}: {exc.strerror or exc}") from None
        except lmdb.Error as exc:
            raise CacheCorrupt(f"cannot open cache index {path}: {exc}") from None
        self._revs = self._env.open_db(b"revs")
        self._snaps = self._env.open_db(b"snaps")
        self._chunks = self._env.open_db(b"chunks")
        self._blobs = self._env.open_db(b"blobs")

    def close(self) -> None:
        self._env.close()

    # Revisions and listings ---------------------------------------------------

    def get_revision(self, source: str, repo: str, rev: str) -> tuple[str, float] | None:
        with self._env.begin(db=self._revs) as txn:
            raw = txn.get(f"{source}\0{repo}\0{rev}".encode())
        if raw is None:
            return None
        rec = json.loads(raw)
        return rec["commit"], rec["resolved_at"]

    def put_revision(self, source: str, repo: str, rev: str, commit: str,
                     resolved_at: float | None = None) -> None:
        rec = {"commit": commit, "resolved_at": time.time() if resolved_at is None else resolved_at}
        with self._env.begin(db=self._revs, write=True) as txn:
            txn.put(f"{source}\0{repo}\0{rev}".encode(), json.dumps(rec).encode())

    def get_snapshot(self, source: str, repo: str, commit: str) -> Snapshot | None:
        with self._env.begin(db=self._snaps) as txn:
            raw = txn.get(f"{source}\0{repo}\0{commit}".encode())
        if raw is None:
            return None
        rec = json.loads(codec.decompress(raw))
        files = tuple(FileEntry(p, s, c, h) for p, s, c, h in rec["files"])
        return Snapshot(repo, commit, files, tuple(rec["dirs"]))

    def put_snapshot(self, source: str, snap: Snapshot) -> None:
        rec = {"files": [[f.path, f.size, f.content_id, f.sha256] for f in snap.files],
               "dirs": list(snap.directories)}
        blob = codec.compress(json.dumps(rec, separators=(",", ":")).encode())
        with self._env.begin(db=self._snaps, write=True) as txn:
            txn.put(f"{source}\0{snap.repo_id}\0{snap.commit}".encode(), blob)

    # Chunks ---------------------------------------------------------------------

    def get_chunk(self, content_id: str, chunk_size: int, index: int) -> str | None:
        """The sha256 (hex) of a cached chunk of a file version, or None."""
        with self._env.begin(db=self._chunks) as txn:
            raw = txn.get(chunk_key(content_id, chunk_size, index))
        return raw.hex() if raw is not None else None

    def put_chunk(self, content_id: str, chunk_size: int, index: int, digest: str,
                  stored_size: int, raw_size: int, codec_id: int = CODEC_RAW) -> None:
        """Record a chunk stored on disk (after its file was renamed into place)."""
        d = bytes.fromhex(digest)
        with self._env.begin(write=True) as txn:
            txn.put(chunk_key(content_id, chunk_size, index), d, db=self._chunks)
            txn.put(d, _BLOB.pack(stored_size, raw_size, codec_id, time.time()), db=self._blobs)

    def drop_chunk(self, content_id: str, chunk_size: int, index: int) -> None:
        """Forget one chunk reference (its file was found missing or damaged)."""
        with self._env.begin(write=True, db=self._chunks) as txn:
            txn.delete(chunk_key(content_id, chunk_size, index))

    def statistics(self) -> IndexStats:
        with self._env.begin() as txn:
            return IndexStats(
                revisions=txn.stat(self._revs)["entries"],
                snapshots=txn.stat(self._snaps)["entries"],
                chunk_refs=txn.stat(self._chunks)["entries"],
                blobs=txn.stat(self._blobs)["entries"],
            )
