"""Span plans: tensor-parallel ranks declare their slices of the same shards
(`modelfs.spans.prefetch`, found from the mounted path alone), then read them; each
byte comes from the origin once, and no byte the ranks did not ask for is fetched
(neither read-ahead nor the whole-file prefetch on open guess for a planned file)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.testing.origin import Origin, write_safetensors

from ..conftest import MiB

RANKS = 4
TENSORS = 8  # of 8 MiB; the ranks need the first 6 (the rest: another pipeline stage)
NEEDED = 6

RANK = r"""
import hashlib, json, os, struct, sys
from modelfs import spans
path, rank, ranks, needed = sys.argv[1], *map(int, sys.argv[2:5])
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
base = 8 + n
mine = []
for name in sorted(k for k in header if k != "__metadata__")[:needed]:
    a, b = header[name]["data_offsets"]
    q = (b - a) // ranks  # this rank's rows of a row-parallel weight
    mine.append((base + a + rank * q, q))
answer = spans.prefetch({path: mine})
fd = os.open(path, os.O_RDONLY)
digest = hashlib.sha256()
for off, length in mine:
    digest.update(os.pread(fd, length, off))
os.close(fd)
print(json.dumps({"plan": answer[0], "spans": mine, "sha256": digest.hexdigest()}))
"""


def test_tensor_parallel_ranks_fetch_only_their_spans_once(mount_factory, origin: Origin,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "shard.safetensors"
    write_safetensors(src, {f"layer{i}.weight": ("F32", (1024, 2048)) for i in range(TENSORS)})
    origin.put_file("org/tp", "main", "model.safetensors", src.read_bytes())
    # The default on-open prefetch of weights is on: a plan must keep it from guessing.
    m = mount_factory(["org/tp"], "--prefetch-on-open=*.safetensors")
    path = m.p("org/tp/model.safetensors")
    with open(path, "rb") as f:  # the header, as every rank reads it first
        n = struct.unpack("<Q", f.read(8))[0]
        f.read(n)
    origin.reset_stats()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(path), str(r), str(RANKS),
                               str(NEEDED)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(RANKS)]
    results = []
    for p in ranks:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    data = src.read_bytes()
    union = 0
    for r in results:
        want = b"".join(data[o:o + n] for o, n in r["spans"])
        assert r["sha256"] == hashlib.sha256(want).hexdigest()  # every rank's bytes right
        assert r["plan"]["chunks"] > 0
        union += sum(n for _, n in r["spans"])  # the ranks' spans are disjoint
    sent = origin.bytes_sent()
    print(f"\n{RANKS} ranks: origin sent {sent / union:.3f}x the union of their spans "
          f"({sent / MiB:.1f} of {union / MiB:.1f} MiB; the file is {len(data) / MiB:.0f} MiB)")
    assert sent <= 1.05 * union
    assert sent >= union  # and they were all fetched (not served from elsewhere)


def test_a_bad_plan_is_refused_with_a_reason(mount_factory) -> None:
    m = mount_factory(["org/model"])
    from modelfs import spans

    with pytest.raises(spans.SpansError, match="outside the file"):
        spans.prefetch({m.p("org/model/config.json"): [(0, 1 << 30)]})
    with pytest.raises(spans.SpansError, match="not in a modelfs mount"):
        spans.prefetch({Path(__file__): [(0, 1)]})
    with m.client() as c:
        res = c._http.post("/v1/plans", json={"files": [{"path": "org/model/nope",
                                                          "spans": [[0, 1]]}]})
    assert res.status_code == 404 and "no such file in the mount" in res.text
