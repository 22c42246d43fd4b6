"""The inode table: mount layout built from repo snapshots (sans-I/O).

`MOUNT/<org>/<name>/...` for a repo at its default revision and
`MOUNT/<org>/<name>@<rev>/...` for a pinned one. Each inode stands for one
immutable thing (a directory of one snapshot, or one version of a file), so
the kernel may cache its pages forever; content that changes gets new inodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..fetch import RemoteFile

ROOT_INODE = 1


@dataclass(frozen=True, slots=True)
class StaticFile:
    """A small file whose bytes the daemon makes up (e.g. a Hugging Face `refs/main`)."""

    content: bytes

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(slots=True)
class Node:
    inode: int
    name: str
    parent: int
    mtime_ns: int
    children: dict[str, int] | None = field(default=None)  # None for a file
    file: RemoteFile | StaticFile | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class Tree:
    def __init__(self, mtime_ns: int) -> None:
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE, mtime_ns, children={})}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, inode: int) -> Node:
        return self._nodes[inode]

    def nodes(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def child(self, parent: int, name: str) -> Node | None:
        node = self._nodes.get(parent)
        if node is None or node.children is None:
            return None
        ino = node.children.get(name)
        return self._nodes[ino] if ino is not None else None

    def _add(self, parent: int, name: str, mtime_ns: int, *,
             file: RemoteFile | StaticFile | None) -> Node:
        p = self._nodes[parent]
        assert p.children is not None
        existing = p.children.get(name)
        if existing is not None:
            node = self._nodes[existing]
            if file is None and node.is_dir:
                return node
            raise ValueError(f"{name!r} already exists in directory inode {parent}")
        node = Node(self._next, name, parent, mtime_ns,
                    children=None if file else {}, file=file)
        self._next += 1
        self._nodes[node.inode] = node
        p.children[name] = node.inode
        return node

    def mkdirs(self, parent: int, path: str, mtime_ns: int) -> Node:
        node = self._nodes[parent]
        for part in path.split("/") if path else []:
            node = self._add(node.inode, part, mtime_ns, file=None)
        return node

    def add_file(self, parent: int, path: str, file: RemoteFile | StaticFile,
                 mtime_ns: int) -> Node:
        head, _, name = path.rpartition("/")
        d = self.mkdirs(parent, head, mtime_ns)
        return self._add(d.inode, name, mtime_ns, file=file)

    def detach(self, parent: int, name: str) -> list[int]:
        """Unlink `name` from `parent`; return the inodes of the subtree it heads.
        The nodes stay until `remove`d: the kernel may still hold references."""
        p = self._nodes[parent]
        assert p.children is not None
        top = p.children.pop(name, None)
        out: list[int] = []
        stack = [top] if top is not None else []
        while stack:
            ino = stack.pop()
            out.append(ino)
            stack.extend((self._nodes[ino].children or {}).values())
        return out

    def remove(self, inode: int) -> None:
        self._nodes.pop(inode, None)

    def total_size(self) -> int:
        return sum(n.file.entry.size for n in self._nodes.values()
                   if isinstance(n.file, RemoteFile))
