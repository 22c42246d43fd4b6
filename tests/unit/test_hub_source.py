"""The Hub source client against the real origin fixture (no mocks)."""

from __future__ import annotations

import logging

import pytest

from modelfs.errors import (
    ListingRejected,
    RemoteAuthError,
    RemoteNotFound,
    RemoteStale,
    RemoteUnavailable,
)
from modelfs.remote.config import HttpConfig
from modelfs.testing.origin import Origin
from modelfs.types import RepoRef

from .conftest import Kit, MiB

FAST = HttpConfig(retries=2, backoff=0.01, timeout=5)


async def test_resolve_and_paginated_listing(kit: Kit, origin: Origin, repo_data) -> None:
    src = kit.source()
    commit = await src.resolve(RepoRef.parse("org/model"))
    assert commit == origin.commit_of("org/model", "main")
    snap = await src.list_files("org/model", commit)
    assert {f.path: f.size for f in snap.files} == {
        p: len(d) for p, d in repo_data["org/model@main"].items()}
    assert snap.directories == ("sub", "sub/dir")
    weights = next(f for f in snap.files if f.path == "model.safetensors")
    assert weights.sha256 == weights.content_id and len(weights.sha256) == 64
    config = next(f for f in snap.files if f.path == "config.json")
    assert config.sha256 is None and len(config.content_id) == 40
    pages = [r for r in origin.records if "/tree/" in r.path]
    assert len(pages) == 3  # 8 entries, 3 a page
    await src.aclose()


async def test_listing_cap(kit: Kit, origin: Origin) -> None:
    src = kit.source(max_listing_entries=4)
    commit = await src.resolve(RepoRef.parse("org/model"))
    with pytest.raises(ListingRejected, match="more than 4 entries; raise max_listing_entries"):
        await src.list_files("org/model", commit)
    await src.aclose()


async def test_errors_name_repo_revision_and_path(kit: Kit, origin: Origin) -> None:
    src = kit.source()
    with pytest.raises(RemoteNotFound, match="repo org/missing revision 'main'.*RepoNotFound"):
        await src.resolve(RepoRef.parse("org/missing"))
    with pytest.raises(RemoteNotFound, match="repo org/model revision 'v9'.*RevisionNotFound"):
        await src.resolve(RepoRef.parse("org/model@v9"))
    origin.require_token["org/model"] = "tok"
    with pytest.raises(RemoteAuthError, match="gated or private repo org/model: set HF_TOKEN"):
        await src.resolve(RepoRef.parse("org/model"))
    await src.aclose()


async def test_ranges_redirects_and_token_scope(kit: Kit, origin: Origin, repo_data) -> None:
    origin.require_token["org/model"] = "tok"
    src = kit.source(token="tok")
    commit = await src.resolve(RepoRef.parse("org/model"))
    snap = await src.list_files("org/model", commit)
    files = {f.path: f for f in snap.files}
    w = repo_data["org/model@main"]["model.safetensors"]
    assert await src.read("org/model", commit, files["model.safetensors"], 5, 1000) == w[5:1005]
    assert await src.read("org/model", commit, files["model.safetensors"], len(w) - 3, 3) == w[-3:]
    c = repo_data["org/model@main"]["config.json"]
    assert await src.read("org/model", commit, files["config.json"], 2, 5) == c[2:7]
    cdn = [r for r in origin.records if r.server == "cdn"]
    assert cdn and not any(r.authorized for r in cdn)
    assert all(r.authorized for r in origin.records if r.server == "hub")
    with pytest.raises(RemoteNotFound, match="beyond end of file"):
        await src.read("org/model", commit, files["config.json"], 2, 500)
    await src.aclose()


async def test_reset_is_resumed_and_retries_are_bounded(kit: Kit, origin: Origin, repo_data,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    src = kit.source()
    f = await kit.remote_file(src)
    commit, entry = f.commit, f.entry
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.reset_next(2, after_bytes=100_000, match="model.safetensors")
    assert await src.read("org/model", commit, entry, 0, 2 * MiB) == w[:2 * MiB]
    origin.fail_next(10, 502, match="model.safetensors")
    with pytest.raises(RemoteUnavailable, match=r"model.safetensors at offset 7: HTTP 502 \(gave up"):
        await src.read("org/model", commit, entry, 7, 10)
    assert "retry 1/2" in caplog.text
    await src.aclose()


async def test_old_commit_still_reads_after_push(kit: Kit, origin: Origin, repo_data) -> None:
    src = kit.source()
    old = await src.resolve(RepoRef.parse("org/model"))
    files = {f.path: f for f in (await src.list_files("org/model", old)).files}
    new = origin.put_file("org/model", "main", "model.safetensors", b"new weights" * 1000)
    assert new != old
    w = repo_data["org/model@main"]["model.safetensors"]
    assert await src.read("org/model", old, files["model.safetensors"], 100, 50) == w[100:150]
    await src.aclose()


@pytest.mark.parametrize(("path", "size"), [("model.safetensors", 10 * MiB + 12345),
                                            ("model.safetensors", 5 * MiB),
                                            ("config.json", 34), ("config.json", 12)])
async def test_changed_content_is_stale_never_mixed(kit: Kit, origin: Origin, repo_data, path: str,
                                                    size: int) -> None:
    src = kit.source()
    f = await kit.remote_file(src, path)
    commit, entry = f.commit, f.entry
    first = await src.read("org/model", commit, entry, 0, 10)
    assert first == repo_data["org/model@main"][path][:10]
    # A misbehaving mirror now serves other bytes (same or other size) for the same commit.
    origin.swap_content("org/model", path, bytes(reversed(repo_data["org/model@main"][path]))[:size]
                        .ljust(size, b"z"))
    fresh = kit.source()  # no remembered redirect: asks the endpoint, which names the new bytes
    with pytest.raises(RemoteStale):
        await fresh.read("org/model", commit, entry, 0, 10)
    await src.aclose()
    await fresh.aclose()


async def test_redirect_target_is_reused_and_refreshed(kit: Kit, origin: Origin, repo_data) -> None:
    src = kit.source()
    f = await kit.remote_file(src)
    commit, entry = f.commit, f.entry
    w = repo_data["org/model@main"]["model.safetensors"]
    origin.reset_stats()
    for i in range(3):
        assert await src.read("org/model", commit, entry, i * MiB, 100) == w[i * MiB:i * MiB + 100]
    assert [r.server for r in origin.data_requests()] == ["hub", "cdn", "cdn", "cdn"]
    origin.reset_stats()
    origin.fail_next(1, 404, match="/cdn/")  # the remembered CDN URL went away
    assert await src.read("org/model", commit, entry, 5 * MiB, 100) == w[5 * MiB:5 * MiB + 100]
    assert [(r.server, r.status) for r in origin.data_requests()] == [
        ("cdn", 404), ("hub", 302), ("cdn", 206)]
    await src.aclose()


