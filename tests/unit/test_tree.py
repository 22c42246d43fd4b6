"""The inode tree without a kernel: building, merging a moved repo's new tree
into the mounted one (what keeps an inode, what changes), and forgetting."""

from __future__ import annotations

from modelfs.fs.tree import ROOT_INODE, StaticFile, Tree
from modelfs.types import FileEntry, RemoteFile


class _NoSource:
    key = "test"


def rf(path: str, cid: str, size: int = 10) -> RemoteFile:
    return RemoteFile(_NoSource(), "org/m", "c" * 40, FileEntry(path, size, cid))  # type: ignore[arg-type]


def build(tree: Tree, parent: int, files: dict[str, RemoteFile | StaticFile]) -> int:
    top = tree.mkdirs(parent, "m", 1)
    for path, f in files.items():
        tree.add_file(top.inode, path, f, 1)
    return top.inode


def test_merge_keeps_what_did_not_change_and_reports_what_did() -> None:
    tree = Tree(1)
    org = tree.mkdirs(ROOT_INODE, "org", 1).inode
    old = build(tree, org, {"a": rf("a", "A"), "b": rf("b", "B"), "d/c": rf("d/c", "C"),
                            "refs": StaticFile(b"x")})
    a, b, refs = tree.child(old, "a"), tree.child(old, "b"), tree.child(old, "refs")
    d = tree.child(old, "d")
    c = tree.child(d.inode, "c")
    assert a and b and d and c
    before = len(tree)
    # The new commit: a unchanged, b changed, d/c gone, e new, refs unchanged.
    staging = tree.mkdirs(ROOT_INODE, "staging", 2).inode
    new = build(tree, staging, {"a": rf("a", "A"), "b": rf("b", "B2"), "e": rf("e", "E"),
                                "refs": StaticFile(b"x"), "d/f": rf("d/f", "F")})
    tree.swap_child(staging, "m", None)
    gone, changed, added = tree.merge(old, new)
    assert tree.child(old, "a") is a  # same node, same inode: the kernel keeps its pages
    assert tree.child(old, "refs") is refs  # same made-up bytes: same node
    assert tree.child(old, "d") is d  # a directory on both sides stays
    assert tree.child(old, "b").inode != b.inode and tree.child(old, "b").file.entry.content_id == "B2"
    assert sorted(gone) == sorted([b.inode, c.inode])
    assert sorted(changed) == sorted([(old, "b"), (d.inode, "c")])
    # New names show only once linked (after the kernel dropped what changed).
    assert sorted((p, n) for p, n, _ in added) == sorted([(old, "e"), (d.inode, "f")])
    assert tree.child(old, "e") is None and tree.child(d.inode, "f") is None
    assert tree.child(d.inode, "c") is None
    tree.link(added)
    assert tree.child(old, "e") is not None and tree.child(d.inode, "f") is not None
    # Gone nodes stay until removed (the kernel may hold them); unchanged copies and
    # the new directory nodes are gone from the table at once.
    assert tree.get(b.inode) is not None
    for ino in gone:
        tree.remove(ino)
    assert len(tree) == before - 2 + 3 + 1  # -b -c, +b' +e +f, +staging
    assert tree.total_size() == 10 * 4  # a, b', e, f


def test_a_file_that_became_a_directory_is_swapped_whole() -> None:
    tree = Tree(1)
    old = build(tree, ROOT_INODE, {"x": rf("x", "X")})
    x = tree.child(old, "x")
    staging = tree.mkdirs(ROOT_INODE, "s", 1).inode
    new = build(tree, staging, {"x/y": rf("x/y", "Y")})
    tree.swap_child(staging, "m", None)
    gone, changed, added = tree.merge(old, new)
    assert gone == [x.inode] and changed == [(old, "x")] and added == []
    assert tree.child(tree.child(old, "x").inode, "y") is not None


def test_detach_returns_the_whole_subtree() -> None:
    tree = Tree(1)
    top = build(tree, ROOT_INODE, {"d/e/f": rf("d/e/f", "F"), "d/g": rf("d/g", "G")})
    d = tree.child(top, "d")
    inodes = tree.detach(top, "d")
    assert len(inodes) == 4 and d.inode in inodes  # d, e, f, g
    assert tree.child(top, "d") is None
