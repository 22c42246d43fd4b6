"""Untrusted listing entries and repo references."""

from __future__ import annotations

import logging

import pytest

from modelfs.errors import ConfigError
from modelfs.remote.listing import bad_path_reason, clean_listing, hub_entry
from modelfs.types import FileEntry, RepoRef

OID = "b" * 40
SHA = "c" * 64


@pytest.mark.parametrize("path", ["", "/abs", "../x", "a/../b", "a/./b", "a//b", "a/", "x\0y",
                                  "a/" + "n" * 256, 5, None])
def test_bad_paths(path: object) -> None:
    assert bad_path_reason(path) is not None


@pytest.mark.parametrize("path", ["a", "a/b.c", "1_Pooling/config.json", "..a", "a..", "x y"])
def test_good_paths(path: str) -> None:
    assert bad_path_reason(path) is None


def test_hub_entry_prefers_lfs() -> None:
    e = hub_entry({"type": "file", "path": "w.bin", "size": 130, "oid": OID,
                   "lfs": {"oid": SHA, "size": 5_000_000_000, "pointerSize": 130}})
    assert e == FileEntry("w.bin", 5_000_000_000, SHA, SHA)
    assert hub_entry({"type": "file", "path": "c.json", "size": 3, "oid": OID}) == FileEntry(
        "c.json", 3, OID)
    assert hub_entry({"path": "x", "size": -1, "oid": OID}) == "bad size -1"
    assert hub_entry({"path": "x", "size": True, "oid": OID}) == "bad size True"
    assert hub_entry({"path": "x", "size": 1, "oid": "zz"}) == "bad oid"
    assert hub_entry({"path": "x", "size": 1, "lfs": {"oid": "short", "size": 1}}) == "bad lfs.oid"


def test_clean_listing_skips_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    files = [FileEntry("a/b.txt", 1, OID), FileEntry("a/b.txt", 2, OID), FileEntry("a", 1, OID),
             FileEntry("c", 1, OID), FileEntry("c/d", 1, OID), FileEntry("../e", 1, OID),
             ("weird", "bad oid")]
    kept, dirs = clean_listing("org/r", files, ["x/y", "c", "/abs"])
    assert [f.path for f in kept] == ["a/b.txt", "c"]
    assert kept[0].size == 1
    assert dirs == ("a", "x", "x/y")
    text = caplog.text
    for needle in ["'a/b.txt': collides", "'a': collides", "'c/d': lies under a path that is a file",
                   "'../e': has an empty", "'weird': bad oid", "directory 'c': collides",
                   "directory '/abs': absolute"]:
        assert needle in text


def test_repo_ref_parse() -> None:
    assert RepoRef.parse("org/name") == RepoRef("org/name", "main", False)
    r = RepoRef.parse("org/name@v1.0")
    assert (r.revision, r.pinned, r.mount_name) == ("v1.0", True, "name@v1.0")
    assert RepoRef.parse("org/n@refs/pr/1").mount_name == "n@refs%2Fpr%2F1"
    assert RepoRef.parse("o/n@" + "a" * 40).is_commit
    for bad in ["name", "a/b/c", "../x", "org/..", "org/name@", "org/name@../x", "/org/x"]:
        with pytest.raises(ConfigError, match="--repo"):
            RepoRef.parse(bad)
