"""The daemon's local API: Starlette routes served by Hypercorn on trio, on a Unix socket.

Hypercorn runs on the daemon's own trio loop (no second thread or loop), so
handlers call the `JobManager` directly. The socket is created owner-only
(umask 0177) in a directory made 0700: only the daemon's user can talk to it.

Endpoints (docs/api.md has examples):
  POST /v1/prefetch                          start a job -> 202 + the job
  GET  /v1/jobs, /v1/jobs/{id}               jobs with their items
  POST /v1/jobs/{id}/{pause|resume|cancel}   a whole job
  POST /v1/jobs/{id}/items/{n}/{action}      one item
  GET  /v1/events                            server-sent events of job/item updates
  GET  /v1/status                            mount, repos, cache, counters, throughput
  GET  /metrics                              Prometheus text format
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ConfigError, UnknownJob
from ..fetch.plans import PlanError
from ..jobs import JobSpec, RepoRequest
from ..types import printable
from . import metrics
from .context import ControlContext, Throughput

log = logging.getLogger(__name__)

KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the trailing NUL
MAX_BODY = 1 << 20  # bytes of a request body (a job of 10,000 repos fits)
MAX_PLAN_BODY = 16 << 20  # a span plan: about 500,000 spans
MAX_JOB_REPOS = 10_000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int = MAX_BODY) -> bytes | None:
    """The request body, or None when it is larger than `limit` (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)


async def _json_body(request: Request, limit: int = MAX_BODY) -> tuple[Any, Response | None]:
    """The request's JSON body, or the answer refusing it (413 too large, 400 not JSON)."""
    raw = await _read_body(request, limit)
    if raw is None:
        return None, _error(413, f"body: larger than {limit} bytes")
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError):
        return None, _error(400, "body: not JSON")


def _spec_from_json(body: Any) -> JobSpec:
    if not isinstance(body, dict):
        raise ConfigError("body: expected a JSON object")
    unknown = set(body) - {"repos", "pin", "force"}
    if unknown:
        raise ConfigError(f"body: unknown field {sorted(unknown)[0]!r}")
    repos = body.get("repos")
    if not isinstance(repos, list) or not repos or len(repos) > MAX_JOB_REPOS:
        raise ConfigError(f"repos: expected a non-empty list of at most {MAX_JOB_REPOS} "
                          "{id, revision, include, exclude}")
    for key in ("pin", "force"):
        if not isinstance(body.get(key, False), bool):
            raise ConfigError(f"{key}: expected true or false")
    reqs = tuple(RepoRequest.from_json(r, f"repos[{n}]") for n, r in enumerate(repos))
    return JobSpec(tuple(dict.fromkeys(reqs)), pin=body.get("pin", False),
                   force=body.get("force", False))


def build_app(ctx: ControlContext) -> Starlette:
    jobs = ctx.jobs

    async def prefetch(request: Request) -> Response:
        body, refused = await _json_body(request)
        if refused is not None:
            return refused
        try:
            job = jobs.submit(_spec_from_json(body))
        except ConfigError as exc:
            return _error(400, str(exc))
        return JSONResponse(job.public(), status_code=202)

    async def plan(request: Request) -> Response:
        """`{"files": [{"path": "ORG/NAME/FILE", "spans": [[offset, length], ...]}],
        "wait": false}`: paths as under the mount. 202 with the plan; with `wait`,
        200 once its chunks are cached."""
        if ctx.plans is None:
            return _error(404, "span plans need a mount")
        body, refused = await _json_body(request, MAX_PLAN_BODY)
        if refused is not None:
            return refused
        if not isinstance(body, dict) or not isinstance(body.get("files"), list):
            return _error(400, 'body: expected {"files": [{"path": ..., "spans": [...]}]}')
        files = []
        for entry in body["files"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                    or not isinstance(entry.get("spans"), list):
                return _error(400, 'files: each is {"path": "...", "spans": [[offset, length]]}')
            f = ctx.resolve(entry["path"])
            if f is None:
                return _error(404, f"{printable(entry['path'], 200)}: no such file in the mount")
            files.append((f, entry["spans"]))
        try:
            p = ctx.plans.submit(files)
        except PlanError as exc:
            return _error(400, str(exc))
        if body.get("wait") is True:
            await p.done.wait()
            return JSONResponse(p.public())
        return JSONResponse(p.public(), status_code=202)

    async def get_plan(request: Request) -> Response:
        p = ctx.plans.plans.get(request.path_params["plan"]) if ctx.plans else None
        if p is None:
            return _error(404, "no such plan")
        return JSONResponse(p.public())

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": [j.public() for j in jobs.jobs.values()]})

    async def get_job(request: Request) -> Response:
        try:
            return JSONResponse(jobs.get(request.path_params["job"]).public())
        except UnknownJob as exc:
            return _error(404, str(exc))

    async def act(request: Request) -> Response:
        action = request.path_params["action"]
        fn = {"pause": jobs.pause, "resume": jobs.resume, "cancel": jobs.cancel}.get(action)
        if fn is None:
            return _error(404, f"no action {action!r} (pause, resume, cancel)")
        item = request.path_params.get("item")
        try:
            job = fn(request.path_params["job"], item)
        except UnknownJob as exc:
            return _error(404, str(exc))
        await jobs.flush()
        return JSONResponse(job.public())

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            async with jobs.subscribe() as updates:
                yield b": modelfs events\n\n"
                while True:
                    event = None
                    with trio.move_on_after(KEEPALIVE):
                        event = await updates.receive()
                    if event is None:
                        yield b": keepalive\n\n"
                    else:
                        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def status(request: Request) -> Response:
        return JSONResponse(ctx.status())

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(ctx), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/prefetch", prefetch, methods=["POST"]),
        Route("/v1/plans", plan, methods=["POST"]),
        Route("/v1/plans/{plan}", get_plan),
        Route("/v1/jobs", list_jobs),
        Route("/v1/jobs/{job}", get_job),
        Route("/v1/jobs/{job}/{action}", act, methods=["POST"]),
        Route("/v1/jobs/{job}/items/{item:int}/{action}", act, methods=["POST"]),
        Route("/v1/events", events),
        Route("/v1/status", status),
        Route("/metrics", prometheus),
    ])


def check_socket_free(path: Path) -> None:
    """Refuse a socket path that is too long, or that another daemon answers on
    (Hypercorn would silently replace it). A stale socket file is fine."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ConfigError(f"longer than {SOCKET_PATH_MAX} bytes, the limit of a Unix socket "
                          "path; set a shorter one", **_socket(path))
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return
            raise ConfigError(str(exc.strerror), **_socket(path)) from None
    raise ConfigError("another modelfs daemon is listening there", **_socket(path))


def _socket(path: Path) -> dict[str, str]:
    """How an error of the socket setting names it (its value, whatever it came from)."""
    return {"setting": "control_socket", "label": "control_socket", "subject": str(path)}


async def serve_control(ctx: ControlContext, path: Path, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on `path` until cancelled; started once the socket listens."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(str(exc.strerror), **_socket(path)) from None
    config = HypercornConfig()
    config.bind = [f"unix:{path}"]
    config.umask = 0o177  # the socket is owner-only
    config.accesslog = None
    config.errorlog = logging.getLogger("modelfs.control.hypercorn")
    config.graceful_timeout = 1.0
    ctx.throughput = Throughput(ctx.reader)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.throughput.run)
            await nursery.start(hypercorn_serve, build_app(ctx), config)
            log.info("control API on %s", path)
            task_status.started()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


__all__ = ["ControlContext", "build_app", "check_socket_free", "serve_control"]
