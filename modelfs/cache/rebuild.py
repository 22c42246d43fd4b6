"""Rebuild a damaged index, keeping the chunk files that still check out.

A damaged `index/` (a truncated `data.mdb`, garbled pages) is moved aside as
`index.damaged-TIME/`. Its records are copied into a new index by a child
process, since LMDB trusts its pages and a garbled one can crash the reader: a
short file is first padded to the length its meta page names (so a missing
page reads as zeros, which LMDB reports, rather than a SIGBUS), and every
sub-database is copied up to the first page LMDB refuses. Then every chunk the
new index names is read back and checked against its checksum; chunk entries
without good bytes are dropped, reference counts and usage are recomputed, and
whole-file checks are forgotten (files are checked again as they are read).
Chunk files nothing names any more are left to `modelfs cache gc`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from ..errors import CacheCorrupt, CacheError
from .index import DB_NAMES, Blob, Index, check_index_file
from .store import ChunkStore


@dataclass(frozen=True, slots=True)
class RebuildResult:
    moved_to: Path
    records: dict[str, int]  # copied per sub-database
    chunks_kept: int
    chunks_dropped: int
    salvage_error: str | None = None  # why copying stopped early (None: all read)


def rebuild_index(cache_dir: Path) -> RebuildResult:
    index_dir = cache_dir / "index"
    if not (index_dir / "data.mdb").exists():
        raise CacheError(f"no index at {index_dir}")
    moved = cache_dir / f"index.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    os.rename(index_dir, moved)
    scratch = moved / "salvage"
    scratch.mkdir()
    shutil.copyfile(moved / "data.mdb", scratch / "data.mdb")
    need = _needed_size(scratch / "data.mdb")
    if need is not None:
        with open(scratch / "data.mdb", "r+b") as f:
            if os.fstat(f.fileno()).st_size < need:
                f.truncate(need)
    index_dir.mkdir(mode=0o700)
    proc = subprocess.run([sys.executable, "-m", "modelfs.cache.rebuild", str(scratch),
                           str(index_dir)], capture_output=True, text=True, timeout=3600)
    records: dict[str, int] = {}
    error = None
    if proc.returncode == 0 and proc.stdout.strip():
        out = json.loads(proc.stdout)
        records, error = out["records"], out["error"]
    else:
        error = (f"the damaged index crashed its reader (status {proc.returncode})"
                 if proc.returncode else "nothing readable")
        shutil.rmtree(index_dir)
        index_dir.mkdir(mode=0o700)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        index = Index(index_dir)
    except CacheCorrupt:
        # What was copied does not hold together (e.g. no format record): start empty.
        shutil.rmtree(index_dir)
        index_dir.mkdir(mode=0o700)
        index, records = Index(index_dir), {}
        error = error or "the copied records do not form an index"
    try:
        store = ChunkStore(cache_dir)
        kept, dropped = index.reconcile(lambda blob: _checks_out(store, blob))
    finally:
        index.close()
    return RebuildResult(moved, records, kept, dropped, error)


def _checks_out(store: ChunkStore, blob: Blob) -> bool:
    return store.load(blob.digest, blob.codec, blob.raw_size, blob.checksum,
                      xxh3=blob.xxh3) is not None


def _needed_size(data_file: Path) -> int | None:
    """The length the newest meta page of `data_file` names, or None."""
    try:
        check_index_file(data_file.parent)
    except CacheCorrupt as exc:
        words = str(exc).split()
        if "need" in words:
            return int(words[words.index("need") + 1])
        return None
    return None


def _copy(src: Path, dst: Path) -> dict[str, object]:
    """In the child: copy every record LMDB still reads from `src` into `dst`."""
    records: dict[str, int] = {}
    error = None
    size = (src / "data.mdb").stat().st_size
    senv = lmdb.open(str(src), readonly=True, lock=False, max_dbs=16, subdir=True)
    denv = lmdb.open(str(dst), map_size=max(1 << 30, 2 * size), max_dbs=16, subdir=True)
    try:
        for name in DB_NAMES:
            if name in (b"refs", b"checked"):
                continue  # rebuilt from `chunks`, and checked again
            try:
                sdb = senv.open_db(name, create=False)
            except lmdb.Error as exc:
                error = error or f"{name.decode()}: {exc}"
                continue
            ddb = denv.open_db(name)
            n = 0
            try:
                with senv.begin() as stxn:
                    batch: list[tuple[bytes, bytes]] = []
                    for key, value in stxn.cursor(db=sdb):
                        batch.append((bytes(key), bytes(value)))
                        if len(batch) >= 10_000:
                            n += _put(denv, ddb, batch)
                            batch = []
                    n += _put(denv, ddb, batch)
            except lmdb.Error as exc:
                error = error or f"{name.decode()}: {exc}"
            records[name.decode()] = n
    finally:
        senv.close()
        denv.close()
    return {"records": records, "error": error}


def _put(env: lmdb.Environment, db: Any, batch: list[tuple[bytes, bytes]]) -> int:
    with env.begin(write=True) as txn:
        for key, value in batch:
            txn.put(key, value, db=db)
    return len(batch)


if __name__ == "__main__":
    print(json.dumps(_copy(Path(sys.argv[1]), Path(sys.argv[2]))))
