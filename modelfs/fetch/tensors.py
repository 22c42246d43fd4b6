"""The order loaders consume a weights file in, from its header (sans-I/O parsing).

safetensors: 8 bytes of little-endian header length, a JSON header mapping
tensor names to `data_offsets` relative to the end of the header. Loaders
(`safe_open` + `get_tensor` over `sorted(keys())`, transformers) read tensors in
name order, which is rarely offset order; prefetching in that order puts the
next tensor a loader wants in the cache first.
"""

from __future__ import annotations

import json
import struct

from .order import ChunkOrder

MAX_HEADER = 100 << 20  # safetensors refuses larger headers too


def safetensors_header_size(first8: bytes, max_header: int = MAX_HEADER) -> int | None:
    """Total bytes before the tensor data (8 + JSON header), or None if not safetensors
    (or its header is larger than `max_header`)."""
    if len(first8) < 8:
        return None
    (n,) = struct.unpack("<Q", first8[:8])
    return 8 + n if 2 <= n <= max_header else None


def tensor_extents(header: bytes, data_start: int, file_size: int) -> list[tuple[str, int, int]]:
    """(name, start, end) of every tensor, in file offsets; [] if the header is not sane."""
    try:
        meta = json.loads(header)
    except (ValueError, RecursionError):
        return []
    if not isinstance(meta, dict):
        return []
    out = []
    for name, t in meta.items():
        if name == "__metadata__" or not isinstance(t, dict):
            continue
        offs = t.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in offs)):
            return []
        start, end = data_start + offs[0], data_start + offs[1]
        if not data_start <= start <= end <= file_size:
            return []
        out.append((name, start, end))
    return out


def loader_chunk_order(extents: list[tuple[str, int, int]], data_start: int, file_size: int,
                       chunk_size: int) -> ChunkOrder:
    """Every chunk index once: the header's, then each tensor's in name order, then
    any chunk no tensor covers. Costs the number of tensors, not of chunks."""
    n = -(-file_size // chunk_size) if file_size else 0
    runs = [(0, min(n, -(-data_start // chunk_size) or 1))]
    runs += [(start // chunk_size, -(-end // chunk_size))
             for _, start, end in sorted(extents) if end > start]
    return ChunkOrder(runs, n)


def plan_loader_order(header: bytes, data_start: int, file_size: int,
                      chunk_size: int) -> ChunkOrder | None:
    """The loader order from a safetensors header, or None if it does not parse. For a
    worker thread: a large header takes a while to parse."""
    extents = tensor_extents(header, data_start, file_size)
    return loader_chunk_order(extents, data_start, file_size, chunk_size) if extents else None
