"""The loader order of a safetensors file, from its header."""

from __future__ import annotations

import json
import struct

from modelfs.fetch.tensors import loader_chunk_order, safetensors_header_size, tensor_extents


def test_chunks_follow_tensor_names_not_offsets() -> None:
    meta = {"__metadata__": {"format": "pt"},
            "layers.2.w": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]},
            "layers.10.w": {"dtype": "F32", "shape": [512], "data_offsets": [1024, 3072]},
            "emb": {"dtype": "F32", "shape": [256], "data_offsets": [3072, 4096]}}
    header = json.dumps(meta).encode()
    first8 = struct.pack("<Q", len(header))
    start = safetensors_header_size(first8)
    assert start == 8 + len(header)
    size = start + 4096
    ext = tensor_extents(header, start, size)
    assert sorted(ext) == [("emb", start + 3072, start + 4096),
                           ("layers.10.w", start + 1024, start + 3072),
                           ("layers.2.w", start, start + 1024)]
    order = loader_chunk_order(ext, start, size, 512)
    assert sorted(order) == list(range(-(-size // 512)))  # every chunk once
    assert order.at(0) == 0  # the header first
    first_emb = (start + 3072) // 512
    assert order.rank(first_emb) < order.rank((start + 1024) // 512 + 1)  # emb before layers


def test_not_safetensors_or_insane_headers() -> None:
    assert safetensors_header_size(b"GGUF\x03\x00\x00\x00") is None
    assert safetensors_header_size(b"\x01") is None
    assert tensor_extents(b"not json", 100, 1000) == []
    bad = json.dumps({"t": {"data_offsets": [0, 5000]}}).encode()
    assert tensor_extents(bad, 100, 1000) == []  # beyond the end of the file
