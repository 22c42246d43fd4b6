"""Local and NFS directories: `--repo ORG/NAME=file:///path/`.

The tree is served read-only through the chunk cache: on NFS the cache is the
point (a node keeps its own copy of what it read, and cached files stay
readable when the share goes away, as with the Hub offline). A file's version
is (size, mtime in ns, inode number), its content id a hash of that and its
real path; the repo's "commit" a hash of the whole walk, so `resolve` is the
re-listing that `revision_ttl` drives. A read checks the open file is still
that version before and after it reads, so a file changed under it gives
ESTALE, never a blend. Reads are `preadv` in worker threads (bounded, and
abandoned at the read deadline: a hung NFS server holds a thread, not the
mount).

Symlinks are followed only when they resolve inside the tree; one pointing
outside it (or anything but a regular file or directory) is skipped with a
warning.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

import trio

from ..errors import (
    ListingRejected,
    ModelfsError,
    RemoteAuthError,
    RemoteNotFound,
    RemoteProtocolError,
    RemoteStale,
    RemoteUnavailable,
)
from ..threads import run_abandonable
from ..types import FileEntry, ReadInto, RepoRef, Snapshot, printable
from .config import FileSourceConfig
from .listing import LOGGED_SKIPS, Listings, bad_size_reason, clean_listing

log = logging.getLogger(__name__)

# Directory levels a walk descends.
MAX_DEPTH = 64
# Errors of a share that went away or hangs: worth serving from the cache.
_UNAVAILABLE = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ENOTCONN, errno.ESTALE,
                          errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH,
                          errno.ECONNREFUSED, errno.ENODEV, errno.ENXIO})


# Bytes one `preadv` asks for (into the thread's own buffer; see `FileSource._pread`).
READ_PIECE = 1 << 20


class _Lease:
    """Whether a read's thread may still write into the caller's buffer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.valid = True


def version_of(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"


def content_id(real_path: str, version: str) -> str:
    """Named by the file's real path and version, not the repo's: two repos over one
    tree (or a symlink inside it) share the file's chunks."""
    return "file-" + hashlib.sha256(f"{real_path}\n{version}".encode()).hexdigest()


def _error(exc: OSError, what: str) -> ModelfsError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return RemoteAuthError(f"{what}: permission denied")
    if exc.errno in _UNAVAILABLE:
        return RemoteUnavailable(f"{what}: {reason}")
    return RemoteProtocolError(f"{what}: {reason}")


class FileSource:
    """One directory tree, mounted as any number of repo ids."""

    def __init__(self, url: str, config: FileSourceConfig) -> None:
        self._root = unquote(urlsplit(url).path).rstrip("/") or "/"
        self._url = url
        self._config = config
        self._threads = trio.CapacityLimiter(config.threads)
        self.key = f"file:{self._root}"
        self._listings = Listings()
        # Where each listed path is read from (the target of a symlink inside the tree).
        self._real: dict[str, str] = {}

    async def aclose(self) -> None:
        pass

    def file_url(self, repo_id: str, commit: str, path: str) -> str:
        return f"file://{quote(self._root.rstrip('/'))}/{quote(path)}"

    async def resolve(self, ref: RepoRef) -> str:
        what = f"{ref.repo_id}: {self._url}"
        deadline = self._config.listing_deadline
        with trio.move_on_after(deadline) as scope:
            found, dirs, real = await run_abandonable(self._walk, what, limiter=self._threads)
        if scope.cancelled_caught:
            raise RemoteUnavailable(f"{what}: listing did not finish within {deadline:.0f}s "
                                    "(a hung share?)")
        kept, directories = clean_listing(ref.repo_id, found, dirs)
        self._real = {f.path: real[f.path] for f in kept}  # the newest walk only
        return self._listings.add(ref.repo_id, kept, directories)

    def _walk(self, what: str) -> tuple[list[FileEntry | tuple[str, str]], list[str],
                                        dict[str, str]]:
        """(entries or (path, reason) pairs, directories, path -> real path), in a thread."""
        try:
            top = os.stat(self._root)
        except FileNotFoundError:
            raise RemoteUnavailable(f"{what}: no such directory") from None
        except OSError as exc:
            raise _error(exc, what) from None
        if not stat.S_ISDIR(top.st_mode):
            raise RemoteNotFound(f"{what}: not a directory")
        root_real = os.path.realpath(self._root)
        files: list[FileEntry | tuple[str, str]] = []
        dirs: list[str] = []
        real: dict[str, str] = {}
        visited = {(top.st_dev, top.st_ino)}
        todo = [("", root_real)]
        cap = self._config.max_listing_entries
        skipped = 0

        def skip(path: str, reason: str) -> None:
            nonlocal skipped
            skipped += 1
            if skipped <= LOGGED_SKIPS:
                log.warning("%s: skipping %s: %s", what, printable(path), reason)

        while todo:
            rel, full = todo.pop()
            if rel.count("/") >= MAX_DEPTH:
                raise ListingRejected(f"{what}: directories nest more than {MAX_DEPTH} deep")
            try:
                with os.scandir(full) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if not rel:
                    raise _error(exc, what) from None
                skip(rel, f"cannot list it ({os.strerror(exc.errno or 0)})")
                continue
            if len(files) + len(dirs) + len(entries) > cap:
                raise ListingRejected(f"{what}: more than {cap} entries; raise "
                                      "max_listing_entries if it really is that large")
            for e in entries:
                path = f"{rel}{e.name}"
                target = e.path
                try:
                    if e.is_symlink():
                        target = os.path.realpath(e.path)
                        if not target.startswith(root_real.rstrip("/") + "/"):
                            skip(path, "a symlink that points outside the tree")
                            continue
                    st = os.stat(target)
                except OSError as exc:
                    skip(path, os.strerror(exc.errno or 0))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in visited:
                        skip(path, "a directory seen before (a symlink loop?)")
                        continue
                    visited.add((st.st_dev, st.st_ino))
                    dirs.append(path)
                    todo.append((path + "/", target))
                elif stat.S_ISREG(st.st_mode):
                    if (bad := bad_size_reason(st.st_size, self._config.max_file_size)):
                        files.append((path, bad))
                        continue
                    version = version_of(st)
                    files.append(FileEntry(path, st.st_size,
                                           content_id(os.path.realpath(target), version),
                                           etag=version))
                    real[path] = target
                else:
                    skip(path, "not a regular file or directory")
        if skipped > LOGGED_SKIPS:
            log.warning("%s: skipped %d more entries", what, skipped - LOGGED_SKIPS)
        return files, dirs, real

    async def list_files(self, repo_id: str, commit: str) -> Snapshot:
        return self._listings.get(repo_id, commit)

    async def read(self, repo_id: str, commit: str, entry: FileEntry, start: int, length: int,
                   *, into: ReadInto | None = None,
                   progress: Callable[[int], None] | None = None) -> bytearray | memoryview:
        what = f"{repo_id}: {entry.path}"
        if start < 0 or start + length > entry.size:
            raise RemoteNotFound(f"{what}: range beyond end of file")
        if into is not None and not isinstance(into, bytearray | memoryview):
            # Buffer after buffer: a local read gains nothing from one large request.
            done = 0
            while done < length:
                part = await into.next()
                await self._read_one(what, entry, start + done, part)
                done += len(part)
                if progress is not None:
                    progress(done)
            return bytearray()
        buf = into if into is not None else bytearray(length)
        if len(buf) != length:
            raise ValueError("buffer size does not match the range")
        await self._read_one(what, entry, start, buf)
        if progress is not None:
            progress(length)
        return buf

    async def _read_one(self, what: str, entry: FileEntry, start: int,
                        buf: bytearray | memoryview) -> None:
        length = len(buf)
        path = self._real.get(entry.path) or os.path.join(self._root, entry.path)
        lease = _Lease()
        # The same bound as an HTTP attempt: timeout + bytes / min_rate.
        deadline = self._config.http.attempt_time(length)
        try:
            with trio.move_on_after(deadline) as scope:
                await run_abandonable(self._pread, path, entry, start, buf, what, lease,
                                      limiter=self._threads)
        except BaseException:
            with lease.lock:  # from here on the thread no longer writes into `buf`
                lease.valid = False
            raise
        if scope.cancelled_caught:
            with lease.lock:
                lease.valid = False
            raise RemoteUnavailable(f"{what}: no answer from the file system within "
                                    f"{deadline:.0f}s (a hung share?)")

    @staticmethod
    def _pread(path: str, entry: FileEntry, start: int, buf: bytearray | memoryview,
               what: str, lease: _Lease) -> None:
        """Fill `buf` from `start` of the file, which must be `entry`'s version
        before and after the read.

        The file is read into a small buffer of this thread's and copied into `buf`
        under `lease`: a read abandoned at its deadline (a hung share) may finish
        long after `buf` went back to the pool, and must not write into it then."""
        scratch = bytearray(min(READ_PIECE, len(buf)))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RemoteStale(f"{what}: the file is gone from the directory") from None
        except OSError as exc:
            raise _error(exc, what) from None
        try:
            if version_of(os.fstat(fd)) != entry.etag:
                raise RemoteStale(f"{what}: the file changed since it was listed")
            view, piece = memoryview(buf), memoryview(scratch)
            done = 0
            while done < len(view):
                n = os.preadv(fd, [piece[:len(view) - done]], start + done)
                if n == 0:
                    raise RemoteStale(f"{what}: the file shrank while it was read")
                with lease.lock:
                    if not lease.valid:
                        return
                    view[done:done + n] = piece[:n]  # a view: one copy, no allocation
                done += n
            if version_of(os.fstat(fd)) != entry.etag:
                raise RemoteStale(f"{what}: the file changed while it was read")
        except OSError as exc:
            raise _error(exc, what) from None
        finally:
            os.close(fd)
