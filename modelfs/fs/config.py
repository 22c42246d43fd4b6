"""The mount's settings as plain data (no pyfuse3 here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FsConfig:
    """`attr_ttl` is how long the kernel may cache names and attributes; inodes
    never change meaning, so this only bounds how late a new tree is seen.
    `blksize` is what `stat` reports: buffered readers (cat, Python's `open`)
    size their reads from it."""

    attr_ttl: float = 60.0
    blksize: int = 1 << 20
