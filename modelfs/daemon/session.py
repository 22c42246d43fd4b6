"""pyfuse3 on a FUSE connection that is already mounted and initialised.

libfuse takes `/dev/fd/N` as a mountpoint and then serves descriptor N, but it
answers every request with EIO until it has seen the kernel's INIT, and the
kernel sends INIT once per connection, to the daemon that mounted it. So the
recorded INIT is played to libfuse over a socket pair standing in for
`/dev/fuse`; once libfuse has answered it, pyfuse3's readers are stopped, the
real descriptor is put in the socket's place (`dup2`, the same number), and
pyfuse3's main loop starts again on it. The first daemon of a mount forwards
libfuse's INIT reply to the kernel; a successor's reply is compared with the
first one's, since the kernel goes on with what was negotiated then.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import pyfuse3
import trio

from .connection import OUT_HEADER, Connection, notify_resend

log = logging.getLogger(__name__)

# How long libfuse may take to answer the recorded INIT.
INIT_TIMEOUT = 10.0


class SessionError(Exception):
    pass


def init(ops: pyfuse3.Operations, conn: Connection, options: Iterable[str]) -> Adoption:
    """`pyfuse3.init` on `conn`; `await adoption.run()` is then the session's main loop."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(conn.init)
    stand_in = theirs.detach()  # the number libfuse keeps as its descriptor
    pyfuse3.init(ops, f"/dev/fd/{stand_in}", set(options))
    return Adoption(conn, ours, stand_in)


class Adoption:
    def __init__(self, conn: Connection, ours: socket.socket, stand_in: int) -> None:
        self.conn = conn
        self._ours = ours
        self._fd = stand_in
        self.reply: bytes = b""

    async def run(self, reply_file: Path | None = None) -> None:
        """Answer INIT through libfuse, swap the real connection in, serve until the
        session ends (`pyfuse3.main`)."""
        await self._answer_init()
        if self.conn.first:
            os.write(self.conn.fd, self.reply)
            if reply_file is not None:
                _write_atomic(reply_file, self.reply)
        elif reply_file is not None:
            self._compare(reply_file)
        os.dup2(self.conn.fd, self._fd)  # closes the stand-in socket
        self._ours.close()
        if not self.conn.first and self.conn.resend and notify_resend(self._fd):
            log.info("asked the kernel to resend the requests the last daemon left unanswered")
        await pyfuse3.main()

    async def _answer_init(self) -> None:
        done = trio.Event()

        async def main_once() -> None:
            try:
                await pyfuse3.main()
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(main_once)
            with trio.move_on_after(INIT_TIMEOUT):
                await trio.lowlevel.wait_readable(self._ours)
                self.reply = self._ours.recv(65536)
            if not self.reply:
                nursery.cancel_scope.cancel()
                raise SessionError(f"libfuse did not answer INIT within {INIT_TIMEOUT:.0f}s")
            # Its readers now wait for the next request on the stand-in: wake them as
            # if it were closing, until the loop has ended (a second reader may only
            # be on its way to waiting).
            while not done.is_set():
                trio.lowlevel.notify_closing(self._fd)
                with trio.move_on_after(0.01):
                    await done.wait()

    def _compare(self, reply_file: Path) -> None:
        try:
            first = reply_file.read_bytes()
        except OSError:
            return
        # The unique id differs (it is the request's); the negotiated rest must not.
        if first[:4] + first[OUT_HEADER.size:] != self.reply[:4] + self.reply[OUT_HEADER.size:]:
            log.warning("this version of modelfs negotiates other FUSE capabilities than the "
                        "one that mounted; the mount keeps the old ones until it is remounted")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
