"""The inode table: mount layout built from repo snapshots (sans-I/O).

`MOUNT/<org>/<name>/...` for a repo at its default revision and
`MOUNT/<org>/<name>@<rev>/...` for a pinned one. Each inode stands for one
immutable thing (a directory of one snapshot, or one version of a file), so
the kernel may cache its pages forever; content that changes gets new inodes.
When a repo moves to a new commit, the tree is merged (`merge`): what did not
change keeps its node, so its inode and the kernel's pages of it live on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ..types import RemoteFile

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


class Merged(NamedTuple):
    """What `Tree.merge` did: inodes that left the tree (to remove once the kernel
    forgets them), (directory inode, name) entries that changed or left (for the
    kernel to drop), and new names not linked yet (directory, name, inode)."""

    gone: list[int]
    changed: list[tuple[int, str]]
    added: list[tuple[int, str, int]]


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
        return self.subtree(top) if top is not None else []

    def subtree(self, top: int) -> list[int]:
        """`top` and every inode below it."""
        out: list[int] = []
        stack = [top]
        while stack:
            ino = stack.pop()
            out.append(ino)
            stack.extend((self._nodes[ino].children or {}).values())
        return out

    def remove(self, inode: int) -> None:
        self._nodes.pop(inode, None)

    def swap_child(self, parent: int, name: str, inode: int | None) -> int | None:
        """Point `parent`/`name` at `inode` (None: unlink it); return what it pointed at."""
        children = self._nodes[parent].children
        assert children is not None
        was = children.pop(name, None)
        if inode is not None:
            children[name] = inode
            self._nodes[inode].parent = parent
        return was

    def merge(self, old_top: int, new_top: int) -> Merged:
        """Make directory `old_top` show what `new_top` (a subtree just built, not
        linked into the tree) shows, changing only what differs: directories on
        both sides and files with the same content keep their old node, hence their
        inode and the kernel's cached pages and entries. Names that are new are not
        linked yet (`Merged.added`, for `link`): the caller shows them once the
        kernel has dropped the entries that changed, so that a reader who sees a
        new name never opens an old version of a changed one."""
        gone: list[int] = []
        changed: list[tuple[int, str]] = []
        added: list[tuple[int, str, int]] = []
        pairs = [(old_top, new_top)]
        while pairs:
            o, n = pairs.pop()
            old_children = self._nodes[o].children
            new_children = self._nodes.pop(n).children  # the new directory node itself goes
            assert old_children is not None
            assert new_children is not None
            for name in set(old_children) | set(new_children):
                oi, ni = old_children.get(name), new_children.get(name)
                if oi is not None and ni is not None:
                    was, now = self._nodes[oi], self._nodes[ni]
                    if was.is_dir and now.is_dir:
                        pairs.append((oi, ni))
                        continue
                    if _same_content(was.file, now.file):
                        del self._nodes[ni]  # never seen by the kernel
                        continue
                if oi is None:
                    assert ni is not None
                    added.append((o, name, ni))
                    continue
                gone += self.detach(o, name)
                if ni is not None:
                    self.swap_child(o, name, ni)
                changed.append((o, name))
        return Merged(gone, changed, added)

    def link(self, added: list[tuple[int, str, int]]) -> None:
        """Show the names `merge` left out (`Merged.added`)."""
        for parent, name, inode in added:
            self.swap_child(parent, name, inode)

    def total_size(self) -> int:
        return sum(n.file.entry.size for n in self._nodes.values()
                   if isinstance(n.file, RemoteFile))

    @property
    def next_inode(self) -> int:
        return self._next

    @classmethod
    def restore(cls, nodes: list[Node], next_inode: int) -> Tree:
        """The tree a previous daemon of this mount served, node for node (the
        kernel knows its inodes by number)."""
        tree = cls(0)
        tree._nodes = {n.inode: n for n in nodes}
        if ROOT_INODE not in tree._nodes or next_inode <= max(tree._nodes):
            raise ValueError("not a whole tree")
        tree._next = next_inode
        return tree


def _same_content(a: RemoteFile | StaticFile | None, b: RemoteFile | StaticFile | None) -> bool:
    if isinstance(a, RemoteFile) and isinstance(b, RemoteFile):
        return a.entry.content_id == b.entry.content_id and a.entry.size == b.entry.size
    return isinstance(a, StaticFile) and a == b

