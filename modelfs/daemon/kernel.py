"""What the daemon sets in the kernel and the process around it: the mount's
read-ahead and FUSE queue, the FUSE control file system, and systemd's
readiness protocol."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

# FUSE requests of up to 1 MiB: the kernel sizes reads from the bdi's read-ahead.
READ_AHEAD_KB = 1024
# Concurrent background (read-ahead) requests the kernel sends us; Mountpoint and
# hf-mount use 64 too.
MAX_BACKGROUND = 64


def tune_kernel(mountpoint: Path) -> None:
    """Kernel knobs of this mount, settable only after mounting (and only as root).

    - the bdi's `read_ahead_kb`: the kernel sizes FUSE read requests from it, so
      1024 turns 128 KiB requests into 1 MiB ones;
    - the FUSE connection's `max_background` (default 12): how many read-ahead
      requests the kernel keeps in flight to the daemon at once.
    Without root the defaults stay, which only costs speed.
    """
    knobs = []
    _mount_fusectl()
    try:
        with open("/proc/self/mountinfo") as f:
            bdi = next((ln.split()[2] for ln in f if ln.split()[4] == str(mountpoint)), None)
        if bdi:
            knobs.append((Path("/sys/class/bdi") / bdi / "read_ahead_kb", READ_AHEAD_KB))
        conn = Path("/sys/fs/fuse/connections") / str(os.minor(os.stat(mountpoint).st_dev))
        knobs += [(conn / "max_background", MAX_BACKGROUND),
                  (conn / "congestion_threshold", MAX_BACKGROUND * 3 // 4)]
    except OSError as exc:
        log.info("cannot tune kernel knobs of %s: %s", mountpoint, exc.strerror)
    for path, value in knobs:
        try:
            path.write_text(str(value))
        except OSError as exc:
            log.info("could not set %s (%s); using the kernel default", path, exc.strerror)


def _mount_fusectl() -> None:
    """The FUSE control file system (`/sys/fs/fuse/connections`) holds
    `max_background`; systemd mounts it at boot, a container or a minimal VM may not."""
    conns = Path("/sys/fs/fuse/connections")
    if os.geteuid() != 0 or not conns.is_dir() or any(conns.iterdir()):
        return
    with open("/proc/self/mounts") as f:
        if any(line.split()[2] == "fusectl" for line in f):
            return
    res = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        log.info("cannot mount fusectl on %s: %s", conns, res.stderr.strip())


def sd_notify(state: str) -> None:
    """Tell systemd (`Type=notify`) about our state: `READY=1`, `STOPPING=1`. A no-op
    outside systemd. The protocol is one datagram to $NOTIFY_SOCKET (sd_notify(3))."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", addr, exc.strerror)
