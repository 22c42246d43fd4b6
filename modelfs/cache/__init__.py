"""The persistent chunk cache: content-addressed chunk files plus an LMDB index.

Knows nothing about sources or FUSE; `modelfs.fetch` is where cache and
sources meet.
"""

from .index import Index, IndexStats
from .store import ChunkStore

__all__ = ["ChunkStore", "Index", "IndexStats"]
