"""Prefetch jobs: warm the cache for whole repos, without a mount.

A job resolves each repo, selects files by include/exclude globs, and fetches
every missing chunk: `parallel_files` files at once, each split into
`per_file` concurrent ranged GETs, through the same chunk reader, scheduler
and cache as the mount. State is per file: one file failing (a 404, repeated
5xx) does not stop the others. Rerunning a job fetches only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .cache import ChunkCache
from .fetch import (
    ChunkReader,
    FetchConfig,
    Priority,
    RemoteFile,
    load_snapshot,
    matches,
    prefetch_file,
)
from .remote import Source
from .types import RepoRef

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FileProgress:
    repo: str
    revision: str
    path: str
    size: int
    done: int = 0  # bytes cached so far
    fetched: int = 0  # of those, bytes this job fetched from the origin
    state: str = "queued"  # queued | running | done | failed
    error: str | None = None


@dataclass(frozen=True, slots=True)
class JobSpec:
    refs: tuple[RepoRef, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    parallel_files: int = 4
    per_file: int = 8
    force: bool = False  # drop what is cached of the selected files and fetch them again
    pin: bool = False  # pin the repos' revisions: eviction never removes them


@dataclass(slots=True)
class JobResult:
    files: list[FileProgress] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # repo-level failures (404, auth)

    @property
    def ok(self) -> bool:
        return not self.errors and all(f.state == "done" for f in self.files)


def selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (not include or matches(path, include)) and not (exclude and matches(path, exclude))


async def run_job(spec: JobSpec, source: Source, cache: ChunkCache,
                  fetch: FetchConfig, on_update: Callable[[FileProgress], None] | None = None,
                  ) -> JobResult:
    """Run a prefetch job to the end; `on_update` sees every progress change."""
    result = JobResult()
    reader = ChunkReader(cache, fetch)

    def notify(p: FileProgress) -> None:
        if on_update:
            on_update(p)

    async with trio.open_nursery() as outer:
        await outer.start(reader.run)
        work: list[tuple[RemoteFile, FileProgress]] = []
        for ref in spec.refs:
            try:
                snap, _ = await load_snapshot(source, cache.index, ref, force=spec.force)
            except Exception as exc:
                result.errors.append(str(exc))
                log.info("%s", exc)
                continue
            if spec.pin:
                cache.index.pin(source.key, ref.repo_id, ref.revision)
            for entry in snap.files:
                if selected(entry.path, spec.include, spec.exclude):
                    if spec.force:
                        await trio.to_thread.run_sync(cache.drop_content, entry.content_id)
                    p = FileProgress(ref.repo_id, ref.revision, entry.path, entry.size)
                    work.append((RemoteFile(source, ref.repo_id, snap.commit, entry), p))
                    result.files.append(p)
                    notify(p)
        # Largest files first: they take longest, so they should start first.
        work.sort(key=lambda w: -w[0].entry.size)
        slots = trio.Semaphore(spec.parallel_files)

        async def one(f: RemoteFile, p: FileProgress) -> None:
            async with slots:
                p.state = "running"
                notify(p)

                def progress(n: int, fetched: bool) -> None:
                    p.done += n
                    p.fetched += n if fetched else 0
                    notify(p)

                try:
                    await prefetch_file(reader, f, parallel=spec.per_file,
                                        priority=Priority.PREFETCH, progress=progress)
                    p.state = "done"
                except* Exception as group:
                    p.state, p.error = "failed", str(group.exceptions[0])
                    log.info("%s/%s: %s", f.repo_id, f.entry.path, p.error)
                notify(p)

        async with trio.open_nursery() as files:
            for f, p in work:
                files.start_soon(one, f, p)
        outer.cancel_scope.cancel()
    return result
