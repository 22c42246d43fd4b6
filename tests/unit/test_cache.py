"""The LMDB index and the content-addressed chunk store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from modelfs.cache import ChunkStore, Index
from modelfs.types import FileEntry, Snapshot


def test_index_round_trips_and_persists(tmp_path: Path) -> None:
    ix = Index(tmp_path / "ix")
    snap = Snapshot("org/r", "a" * 40, (FileEntry("x/y.bin", 10, "c" * 64, "c" * 64),
                                        FileEntry("z.json", 3, "d" * 40)), ("x",))
    ix.put_snapshot("hf:e", snap)
    ix.put_revision("hf:e", "org/r", "main", "a" * 40, 123.0)
    ix.put_chunk("c" * 64, 1024, 0, "e" * 64, 4096, 1024)
    ix.close()

    ix = Index(tmp_path / "ix")
    assert ix.get_snapshot("hf:e", "org/r", "a" * 40) == snap
    assert ix.get_snapshot("hf:other", "org/r", "a" * 40) is None
    assert ix.get_revision("hf:e", "org/r", "main") == ("a" * 40, 123.0)
    assert ix.get_chunk("c" * 64, 1024, 0) == "e" * 64
    assert ix.get_chunk("c" * 64, 2048, 0) is None  # another chunk size is another key
    assert ix.get_chunk("c" * 64, 1024, 1) is None
    assert ix.usage() == 4096
    assert ix.drop_chunk("c" * 64, 1024, 0) == ["e" * 64]  # its last user: the blob goes too
    assert ix.get_chunk("c" * 64, 1024, 0) is None
    stats = ix.statistics()
    assert (stats.snapshots, stats.revisions, stats.chunk_refs, stats.blobs) == (1, 1, 0, 0)
    assert stats.usage == 0
    ix.close()


def test_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "leftover.partial").write_bytes(b"half a chunk")
    (tmp_path / "tmp" / "999999999.abc").write_bytes(b"a dead writer's")
    live = tmp_path / "tmp" / f"{os.getppid()}.abc"  # a live process's file in progress
    live.write_bytes(b"in progress")
    store = ChunkStore(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == [live]  # crash left-overs are dropped
    live.unlink()
    data = b"hello chunk" * 1000
    digest = store.put(data).digest
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path_for(digest).read_bytes() == data
    assert store.put(data).digest == digest
    assert store.count() == 1
    assert store.read(digest, 5, 6) == data[5:11]
    assert store.read("0" * 64, 0, 1) is None
    assert list((tmp_path / "tmp").iterdir()) == []
