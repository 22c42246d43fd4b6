"""zstd framing for what the cache keeps (the one home of `zstandard`).

Listings (JSON, highly repetitive) are always compressed. Chunk compression
(`auto|always|never`) builds on the same two functions.
"""

from __future__ import annotations

import zstandard

_LEVEL = 3


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_LEVEL).compress(data)


def decompress(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)
