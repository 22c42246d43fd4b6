"""What a successor daemon needs to serve the mount its predecessor served: the
repos at their commits and the inode table, node for node.

The kernel knows files by inode number (and open files by handle, which encode
the inode: `Operations.open`), so a successor must number every node as the
predecessor did, including the nodes of replaced revisions that open files still
read. The daemon writes this file whenever its tree changes (at start and when a
repo moves), so even a daemon killed without warning leaves it current.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..cache import Index
from ..fetch import load_snapshot
from ..fs.tree import Node, StaticFile, Tree
from ..remote.sources import Sources
from ..types import FileEntry, RemoteFile, RepoSpec
from .layout import MountedRepo

STATE_FILE = "mount-state.json"
VERSION = 1


def save(path: Path, mountpoint: Path, repos: list[MountedRepo], tree: Tree) -> None:
    urls = {id(r.source): r.url for r in repos}
    nodes: list[list[Any]] = []
    for n in tree.nodes():
        payload: Any = None
        if isinstance(n.file, RemoteFile):
            payload = {"url": urls.get(id(n.file.source)), "repo": n.file.repo_id,
                       "commit": n.file.commit, "entry": asdict(n.file.entry)}
        elif isinstance(n.file, StaticFile):
            payload = {"static": base64.b64encode(n.file.content).decode()}
        nodes.append([n.inode, n.name, n.parent, n.mtime_ns,
                      sorted(n.children.items()) if n.children is not None else None, payload])
    doc = {"version": VERSION, "mountpoint": str(mountpoint), "next": tree.next_inode,
           "repos": [{"spec": str(RepoSpec(r.ref, r.url)), "commit": r.snap.commit,
                      "resolved_at": r.resolved_at, "hub": r.hub} for r in repos],
           "nodes": nodes}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def load(path: Path, mountpoint: Path, sources: Sources,
               index: Index) -> tuple[list[MountedRepo], Tree]:
    """The repos and tree `save` wrote. Raises ValueError (with a reason) when the
    file is missing, damaged or of another mount."""
    try:
        doc = json.loads(path.read_text())  # noqa: ASYNC240  (small, local, once at start)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"{path} is not a mount state of this version")
    if doc.get("mountpoint") != str(mountpoint):
        raise ValueError(f"{path} is the state of the mount {doc.get('mountpoint')!r}")
    try:
        repos = []
        for r in doc["repos"]:
            spec = RepoSpec.parse(r["spec"])
            source = sources.for_spec(spec)
            snap, _ = await load_snapshot(source, index, spec.ref, commit=r["commit"])
            repos.append(MountedRepo(spec.ref, source, snap, float(r["resolved_at"]),
                                     hub=bool(r["hub"]), url=spec.url))
        nodes = []
        for ino, name, parent, mtime_ns, children, payload in doc["nodes"]:
            file: RemoteFile | StaticFile | None = None
            if payload is not None and "static" in payload:
                file = StaticFile(base64.b64decode(payload["static"]))
            elif payload is not None:
                file = RemoteFile(sources.get(payload["url"]), payload["repo"],
                                  payload["commit"], FileEntry(**payload["entry"]))
            nodes.append(Node(int(ino), str(name), int(parent), int(mtime_ns),
                              children=dict(children) if children is not None else None,
                              file=file))
        return repos, Tree.restore(nodes, int(doc["next"]))
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
