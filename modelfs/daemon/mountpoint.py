"""The mountpoint: refuse one in use, clear the dead mount of a daemon that died."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that a FUSE file system (another modelfs, say) serves, and
    clear a dead modelfs mount. A mountpoint that is itself a mount of another kind
    is fine: in a container it is the volume (a Kubernetes hostPath is a bind mount)."""
    # Mounted first: a dead FUSE mount answers stat() with ENOTCONN.
    fstype = top_fstype(path)
    if fstype is not None and fstype.startswith("fuse") and not _clear_dead_mount(path):
        raise ConfigError(f"something is already mounted there (a stale mount? "
                          f"`modelfs umount {path}`)", setting="mountpoint", label="mountpoint",
                          subject=str(path))
    if not path.is_dir():
        raise ConfigError("not an existing directory", setting="mountpoint", label="mountpoint",
                          subject=str(path))


def top_fstype(path: Path) -> str | None:
    """The type of the file system mounted last at `path` (the one it shows), if any."""
    target = str(path.absolute())
    with open("/proc/self/mounts") as f:
        types = [ln.split()[2] for ln in f if ln.split()[1].replace("\\040", " ") == target]
    return types[-1] if types else None


def _clear_dead_mount(path: Path) -> bool:
    """A modelfs mount whose daemon died (kill -9, OOM) answers ENOTCONN; unmount it,
    so a restart (systemd's Restart=on-failure) can mount again. Anything else
    mounted there is left alone."""
    if top_fstype(path) != "fuse.modelfs":
        return False
    try:
        os.listdir(path)  # a stat may be answered from cached attributes; a listing is not
        return False  # alive: another daemon serves it
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    res = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or modelfs_mounted(path):
        return False
    log.warning("mountpoint %s: cleared the dead mount of a daemon that did not exit cleanly",
                path)
    return True


def modelfs_mounted(path: Path) -> bool:
    """Whether a modelfs mount is what `path` shows (a mount below it, such as a
    container volume's bind mount, does not count)."""
    return top_fstype(path) == "fuse.modelfs"


def is_mounted(path: Path) -> bool:
    target = str(path.absolute())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f)
