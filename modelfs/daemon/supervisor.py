"""The supervisor: the process that owns the mount, so that the daemon serving it can
be restarted, upgraded or can crash without breaking a single open file.

It mounts (`connection.mount`), then runs the daemon as a child process that
inherits the FUSE connection (`modelfs mount ... --foreground` with the
connection in its environment). On `modelfs restart` (SIGUSR1) the daemon stops
reading requests, answers or abandons the ones in flight and exits with
`HANDED_OVER`; a successor starts on the same connection, rebuilds the same
inodes from the state the daemon keeps in `CACHE_DIR/daemon/`, and asks the
kernel to resend what was abandoned (Linux 6.9 and later). A daemon that dies
(kill -9, OOM) is replaced the same way. Requests that arrive meanwhile wait in
the kernel: readers see a pause, not an error.

On SIGTERM (or SIGINT, SIGHUP) the daemon gets SIGTERM and `STOP_WAIT` seconds;
then the connection is aborted and the mount detached, so no reader is left
waiting in the kernel, whatever the origin does. The supervisor has no event
loop and imports nothing of the daemon's: signals wake a `select` through a pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import connection
from .kernel import sd_notify
from .mountpoint import modelfs_mounted

log = logging.getLogger(__name__)

# The daemon's exit status after it stopped serving for a successor.
HANDED_OVER = 75
# After SIGTERM the daemon has this long to stop (its own bound is `serve.STOP_GRACE`
# for requests in flight); then it is killed and the connection aborted.
STOP_WAIT = 10.0
# A restart waits this long for the old daemon to hand over before killing it.
HANDOVER_WAIT = 90.0
# Daemons that die `CRASH_LIMIT` times within `CRASH_WINDOW` seconds (a version that
# cannot start, or a request that kills every daemon it is resent to) are not started
# again: the mount is given up.
CRASH_WINDOW = 60.0
CRASH_LIMIT = 10
START_TIMEOUT = 330.0  # the daemon resolves repos within 300 s

READY = b"READY\n"
PR_SET_PDEATHSIG = 1
STATE_DIR = "daemon"  # under the cache directory
PID_FILE = "supervisor.pid"
WORKER_FILE = "daemon.pid"
REPLY_FILE = "init-reply"
SOCKET = "supervisor.sock"  # restart and take-over requests


def state_dir(cache_dir: Path) -> Path:
    d = cache_dir / STATE_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    return d


class Supervisor:
    def __init__(self, mountpoint: Path, options: list[str], worker_cmd: Sequence[str],
                 cache_dir: Path, ready_fd: int | None, *, take_over: bool = False) -> None:
        self.mountpoint = mountpoint.absolute()
        self.options = options
        self.worker_cmd = list(worker_cmd)
        self.dir = state_dir(cache_dir)
        self.ready_fd = ready_fd
        self.take_over = take_over
        self.conn: connection.Connection | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.child_ready: int | None = None  # read end of the child's readiness pipe
        self.deaths: list[float] = []  # when daemons died unexpectedly (monotonic)
        self.serving = False  # some daemon has been ready on this connection
        self.stopping = False
        self.restarting = False
        self.listener: socket.socket | None = None
        self.waiting: list[socket.socket] = []  # `modelfs restart`s waiting for the new daemon
        self.successor: socket.socket | None = None  # a new supervisor taking the mount over
        self.handed_over = False
        self.spawn_at: float | None = None  # a successor is due (after a back-off)
        self.child_served = False  # the current daemon has been ready
        self.failed_starts = 0  # daemons in a row that died before they were ready
        self._signals: list[int] = []

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Mount (or take the mount over), serve through daemons until stopped or taken
        over; the exit status."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        if self.take_over and modelfs_mounted(self.mountpoint):
            self.conn = request_take_over(self.dir, self.mountpoint)
            log.info("took %s over from the supervisor that served it", self.mountpoint)
        else:
            self.conn = connection.mount(self.mountpoint, self.options)
            (self.dir / REPLY_FILE).unlink(missing_ok=True)
            log.info("mounted %s (FUSE connection resend: %s)", self.mountpoint,
                     "yes" if self.conn.resend else "no: a daemon crash fails its open reads")
        self.listener = _listen(self.dir / SOCKET)
        (self.dir / PID_FILE).write_text(f"{os.getpid()} {self.mountpoint}\n")
        try:
            self._spawn()
            end = self._loop(wake_r)
            if self.handed_over:
                return self._idle(wake_r)
            return end
        finally:
            for client in self.waiting:
                _reply(client, {"error": f"the mount {self.mountpoint} stopped"})
            if self.listener is not None:
                self.listener.close()
            if not self.handed_over:
                # Abort first: it ends every wait on the connection, the daemon's own too.
                connection.unmount(self.mountpoint, self.conn.fd)
                self._kill_child()
                for name in (PID_FILE, WORKER_FILE, SOCKET):
                    (self.dir / name).unlink(missing_ok=True)
                log.info("unmounted %s", self.mountpoint)

    def _idle(self, wake_r: int) -> int:
        """Handed over: wait for the stop signal (in Kubernetes the old pod is deleted
        once the new one is ready; exiting before would have the kubelet restart this
        container, which would take the mount back)."""
        log.info("the mount is served by its new supervisor now; waiting to be stopped")
        while True:
            with contextlib.suppress(InterruptedError):
                select.select([wake_r], [], [])
            _drain(wake_r)
            if any(s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                   for s in self._take_signals()):
                log.info("stopped; %s stays mounted, served by the new supervisor",
                         self.mountpoint)
                return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _loop(self, wake_r: int) -> int:
        deadline: float | None = None
        while True:
            fds: list[int | socket.socket] = [wake_r]
            if self.child_ready is not None:
                fds.append(self.child_ready)
            if self.listener is not None:
                fds.append(self.listener)
            due = [t for t in (deadline, self.spawn_at) if t is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                readable = []
            if wake_r in readable:
                _drain(wake_r)
            if self.child_ready is not None and self.child_ready in readable:
                self._read_child_ready()
            if self.listener is not None and self.listener in readable:
                op = self._accept()
                if op is not None:
                    self._signals.append(op)
            for signum in self._take_signals():
                if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) and not self.stopping:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    self.stopping = True
                    self._signal_child(signal.SIGTERM)
                    deadline = time.monotonic() + STOP_WAIT
                elif signum == signal.SIGUSR1 and not self.stopping and not self.restarting:
                    log.info("restart: handing the mount over to a new daemon%s",
                             " (and to a new supervisor)" if self.successor else "")
                    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
                    self.restarting = True
                    self._signal_child(signal.SIGUSR1)
                    deadline = time.monotonic() + HANDOVER_WAIT
            if self.spawn_at is not None and time.monotonic() >= self.spawn_at:
                self.spawn_at = None
                if not self.stopping:
                    self._spawn()
            if self.stopping and self.child is None and self.spawn_at is None:
                return 0  # stopped between daemons
            status = self._reap()
            if status is not None:
                deadline = None
                end = self._after_exit(status)
                if end is not None or self.handed_over:
                    return end or 0
            if deadline is not None and time.monotonic() >= deadline:
                if self.stopping:
                    log.warning("the daemon did not stop within %.0fs; aborting the mount",
                                STOP_WAIT)
                    return 1
                log.warning("the daemon did not hand over within %.0fs; killing it",
                            HANDOVER_WAIT)
                self._signal_child(signal.SIGKILL)
                deadline = None

    def _accept(self) -> int | None:
        """One request on the supervisor's socket: `restart` (`modelfs restart`) or
        `take-over` (a new supervisor, `modelfs mount --take-over`). Returns SIGUSR1 when
        it starts a handover."""
        assert self.listener is not None
        try:
            client, _ = self.listener.accept()
        except OSError:
            return None
        client.settimeout(2.0)
        try:
            request = json.loads(client.recv(4096).decode())
            op = request["op"]
        except (OSError, ValueError, KeyError, TypeError):
            _reply(client, {"error": "not a request"})
            return None
        if self.stopping or self.successor is not None:
            _reply(client, {"error": "the mount is stopping or being taken over"})
            return None
        if op == "restart":
            self.waiting.append(client)
            return None if self.restarting else signal.SIGUSR1
        if op == "take-over" and request.get("mountpoint") == str(self.mountpoint):
            if self.restarting:
                _reply(client, {"error": "a restart is under way; try again"})
                return None
            self.successor = client
            return signal.SIGUSR1
        _reply(client, {"error": f"cannot {op} {request.get('mountpoint', '')}".strip()})
        return None

    def _take_signals(self) -> list[int]:
        taken, self._signals = self._signals, []
        return [s for s in taken if s != signal.SIGCHLD]

    def _after_exit(self, status: int) -> int | None:
        """What a daemon's exit means: None to go on serving (a successor started)."""
        what = (f"killed by {signal.Signals(-status).name}" if status < 0
                else f"exited with status {status}")
        if self.stopping:
            return 0
        if status == 0 or not modelfs_mounted(self.mountpoint):
            log.info("the daemon %s; the mount is done", what)
            return 0 if status in (0, HANDED_OVER) else 1
        if self.successor is not None and self.restarting:
            # Whatever the daemon's end: the new supervisor's daemon has the kernel
            # resend what this one left unanswered.
            assert self.conn is not None
            _reply(self.successor, {"init": self.conn.init.hex()}, fds=[self.conn.fd])
            self.successor = None
            self.handed_over = True
            self.restarting = False
            os.close(self.conn.fd)
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            return None
        if status == HANDED_OVER and self.restarting:
            self.restarting = False
            self._spawn()
            return None
        if not self.serving:
            log.error("the daemon %s before the mount was ready; unmounting", what)
            return 1
        self.restarting = False
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < CRASH_WINDOW] + [now]
        if len(self.deaths) >= CRASH_LIMIT:
            log.error("the daemon %s; %d daemons died within %.0fs: giving up the mount",
                      what, len(self.deaths), CRASH_WINDOW)
            return 1
        # Back off while daemons die before serving (a version that cannot start): one
        # killed while serving is replaced at once. Readers wait meanwhile.
        self.failed_starts = 0 if self.child_served else self.failed_starts + 1
        delay = min(0.25 * 2 ** (self.failed_starts - 1), 5.0) if self.failed_starts else 0.0
        log.warning("the daemon %s; starting a successor on the same mount%s", what,
                    f" in {delay:.2g}s" if delay else "")
        self.spawn_at = time.monotonic() + delay
        return None

    # -- the daemon process ----------------------------------------------------------

    def _spawn(self) -> None:
        assert self.conn is not None
        first = not (self.dir / REPLY_FILE).exists()  # no daemon answered INIT yet
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(self.conn.env(first=first))
        cmd = [*self.worker_cmd, "--ready-fd", str(ready_w)]
        self.child = subprocess.Popen(cmd, env=env, pass_fds=(self.conn.fd, ready_w),
                                      preexec_fn=_die_with_parent)
        os.close(ready_w)
        self.child_ready = ready_r
        self.child_served = False
        log.info("started daemon process %d%s", self.child.pid,
                 "" if first else " on the running mount")

    def _read_child_ready(self) -> None:
        assert self.child_ready is not None
        line = os.read(self.child_ready, 4096)
        os.close(self.child_ready)
        self.child_ready = None
        if line.startswith(READY):
            assert self.child is not None
            (self.dir / WORKER_FILE).write_text(f"{self.child.pid}\n")
            self.child_served = True
            if not self.serving:
                self._tell_ready(READY)
            self.serving = True
            sd_notify(f"READY=1\nSTATUS=serving {self.mountpoint}")
            for client in self.waiting:
                _reply(client, {"pid": self.child.pid})
            self.waiting = []
        elif line and not self.serving:
            self._tell_ready(line)

    def _tell_ready(self, line: bytes) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, line)
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def _signal_child(self, sig: int) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(sig)

    def _reap(self) -> int | None:
        if self.child is None:
            return None
        status = self.child.poll()
        if status is None:
            return None
        self.child = None
        if self.child_ready is not None:
            self._read_child_ready_after_exit()
        return status

    def _read_child_ready_after_exit(self) -> None:
        assert self.child_ready is not None
        try:
            line = os.read(self.child_ready, 4096)
        except OSError:
            line = b""
        os.close(self.child_ready)
        self.child_ready = None
        if line and not self.serving and not line.startswith(READY):
            self._tell_ready(line)

    def _kill_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()


def _die_with_parent() -> None:
    """The daemon is killed when the supervisor dies: a mount nobody supervises is
    better dead (ENOTCONN, cleared by the next start) than served by an orphan."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def restart(cache_dir: Path, mountpoint: Path | None, timeout: float) -> int:
    """Ask the supervisor of the mount whose cache is `cache_dir` to hand it over to a
    new daemon; wait until that one is ready. Returns the new daemon's pid."""
    d = cache_dir / STATE_DIR
    try:
        mounted = (d / PID_FILE).read_text().strip().partition(" ")[2]
    except OSError:
        mounted = ""
    if mountpoint is not None and mounted and str(mountpoint) != mounted:
        raise RuntimeError(f"the mount with the cache {cache_dir} is {mounted}, not {mountpoint}"
                           " (--cache-dir names another mount's cache)")
    answer, _ = _request(d / SOCKET, {"op": "restart"}, timeout,
                         f"no modelfs mount runs with the cache {cache_dir}")
    if "pid" not in answer:
        raise RuntimeError(f"the restart failed: {answer.get('error', answer)}")
    return int(answer["pid"])


def request_take_over(state: Path, mountpoint: Path) -> connection.Connection:
    """The FUSE connection of the mount another supervisor serves, once its daemon has
    stopped (`modelfs mount --take-over`: a new version of the whole process tree)."""
    try:
        answer, fds = _request(state / SOCKET, {"op": "take-over", "mountpoint": str(mountpoint)},
                               HANDOVER_WAIT + 30, f"it is mounted but no supervisor answers at "
                               f"{state / SOCKET} to hand it over")
    except RuntimeError as exc:
        raise ConfigError(str(exc), setting="mountpoint", label="mountpoint",
                          subject=str(mountpoint)) from None
    if "init" not in answer or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConfigError(f"the supervisor of the mount refused to hand it over: "
                          f"{answer.get('error', answer)}", setting="mountpoint",
                          label="mountpoint", subject=str(mountpoint))
    os.set_inheritable(fds[0], True)
    return connection.Connection(fds[0], bytes.fromhex(answer["init"]), first=False)


def _request(path: Path, request: dict[str, str], timeout: float,
             absent: str) -> tuple[dict[str, Any], list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _short_path(path) as short:
                s.connect(short)
        except OSError:
            raise RuntimeError(absent) from None
        s.sendall(json.dumps(request).encode())
        try:
            data, fds, _, _ = socket.recv_fds(s, 65536, 1)
        except TimeoutError:
            raise RuntimeError(f"no answer within {timeout:.0f}s; see the mount's log") from None
    try:
        answer = json.loads(data.decode())
    except ValueError:
        answer = {"error": "the supervisor went away"}
    return answer if isinstance(answer, dict) else {"error": answer}, fds


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    path.unlink(missing_ok=True)  # a dead supervisor's, or the one that handed over
    with _short_path(path) as short:
        s.bind(short)
    os.chmod(path, 0o600)
    s.listen(8)
    s.setblocking(False)
    return s


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A Unix socket address is at most 107 bytes: a longer path is reached through
    its directory's descriptor."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _reply(client: socket.socket, answer: dict[str, Any], fds: Sequence[int] = ()) -> None:
    try:
        socket.send_fds(client, [json.dumps(answer).encode()], list(fds))
    except OSError as exc:
        log.info("could not answer a request on the supervisor's socket: %s", exc)
    finally:
        client.close()


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 256):
                return
        except BlockingIOError:
            return


def worker_command(argv: Sequence[str]) -> list[str]:
    """The daemon's command line: this `modelfs mount` again, in the foreground, without
    a readiness descriptor of its own (the supervisor gives each daemon one)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip or a.startswith("--ready-fd="):
            skip = False
        elif a == "--ready-fd":
            skip = True
        else:
            out.append(a)
    if "--foreground" not in out:
        out.append("--foreground")
    return [sys.executable, "-m", "modelfs", "mount", *out]
