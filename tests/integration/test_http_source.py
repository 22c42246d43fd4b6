"""Plain HTTP origins (`--url`): directory indexes, single files, ETag revalidation."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

from modelfs.testing.origin import Origin

from ..conftest import MiB, wait_for


def read_or_stale(path: Path) -> bytes | None:
    """The file's bytes, or None while the mount has not noticed a change yet."""
    try:
        return path.read_bytes()
    except OSError as exc:
        if exc.errno != errno.ESTALE:
            raise
        return None


def test_plain_directory_and_single_file_urls(mount_factory, origin: Origin, repo_data) -> None:
    files = repo_data["org/model@main"]
    m = mount_factory([], "--url", f"mirror/model={origin.url}/plain/org/model/main/",
                      "--url", f"mirror/one={origin.url}/plain/org/model/v1/model.safetensors")
    got = sorted(str(p.relative_to(m.p("mirror/model"))) for p in m.p("mirror/model").rglob("*")
                 if p.is_file())
    assert got == sorted(files)
    for path, data in files.items():
        assert m.p(f"mirror/model/{path}").read_bytes() == data, path
    assert os.listdir(m.p("mirror/one")) == ["model.safetensors"]
    assert m.p("mirror/one/model.safetensors").read_bytes() == \
        repo_data["org/model@v1"]["model.safetensors"]


def test_etag_change_is_revalidated_and_never_mixed(mount_factory, origin: Origin,
                                                    repo_data) -> None:
    old = repo_data["org/model@main"]["model.safetensors"]
    new = random.Random(5).randbytes(len(old))  # same size: only the ETag tells them apart
    m = mount_factory([], "--url", f"mirror/model={origin.url}/plain/org/model/main/",
                      "--revision-ttl", "0.3")
    origin.reset_stats()
    wait_for(lambda: any(r.status == 304 for r in origin.records), what="a revalidation")
    assert not origin.data_requests()  # unchanged: 304s only, no bytes
    with open(m.p("mirror/model/model.safetensors"), "rb") as fh:
        head = fh.read(MiB)
        assert head == old[:MiB]
        origin.put_file("org/model", "main", "model.safetensors", new)
        wait_for(lambda: read_or_stale(m.p("mirror/model/model.safetensors")) == new,
                 what="new opens to see the new version")
        try:
            rest: bytes | None = fh.read()
        except OSError as exc:  # the old version is gone from the origin: stale, not mixed
            if exc.errno != errno.ESTALE:
                raise
            rest = None
        assert rest is None or rest == old[MiB:]
    assert "dropping the old version" in m.log_text()
