"""Chunks kept in memory for readers: just fetched, or loaded from disk ahead of
them. Every read is answered from here without a copy or a syscall.

A least-recently-used table of blocks (`memory.Block`), bounded by the memory
budget rather than by a size of its own: the reader's reclaim evicts its
oldest when another buffer needs the room. A chunk whose every byte has been
served leaves at once: the mount's page cache holds those bytes now
(`keep_cache`), so its buffer goes to chunks ahead of readers rather than
fresh memory being taken for them. A range read twice only makes this early;
a later read loads the chunk again.
"""

from __future__ import annotations

from collections import OrderedDict

from ..chunks import ChunkKey
from .memory import Block


class RecentChunks:
    def __init__(self) -> None:
        self._blocks: OrderedDict[ChunkKey, Block] = OrderedDict()
        self._served: dict[ChunkKey, int] = {}  # bytes served of each chunk here

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def get(self, key: ChunkKey) -> Block | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def add(self, key: ChunkKey, block: Block) -> None:
        """Keep `block` (a hold of its own) as chunk `key`."""
        old = self._blocks.pop(key, None)
        self._blocks[key] = block.retain()
        if old is not None:
            old.release()

    def served(self, key: ChunkKey, n: int) -> bool:
        """`n` more bytes of chunk `key` went to the kernel; True when that was the
        last of them (the chunk has left)."""
        block = self._blocks.get(key)
        if block is None:
            return False
        done = self._served.get(key, 0) + n
        if done < len(block.data):
            self._served[key] = done
            return False
        self.drop(key)
        return True

    def drop(self, key: ChunkKey) -> None:
        self._served.pop(key, None)
        block = self._blocks.pop(key, None)
        if block is not None:
            block.release()

    def drop_content(self, content_id: str) -> None:
        for key in [k for k in self._blocks if k[0] == content_id]:
            self.drop(key)

    def indices(self, content_id: str) -> set[int]:
        return {idx for cid, idx in self._blocks if cid == content_id}

    def evict_oldest(self) -> bool:
        """Let the least recently used chunk go; False when there is none."""
        if not self._blocks:
            return False
        self.drop(next(iter(self._blocks)))
        return True
