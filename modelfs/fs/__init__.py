"""The FUSE side: the inode tree and the request handlers (the one home of pyfuse3,
apart from init/main/close in the daemon)."""

from .operations import FsConfig, Operations
from .tree import ROOT_INODE, Node, Tree

__all__ = ["ROOT_INODE", "FsConfig", "Node", "Operations", "Tree"]
