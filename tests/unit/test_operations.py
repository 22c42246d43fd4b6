"""The FUSE handlers called directly, without a kernel: attributes, lookups and
forgets of replaced inodes, read-only refusals, reads through the real reader."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest
import trio

from modelfs.fs.config import FsConfig
from modelfs.fs.operations import Operations
from modelfs.fs.tree import ROOT_INODE, StaticFile, Tree

from .conftest import Kit, MiB

CTX = pyfuse3.RequestContext()


async def mounted(kit: Kit) -> tuple[Operations, Tree, int]:
    src = kit.source()
    f = await kit.remote_file(src)
    tree = Tree(1)
    top = tree.mkdirs(ROOT_INODE, "org/model", 5).inode
    tree.add_file(top, "model.safetensors", f, 5)
    tree.add_file(top, "refs/main", StaticFile(b"abc123"), 5)
    _, reader = kit.reader()
    return Operations(tree, reader, FsConfig(attr_ttl=7.0)), tree, top


async def test_attributes_and_lookups(kit: Kit, repo_data) -> None:
    ops, _, top = await mounted(kit)
    org = await ops.lookup(pyfuse3.InodeT(ROOT_INODE), pyfuse3.FileNameT(b"org"), CTX)
    assert stat.S_ISDIR(org.st_mode) and org.st_mode & 0o777 == 0o555
    f = await ops.lookup(pyfuse3.InodeT(top), pyfuse3.FileNameT(b"model.safetensors"), CTX)
    size = len(repo_data["org/model@main"]["model.safetensors"])
    assert stat.S_ISREG(f.st_mode) and f.st_mode & 0o777 == 0o444
    assert (f.st_size, f.st_blksize, f.st_blocks) == (size, 1 << 20, -(-size // 512))
    assert f.entry_timeout == f.attr_timeout == 7.0 and f.st_mtime_ns == 5
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(pyfuse3.InodeT(top), pyfuse3.FileNameT(b"nope"), CTX)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(pyfuse3.InodeT(12345), CTX)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.opendir(f.st_ino, CTX)
    assert e.value.errno == errno.ENOTDIR
    s = await ops.statfs(CTX)
    assert s.f_blocks == -(-(size + 6) // 4096) and s.f_bavail == 0


async def test_read_only_everywhere(kit: Kit) -> None:
    ops, tree, top = await mounted(kit)
    ino = tree.child(top, "model.safetensors").inode
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(pyfuse3.InodeT(ino), flags, CTX)
        assert e.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(pyfuse3.InodeT(top), os.O_RDONLY, CTX)
    assert e.value.errno == errno.EISDIR
    for op in (ops.mkdir, ops.unlink, ops.write, ops.setattr, ops.rename):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await op()
        assert e.value.errno == errno.EROFS


async def test_reads_through_the_reader_and_handles(kit: Kit, repo_data) -> None:
    ops, tree, top = await mounted(kit)
    want = repo_data["org/model@main"]["model.safetensors"]
    ino = tree.child(top, "model.safetensors").inode
    refs = tree.child(tree.child(top, "refs").inode, "main").inode
    async with trio.open_nursery() as nursery:
        await nursery.start(ops._reader.run)
        info = await ops.open(pyfuse3.InodeT(ino), os.O_RDONLY, CTX)
        assert info.keep_cache  # an inode never changes content
        got = await ops.read(info.fh, 3 * MiB - 10, 20)
        assert bytes(got) == want[3 * MiB - 10:3 * MiB + 10]  # across two chunks
        assert bytes(await ops.read(info.fh, len(want) - 5, 100)) == want[-5:]  # clipped at the end
        await ops.release(info.fh)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(info.fh, 0, 10)
        assert e.value.errno == errno.EBADF
        static = await ops.open(pyfuse3.InodeT(refs), os.O_RDONLY, CTX)
        assert await ops.read(static.fh, 3, 10) == b"123"
        nursery.cancel_scope.cancel()


async def test_a_replaced_inode_lives_until_the_kernel_forgets_it(kit: Kit) -> None:
    ops, tree, top = await mounted(kit)
    old = await ops.lookup(pyfuse3.InodeT(top), pyfuse3.FileNameT(b"model.safetensors"), CTX)
    await ops.lookup(pyfuse3.InodeT(top), pyfuse3.FileNameT(b"model.safetensors"), CTX)
    org = tree.child(ROOT_INODE, "org").inode
    src = kit.source()
    f = await kit.remote_file(src, "config.json")  # other content under the same name
    await ops.replace(org, "model", lambda t: t.add_file(
        t.mkdirs(org, "model", 6).inode, "model.safetensors", f, 6))
    new = tree.child(tree.child(org, "model").inode, "model.safetensors")
    assert new.inode != old.st_ino
    assert tree.get(old.st_ino) is not None  # the kernel holds two references
    await ops.forget([(old.st_ino, 1)])
    assert tree.get(old.st_ino) is not None
    await ops.forget([(old.st_ino, 1)])
    assert tree.get(old.st_ino) is None  # forgotten: gone
    # refs/ was not in the new tree: it left, and nobody had looked it up.
    assert tree.child(tree.child(org, "model").inode, "refs") is None
