"""The mount's layout: which directory shows which repo at which snapshot.

`MOUNT/<org>/<name>[@rev]/...` per repo (`MOUNT/datasets/<org>/<name>` for a
dataset), and the Hugging Face cache view
(`MOUNT/.hf-cache/hub/{models,datasets}--ORG--NAME/{refs,snapshots}`) for the Hub repos,
built into a `Tree` (sans-I/O: no FUSE here), and the mount part of the status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..fs.tree import ROOT_INODE, StaticFile, Tree
from ..types import DATASETS, RemoteFile, RepoRef, Snapshot, Source


@dataclass(slots=True)
class MountedRepo:
    """One repo of the mount and the snapshot it shows now. `hub`: it comes from the
    Hub (and so shows in the Hugging Face cache view)."""

    ref: RepoRef
    source: Source
    snap: Snapshot
    resolved_at: float
    hub: bool = False
    url: str | None = None  # what `ORG/NAME=URL` named; None for the Hub


# The Hugging Face cache view: `HF_HUB_CACHE=MOUNT/.hf-cache/hub HF_HUB_OFFLINE=1`.
HF_VIEW = ".hf-cache/hub"


def hf_dir_name(repo_id: str) -> str:
    """`models--ORG--NAME`, or `datasets--ORG--NAME` for `datasets/ORG/NAME`."""
    kind, _, name = repo_id.partition("/")
    if kind == DATASETS and "/" in name:
        return "datasets--" + name.replace("/", "--")
    return "models--" + repo_id.replace("/", "--")


def add_hf_view(tree: Tree, repos: list[MountedRepo]) -> None:
    """`MOUNT/.hf-cache/hub/models--ORG--NAME/{refs/REV, snapshots/COMMIT/...}` for the
    Hub repos among `repos` (all of one repo id when called for an update), laid out
    like huggingface_hub's cache so unchanged code loads from the mount offline."""
    repos = [r for r in repos if r.hub]
    hub = tree.mkdirs(ROOT_INODE, HF_VIEW, 0) if repos else None
    for r in repos:
        assert hub is not None
        mtime = int(r.resolved_at * 1e9)
        top = tree.mkdirs(hub.inode, hf_dir_name(r.ref.repo_id), mtime)
        tree.mkdirs(top.inode, "refs", mtime)
        if not r.ref.is_commit:
            tree.add_file(top.inode, f"refs/{r.ref.revision}",
                          StaticFile(r.snap.commit.encode()), mtime)
        snap_dir = f"snapshots/{r.snap.commit}"
        if tree.child(tree.mkdirs(top.inode, "snapshots", mtime).inode, r.snap.commit):
            continue  # two refs at one commit share a snapshot
        add_snapshot(tree, tree.mkdirs(top.inode, snap_dir, mtime).inode, r.source, r.ref,
                     r.snap, mtime)


def add_snapshot(tree: Tree, top: int, source: Source, ref: RepoRef, snap: Snapshot,
                 mtime: int) -> None:
    for d in snap.directories:
        tree.mkdirs(top, d, mtime)
    for entry in snap.files:
        tree.add_file(top, entry.path, RemoteFile(source, ref.repo_id, snap.commit, entry), mtime)


def add_repo(tree: Tree, source: Source, ref: RepoRef, snap: Snapshot, resolved_at: float) -> None:
    """`MOUNT/<org>/<name>[@rev]/...` for one snapshot."""
    mtime = int(resolved_at * 1e9)
    top = tree.mkdirs(ROOT_INODE, ref.mount_path, mtime)
    add_snapshot(tree, top.inode, source, ref, snap, mtime)


def describe(mountpoint: Path, cache_dir: Path, repos: list[MountedRepo]) -> dict[str, Any]:
    """The mount part of `/v1/status`."""
    return {"mountpoint": str(mountpoint), "cache_dir": str(cache_dir),
            "repos": [{"id": r.ref.repo_id, "revision": r.ref.revision, "source": r.source.key,
                       "commit": r.snap.commit, "resolved_at": r.resolved_at,
                       "path": str(mountpoint / r.ref.mount_path), "url": shown_url(r.url),
                       "files": len(r.snap.files)} for r in repos]}


def shown_url(url: str | None) -> str | None:
    """A repo URL without credentials (`https://user:secret@host/` -> `https://host/`)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def local_path(mountpoint: Path,
               repos: list[MountedRepo]) -> Callable[[str, str, str], str | None]:
    """Where a job's file shows under the mount: its repo mounted at that revision."""
    def find(repo: str, revision: str, path: str) -> str | None:
        for r in repos:
            if r.ref.repo_id == repo and r.ref.revision == revision:
                return str(mountpoint / r.ref.mount_path / path)
        return None
    return find
