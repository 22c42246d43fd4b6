"""Chunk arithmetic, shared by the cache and the fetch layer: which fixed,
aligned chunks a byte range touches.

Chunks are keyed by (file version, chunk size, index), never by the range a
reader asked for, so any read that straddles chunks still hits the cache.
In memory, one chunk of one file version is a `ChunkKey` (the chunk size is
the daemon's, one for its lifetime).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# (content id of a file version, chunk index)
ChunkKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one chunk that a read needs: chunk `index`, bytes [start, end) in it."""

    index: int
    start: int
    end: int


def position_name(content_id: str, chunk_size: int, index: int) -> str:
    """A chunk's name from its position (content id, chunk size, index): what the
    cache names chunks of versioned files by, and the shared tier's object keys."""
    return hashlib.sha256(f"{content_id}\0{chunk_size}\0{index}".encode()).hexdigest()


def chunk_count(file_size: int, chunk_size: int) -> int:
    return -(-file_size // chunk_size)


def chunk_extent(index: int, file_size: int, chunk_size: int) -> tuple[int, int]:
    """(offset in file, length) of chunk `index`; the last chunk may be short."""
    start = index * chunk_size
    if index < 0 or start >= file_size:
        raise ValueError(f"chunk {index} outside a file of {file_size} bytes")
    return start, min(chunk_size, file_size - start)


def pieces(offset: int, size: int, file_size: int, chunk_size: int) -> list[Piece]:
    """The chunk pieces covering [offset, offset+size), clipped to the file's end."""
    if offset < 0 or size < 0:
        raise ValueError("negative offset or size")
    end = min(offset + size, file_size)
    out = []
    pos = offset
    while pos < end:
        index = pos // chunk_size
        chunk_start = index * chunk_size
        stop = min(end, chunk_start + chunk_size)
        out.append(Piece(index, pos - chunk_start, stop - chunk_start))
        pos = stop
    return out
