"""Chunk files on disk, named by the sha256 of their (uncompressed) bytes.

A chunk is written under `tmp/`, then renamed into `chunks/ab/abcdef...`:
rename is atomic, so a reader (or a restart after `kill -9`) never sees a
partial chunk. Identical bytes land on the same name and are stored once.
A file holds the raw bytes or a zstd frame of them; the index records which.
All methods are synchronous; callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import mmap
import os
import stat
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..errors import CacheError
from . import codec
from .index import CODEC_RAW, CODEC_ZSTD

# Chunks written with O_DIRECT: whole 4 KiB blocks, up to the largest chunk size.
DIRECT_ALIGN = 4096
HUGE_PAGE = 2 << 20
DIRECT_MAX = 256 << 20


@dataclass(frozen=True, slots=True)
class Stored:
    digest: str
    disk_bytes: int  # blocks actually used, what the cache size limit counts
    codec: int
    checksum: int  # of the raw bytes, by `checksum(..., xxh3=True)`


def checksum(data: bytes | bytearray | memoryview, *, xxh3: bool) -> int:
    """The quick per-chunk check value: xxh3_64's low 32 bits (new chunks: ~70 GB/s),
    or crc32 (~5 GB/s; chunks stored by earlier versions)."""
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF if xxh3 else zlib.crc32(data)


def direct_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least `size` bytes, in whole 4 KiB blocks: what
    `ChunkStore.read_into` can fill with O_DIRECT (anonymous maps are page-aligned).
    Private: Python's default anonymous map is shared, i.e. shmem, whose page
    faults cost more and which no other process needs here.

    From 2 MiB up, the buffer's whole 2 MiB pieces are transparent huge pages,
    and its length is rounded up to 2 MiB, which makes Linux align the map to
    2 MiB: one O_DIRECT read into it is a few disk segments, where 4 KiB pages
    split it at the device's segment limit (254 on virtio-blk), which halved
    load throughput here (1.3 against 3.1 GB/s, docs/benchmarks.md). The rest
    (a chunk's +1 byte) stays in 4 KiB pages, so it costs one page, not one
    more huge page."""
    size = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    huge = size // HUGE_PAGE * HUGE_PAGE
    buf = mmap.mmap(-1, -(-size // HUGE_PAGE) * HUGE_PAGE if huge else size,
                    flags=mmap.MAP_PRIVATE)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP off ("never"): 4 KiB pages still work
            buf.madvise(mmap.MADV_HUGEPAGE, 0, huge)
    return buf


# What the cache directory holds directly; none of them may be a symlink.
_CACHE_ENTRIES = ("index", "chunks", "tmp", "modelfs.log", "control.sock")


def check_cache_dir(root: Path) -> None:
    """Create the cache directory owner-only, or refuse one this process cannot trust:
    owned by another user, writable by group or others, or holding symlinks where
    modelfs keeps its files (a planted `tmp` symlink would have the stale-temp sweep
    delete files elsewhere; a `chunks/xx` one, chunks written elsewhere). The way
    s3ql refuses a cache it does not own; checked once at start, as nobody else can
    write in a directory that passes."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(root)
    except FileExistsError:
        raise CacheError(f"cache dir {root}: not a directory") from None
    except OSError as exc:
        raise CacheError(f"cache dir {root}: {exc.strerror or exc}") from None
    euid = os.geteuid()
    if st.st_uid != euid:
        raise CacheError(f"cache dir {root}: owned by uid {st.st_uid}, not by this user "
                         f"(uid {euid}); chown it or pick another --cache-dir")
    if st.st_mode & 0o022:
        raise CacheError(f"cache dir {root}: writable by group or others (mode "
                         f"{st.st_mode & 0o777:o}); chmod 700 it")
    suspects = [root / name for name in _CACHE_ENTRIES]
    chunks = root / "chunks"
    if chunks.is_dir() and not chunks.is_symlink():
        suspects += list(chunks.iterdir())  # at most 256 prefix directories
    for path in suspects:
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(lst.st_mode):
            raise CacheError(f"cache dir {root}: {path.relative_to(root)} is a symlink; "
                             "modelfs never follows links inside its cache: remove it")
        if lst.st_uid != euid:
            raise CacheError(f"cache dir {root}: {path.relative_to(root)} is owned by uid "
                             f"{lst.st_uid}, not by this user (uid {euid})")


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._chunks = root / "chunks"
        self._tmp = root / "tmp"
        self._local = threading.local()  # per-thread O_DIRECT write buffers
        self._direct = True  # until the file system refuses O_DIRECT writes
        self._direct_read = True  # ... or reads
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._prefix = f"{os.getpid()}."
            self._seq = itertools.count()  # temp names of `_put_direct`
            self._drop_stale_temps()
        except OSError as exc:
            raise CacheError(f"cache dir {root}: {exc.strerror or exc}") from None

    def _drop_stale_temps(self) -> None:
        """Temp files of dead processes are incomplete by definition: drop them.

        Temp names start with the writer's pid, so a daemon starting beside a
        running `modelfs prefetch` on the same cache leaves its files alone.
        """
        for p in self._tmp.iterdir():
            pid = p.name.split(".", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                p.unlink(missing_ok=True)

    def path_for(self, digest: str) -> Path:
        return self._chunks / digest[:2] / digest

    def put(self, data: bytes | bytearray | memoryview, compression: str = "never",
            name: str | None = None, *, aligned: bool = False) -> Stored:
        """Store `data` (compressed if `compression` says so) under its sha256, or
        under `name` (a position-derived name: see `index.POSITIONAL`). `aligned`:
        `data` starts on a page boundary (a view of a `direct_buffer` from its
        start), so an O_DIRECT write can take it as it is."""
        digest = name or hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        packed = codec.compress_chunk(data, compression)
        body = data if packed is None else packed
        if self._put_direct(body, final, aligned=aligned and packed is None):
            disk = len(body)  # whole blocks, written through
        else:
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=self._prefix)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    blocks = os.fstat(f.fileno()).st_blocks
                self._rename(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            # st_blocks right after a write may not count delayed allocation yet; the
            # file's size rounded up to 4 KiB is what it will take.
            disk = max(blocks * 512, -(-len(body) // 4096) * 4096)
        return Stored(digest, disk, CODEC_RAW if packed is None else CODEC_ZSTD,
                      checksum(data, xxh3=True))

    def _put_direct(self, body: bytes | bytearray | memoryview, final: Path, *,
                    aligned: bool) -> bool:
        """Write a chunk of whole blocks with O_DIRECT, from `body` itself when it is
        `aligned`, else from a page-aligned per-thread copy, in four system calls
        (open, write, close, rename). O_DIRECT skips the page cache, which on a cold
        stream holds the bytes already (as the mount's file pages) and costs a second
        copy, page allocations and writeback (1 GiB of 4 MiB chunks, this VM: 1.49 s
        buffered with the sync, 0.52 s direct). Few calls matter too: a store runs in
        a worker thread that takes the GIL back after each, which waits for a busy
        event loop (eight calls before: 1.52 -> 1.46 s for an S3 prefetch of 1 GiB).
        False when not possible (a partial block, a file system without O_DIRECT
        such as tmpfs): the caller writes normally."""
        n = len(body)
        if not self._direct or n == 0 or n % DIRECT_ALIGN or n > DIRECT_MAX:
            return False
        source: bytes | bytearray | memoryview | mmap.mmap = body
        if not aligned:
            staged = getattr(self._local, "direct", None)
            if staged is None or len(staged) < n:
                staged = self._local.direct = direct_buffer(n)
            staged[:n] = body
            source = staged
        tmp = self._tmp / f"{self._prefix}{next(self._seq)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT,
                         0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False  # e.g. tmpfs: no O_DIRECT
            return False
        try:
            view = memoryview(source)[:n]
            done = 0
            try:
                while done < n:
                    done += os.write(fd, view[done:])
            except OSError as exc:
                if exc.errno != errno.EINVAL or done:
                    raise
                self._direct = False  # the file system refuses O_DIRECT writes
                tmp.unlink()
                return False
            finally:
                view.release()
                os.close(fd)
            self._rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _rename(self, tmp: str | Path, final: Path) -> None:
        """Move a written chunk into place, making its directory the first time."""
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(exist_ok=True)
            os.rename(tmp, final)

    def load(self, digest: str, codec_id: int, raw_size: int, check: int | None = None,
             *, xxh3: bool = True, into: mmap.mmap | None = None) -> bytes | memoryview | None:
        """A whole chunk, decompressed, if its file exists and holds `raw_size` bytes
        that match: their `checksum` when `check` is given (far cheaper), else
        their sha256, the file's name. None when missing or damaged.

        A raw chunk is read with O_DIRECT into `into` (a `direct_buffer` the caller
        reuses) or a buffer of its own: the bytes go to the mount's page cache
        anyway, so a second copy in the chunk file's page cache would only cost a
        copy and memory."""
        if codec_id == CODEC_RAW:
            # +1: a longer file shows
            buf = into if into is not None and len(into) > raw_size else direct_buffer(raw_size + 1)
            n = self.read_into(digest, buf, raw_size + 1)
            if n < 0:
                return None
            body: bytes | memoryview = memoryview(buf)[:n]
        else:
            try:
                with open(self.path_for(digest), "rb") as f:
                    body = f.read()
            except FileNotFoundError:
                return None
            try:
                body = codec.decompress(body, raw_size)
            except Exception:
                return None
        if len(body) != raw_size:
            return None
        if check is not None:
            return body if checksum(body, xxh3=xxh3) == check else None
        return body if hashlib.sha256(body).hexdigest() == digest else None

    def read_into(self, digest: str, buf: mmap.mmap | bytearray, limit: int | None = None) -> int:
        """Read a chunk file from its start into `buf` (at most `limit` bytes, rounded
        up to a block); the bytes read, or -1 when the file is gone. A page-aligned
        `buf` (an `mmap`) of whole 4 KiB blocks is filled with O_DIRECT, bypassing
        the page cache (where possible). `limit` matters for memory: O_DIRECT
        faults in the whole of the buffer it is given, read or not."""
        path = self.path_for(digest)
        direct = self._direct_read and isinstance(buf, mmap.mmap) and len(buf) % DIRECT_ALIGN == 0
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            return -1
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            self._direct_read = False  # e.g. tmpfs: no O_DIRECT
            return self.read_into(digest, buf, limit)
        target: mmap.mmap | bytearray | memoryview = buf
        if limit is not None and limit < len(buf):
            target = memoryview(buf)[:-(-limit // DIRECT_ALIGN) * DIRECT_ALIGN]
        try:
            return os.preadv(fd, [target], 0)  # a regular file reads short only at its end
        finally:
            os.close(fd)

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        """Every chunk file's name (walks the tree: for `cache gc`/`verify`, not hot paths)."""
        for _, _, files in os.walk(self._chunks):
            yield from files

    def count(self) -> int:
        return sum(1 for _ in self.digests())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
