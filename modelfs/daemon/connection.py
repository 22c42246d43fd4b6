"""The FUSE connection as a file descriptor the supervisor owns.

The supervisor mounts (through `fusermount3`, which hands back the open
`/dev/fuse` descriptor over a socket, as libfuse itself does when it is not
root), reads the kernel's `FUSE_INIT` request off it and keeps both. A daemon
process that serves the mount inherits the descriptor and the recorded INIT
(`Connection.from_env`); one that dies or is replaced leaves the connection,
and so the mount and every open file on it, alive for its successor.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .mountpoint import top_fstype

log = logging.getLogger(__name__)

# What the supervisor tells the daemon process it starts (not MODELFS_*: those are settings).
ENV_FD = "_MODELFS_FUSE_FD"
ENV_INIT = "_MODELFS_FUSE_INIT"  # the kernel's INIT request, hex
ENV_FIRST = "_MODELFS_FUSE_FIRST"  # "1": the kernel still waits for the INIT reply

FUSE_INIT = 26
# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_init_in: major, minor, max_readahead, flags, flags2, ...
INIT_IN = struct.Struct("<IIIII")
# struct fuse_out_header: len, error (or a notify code when unique is 0), unique
OUT_HEADER = struct.Struct("<IiQ")
FUSE_NOTIFY_RESEND = 7
FUSE_HAS_RESEND = 1 << 39  # in the INIT flags (flags2 << 32): the kernel resends on request
# One request of this kernel's largest (1 MiB pages plus the header): what INIT must fit in.
READ_SIZE = (1 << 20) + 4096 * 2


@dataclass(frozen=True)
class Connection:
    """An open FUSE connection and the INIT request the kernel sent on it."""

    fd: int
    init: bytes
    first: bool = False  # no daemon has answered INIT yet

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> Connection | None:
        if ENV_FD not in env:
            return None
        try:
            conn = cls(int(env[ENV_FD]), bytes.fromhex(env[ENV_INIT]), env.get(ENV_FIRST) == "1")
            os.fstat(conn.fd)
        except (KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"not a FUSE connection handed over by the supervisor ({exc})",
                              setting=ENV_FD) from None
        return conn

    def env(self, *, first: bool) -> dict[str, str]:
        return {ENV_FD: str(self.fd), ENV_INIT: self.init.hex(), ENV_FIRST: "1" if first else ""}

    @property
    def resend(self) -> bool:
        """Whether the kernel resends, on our notice, the requests a dead daemon had read
        but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9 and later)."""
        return bool(init_flags(self.init) & FUSE_HAS_RESEND)


def init_flags(init: bytes) -> int:
    """The capability flags of an INIT request (flags2 above bit 32 from protocol 7.36)."""
    _, minor, _, flags, flags2 = INIT_IN.unpack_from(init, IN_HEADER.size)
    return flags | (flags2 << 32 if minor >= 36 else 0)


def mount(mountpoint: Path, options: list[str]) -> Connection:
    """Mount a FUSE file system at `mountpoint` with `fusermount3` and return the
    connection with the kernel's INIT request read off it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        res = subprocess.run(["fusermount3", "-o", ",".join(options), "--", str(mountpoint)],
                             env=env, pass_fds=(theirs.fileno(),), capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise ConfigError(f"fusermount3 could not mount it: {res.stderr.strip()}",
                              setting="mountpoint", label="mountpoint", subject=str(mountpoint))
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise ConfigError("fusermount3 mounted it but sent no FUSE descriptor",
                          setting="mountpoint", label="mountpoint", subject=str(mountpoint))
    fd = fds[0]
    os.set_inheritable(fd, True)
    init = os.read(fd, READ_SIZE)
    _, opcode, *_ = IN_HEADER.unpack_from(init)
    if opcode != FUSE_INIT:
        os.close(fd)
        raise ConfigError(f"the kernel's first FUSE request was opcode {opcode}, not INIT",
                          setting="mountpoint", label="mountpoint", subject=str(mountpoint))
    return Connection(fd, init, first=True)


def notify_resend(fd: int) -> bool:
    """Ask the kernel to resend every request read but not answered on this connection.
    False where the kernel does not know the notice."""
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError as exc:
        log.info("the kernel refused FUSE_NOTIFY_RESEND: %s", exc.strerror)
        return False
    return True


def unmount(mountpoint: Path, fd: int | None) -> None:
    """Abort the connection and detach the mount: every request waiting on it, and every
    later one, fails at once (ENOTCONN), so no reader is left waiting in the kernel."""
    _abort(mountpoint)
    if top_fstype(mountpoint) == "fuse.modelfs":  # else unmounted already (`modelfs umount`)
        res = subprocess.run(["fusermount3", "-u", "-z", "--", str(mountpoint)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            log.warning("fusermount3 -u -z %s: %s", mountpoint, res.stderr.strip())
    if fd is not None:
        os.close(fd)


def _abort(mountpoint: Path) -> None:
    """Abort through the FUSE control file system (`/sys/fs/fuse/connections/N/abort`,
    N the mount's device minor): closing our descriptor aborts too, but only once no
    other process holds one."""
    target = str(mountpoint.absolute())
    with open("/proc/self/mountinfo") as f:
        # The last FUSE mount there: below it may be the bind mount of a container volume.
        devs = [ln.split()[2] for ln in f if ln.split()[4].replace("\\040", " ") == target
                and ln.split(" - ")[1].startswith("fuse")]
    if not devs:
        return
    dev = devs[-1]
    path = Path("/sys/fs/fuse/connections") / dev.partition(":")[2] / "abort"
    try:
        path.write_text("1")
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
            log.info("could not abort the FUSE connection of %s: %s", mountpoint, exc.strerror)
