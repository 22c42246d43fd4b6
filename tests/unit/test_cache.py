"""The LMDB index and the content-addressed chunk store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelfs.cache import CacheConfig, ChunkCache, ChunkStore, FileCheck, Index
from modelfs.cache.chunk_cache import FileHasher
from modelfs.cache.index import CODEC_RAW, CODEC_ZSTD
from modelfs.cache.store import checksum, direct_buffer
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
    assert list((tmp_path / "tmp").iterdir()) == []


def _cache(root: Path, **kw: object) -> ChunkCache:
    return ChunkCache(Index(root / "index"), ChunkStore(root), CacheConfig(**kw))  # type: ignore[arg-type]


def _chunk(seed: int, n: int = 64 << 10) -> bytes:
    return random.Random(seed).randbytes(n)


def test_eviction_is_lru_within_the_limit_and_spares_pins(tmp_path: Path) -> None:
    size = 64 << 10
    cache = _cache(tmp_path, limit=10 * size, low_water=1.0, compression="never")
    pinned = Snapshot("org/pinned", "p" * 40, (FileEntry("w.bin", 2 * size, "pin-cid"),))
    cache.index.put_snapshot("hf:e", pinned)
    cache.index.put_revision("hf:e", "org/pinned", "main", "p" * 40)
    cache.index.pin("hf:e", "org/pinned", "main")
    pin_digests = [cache.put("pin-cid", size, i, _chunk(100 + i)) for i in range(2)]
    digests = [cache.put("cid", size, i, _chunk(i)) for i in range(8)]
    assert cache.index.usage() == 10 * size
    cache.load(digests[0])  # chunk 0 is now the most recently used
    time.sleep(0.01)
    cache.put("cid", size, 8, _chunk(8))  # over the limit by one chunk: evict the LRU one
    assert cache.index.usage() <= 10 * size
    assert cache.lookup("cid", size, 1) is None  # least recently used
    assert not cache.store.path_for(digests[1]).exists()
    assert cache.lookup("cid", size, 0) == digests[0]  # touched, kept
    for _ in range(6):
        time.sleep(0.01)
        cache.put("cid", size, 9 + _, _chunk(9 + _))
    assert cache.index.usage() <= 10 * size
    for i, d in enumerate(pin_digests):  # the oldest, but pinned
        assert cache.lookup("pin-cid", size, i) == d
    cache.index.unpin("hf:e", "org/pinned", "main")
    cache.put("cid", size, 20, _chunk(20))
    assert cache.lookup("pin-cid", size, 0) is None
    cache.index.close()


def test_compression_auto_keeps_only_chunks_that_shrink(tmp_path: Path) -> None:
    cache = _cache(tmp_path, compression="auto")
    text = json.dumps({f"token{i}": i for i in range(60000)}).encode()
    noise = _chunk(1, 1 << 20)
    d_text = cache.put("tok", 4 << 20, 0, text)
    d_noise = cache.put("w", 4 << 20, 0, noise)
    blob_text, blob_noise = cache.index.blob(d_text), cache.index.blob(d_noise)
    assert blob_text is not None and blob_noise is not None
    assert blob_text.codec == CODEC_ZSTD and blob_text.disk_bytes < len(text) // 3
    assert blob_noise.codec == CODEC_RAW
    fresh = _reopen(cache, tmp_path)
    assert fresh.load(d_text) == text
    assert fresh.load(d_noise) == noise
    fresh.index.close()


def _reopen(cache: ChunkCache, root: Path) -> ChunkCache:
    """What a restarted daemon sees: same files and index, nothing checked yet."""
    cache.index.close()
    return _cache(root, compression=cache.config.compression)


def test_damaged_chunks_are_never_served_after_a_restart(tmp_path: Path) -> None:
    cache = _cache(tmp_path, compression="never")
    chunks = [_chunk(i) for i in range(3)]
    digests = [cache.put("cid", 64 << 10, i, c) for i, c in enumerate(chunks)]
    cache.index.put_chunk("other", 64 << 10, 0, digests[0], 65536, 65536)  # shared blob
    p0, p1, p2 = (cache.store.path_for(d) for d in digests)
    raw = bytearray(p0.read_bytes())
    raw[1000] ^= 1  # a flipped bit
    p0.write_bytes(bytes(raw))
    p1.write_bytes(p1.read_bytes()[:100])  # truncated
    p2.unlink()  # deleted
    cache = _reopen(cache, tmp_path)
    usage = cache.index.usage()
    for d in digests:
        assert cache.load(d) is None
    assert cache.lookup("cid", 64 << 10, 0) is None and cache.lookup("other", 64 << 10, 0) is None
    assert cache.index.usage() == usage - 3 * 65536
    assert not p0.exists() and not p1.exists()
    cache.index.close()


def test_whole_file_mismatch_drops_the_file(tmp_path: Path) -> None:
    cache = _cache(tmp_path, compression="never")
    data = _chunk(7, 200_000)
    good = FileEntry("w.bin", len(data), "cid", hashlib.sha256(data).hexdigest())
    for i in range(4):
        cache.put("cid", 64 << 10, i, data[i * 65536:(i + 1) * 65536])
    assert cache.check_file(good, 64 << 10) == FileCheck(4, 0, True, True, "sha256")
    assert cache.index.is_checked("cid")
    bad = FileEntry("w.bin", len(data), "cid", "0" * 64)
    assert cache.check_file(bad, 64 << 10) == FileCheck(4, 0, False, False, "sha256")
    assert cache.index.file_chunks("cid", 64 << 10) == {}
    assert cache.index.usage() == 0
    cache.index.close()


def test_chunk_puts_from_many_threads_share_commits_and_each_gets_its_own_result(
        tmp_path: Path) -> None:
    import threading

    ix = Index(tmp_path / "ix")
    ix.put_chunk("c" * 64, 1024, 0, "0" * 64, 4096, 1024)  # to be replaced below
    commits: list[int] = []
    commit = ix._commit_puts

    def slow_commit(batch: list) -> None:  # the first commit holds the others back
        commits.append(len(batch))
        time.sleep(0.05 if len(commits) == 1 else 0)
        commit(batch)

    ix._commit_puts = slow_commit  # type: ignore[method-assign]
    results: dict[int, list[str]] = {}

    def put(i: int) -> None:
        results[i] = ix.put_chunk("c" * 64, 1024, i, f"{i + 1:064x}", 4096, 1024)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(commits) == 16 and len(commits) < 16  # grouped, each put once
    assert results[0] == ["0" * 64] and all(results[i] == [] for i in range(1, 16))
    assert all(ix.get_chunk("c" * 64, 1024, i) == f"{i + 1:064x}" for i in range(16))
    assert ix.usage() == 16 * 4096

    def no_space(fn: object) -> None:  # an error reaches the puts of the batch
        raise OSError(28, "No space left on device")

    ix._commit_puts = commit  # type: ignore[method-assign]
    ix._write = no_space  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError):
        ix.put_chunk("c" * 64, 1024, 99, "f" * 64, 4096, 1024)
    ix.close()


def test_index_map_grows_and_follows_another_process(tmp_path: Path) -> None:
    ix = Index(tmp_path / "ix", map_size=256 << 10)
    for i in range(200):  # ~2 MiB of listings through a 256 KiB map
        files = tuple(FileEntry(f"f{i}-{j}", j, _chunk(i * 1000 + j, 16).hex()) for j in range(400))
        ix.put_snapshot("hf:e", Snapshot("org/r", f"{i:040x}", files))
    assert ix.statistics().map_size > 256 << 10
    assert ix.get_snapshot("hf:e", "org/r", f"{7:040x}") is not None
    before = ix.statistics().map_size
    code = (
        "import os; from pathlib import Path; from modelfs.cache import Index;"
        "from modelfs.types import FileEntry, Snapshot;"
        f"ix = Index(Path({str(tmp_path / 'ix')!r}), map_size={before});"
        "[ix.put_snapshot('hf:e', Snapshot('org/big', f'{i:040x}', tuple(FileEntry(f'x{i}-{j}',"
        " j, os.urandom(32).hex()) for j in range(2000)))) for i in range(100)];"
        "print(ix.statistics().map_size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > before
    ix.put_revision("hf:e", "org/r", "main", "a" * 40)  # adopts the other process's map
    assert ix.get_snapshot("hf:e", "org/big", f"{99:040x}") is not None
    ix.close()


def test_a_chunk_being_read_is_not_evicted(tmp_path: Path) -> None:
    size = 64 << 10
    cache = _cache(tmp_path, limit=2 * size, low_water=1.0, compression="never")
    first = cache.put("cid", size, 0, _chunk(0))
    cache.put("cid", size, 1, _chunk(1))
    with cache._in_use(first):  # what `read`/`load`/`check` hold while reading a chunk file
        cache.put("cid", size, 2, _chunk(2))  # over the limit: the LRU chunk is `first`...
        assert cache.lookup("cid", size, 0) == first  # ...but it is being read
        assert cache.lookup("cid", size, 1) is None
    cache.put("cid", size, 3, _chunk(3))
    assert cache.lookup("cid", size, 0) is None
    assert cache.index.usage() <= 2 * size
    cache.index.close()


def test_positional_chunks_are_checked_by_crc_and_the_whole_file(tmp_path: Path) -> None:
    cache = _cache(tmp_path, compression="never")
    data = _chunk(11, 3 * 65536)
    entry = FileEntry("w.bin", len(data), "lfs-oid", hashlib.sha256(data).hexdigest())
    digests = [cache.put("lfs-oid", 65536, i, data[i * 65536:(i + 1) * 65536], positional=True)
               for i in range(3)]
    blob = cache.index.blob(digests[0])
    assert blob is not None and blob.positional and not blob.compressed
    assert digests[0] != hashlib.sha256(data[:65536]).hexdigest()  # not hashed from the bytes
    assert cache.check_file(entry, 65536) == FileCheck(3, 0, True, True, "sha256")
    p = cache.store.path_for(digests[1])
    raw = bytearray(p.read_bytes())
    raw[7] ^= 4
    p.write_bytes(bytes(raw))
    cache = _reopen(cache, tmp_path)
    assert cache.load(digests[1]) is None  # crc32 catches the flip
    assert cache.check_file(entry, 65536) == FileCheck(2, 0, False, None, "sha256")
    cache.index.close()


def test_chunks_of_a_format_2_cache_keep_their_crc32_check(tmp_path: Path) -> None:
    """Chunks stored before the XXH3 flag carry a crc32: still served, still checked,
    and the index is upgraded to the current format in place."""
    import struct
    import zlib

    from modelfs.cache.index import FORMAT

    cache = _cache(tmp_path, compression="never")
    good, bad = _chunk(1), _chunk(2)
    for i, data in enumerate((good, bad)):
        digest = cache.store.put(data).digest
        # As format 2 wrote it: no flag in the codec byte, crc32 as the checksum.
        cache.index.put_chunk("old", 64 << 10, i, digest, 65536, len(data), CODEC_RAW,
                              zlib.crc32(data))
    cache.index._write(lambda txn: txn.put(b"format", struct.pack(">I", 2),
                                           db=cache.index._meta))
    p_bad = cache.store.path_for(cache.lookup("old", 64 << 10, 1))
    raw = bytearray(p_bad.read_bytes())
    raw[7] ^= 0x10
    p_bad.write_bytes(bytes(raw))
    cache = _reopen(cache, tmp_path)
    d_good = cache.lookup("old", 64 << 10, 0)
    blob = cache.index.blob(d_good)
    assert blob is not None and not blob.xxh3 and blob.checksum == zlib.crc32(good)
    assert cache.load(d_good) == good
    assert cache.load(cache.lookup("old", 64 << 10, 1)) is None  # crc32 caught the flip
    assert cache.index._read(lambda txn: txn.get(b"format", db=cache.index._meta)) == \
        struct.pack(">I", FORMAT)
    # New chunks get xxh3, and a flip in them is caught too.
    d_new = cache.put("new", 64 << 10, 0, _chunk(3))
    assert cache.index.blob(d_new).xxh3
    p_new = cache.store.path_for(d_new)
    raw = bytearray(p_new.read_bytes())
    raw[5000] ^= 1
    p_new.write_bytes(bytes(raw))
    cache = _reopen(cache, tmp_path)
    assert cache.load(d_new) is None
    cache.index.close()


def test_whole_block_chunks_bypass_the_page_cache(tmp_path: Path) -> None:
    """A chunk of whole 4 KiB blocks is written with O_DIRECT (the mount's own file
    pages already hold those bytes); anything else, or a file system that refuses
    O_DIRECT, is written normally. Both read back exactly."""
    import shutil

    store = ChunkStore(tmp_path)
    whole, tail = _chunk(1, 1 << 20), _chunk(2, (1 << 20) + 100)
    d_whole, d_tail = store.put(whole).digest, store.put(tail).digest
    assert store.path_for(d_whole).read_bytes() == whole
    assert store.path_for(d_tail).read_bytes() == tail
    if not store._direct or shutil.which("fincore") is None:
        return  # this file system has no O_DIRECT: the buffered path was taken and worked
    store2 = ChunkStore(tmp_path / "again")  # a chunk not read back since its write
    d2 = store2.put(_chunk(3, 1 << 20)).digest
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          str(store2.path_for(d2))], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 0  # nothing of it went through the page cache


def test_loads_bypass_the_page_cache_and_check_every_time(tmp_path: Path) -> None:
    """A raw chunk is read whole with O_DIRECT into the caller's buffer (reused from
    load to load), so nothing of it lands in the page cache, and it is checked on
    every load: damage done after an earlier good load is still never served."""
    import mmap
    import shutil

    store = ChunkStore(tmp_path)
    data = _chunk(4, 1 << 20)
    d = store.put(data).digest
    path = store.path_for(d)
    if not store._direct or shutil.which("fincore") is None:
        pytest.skip("no O_DIRECT here: every chunk is in the page cache")
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    def resident() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(path)], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert resident() == 0
    buf = direct_buffer(len(data) + 1)
    blob = store.load(d, CODEC_RAW, len(data), checksum(data, xxh3=True), into=buf)
    assert isinstance(blob, memoryview) and blob.obj is buf and bytes(blob) == data
    assert resident() == 0  # loaded past the page cache
    assert store.load(d, CODEC_RAW, len(data) - 1, checksum(data, xxh3=True)) is None
    raw = bytearray(data)
    raw[12345] ^= 1
    path.write_bytes(bytes(raw))
    assert store.load(d, CODEC_RAW, len(data), checksum(data, xxh3=True),
                      into=mmap.mmap(-1, len(data) + 4096)) is None


def test_chunk_sized_load_buffers_are_huge_pages_and_a_load_touches_only_the_chunk(
        tmp_path: Path) -> None:
    """A load buffer of a 4 MiB chunk (+1 byte, to see a longer file) starts on a
    2 MiB boundary and its 4 MiB are marked for transparent huge pages, so an
    O_DIRECT read into it is not split at the disk's segment limit; the +1 stays
    in 4 KiB pages. A load faults in only what it may read (4 MiB + one page),
    not the whole buffer: O_DIRECT pins all of the buffer it is given."""
    import ctypes

    store = ChunkStore(tmp_path)
    data = _chunk(5, 4 << 20)
    d = store.put(data).digest
    buf = direct_buffer(len(data) + 1)
    assert len(buf) == 6 << 20
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert addr % (2 << 20) == 0  # Linux >= 6.7 aligns maps of whole 2 MiB pages
        assert "hg" in _vm_flags(addr)  # MADV_HUGEPAGE
        assert "hg" not in _vm_flags(addr + (4 << 20))  # the +1: 4 KiB pages
    assert len(direct_buffer(5000)) == 8192

    blob = store.load(d, CODEC_RAW, len(data), checksum(data, xxh3=True), into=buf)
    assert blob is not None and bytes(blob) == data
    if store._direct_read:  # (a buffered read touches only what it reads anyway)
        libc = ctypes.CDLL(None, use_errno=True)
        vec = (ctypes.c_ubyte * (len(buf) // 4096))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)), vec) == 0
        assert sum(b & 1 for b in vec) * 4096 == len(data) + 4096


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping that holds `addr` (maps with equal flags may merge)."""
    span = (0, 0)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = head.split("-")
                span = (int(lo, 16), int(hi, 16))
            elif line.startswith("VmFlags:") and span[0] <= addr < span[1]:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_the_whole_file_hash_reads_chunks_back_ahead_of_itself(
        tmp_path: Path, ahead: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks stored before the hash reaches them are read back from disk, the next
    ones meanwhile in other threads when the hasher has buffers for them; held and
    not-yet-stored chunks mix with those, and the digest is that of the file."""
    cs = 64 << 10
    cache = _cache(tmp_path, compression="never")
    data = _chunk(5, 20 * cs + 123)
    entry = FileEntry("w.bin", len(data), "cid", hashlib.sha256(data).hexdigest())
    part = [data[i * cs:(i + 1) * cs] for i in range(21)]
    readers: list[str] = []
    read_back = FileHasher._read_back

    def counting(self: FileHasher, idx: int, buf: object) -> object:
        readers.append(threading.current_thread().name)
        return read_back(self, idx, buf)  # type: ignore[arg-type]

    monkeypatch.setattr(FileHasher, "_read_back", counting)
    for i in (*range(0, 9), *range(10, 21)):  # chunk 9 not stored yet
        cache.put("cid", cs, i, part[i], positional=True)
    hasher = FileHasher(cache, entry, cs)
    bufs = [direct_buffer(cs + 1) for _ in range(1 + ahead)]
    hasher.offer(1, part[1])  # held in memory: not read back
    assert hasher.step(*bufs) is None
    assert hasher.position == 9
    cache.put("cid", cs, 9, part[9], positional=True)
    assert hasher.step(*bufs) is True
    assert hasher.digest == entry.sha256 and cache.index.is_checked("cid")
    elsewhere = [n for n in readers if n.startswith("modelfs-read-back")]
    assert bool(elsewhere) == bool(ahead), readers
    assert readers.count(threading.current_thread().name) + len(elsewhere) >= 20 - 1
    # A chunk whose bytes are not the file's: the file fails and loses its chunks.
    other = FileEntry("w.bin", len(data), "cid2", entry.sha256)
    for i in range(21):
        cache.put("cid2", cs, i, part[i] if i != 13 else _chunk(6, cs), positional=True)
    assert FileHasher(cache, other, cs).step(*bufs) is False
    assert cache.index.file_chunks("cid2", cs) == {}
    cache.index.close()
