"""A real HTTP origin that speaks the Hub API, for tests, demos and benchmarks.

Serves repos from a directory laid out as `ROOT/<org>/<name>/<ref>/<files...>`:
each subdirectory of a repo is a branch or tag. A ref's commit sha is derived
from its content, and every commit ever seen stays resolvable, so moving a
branch (change files, `refresh()`) keeps old commits readable.

Endpoints (like huggingface.co):
- `GET /api/models/{repo}/revision/{rev}` -> `{"id", "sha", "siblings"}`
- `GET /api/models/{repo}/tree/{rev}?recursive=true` paginated with `Link: rel="next"`
- the same under `/api/datasets/` for repos added as `datasets/ORG/NAME`
- `GET|HEAD /{repo}/resolve/{rev}/{path}`: small files served directly (ETag = git
  blob id); LFS files answer 302 to a second listener acting as CDN, with
  `X-Linked-Etag` (sha256) and `X-Linked-Size`; the CDN serves `/cdn/{sha256}`
  with an ETag of its own. Range (single), 206/416, If-Range, If-Match.
- `GET /_origin/stats` -> request and byte counts as JSON.

Knobs (Python API, thread-safe): `fail_next`, `reset_next`, `corrupt_next`, `delay`,
`throttle`, `require_token`, `extra_entries`, `refresh`; for hostile-origin tests
`script` (a canned answer, headers and body chosen by the test, for any request
path) and `misbehave` (data requests that stall before the headers, stall or
trickle mid-body, ignore Range, send a wrong Content-Range, or a short or long
body). Listens on 127.0.0.1 only.

Run: `python -m modelfs.testing.origin --root DIR [--port 8080] [--demo]`.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack",
                ".model", ".npz", ".ckpt")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class OriginFile:
    path: str
    disk: Path
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int
    range: str | None
    bytes_sent: int
    server: str  # "hub" or "cdn"
    authorized: bool
    client_port: int = 0  # which connection: a kept-alive one asks again from the same port

    @property
    def is_data(self) -> bool:
        """A request for file content (resolve or CDN), as opposed to metadata."""
        plain_file = self.path.startswith("/plain/") and not self.path.endswith("/")
        return self.server == "cdn" or "/resolve/" in self.path or (
            plain_file and self.method == "GET")


@dataclass
class _Fault:
    kind: str  # "status", "reset", "corrupt", or one of MISBEHAVIOURS
    remaining: int
    match: str | None
    status: int = 503
    retry_after: str | None = None
    after_bytes: int = 0
    seconds: float = 0.0  # how long a stall lasts
    rate: float = 0.0  # bytes per second of a trickle


# What `misbehave` can make a data request do.
MISBEHAVIOURS = ("stall_headers", "stall_body", "trickle", "ignore_range", "wrong_range",
                 "short_body", "long_body")


@dataclass
class _Script:
    """A canned answer for request paths matching `match` (a glob), `remaining` times
    (None: for ever)."""

    match: str
    status: int
    body: bytes
    headers: dict[str, str]
    remaining: int | None
    stall: float = 0.0


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, OriginFile]] = field(default_factory=dict)


def _git_blob_oid(data_size: int, chunks: list[bytes]) -> str:
    h = hashlib.sha1(f"blob {data_size}\0".encode())
    for c in chunks:
        h.update(c)
    return h.hexdigest()


class Origin:
    def __init__(self, root: Path, *, page_size: int = 1000, lfs_threshold: int = 10 << 20,
                 host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0) -> None:
        self.root = Path(root)
        self.page_size = page_size
        self.lfs_threshold = lfs_threshold
        self.delay = 0.0
        self.throttle = 0.0  # bytes per second for bodies; 0 = as fast as possible
        self.require_token: dict[str, str] = {}
        self.extra_entries: dict[str, list[dict[str, Any]]] = {}
        self.records: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._scripts: list[_Script] = []
        self._chaos: tuple[float, random.Random, float] | None = None
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._blobs: dict[str, OriginFile] = {}
        self._swaps: dict[tuple[str, str], OriginFile] = {}
        self._hub = _Server((host, port), _Handler, self, "hub")
        self._cdn = _Server((host, cdn_port), _Handler, self, "cdn")
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()  # ends stalls and trickles at `stop`
        self.refresh()

    # Lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._hub.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def cdn_url(self) -> str:
        host, port = self._cdn.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Origin:
        self._stopping.clear()
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Repo state -----------------------------------------------------------------

    def refresh(self) -> None:
        """Re-scan ROOT: refs move to the commit of their current content."""
        repos: dict[str, _Repo] = {}
        orgs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        # ROOT/datasets/ORG/NAME/REF holds the dataset `datasets/ORG/NAME`.
        datasets = self.root / "datasets"
        orgs = [o for o in orgs if o != datasets] + (
            sorted(p for p in datasets.iterdir() if p.is_dir()) if datasets.is_dir() else [])
        for org in orgs:
            for name in sorted(p for p in org.iterdir() if p.is_dir()):
                repo_id = str(name.relative_to(self.root))
                repo = self._repos.get(repo_id) or _Repo()
                repo.refs = {}
                for ref in sorted(p for p in name.iterdir() if p.is_dir()):
                    files = self._scan(ref)
                    commit = hashlib.sha1(
                        (repo_id + "\n" + "\n".join(f"{f.path} {f.git_oid}"
                                                    for f in files.values())).encode()).hexdigest()
                    repo.commits[commit] = files
                    repo.refs[ref.name.replace("%2F", "/")] = commit
                repos[repo_id] = repo
        with self._lock:
            self._repos = repos

    def _scan(self, ref_dir: Path) -> dict[str, OriginFile]:
        out = {}
        for p in sorted(ref_dir.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(ref_dir).as_posix()
            st = p.stat()
            key = (str(p), st.st_size, st.st_mtime_ns)
            if key not in self._hash_cache:
                sha1 = hashlib.sha1(f"blob {st.st_size}\0".encode())
                sha256 = hashlib.sha256()
                with open(p, "rb") as fp:
                    while block := fp.read(4 << 20):
                        sha1.update(block)
                        sha256.update(block)
                self._hash_cache[key] = (sha1.hexdigest(), sha256.hexdigest())
            oid, sha = self._hash_cache[key]
            lfs = st.st_size >= self.lfs_threshold or rel.endswith(LFS_SUFFIXES)
            f = OriginFile(rel, self._keep(p, oid), st.st_size, oid, sha if lfs else None)
            if lfs:
                self._blobs[sha] = f
            out[rel] = f
        return out

    def _keep(self, path: Path, oid: str) -> Path:
        """Hard-link content into ROOT/.objects so old commits keep their bytes
        after a file is replaced (`put_file`)."""
        obj = self.root / ".objects" / oid
        if not obj.exists():
            obj.parent.mkdir(exist_ok=True)
            os.link(path, obj)
        return obj

    def put_file(self, repo_id: str, ref: str, path: str, data: bytes) -> str:
        """Replace (atomically) or add a file on a ref, as a push would; returns the new commit."""
        target = self.root / repo_id / ref / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp-put")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        self.refresh()
        return self.commit_of(repo_id, ref)

    def swap_content(self, repo_id: str, path: str, data: bytes) -> None:
        """Misbehaving mirror: serve `data` for `path` at every commit, listings unchanged."""
        disk = self.root / ".swapped" / repo_id / path
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_bytes(data)
        sha1 = _git_blob_oid(len(data), [data])
        sha = hashlib.sha256(data).hexdigest()
        lfs = len(data) >= self.lfs_threshold or path.endswith(LFS_SUFFIXES)
        f = OriginFile(path, disk, len(data), sha1, sha if lfs else None)
        with self._lock:
            self._swaps[(repo_id, path)] = f
            if lfs:
                self._blobs[sha] = f

    def commit_of(self, repo_id: str, rev: str = "main") -> str:
        return self._lookup(repo_id, rev)[0]

    def _lookup(self, repo_id: str, rev: str) -> tuple[str, dict[str, OriginFile]]:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise KeyError("RepoNotFound")
            commit = repo.refs.get(rev, rev)
            files = repo.commits.get(commit)
            if files is None:
                raise KeyError("RevisionNotFound")
            return commit, files

    # Knobs ----------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, *, match: str | None = None,
                  retry_after: str | None = None) -> None:
        """The next `n` data requests (whose path contains `match`) answer `status`."""
        with self._lock:
            self._faults.append(_Fault("status", n, match, status=status, retry_after=retry_after))

    def reset_next(self, n: int = 1, *, after_bytes: int = 65536, match: str | None = None) -> None:
        """The next `n` data requests send `after_bytes` of body, then a TCP reset."""
        with self._lock:
            self._faults.append(_Fault("reset", n, match, after_bytes=after_bytes))

    def corrupt_next(self, n: int = 1, *, match: str | None = None) -> None:
        """The next `n` data requests send a body whose first byte is flipped, with
        every header right (a bad mirror or a bit flip in transit)."""
        with self._lock:
            self._faults.append(_Fault("corrupt", n, match))

    def misbehave(self, kind: str, n: int = 1, *, match: str | None = None,
                  seconds: float = 3600.0, rate: float = 1.0, after_bytes: int = 65536) -> None:
        """The next `n` data requests (path containing `match`) misbehave:
        `stall_headers` sleeps `seconds` before answering; `stall_body` sends
        `after_bytes` of body, then sleeps `seconds`; `trickle` sends the body at
        `rate` bytes per second; `ignore_range` answers 200 with the whole file;
        `wrong_range` answers 206 with a Content-Range one byte off; `short_body`
        and `long_body` send one byte less or more than Content-Length says."""
        if kind not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {kind!r}")
        with self._lock:
            self._faults.append(_Fault(kind, n, match, seconds=seconds, rate=rate,
                                       after_bytes=after_bytes))

    def chaos(self, probability: float, *, seed: int = 0, stall: float = 2.0) -> None:
        """Fault-injecting mode: each data request, with `probability`, gets one fault
        drawn at random (503, 500 or 429 with Retry-After, a reset at a random offset,
        a stall before the headers or mid-body of up to `stall` seconds, a trickle,
        a 200 for a range, a wrong Content-Range, a short or a long body). Never
        corrupt bytes with right headers: that is `corrupt_next`. 0 turns it off."""
        with self._lock:
            self._chaos = (probability, random.Random(seed), stall) if probability else None

    def _chaos_fault(self, kinds: tuple[str, ...]) -> _Fault | None:
        with self._lock:
            if self._chaos is None:
                return None
            p, rnd, stall = self._chaos
            if rnd.random() >= p:
                return None
            kind = rnd.choice([k for k in ("status", "reset", *MISBEHAVIOURS) if k in kinds])
            return _Fault(kind, 1, None, status=rnd.choice([500, 503, 429]),
                          retry_after=rnd.choice([None, "1"]), after_bytes=rnd.randrange(1, 1 << 20),
                          seconds=rnd.uniform(0.1, stall), rate=rnd.choice([50e3, 500e3, 5e6]))

    def script(self, match: str, body: bytes | str | Any = b"", *, status: int = 200,
               headers: dict[str, str] | None = None, times: int | None = None,
               stall: float = 0.0) -> None:
        """Answer requests whose path (unquoted, without the query) matches the glob
        `match` with `status`, `headers` and `body` (a str is sent as UTF-8, anything
        else but bytes as JSON), after `stall` seconds, `times` times (None: always).
        The latest script for a path wins."""
        if isinstance(body, str):
            raw = body.encode("utf-8", "surrogatepass")
        elif isinstance(body, bytes | bytearray):
            raw = bytes(body)
        else:
            raw = json.dumps(body).encode()
        with self._lock:
            self._scripts.insert(0, _Script(match, status, raw, dict(headers or {}), times,
                                            stall))

    def _take_script(self, path: str) -> _Script | None:
        with self._lock:
            for sc in self._scripts:
                if (sc.remaining is None or sc.remaining > 0) and fnmatch.fnmatch(path, sc.match):
                    if sc.remaining is not None:
                        sc.remaining -= 1
                    return sc
        return None

    def go_down(self) -> None:
        """Stop answering: both ports refuse connections until `come_back`."""
        self.stop()
        self._threads.clear()

    def come_back(self) -> None:
        """Listen again on the same ports."""
        hub, cdn = self._hub.server_address, self._cdn.server_address
        self._hub = _Server((str(hub[0]), hub[1]), _Handler, self, "hub")
        self._cdn = _Server((str(cdn[0]), cdn[1]), _Handler, self, "cdn")
        self.start()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._scripts.clear()

    def _take_fault(self, names: str, kinds: tuple[str, ...]) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if (f.remaining > 0 and f.kind in kinds
                        and (f.match is None or f.match in names)):
                    f.remaining -= 1
                    return f
        return self._chaos_fault(kinds) if "corrupt" in kinds else None  # data requests only

    # Stats ----------------------------------------------------------------------

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def reset_stats(self) -> None:
        with self._lock:
            self.records = []

    def data_requests(self, match: str | None = None) -> list[RequestRecord]:
        """Content requests so far; with `match`, only those whose path matches the glob."""
        with self._lock:
            recs = list(self.records)
        return [r for r in recs if r.is_data and (match is None or fnmatch.fnmatch(r.path, match))]

    def bytes_sent(self) -> int:
        with self._lock:
            return sum(r.bytes_sent for r in self.records)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            recs = list(self.records)
        return {"requests": len(recs), "data_requests": sum(r.is_data for r in recs),
                "bytes_sent": sum(r.bytes_sent for r in recs)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], handler: type, origin: Origin, kind: str) -> None:
        super().__init__(addr, handler)
        self.origin = origin
        self.kind = kind

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Injected resets and clients that hang up are expected: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm on, a
    # keep-alive request then waits ~40 ms on the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server
    _sent = 0  # body bytes of the current `_sendfile`, as they go

    def log_message(self, format: str, *args: Any) -> None:
        return

    # Plumbing -------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              *, error_code: str | None = None) -> None:
        # Recorded before the client can see the answer, so records keep request order.
        self._done(status, len(body) if self.command != "HEAD" else 0)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})

    def _done(self, status: int, sent: int) -> RequestRecord:
        rec = RequestRecord(
            self.command, unquote(urlsplit(self.path).path), status, self.headers.get("Range"),
            sent, self.server.kind, "Authorization" in self.headers, self.client_address[1])
        self.server.origin._record(rec)
        return rec

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        origin = self.server.origin
        if origin.delay:
            time.sleep(origin.delay)
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            scripted = origin._take_script(path)
            if scripted is not None:
                if scripted.stall:
                    origin._stopping.wait(scripted.stall)
                self._send(scripted.status, scripted.body, scripted.headers)
            elif self.server.kind == "cdn":
                self._cdn(path)
            elif path == "/_origin/stats":
                self._json(origin.stats())
            elif path.startswith("/api/models/"):
                self._api(path[len("/api/models/"):], parse_qs(url.query))
            elif path.startswith("/api/datasets/"):
                self._api(path[len("/api/datasets/"):], parse_qs(url.query), "datasets/")
            elif "/resolve/" in path:
                self._resolve(path)
            elif path.startswith("/plain/"):
                self._plain(path)
            else:
                self._send(404, b"not found", error_code="EntryNotFound")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # Hub API --------------------------------------------------------------------

    def _auth_ok(self, repo_id: str) -> bool:
        token = self.server.origin.require_token.get(repo_id)
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _repo_lookup(self, repo_id: str, rev: str) -> tuple[str, dict[str, OriginFile]] | None:
        if not self._auth_ok(repo_id):
            self._send(401, b"gated", error_code="GatedRepo")
            return None
        try:
            return self.server.origin._lookup(repo_id, rev)
        except KeyError as exc:
            code = exc.args[0]
            self._send(404, code.encode(), error_code=code)
            return None

    def _api(self, rest: str, query: dict[str, list[str]], kind: str = "") -> None:
        """`kind` is `datasets/` for the dataset API: its repos are added to the
        origin as `datasets/ORG/NAME`."""
        parts = rest.split("/")
        if len(parts) < 4 or parts[2] not in ("revision", "tree"):
            self._send(404, b"not found")
            return
        repo_id = kind + "/".join(parts[:2])
        rev = parts[3]
        found = self._repo_lookup(repo_id, rev)
        if found is None:
            return
        commit, files = found
        if parts[2] == "revision":
            self._json({"id": repo_id, "sha": commit,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})
            return
        entries = self._tree_entries(files) + self.server.origin.extra_entries.get(repo_id, [])
        page = self.server.origin.page_size
        cursor = int(query.get("cursor", ["0"])[0])
        chunk = entries[cursor:cursor + page]
        headers = {}
        if cursor + page < len(entries):
            host = self.headers.get("Host", "127.0.0.1")
            api = f"datasets/{repo_id[len(kind):]}" if kind else f"models/{repo_id}"
            nxt = (f"http://{host}/api/{api}/tree/{rev}?recursive=true"
                   f"&cursor={cursor + page}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(chunk, headers)

    @staticmethod
    def _tree_entries(files: dict[str, OriginFile]) -> list[dict[str, Any]]:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        out: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in dirs]
        for f in files.values():
            e: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.sha256:
                pointer = 100 + len(str(f.size))
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": pointer}
                e["size"] = pointer
            out.append(e)
        return out

    def _resolve(self, path: str) -> None:
        head, _, rest = path.lstrip("/").partition("/resolve/")
        rev, _, fpath = rest.partition("/")
        found = self._repo_lookup(head, rev)
        if found is None:
            return
        commit, files = found
        f = self.server.origin._swaps.get((head, fpath)) or files.get(fpath)
        if f is None:
            self._send(404, b"entry not found", error_code="EntryNotFound")
            return
        if f.sha256:
            if self._fault(path, ("status",)):
                return
            loc = f"{self.server.origin.cdn_url}/cdn/{f.sha256}"
            self._send(302, b"", {"Location": loc, "X-Repo-Commit": commit,
                                  "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                                  "ETag": f'"{f.sha256}"'})
            return
        self._serve_file(f, f'"{f.git_oid}"', {"X-Repo-Commit": commit}, path)

    def _plain(self, path: str) -> None:
        """A plain HTTP mirror: `/plain/ORG/NAME/REF/PATH` serves the file as nginx
        would (ETag "mtime-size"-like, Range, If-Range, If-None-Match); a path ending
        in `/` is a directory index in nginx's `autoindex_format json`."""
        parts = path[len("/plain/"):].split("/", 3)
        if len(parts) < 3:
            self._send(404, b"not found")
            return
        repo_id, ref, rest = f"{parts[0]}/{parts[1]}", parts[2], parts[3] if len(parts) > 3 else ""
        try:
            _, files = self.server.origin._lookup(repo_id, ref)
        except KeyError:
            self._send(404, b"not found")
            return
        if rest == "" or rest.endswith("/"):
            seen: dict[str, dict[str, Any]] = {}
            for p, f in files.items():
                if not p.startswith(rest):
                    continue
                head, sep, _ = p[len(rest):].partition("/")
                seen[head] = ({"name": head, "type": "directory", "mtime": "-"} if sep else
                              {"name": head, "type": "file", "mtime": "-", "size": f.size})
            if not seen and rest:
                self._send(404, b"not found")
                return
            self._json(sorted(seen.values(), key=lambda e: e["name"]))
            return
        found = files.get(rest)
        if found is None:
            self._send(404, b"not found")
            return
        etag = f'"{found.git_oid[:8]}-{found.size:x}"'
        if self.headers.get("If-None-Match") == etag:
            self._done(304, 0)
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self._serve_file(found, etag, {}, path)

    def _cdn(self, path: str) -> None:
        sha = path.removeprefix("/cdn/")
        f = self.server.origin._blobs.get(sha)
        if f is None:
            self._send(404, b"no such blob")
            return
        self._serve_file(f, f'"cdn-{sha[:32]}"', {}, path)

    # Byte serving -----------------------------------------------------------------

    def _fault(self, names: str, kinds: tuple[str, ...] = ("status", "reset")) -> _Fault | None:
        fault = self.server.origin._take_fault(names, kinds)
        if fault and fault.kind == "status":
            hdrs = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._send(fault.status, b"injected failure", hdrs)
            return fault
        return fault

    def _serve_file(self, f: OriginFile, etag: str, extra: dict[str, str], path: str) -> None:
        fault = self._fault(f"{path} {f.path}", ("status", "reset", "corrupt", *MISBEHAVIOURS))
        if fault and fault.kind == "status":
            return
        corrupt = fault is not None and fault.kind == "corrupt"
        odd = fault.kind if fault is not None and fault.kind in MISBEHAVIOURS else None
        misfault = fault if odd else None
        if corrupt or odd:
            fault = None
        if odd == "stall_headers":
            assert misfault is not None
            self.server.origin._stopping.wait(misfault.seconds)
        if_match = self.headers.get("If-Match")
        if if_match and if_match != "*" and etag not in [v.strip() for v in if_match.split(",")]:
            self._send(412, b"precondition failed", {"ETag": etag})
            return
        start, end, status = 0, f.size - 1, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag) and odd != "ignore_range":
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), f.size - 1) if m.group(2) else f.size - 1
                else:
                    start = max(0, f.size - int(m.group(2)))
                if start >= f.size or start > end:
                    self._send(416, b"", {"Content-Range": f"bytes */{f.size}", "ETag": etag})
                    return
                status = 206
        length = end - start + 1 if f.size else 0
        limit = fault.after_bytes if fault else length
        declared = length + {"short_body": 1, "long_body": -1}.get(odd or "", 0)
        limit = min(limit, max(declared, 0))
        # Recorded before the client can see the answer, so records keep request order;
        # the byte count is corrected below if the body ends early.
        rec = self._done(status, 0 if self.command == "HEAD" else min(length, limit))
        self.send_response(status)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(max(declared, 0)))
        if status == 206:
            shift = 1 if odd == "wrong_range" else 0
            self.send_header("Content-Range", f"bytes {start + shift}-{end + shift}/{f.size}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.flush()
        try:
            if corrupt and length:
                with open(f.disk, "rb") as fh:
                    fh.seek(start)
                    self.connection.sendall(bytes([fh.read(1)[0] ^ 0xFF]))
                rec.bytes_sent = 1 + self._sendfile(f.disk, start + 1, length - 1)
            elif odd in ("stall_body", "trickle"):
                assert misfault is not None
                rec.bytes_sent = self._dribble(f.disk, start, min(length, limit), misfault)
            else:
                rec.bytes_sent = self._sendfile(f.disk, start, min(length, limit))
        except OSError:
            # The client went away: count what was handed to the socket (egress).
            rec.bytes_sent = self._sent
            raise
        if fault:
            # Abort with a TCP reset mid-body.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    def _dribble(self, disk: Path, offset: int, count: int, fault: _Fault) -> int:
        """A stalled or trickling body: `after_bytes` then a stall, or `rate` bytes/s.
        Ends early when the origin is stopped (so a test's teardown never waits)."""
        stopped = self.server.origin._stopping
        if fault.kind == "stall_body":
            sent = self._sendfile(disk, offset, min(count, fault.after_bytes))
            stopped.wait(fault.seconds)
            self.close_connection = True  # then hang up: the body stays short
            return sent
        sent = 0
        step = max(1, int(fault.rate // 10))
        while sent < count and not stopped.is_set():
            sent += self._sendfile(disk, offset + sent, min(step, count - sent))
            stopped.wait(step / fault.rate)
        return sent

    def _sendfile(self, disk: Path, offset: int, count: int) -> int:
        """Send `count` bytes of `disk` from `offset`; `_sent` counts them as they go
        (a body the client broke off still counts what left)."""
        sent = self._sent = 0
        sock = self.connection.fileno()
        rate = self.server.origin.throttle
        step = 64 << 10 if rate else 8 << 20
        with open(disk, "rb") as fh:
            while sent < count:
                n = os.sendfile(sock, fh.fileno(), offset + sent, min(count - sent, step))
                if n == 0:
                    break
                sent += n
                self._sent = sent
                if rate:
                    time.sleep(n / rate)
        return sent


# Demo and benchmark repos ---------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]],
                      seed: int = 0) -> None:
    """Write a valid safetensors file of random data: {name: (dtype, shape)}."""
    import random

    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
    rnd = random.Random(seed)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in sorted(tensors.items()):
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        left = offset
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n


def make_demo_repo(root: Path, repo_id: str = "demo/tiny-model", weights_mib: int = 64) -> Path:
    """A small Hub-style repo: config, tokenizer, a safetensors file, a subfolder."""
    ref = root / repo_id / "main"
    (ref / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (ref / "config.json").write_text(json.dumps(
        {"architectures": ["DemoModel"], "hidden_size": 1024, "num_layers": weights_mib // 4}))
    (ref / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "model": {"type": "WordLevel",
                                     "vocab": {f"tok{i}": i for i in range(2000)}}}))
    (ref / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    layers = max(1, weights_mib // 4)
    write_safetensors(ref / "model.safetensors",
                      {f"layer.{i}.weight": ("F32", (1024, 1024)) for i in range(layers)})
    return ref


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m modelfs.testing.origin",
                                 description="Serve ROOT/<org>/<name>/<ref>/... as a Hub origin.")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--cdn-port", type=int, default=0)
    ap.add_argument("--demo", action="store_true", help="generate demo/tiny-model under ROOT first")
    ap.add_argument("--demo-mib", type=int, default=64)
    args = ap.parse_args(argv)
    if args.demo:
        make_demo_repo(args.root, weights_mib=args.demo_mib)
    origin = Origin(args.root, port=args.port, cdn_port=args.cdn_port).start()
    repos = ", ".join(sorted(origin._repos)) or "none"
    print(f"origin {origin.url} (cdn {origin.cdn_url}) serving {repos}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        origin.stop()


if __name__ == "__main__":
    main()

__all__ = ["Origin", "make_demo_repo", "write_safetensors"]
