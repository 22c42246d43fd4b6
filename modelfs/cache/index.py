"""The cache index in LMDB (the one home of `lmdb`).

Sub-databases:

- `revs`:   source \\0 repo \\0 revision  -> JSON {commit, resolved_at}
- `snaps`:  source \\0 repo \\0 commit    -> zstd(JSON listing)
- `chunks`: content_id \\0 chunk_size \\0 index (u64 BE) -> chunk digest (32 bytes)
- `refs`:   chunk digest + chunk key    -> b"" (who uses a blob, so dropping one finds the other)
- `blobs`:  chunk digest               -> (disk_bytes u64, raw_size u64, codec u8, last_access f64,
                                          checksum u32 of the raw bytes: the quick check on first use;
                                          xxh3_64's low 32 bits, or crc32 for chunks stored before
                                          the XXH3 flag existed)
- `pins`:   source \\0 repo \\0 revision  -> b""
- `checked`: content_id                -> f64 (when the whole file last matched its sha256)
- `meta`:   b"format" -> u32; b"usage" -> u64, the sum of `disk_bytes` over `blobs`
- `jobs`:   job id                   -> JSON of a prefetch job (the control plane's, opaque here)

Every transaction is short and synchronous; callers never hold one across an
`await`. LMDB allows several processes (daemon, `modelfs prefetch`, `modelfs
cache`) at once: write transactions are serialised by LMDB, so `usage` stays
exact. Access times are kept in memory and written in batches (`touch`,
`flush_access`): a read never pays for a write transaction. Chunk records
stored by several threads at once share a commit (`put_chunk`), so a burst of
chunks pays for one fsync, not one each.

The map grows by doubling when full (`MapFullError`) and follows another
process's growth (`MapResizedError`); both need every transaction of this
process closed, which `_Guard` provides.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..errors import CacheCorrupt, CacheError, CacheFull
from ..types import FileEntry, Snapshot
from . import codec

T = TypeVar("T")

# What a damaged index raises inside a transaction: LMDB's own errors (a bad page),
# and records that do not decode (struct, JSON, UTF-8, zstd).
_DAMAGE = (lmdb.Error, struct.error, ValueError, KeyError, codec.CodecError)

# 3: blobs may carry the XXH3 flag. A format-2 index is upgraded in place on open (its
# blobs keep their crc32); modelfs versions that know only format 2 refuse a format-3
# index instead of taking every xxh3 checksum for damage.
FORMAT = 3
_BLOB = struct.Struct(">QQBdI")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
CODEC_RAW = 0
CODEC_ZSTD = 1
# Set in a blob's codec byte when its name is derived from (content id, chunk size,
# index) rather than hashed from its bytes: for files whose content id is itself a
# sha256 of the whole file (LFS), which the whole-file check verifies.
POSITIONAL = 0x80
# Set in a blob's codec byte when its checksum is the low 32 bits of xxh3_64 (10x
# cheaper than crc32); chunks stored before this flag carry a crc32.
XXH3 = 0x40
_FLAGS = POSITIONAL | XXH3


@dataclass(frozen=True, slots=True)
class IndexStats:
    revisions: int
    snapshots: int
    chunk_refs: int
    blobs: int
    usage: int
    map_size: int


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str
    disk_bytes: int
    raw_size: int
    codec: int  # CODEC_RAW | CODEC_ZSTD
    last_access: float
    checksum: int
    flags: int = 0  # POSITIONAL | XXH3

    @classmethod
    def unpack(cls, digest: str, raw: bytes) -> Blob:
        disk, size, codec, at, checksum = _BLOB.unpack(raw)
        return cls(digest, disk, size, codec & ~_FLAGS, at, checksum, codec & _FLAGS)

    @property
    def compressed(self) -> bool:
        return self.codec == CODEC_ZSTD

    @property
    def positional(self) -> bool:
        """Named by position, not by its bytes: only its checksum checks the chunk alone."""
        return bool(self.flags & POSITIONAL)

    @property
    def xxh3(self) -> bool:
        return bool(self.flags & XXH3)


@dataclass(frozen=True, slots=True)
class Revision:
    source: str
    repo_id: str
    revision: str
    commit: str
    resolved_at: float


def chunk_key(content_id: str, chunk_size: int, index: int) -> bytes:
    return f"{content_id}\0{chunk_size}\0".encode() + index.to_bytes(8, "big")


def _parse_chunk_key(key: bytes) -> tuple[str, int, int]:
    cid, size, _ = key[:-8].split(b"\0")
    return cid.decode(), int(size), int.from_bytes(key[-8:], "big")


def _name(source: str, repo: str, rev: str) -> bytes:
    return f"{source}\0{repo}\0{rev}".encode()


class _Put:
    """A chunk record waiting for the next group commit (`Index.put_chunk`)."""

    __slots__ = ("done", "error", "orphans", "rec")

    def __init__(self, rec: tuple[str, int, int, str, int, int, int, int]) -> None:
        self.rec = rec
        self.orphans: list[str] = []
        self.error: BaseException | None = None
        self.done = False


class _Guard:
    """Shared for transactions, exclusive for a map resize (which LMDB allows
    only while this process has no transaction open)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


# LMDB's file starts with two meta pages (lmdb's mdb.c, MDB_meta): at byte 16 of each
# the magic and version, at 40 the page size (the free DB's md_pad), at 136 the last
# page used and at 144 the transaction id. The newer valid one says how long the
# file must be; a shorter file (truncated) would be a SIGBUS on the first read.
_META_MAGIC = 0xBEEFC0DE
_DAMAGED_HINT = "`modelfs cache rebuild-index` keeps what still checks out, `modelfs cache clear` starts over"
DB_NAMES = (b"revs", b"snaps", b"chunks", b"refs", b"blobs", b"pins", b"checked", b"meta",
            b"jobs")


def check_index_file(path: Path) -> None:
    """Refuse an LMDB file that is shorter than its own meta pages say (a truncated or
    garbled index), before LMDB maps it. A missing or empty file is a new index."""
    data_file = path / "data.mdb"
    try:
        with open(data_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(2 * 65536)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheError(f"cache index {data_file}: {exc.strerror or exc}") from None
    if size == 0:
        return
    metas = []
    psize = 0
    for page in (0, 1):
        off = page * (psize or 4096)
        if len(head) < off + 152:
            break
        magic, version = struct.unpack_from("<II", head, off + 16)
        if magic != _META_MAGIC or version != 1:
            continue
        psize = psize or struct.unpack_from("<I", head, off + 40)[0]
        last_pg, txnid = struct.unpack_from("<QQ", head, off + 136)
        metas.append((txnid, last_pg))
    if not metas or psize < 512 or psize & (psize - 1):
        raise CacheCorrupt(f"index damaged: {data_file} has no valid LMDB header; "
                           f"{_DAMAGED_HINT}")
    need = (max(metas)[1] + 1) * psize
    if size < need:
        raise CacheCorrupt(f"index damaged: {data_file} is {size} bytes, its pages need {need} "
                           f"(truncated?); {_DAMAGED_HINT}")


class Index:
    def __init__(self, path: Path, *, map_size: int = 1 << 30,
                 readonly: bool = False) -> None:
        check_index_file(path)
        try:
            if not readonly:
                path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=10, subdir=True,
                                  readonly=readonly, lock=not readonly)
        except OSError as exc:
            raise CacheError(f"cache index {path}: {exc.strerror or exc}") from None
        except lmdb.Error as exc:
            raise CacheCorrupt(f"index damaged: cannot open {path} ({exc}); "
                               f"{_DAMAGED_HINT}") from None
        self.path = path
        self._guard = _Guard()
        self._queued: list[_Put] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._touched: dict[bytes, float] = {}
        try:
            names = set(DB_NAMES)
            if readonly:
                with self._env.begin() as txn:
                    names = {n for n in DB_NAMES if txn.get(n) is not None}

            def db(name: bytes) -> Any:
                if not readonly:
                    return self._env.open_db(name)
                return self._env.open_db(name, create=False) if name in names else None
            self._revs, self._snaps, self._chunks = db(b"revs"), db(b"snaps"), db(b"chunks")
            self._refs, self._blobs, self._pins = db(b"refs"), db(b"blobs"), db(b"pins")
            self._checked, self._meta, self._jobs = db(b"checked"), db(b"meta"), db(b"jobs")
        except lmdb.Error as exc:
            self._env.close()
            raise CacheCorrupt(f"index damaged: {path} ({exc}); {_DAMAGED_HINT}") from None
        if not readonly:
            self._check_format()

    def _check_format(self) -> None:
        def check(txn: lmdb.Transaction) -> int | None:
            raw = txn.get(b"format", db=self._meta)
            if raw is None and txn.stat(self._chunks)["entries"] == 0:
                txn.put(b"format", struct.pack(">I", FORMAT), db=self._meta)
                return FORMAT
            return struct.unpack(">I", raw)[0] if raw else None

        found = self._write(check)
        if found == 2:  # format 3 adds the XXH3 blob flag; older blobs keep their crc32
            self._write(lambda txn: txn.put(b"format", struct.pack(">I", FORMAT), db=self._meta))
            found = FORMAT
        if found != FORMAT:
            raise CacheCorrupt(f"cache index {self.path} has format {found or 1}; this modelfs "
                               f"uses format {FORMAT}: remove the cache directory to start over")

    def close(self) -> None:
        """Write pending access times and close; closing twice is a no-op."""
        if getattr(self, "_closed", False):
            return
        self.flush_access()
        self._env.close()
        self._closed = True

    # Transactions, with map growth -----------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                with self._guard.shared(), self._env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except _DAMAGE as exc:
                raise self._damaged(exc) from None

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                with self._guard.shared(), self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.DiskError as exc:
                raise CacheFull(f"cache index {self.path}: {exc}") from None
            except _DAMAGE as exc:
                raise self._damaged(exc) from None

    def _damaged(self, exc: Exception) -> CacheCorrupt:
        """LMDB found a bad page, or a record does not decode: one line, and what to do."""
        return CacheCorrupt(f"index damaged: {self.path} ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); {_DAMAGED_HINT}")

    def _adopt_map_size(self) -> None:
        with self._guard.exclusive():
            self._env.set_mapsize(0)  # take the size another process grew the map to

    def _grow_map(self) -> None:
        with self._guard.exclusive():
            size = self._env.info()["map_size"] * 2
            self._env.set_mapsize(size)

    # Revisions and listings ---------------------------------------------------

    def get_revision(self, source: str, repo: str, rev: str) -> tuple[str, float] | None:
        raw = self._read(lambda txn: txn.get(_name(source, repo, rev), db=self._revs))
        if raw is None:
            return None
        rec = json.loads(raw)
        return rec["commit"], rec["resolved_at"]

    def put_revision(self, source: str, repo: str, rev: str, commit: str,
                     resolved_at: float | None = None) -> None:
        rec = {"commit": commit, "resolved_at": time.time() if resolved_at is None else resolved_at}
        self._write(lambda txn: txn.put(_name(source, repo, rev), json.dumps(rec).encode(),
                                        db=self._revs))

    def revisions(self) -> list[Revision]:
        def scan(txn: lmdb.Transaction) -> list[Revision]:
            out = []
            for key, raw in txn.cursor(db=self._revs):
                source, repo, rev = key.decode().split("\0")
                rec = json.loads(raw)
                out.append(Revision(source, repo, rev, rec["commit"], rec["resolved_at"]))
            return out

        return self._read(scan)

    def get_snapshot(self, source: str, repo: str, commit: str) -> Snapshot | None:
        raw = self._read(lambda txn: txn.get(_name(source, repo, commit), db=self._snaps))
        if raw is None:
            return None
        rec = json.loads(codec.decompress(raw))
        files = tuple(FileEntry(*row) for row in rec["files"])
        return Snapshot(repo, commit, files, tuple(rec["dirs"]))

    def put_snapshot(self, source: str, snap: Snapshot) -> None:
        rec = {"files": [[f.path, f.size, f.content_id, f.sha256,
                          *([f.etag, f.version] if f.version else [f.etag] if f.etag else [])]
                         for f in snap.files],
               "dirs": list(snap.directories)}
        blob = codec.compress(json.dumps(rec, separators=(",", ":")).encode())
        self._write(lambda txn: txn.put(_name(source, snap.repo_id, snap.commit), blob,
                                        db=self._snaps))

    # Pins -----------------------------------------------------------------------------

    def pin(self, source: str, repo: str, rev: str) -> None:
        self._write(lambda txn: txn.put(_name(source, repo, rev), b"", db=self._pins))

    def unpin(self, source: str, repo: str, rev: str) -> bool:
        return self._write(lambda txn: txn.delete(_name(source, repo, rev), db=self._pins))

    def pins(self) -> list[tuple[str, str, str]]:
        def scan(txn: lmdb.Transaction) -> list[tuple[str, str, str]]:
            return [tuple(k.decode().split("\0")) for k in txn.cursor(db=self._pins).iternext(
                values=False)]

        return self._read(scan)

    # Chunks ---------------------------------------------------------------------

    def get_chunk(self, content_id: str, chunk_size: int, index: int) -> str | None:
        """The digest (hex sha256) of a cached chunk of a file version, or None."""
        raw = self._read(lambda txn: txn.get(chunk_key(content_id, chunk_size, index),
                                             db=self._chunks))
        return raw.hex() if raw is not None else None

    def file_chunks(self, content_id: str, chunk_size: int) -> dict[int, str]:
        """Every cached chunk of a file version: index -> digest."""
        prefix = f"{content_id}\0{chunk_size}\0".encode()

        def scan(txn: lmdb.Transaction) -> dict[int, str]:
            out = {}
            cur = txn.cursor(db=self._chunks)
            if cur.set_range(prefix):
                for key, d in cur:
                    if not key.startswith(prefix):
                        break
                    out[int.from_bytes(key[-8:], "big")] = d.hex()
            return out

        return self._read(scan)

    def chunk_sizes(self, content_id: str) -> set[int]:
        """The chunk sizes a file version has chunks cached at (usually one)."""
        prefix = f"{content_id}\0".encode()

        def scan(txn: lmdb.Transaction) -> set[int]:
            sizes: set[int] = set()
            cur = txn.cursor(db=self._chunks)
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                _, size, _ = _parse_chunk_key(cur.key())
                sizes.add(size)
                ok = cur.set_range(f"{content_id}\0{size + 1}\0".encode())
            return sizes

        return self._read(scan)

    def put_chunk(self, content_id: str, chunk_size: int, index: int, digest: str,
                  disk_bytes: int, raw_size: int, codec_id: int = CODEC_RAW,
                  checksum: int = 0) -> list[str]:
        """Record a chunk stored on disk (after its file was renamed into place).

        Returns the digests of blobs this made unused (the key pointed at other
        bytes before): the caller deletes their files.

        Group commit: puts from several threads that arrive while a commit is
        under way go into the next transaction together, so a burst of chunks pays
        for one fsync instead of one each (they queue on LMDB's writer lock anyway).
        """
        entry = _Put((content_id, chunk_size, index, digest, disk_bytes, raw_size, codec_id,
                      checksum))
        with self._queue_lock:
            self._queued.append(entry)
        with self._commit_lock:
            if not entry.done:  # else a commit that ran while this thread waited took it
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit_puts(batch)
        if entry.error is not None:
            raise entry.error
        return entry.orphans

    def _commit_puts(self, batch: list[_Put]) -> None:
        now = time.time()

        def put(txn: lmdb.Transaction) -> list[list[str]]:
            orphans = [self._insert(txn, e.rec, now) for e in batch]
            self._write_touches(txn)
            return orphans

        try:
            results = self._write(put)
        except BaseException as exc:
            for e in batch:
                e.error, e.done = exc, True
            return
        for e, orphans in zip(batch, results, strict=True):
            e.orphans, e.done = orphans, True

    def put_chunks(self, records: list[tuple[str, int, int, str, int, int, int, int]]) -> None:
        """Record many stored chunks in one transaction, as `put_chunk` takes them
        (content_id, chunk_size, index, digest, disk_bytes, raw_size, codec, checksum).
        For bulk imports: blobs made unused are not reported."""
        now = time.time()
        self._write(lambda txn: [self._insert(txn, rec, now) for rec in records])

    def _insert(self, txn: lmdb.Transaction, rec: tuple[str, int, int, str, int, int, int, int],
                now: float) -> list[str]:
        content_id, chunk_size, index, digest, disk_bytes, raw_size, codec_id, checksum = rec
        d, key = bytes.fromhex(digest), chunk_key(content_id, chunk_size, index)
        orphans = []
        old = txn.get(key, db=self._chunks)
        if old is not None and old != d:
            orphans = self._unref(txn, old, key)
        txn.put(key, d, db=self._chunks)
        txn.put(d + key, b"", db=self._refs)
        if txn.get(d, db=self._blobs) is None:
            txn.put(d, _BLOB.pack(disk_bytes, raw_size, codec_id, now, checksum), db=self._blobs)
            self._add_usage(txn, disk_bytes)
        return orphans

    def drop_chunk(self, content_id: str, chunk_size: int, index: int) -> list[str]:
        """Forget one chunk reference; returns the digests of blobs left unused."""
        key = chunk_key(content_id, chunk_size, index)

        def drop(txn: lmdb.Transaction) -> list[str]:
            d = txn.pop(key, db=self._chunks)
            return self._unref(txn, d, key) if d is not None else []

        return self._write(drop)

    def drop_content(self, content_id: str) -> list[str]:
        """Forget every chunk of a file version (all chunk sizes); returns unused digests."""
        prefix = f"{content_id}\0".encode()

        def drop(txn: lmdb.Transaction) -> list[str]:
            cur = txn.cursor(db=self._chunks)
            found = []
            if cur.set_range(prefix):
                for key, d in cur:
                    if not key.startswith(prefix):
                        break
                    found.append((key, d))
            orphans = []
            for key, d in found:
                txn.delete(key, db=self._chunks)
                orphans += self._unref(txn, d, key)
            txn.delete(content_id.encode(), db=self._checked)
            return orphans

        return self._write(drop)

    def drop_blob(self, digest: str) -> None:
        """Forget a blob and every chunk that points at it (its file is damaged or gone)."""
        d = bytes.fromhex(digest)
        self._write(lambda txn: self._drop_blob(txn, d))

    def _drop_blob(self, txn: lmdb.Transaction, d: bytes) -> None:
        cur = txn.cursor(db=self._refs)
        keys = []
        if cur.set_range(d):
            for ref, _ in cur:
                if not ref.startswith(d):
                    break
                keys.append(ref[len(d):])
        for key in keys:
            txn.delete(d + key, db=self._refs)
            if txn.get(key, db=self._chunks) == d:
                txn.delete(key, db=self._chunks)
                txn.delete(_parse_chunk_key(key)[0].encode(), db=self._checked)
        raw = txn.pop(d, db=self._blobs)
        if raw is not None:
            self._add_usage(txn, -_BLOB.unpack(raw)[0])

    def _unref(self, txn: lmdb.Transaction, d: bytes, key: bytes) -> list[str]:
        """Remove one reference to blob `d`; drop the blob when none are left."""
        txn.delete(d + key, db=self._refs)
        cur = txn.cursor(db=self._refs)
        if cur.set_range(d) and cur.key().startswith(d):
            return []
        raw = txn.pop(d, db=self._blobs)
        if raw is None:
            return []
        self._add_usage(txn, -_BLOB.unpack(raw)[0])
        return [d.hex()]

    def _add_usage(self, txn: lmdb.Transaction, delta: int) -> None:
        usage = self._usage_in(txn) + delta
        txn.put(b"usage", _U64.pack(max(0, usage)), db=self._meta)

    def blob(self, digest: str) -> Blob | None:
        raw = self._read(lambda txn: txn.get(bytes.fromhex(digest), db=self._blobs))
        return Blob.unpack(digest, raw) if raw is not None else None

    def blobs(self) -> list[Blob]:
        return self._read(lambda txn: [Blob.unpack(d.hex(), v)
                                       for d, v in txn.cursor(db=self._blobs)])

    def reconcile(self, check: Callable[[Blob], bool]) -> tuple[int, int]:
        """After copying records out of a damaged index: keep each chunk entry whose
        blob record decodes and whose bytes `check` out, drop the rest, rebuild the
        references and usage from what is kept, and forget every whole-file check.
        Returns (chunk entries kept, dropped)."""
        def scan(txn: lmdb.Transaction) -> list[Blob]:
            out = []
            for d, raw in txn.cursor(db=self._blobs):
                if len(d) == 32 and len(raw) == _BLOB.size:
                    out.append(Blob.unpack(bytes(d).hex(), bytes(raw)))
            return out

        good = {b.digest: b for b in self._read(scan) if check(b)}

        def fix(txn: lmdb.Transaction) -> tuple[int, int]:
            txn.drop(self._refs, delete=False)
            txn.drop(self._checked, delete=False)
            kept, dropped, used = 0, 0, set()
            for key, d in list(txn.cursor(db=self._chunks)):
                key, d = bytes(key), bytes(d)
                if d.hex() in good and len(key) > 8 and key.count(b"\0") >= 2:
                    txn.put(d + key, b"", db=self._refs)
                    used.add(d.hex())
                    kept += 1
                else:
                    txn.delete(key, db=self._chunks)
                    dropped += 1
            for d in [bytes(k) for k in txn.cursor(db=self._blobs).iternext(values=False)]:
                if d.hex() not in used:
                    txn.delete(d, db=self._blobs)
            txn.put(b"usage", _U64.pack(sum(good[d].disk_bytes for d in used)), db=self._meta)
            return kept, dropped

        return self._write(fix)

    def usage(self) -> int:
        """Disk bytes of every indexed chunk file."""
        return self._read(self._usage_in)

    # Access times and eviction ------------------------------------------------------

    def touch(self, digest: str) -> None:
        """Note a read of a blob; written with the next write transaction or flush."""
        self._touched[bytes.fromhex(digest)] = time.time()

    def flush_access(self) -> None:
        if self._touched:
            self._write(self._write_touches)

    def _write_touches(self, txn: lmdb.Transaction) -> None:
        touched, self._touched = self._touched, {}
        for d, at in touched.items():
            raw = txn.get(d, db=self._blobs)
            if raw is not None:
                disk, size, cid, _, crc = _BLOB.unpack(raw)
                txn.put(d, _BLOB.pack(disk, size, cid, at, crc), db=self._blobs)

    def evict(self, target: int, protect: Callable[[str], bool]) -> list[str]:
        """Drop least-recently-used blobs until `usage` <= `target`, skipping those
        `protect` names (pinned, being read). Returns the digests dropped: the
        caller deletes their files after this commit, so a crash in between leaves
        only an unindexed file (`cache gc` removes it), never an entry without bytes."""

        def evict(txn: lmdb.Transaction) -> list[str]:
            self._write_touches(txn)
            usage = self._usage_in(txn)
            if usage <= target:
                return []
            order = sorted((_BLOB.unpack(v)[3], d, _BLOB.unpack(v)[0])
                           for d, v in txn.cursor(db=self._blobs))
            dropped = []
            for _, d, disk in order:
                if usage <= target:
                    break
                if protect(d.hex()):
                    continue
                self._drop_blob(txn, d)
                usage -= disk
                dropped.append(d.hex())
            return dropped

        return self._write(evict)

    def pinned_content(self) -> set[str]:
        """Content ids of every file in a pinned revision (as far as the index knows it)."""
        out: set[str] = set()
        for source, repo, rev in self.pins():
            known = self.get_revision(source, repo, rev)
            commit = known[0] if known else rev
            snap = self.get_snapshot(source, repo, commit)
            if snap:
                out.update(f.content_id for f in snap.files)
        return out

    def blob_contents(self, digest: str) -> set[str]:
        """Content ids of the files that use a blob."""
        d = bytes.fromhex(digest)

        def scan(txn: lmdb.Transaction) -> set[str]:
            out = set()
            cur = txn.cursor(db=self._refs)
            if cur.set_range(d):
                for ref in cur.iternext(values=False):
                    if not ref.startswith(d):
                        break
                    out.add(_parse_chunk_key(ref[len(d):])[0])
            return out

        return self._read(scan)

    # Whole-file checks ----------------------------------------------------------------

    def set_checked(self, content_id: str) -> None:
        self._write(lambda txn: txn.put(content_id.encode(), _F64.pack(time.time()),
                                        db=self._checked))

    def is_checked(self, content_id: str) -> bool:
        return self._read(lambda txn: txn.get(content_id.encode(), db=self._checked)) is not None

    # Prefetch jobs (kept across restarts) -------------------------------------------------

    def put_job(self, job_id: str, record: dict[str, object]) -> None:
        data = json.dumps(record, separators=(",", ":")).encode()
        self._write(lambda txn: txn.put(job_id.encode(), data, db=self._jobs))

    def delete_job(self, job_id: str) -> None:
        key = job_id.encode("utf-8", "surrogateescape")
        self._write(lambda txn: txn.delete(key, db=self._jobs))

    def jobs(self) -> list[dict[str, object]]:
        """Every saved job record, its `id` its key; one that is not a JSON object
        comes back as just `{"id": key}`, for the caller to report and drop."""
        def scan(txn: lmdb.Transaction) -> list[dict[str, object]]:
            out: list[dict[str, object]] = []
            for key, raw in txn.cursor(db=self._jobs):
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):
                    rec = None
                job_id = bytes(key).decode("utf-8", "surrogateescape")
                out.append({**rec, "id": job_id} if isinstance(rec, dict) else {"id": job_id})
            return out

        return self._read(scan)

    # Whole index ----------------------------------------------------------------------

    def clear_chunks(self) -> None:
        """Forget every chunk (listings and pins stay)."""
        def clear(txn: lmdb.Transaction) -> None:
            for db in (self._chunks, self._refs, self._blobs, self._checked):
                txn.drop(db, delete=False)
            txn.put(b"usage", _U64.pack(0), db=self._meta)
            self._touched.clear()

        self._write(clear)

    def statistics(self) -> IndexStats:
        def stat(txn: lmdb.Transaction) -> IndexStats:
            return IndexStats(
                revisions=txn.stat(self._revs)["entries"],
                snapshots=txn.stat(self._snaps)["entries"],
                chunk_refs=txn.stat(self._chunks)["entries"],
                blobs=txn.stat(self._blobs)["entries"],
                usage=self._usage_in(txn),
                map_size=self._env.info()["map_size"],
            )

        return self._read(stat)

    def _usage_in(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"usage", db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0
