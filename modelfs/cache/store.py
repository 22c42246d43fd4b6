"""Chunk files on disk, named by the sha256 of their bytes.

A chunk is written under `tmp/`, then renamed into `chunks/ab/abcdef...`:
rename is atomic, so a reader (or a restart after `kill -9`) never sees a
partial chunk. Identical bytes land on the same name and are stored once.
All methods are synchronous; callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import CacheError


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._chunks = root / "chunks"
        self._tmp = root / "tmp"
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._prefix = f"{os.getpid()}."
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

    def put(self, data: bytes) -> str:
        """Store `data`; return its hex sha256 (its name)."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        if final.exists():
            return digest
        final.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=self._prefix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read(self, digest: str, offset: int, length: int) -> bytes | None:
        """`length` bytes at `offset` of a chunk, or None when its file is gone."""
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def willneed(self, digest: str) -> None:
        """Start reading a chunk file into the page cache (asynchronous readahead)."""
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY)
        except OSError:
            return  # only a hint: a missing file is found (and refetched) by the read
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def count(self) -> int:
        """Number of chunk files (walks the tree: for tests and `cache ls`, not hot paths)."""
        return sum(len(files) for _, _, files in os.walk(self._chunks))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
