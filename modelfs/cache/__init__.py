"""The persistent chunk cache: content-addressed chunk files plus an LMDB index.

Knows nothing about sources or FUSE; `modelfs.fetch` is where cache and
sources meet.
"""

from .chunk_cache import CacheConfig, ChunkCache, FileCheck, FileHasher
from .codec import MODES as COMPRESSION_MODES
from .index import Blob, Index, IndexStats, Revision
from .store import ChunkStore, check_cache_dir

__all__ = ["COMPRESSION_MODES", "Blob", "CacheConfig", "ChunkCache", "ChunkStore", "FileCheck",
           "FileHasher", "Index", "IndexStats", "Revision", "check_cache_dir"]
