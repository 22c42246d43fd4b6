"""Tell the daemon of a mount which bytes a loader is about to read.

    from modelfs import spans
    spans.prefetch({"/models/org/llm/model-00001-of-00004.safetensors": [(off, n), ...]})

A tensor-parallel rank calls this with the spans of its slices before it reads
them: the daemon fetches exactly the chunks covering them, once for all ranks,
at read-ahead priority, and does no guessing (read-ahead, whole-file prefetch)
for those files. The daemon is found from the path itself: the mount's root
carries its API socket as the extended attribute `user.modelfs.control_socket`.
Standard library only, so any loader process can import it cheaply.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SOCKET_XATTR = "user.modelfs.control_socket"
TIMEOUT = 30.0  # seconds to submit a plan (waiting for it: no limit)


class SpansError(RuntimeError):
    """The plan could not be given to a daemon (the message says which path, why)."""


def prefetch(plan: Mapping[str | os.PathLike[str], Iterable[tuple[int, int]]], *,
             wait: bool = False) -> list[dict[str, Any]]:
    """Submit byte spans `(offset, length)` per file; returns the daemon's answer per
    mount (its plan: chunks, bytes, and with `wait`, once they are all cached)."""
    by_mount: dict[Path, list[dict[str, Any]]] = {}
    for path, spans in plan.items():
        root = mount_root(Path(path))
        rel = Path(os.path.abspath(path)).relative_to(root)
        by_mount.setdefault(root, []).append(
            {"path": str(rel), "spans": [[int(o), int(n)] for o, n in spans]})
    return [_post(root, {"files": files, "wait": wait}) for root, files in by_mount.items()]


def mount_root(path: Path) -> Path:
    """The root of the modelfs mount `path` is in."""
    p = Path(os.path.abspath(path))
    for d in [p, *p.parents]:
        if os.path.ismount(d):
            try:
                os.getxattr(d, SOCKET_XATTR)
            except OSError:
                break
            return d
    raise SpansError(f"{path}: not in a modelfs mount with a control socket")


def _post(root: Path, body: dict[str, Any]) -> dict[str, Any]:
    sock = os.fsdecode(os.getxattr(root, SOCKET_XATTR))
    conn = _UnixConnection(sock, timeout=None if body["wait"] else TIMEOUT)
    try:
        conn.request("POST", "/v1/plans", json.dumps(body),
                     {"Content-Type": "application/json"})
        res = conn.getresponse()
        data = res.read()
    except OSError as exc:
        raise SpansError(f"{root}: the daemon at {sock} did not take the plan ({exc})") from None
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"error": data[:200].decode(errors="replace")}
    if res.status >= 300:
        raise SpansError(f"{root}: {answer.get('error', answer)}")
    return dict(answer)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("modelfs", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s
