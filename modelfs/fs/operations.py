"""FUSE request handlers (pyfuse3 on trio).

The one FUSE boundary: `_boundary` turns a `ModelfsError` into its errno and
any other exception into `EIO` plus a logged traceback, because pyfuse3 ends
its main loop (and the mount) on any exception that is not a `FUSEError`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ..errors import ModelfsError
from ..fetch import ChunkReader, OpenPrefetcher, next_shard
from ..types import RemoteFile
from .config import FsConfig
from .tree import ROOT_INODE, Node, StaticFile, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


# A read that has waited this long has its reader checked every READER_CHECK seconds:
# pyfuse3 passes no FUSE_INTERRUPT on, so a reader killed or interrupted (Ctrl-C)
# while the origin is slow would otherwise wait for the read's deadline.
READER_CHECK = 0.2
# Signals that mean "stop": pending and not blocked or ignored, the read is answered EINTR.
_STOP_SIGNALS = frozenset({1, 2, 3, 9, 15})  # HUP INT QUIT KILL TERM


def reader_gone(pid: int) -> bool:
    """Whether process `pid` (the opener of a file) has exited, or has a stop signal
    pending that a read in its way keeps it from acting on."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    masks = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn"):
            masks[key] = int(value.strip() or b"0", 16)
    pending = (masks.get(b"SigPnd", 0) | masks.get(b"ShdPnd", 0)) \
        & ~masks.get(b"SigBlk", 0) & ~masks.get(b"SigIgn", 0)
    return any(pending >> (sig - 1) & 1 for sig in _STOP_SIGNALS)


def _boundary(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ModelfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in FUSE %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _erofs(*_args: Any, **_kwargs: Any) -> Awaitable[Any]:
    async def fail() -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return fail()


# The mount root's attribute naming the daemon's API socket (`modelfs.spans`).
SOCKET_XATTR = b"user.modelfs.control_socket"
# A file handle is its inode << HANDLE_BITS | a serial number.
HANDLE_BITS = 32
HANDLE_MASK = (1 << HANDLE_BITS) - 1


class Operations(pyfuse3.Operations):
    """Read-only operations over a `Tree`; file data comes from a `ChunkReader`."""

    enable_writeback_cache = False

    def __init__(self, tree: Tree, reader: ChunkReader, config: FsConfig,
                 prefetcher: OpenPrefetcher | None = None, *, inherited: bool = False,
                 root_xattrs: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._tree = tree
        self._reader = reader
        self._prefetcher = prefetcher
        self._config = config
        self._uid = os.getuid()
        self._gid = os.getgid()
        # Kernel references per inode (lookup/readdirplus minus forget): an inode of a
        # tree that was replaced may be dropped only once this reaches zero.
        self._lookups: Counter[int] = Counter()
        self._detached: set[int] = set()  # replaced inodes the kernel still references
        # Taken over from a predecessor daemon: the kernel may reference any of these
        # inodes with counts we never saw, so they are never dropped.
        self._inherited: set[int] = {n.inode for n in tree.nodes()} if inherited else set()
        # Stopping: no more kernel invalidations (one may wait on a request in flight).
        self.stopping = False
        self._root_xattrs = root_xattrs or {}
        self._handles: dict[int, RemoteFile | StaticFile] = {}
        self._openers: dict[int, int] = {}  # file handle -> pid of the process that opened it
        self._fh = itertools.count(1)
        # Reads in progress: (opener pid, the read's cancel scope, when it started).
        self._reads: dict[object, tuple[int, trio.CancelScope, float]] = {}

    # Every mutating request: read-only file system.
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs  # type: ignore[assignment]
    write = create = setxattr = removexattr = _erofs  # type: ignore[assignment]

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        node = self._tree[inode]
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(inode)
        a.generation = 0
        a.entry_timeout = self._config.attr_ttl
        a.attr_timeout = self._config.attr_ttl
        if node.file is None:
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            a.st_nlink = 1
            a.st_size = node.file.size if isinstance(node.file, StaticFile) else node.file.entry.size
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_blksize = self._config.blksize
        a.st_blocks = -(-a.st_size // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    def _next_shard(self, node: Node) -> RemoteFile | None:
        """The shard a loader reads after `node`'s, in the same directory (same repo
        version), for the prefetcher; None if there is none."""
        name = next_shard(node.name)
        after = self._tree.child(node.parent, name) if name is not None else None
        if after is None or not isinstance(after.file, RemoteFile) \
                or not isinstance(node.file, RemoteFile) or after.file.commit != node.file.commit:
            return None
        return after.file

    def _node_or_enoent(self, inode: int) -> None:
        if self._tree.get(inode) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)

    @_boundary
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._tree.child(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._lookups[node.inode] += 1
        return self._attrs(node.inode)

    @property
    def tree(self) -> Tree:
        return self._tree

    async def replace(self, parent: int, name: str, build: Callable[[Tree], object]) -> None:
        """Swap the subtree at `parent`/`name` for the one `build` adds (a repo moved to
        a new commit). Call from a task, never from a request handler: it waits for
        the kernel to drop its cached entries, which waits on requests in flight.

        The new subtree is merged into the old one: only entries that changed are
        replaced (and dropped from the kernel's cache), so unchanged files keep
        their inode and the kernel keeps their pages. Names that are new show only
        once the kernel has dropped every changed entry: whoever sees a new file
        opens the new version of every other (the kernel would otherwise serve a
        changed name from its cached entry, the old inode, until that is dropped).
        Open files keep reading what they opened (handles hold their
        `RemoteFile`); old inodes go away once the kernel forgets them.
        """
        old = self._tree.swap_child(parent, name, None)
        build(self._tree)
        new = self._tree.swap_child(parent, name, old)
        if old is not None and new is not None and self._tree[old].is_dir \
                and self._tree[new].is_dir:
            gone, changed, added = self._tree.merge(old, new)
        else:  # nothing there before, or not a directory: swap the whole entry
            self._tree.swap_child(parent, name, new)
            gone = self._tree.subtree(old) if old is not None else []
            changed, added = [(parent, name)], []
        for ino in gone:
            if self._lookups[ino] > 0 or ino in self._inherited:
                self._detached.add(ino)
            else:
                self._tree.remove(ino)
        for dir_inode, entry in changed:
            await self._invalidate_entry(dir_inode, entry)
        self._tree.link(added)

    async def _invalidate_entry(self, dir_inode: int, name: str) -> None:
        """Have the kernel drop its entry `name` in `dir_inode`, in a worker thread: the
        kernel waits for a lookup in that directory in flight, which this event loop
        must stay free to answer. Not once stopping, nor where the kernel never had
        the entry (or there is no mount)."""
        if self.stopping:
            return
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, pyfuse3.InodeT(dir_inode),
                                          pyfuse3.FileNameT(os.fsencode(name)))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("kernel entry %r of inode %d not dropped: %s", name, dir_inode, exc)

    async def invalidate_content(self, content_id: str) -> None:
        """Drop the kernel's cached pages of every inode showing `content_id`. In a
        worker thread: the kernel may wait for a read in flight on those pages, which
        this event loop must stay free to answer."""
        inodes = [n.inode for n in list(self._tree.nodes())
                  if isinstance(n.file, RemoteFile) and n.file.entry.content_id == content_id]
        for ino in inodes:
            if self.stopping:
                return
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, pyfuse3.InodeT(ino))
            except OSError as exc:
                log.debug("kernel cache of inode %d not invalidated: %s", ino, exc)

    @_boundary
    async def forget(self, inode_list: Any) -> None:
        for inode, n in inode_list:
            left = self._lookups[inode] - n
            if left > 0:
                self._lookups[inode] = left
            else:
                del self._lookups[inode]
                if inode in self._detached and inode not in self._inherited:
                    self._detached.discard(inode)
                    self._tree.remove(inode)

    @_boundary
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._node_or_enoent(inode)
        return self._attrs(inode)

    @_boundary
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        self._node_or_enoent(inode)
        if not self._tree[inode].is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_boundary
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        children = self._tree[fh].children or {}
        names = sorted(children)
        for i in range(start_id, len(names)):
            ino = children[names[i]]
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attrs(ino), i + 1):
                break
            self._lookups[ino] += 1  # readdirplus counts as a lookup

    @_boundary
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_boundary
    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._node_or_enoent(inode)
        node = self._tree[inode]
        if node.file is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        # The handle names its inode, so a successor daemon can serve it (`_handle`).
        fh = inode << HANDLE_BITS | next(self._fh) & HANDLE_MASK
        self._handles[fh] = node.file
        self._openers[fh] = ctx.pid
        if isinstance(node.file, RemoteFile):
            self._reader.reopened(node.file)
            if self._prefetcher is not None:
                self._prefetcher.on_open(node.file, self._next_shard(node))
        # An inode never changes content, so its pages may stay cached.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @_boundary
    async def read(  # type: ignore[override]  # pyfuse3 replies with any buffer; its stub says bytes
            self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes | memoryview:
        f = self._handle(fh)
        if isinstance(f, StaticFile):
            return f.content[off:off + size]
        token = object()
        with trio.CancelScope() as scope:
            self._reads[token] = (self._openers.get(fh, 0), scope, trio.current_time())
            try:
                return await self._reader.read(f, off, size)
            finally:
                del self._reads[token]
        log.info("read of %s at offset %d: its reader went away; answered EINTR", f.name, off)
        raise pyfuse3.FUSEError(errno.EINTR)

    def file_at(self, path: str) -> RemoteFile | None:
        """The file at `path` under the mount (`ORG/NAME/FILE`), for span plans."""
        node = self._tree[ROOT_INODE]
        for part in path.strip("/").split("/"):
            child = self._tree.child(node.inode, part) if part not in ("", ".", "..") else None
            if child is None:
                return None
            node = child
        return node.file if isinstance(node.file, RemoteFile) else None

    def _handle(self, fh: int) -> RemoteFile | StaticFile:
        """The file an open handle reads. A handle this daemon did not open was opened
        through a predecessor: its inode (the high bits) says which file."""
        f = self._handles.get(fh)
        if f is None:
            node = self._tree.get(fh >> HANDLE_BITS)
            if node is None or node.file is None or fh >> HANDLE_BITS not in self._inherited:
                raise pyfuse3.FUSEError(errno.EBADF)
            f = self._handles[fh] = node.file
        return f

    async def watch_readers(self) -> None:
        """Answer the reads of readers that went away (see `reader_gone`); until cancelled."""
        while True:
            await trio.sleep(READER_CHECK)
            now = trio.current_time()
            verdicts: dict[int, bool] = {}
            for pid, scope, started in list(self._reads.values()):
                if pid and now - started >= READER_CHECK:
                    if pid not in verdicts:
                        verdicts[pid] = reader_gone(pid)
                    if verdicts[pid]:
                        scope.cancel()

    @_boundary
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        opened_here = self._openers.pop(fh, None) is not None
        f = self._handles.pop(fh, None)
        if isinstance(f, RemoteFile) and self._prefetcher is not None and opened_here:
            self._prefetcher.on_release(f)

    @_boundary
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-self._tree.total_size() // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._tree)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_boundary
    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        value = self._root_xattrs.get(bytes(name)) if inode == ROOT_INODE else None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_boundary
    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> list[pyfuse3.XAttrNameT]:
        return []
