"""zstd framing for what the cache keeps (the one home of `zstandard`).

Listings (JSON, highly repetitive) are always compressed. Chunks follow the
`compression` setting: `never`, `always`, or `auto`, which keeps a chunk
compressed only when that saves at least `MIN_SAVING` of it and a disk block. `auto` first
compresses a small sample at the fastest level, so incompressible chunks (most
weights) cost one 128 KiB trial, not a whole-chunk compression.
"""

from __future__ import annotations

import zstandard

_LEVEL = 3
MIN_SAVING = 0.10
_SAMPLE = 128 << 10
_BLOCK = 4096
MODES = ("auto", "always", "never")
CodecError = zstandard.ZstdError  # bytes that are not a zstd frame


def compress(data: bytes | bytearray | memoryview, level: int = _LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def decompress(data: bytes, size: int | None = None) -> bytes:
    d = zstandard.ZstdDecompressor()
    return d.decompress(data, max_output_size=size or 0)


def compress_chunk(data: bytes | bytearray | memoryview, mode: str) -> bytes | None:
    """The compressed form of a chunk to store, or None to store it raw."""
    if mode == "never" or not data or (mode == "auto" and len(data) <= _BLOCK):
        return None  # auto: a chunk of one disk block or less cannot get smaller on disk
    if mode == "auto" and len(data) > 2 * _SAMPLE:
        mid = len(data) // 2
        sample = memoryview(data)[mid:mid + _SAMPLE]
        if len(compress(sample, level=1)) > (1 - MIN_SAVING) * _SAMPLE:
            return None
    packed = compress(data)
    saved = len(data) - len(packed)
    if mode == "auto" and (saved < MIN_SAVING * len(data) or saved < _BLOCK):
        return None
    return packed
