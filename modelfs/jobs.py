"""Prefetch jobs: warm the cache for whole repos, with per-file state.

A job is a list of repo requests (repo id, revision, include/exclude globs) and
whether to pin them. The `JobManager` resolves each repo to a commit, makes one
item per selected file, and runs items `parallel_files` at a time over all jobs,
taking turns between jobs, so a job of 80 small repos and a job of one large
file both make progress. An item fetches its missing chunks through the shared
`ChunkReader` at PREFETCH priority: demand reads through the mount come first,
and the reader's connection, memory and bandwidth limits bound everything.

- State is per item: a 404 or repeated 5xx fails that item only; the job ends
  `partial` and the item carries the error.
- Pause and cancel stop an item from starting new chunk fetches; those under
  way (at most `per_file`, one chunk each) finish and are stored, so resume
  refetches nothing: it starts again from what is cached. Resume of a job also
  retries its failed items.
- With `persist`, jobs are kept in the index; after a restart unfinished jobs
  go on at the commits they resolved to.
- Listeners (`subscribe`) get job and item updates, batched: at most
  `1 / EVENT_INTERVAL` per job per second.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .cache import ChunkCache, Index
from .errors import ConfigError, ModelfsError, UnknownJob
from .fetch import ChunkReader, Got, Priority, load_snapshot, matches, prefetch_file
from .schema import ItemDoc, JobDoc, JobSummaryDoc
from .types import FileEntry, RemoteFile, RepoRef, RepoSpec, Source, printable

log = logging.getLogger(__name__)

EVENT_INTERVAL = 0.25  # seconds between batches of updates (and index writes) of a job
MAX_PATTERNS = 256  # include/exclude globs of one repo request


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RepoRequest:
    """One repo of a job: `id` at `revision`, the files matching `include` (all when
    empty) and not `exclude`."""

    id: str
    revision: str = "main"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    url: str | None = None  # ORG/NAME=URL: where the repo is read from (None: the Hub)

    @property
    def ref(self) -> RepoRef:
        if self.url is not None:
            return RepoRef(self.id)
        return RepoRef.parse(f"{self.id}@{self.revision}")

    def selects(self, path: str) -> bool:
        return ((not self.include or matches(path, self.include))
                and not (self.exclude and matches(path, self.exclude)))

    @classmethod
    def from_json(cls, raw: Any, where: str) -> RepoRequest:
        """Build from API JSON; a bad field is a `ConfigError` naming `where`.field."""
        if isinstance(raw, str):
            raw = {"id": raw}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object with an `id`")
        unknown = set(raw) - {"id", "revision", "include", "exclude", "url"}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        repo_id, revision, url = raw.get("id"), raw.get("revision", "main"), raw.get("url")
        if not isinstance(repo_id, str) or not isinstance(revision, str) \
                or not isinstance(url, str | None):
            raise ConfigError(f"{where}.id/revision/url: expected strings")
        if url is not None or "=" in repo_id:
            try:
                spec = RepoSpec.parse(repo_id if url is None else f"{repo_id}={url}")
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            repo_id, url = spec.ref.repo_id, spec.url
        elif "@" in repo_id:
            repo_id, _, revision = repo_id.partition("@")
        lists = {}
        for key in ("include", "exclude"):
            val = raw.get(key, [])
            if not isinstance(val, list) or len(val) > MAX_PATTERNS \
                    or not all(isinstance(v, str) and _utf8(v) and len(v) <= 1024 for v in val):
                raise ConfigError(f"{where}.{key}: expected a list of at most {MAX_PATTERNS} "
                                  "glob strings")
            lists[key] = tuple(val)
        req = cls(repo_id, "main" if url else revision, lists["include"], lists["exclude"], url)
        try:
            req.ref  # noqa: B018 -- validates the id and revision
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return req

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "revision": self.revision, "include": list(self.include),
                "exclude": list(self.exclude), "url": self.url}


@dataclass(frozen=True, slots=True)
class JobSpec:
    repos: tuple[RepoRequest, ...]
    pin: bool = False  # pin the repos' revisions: eviction never removes them
    force: bool = False  # drop what is cached of the selected files and fetch them again


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """`parallel_files`: items fetched at once over all jobs; `per_file`: concurrent
    chunk fetches of one item; `keep_finished`: finished jobs kept for listing."""

    parallel_files: int = 4
    per_file: int = 8
    keep_finished: int = 200
    resolve_parallel: int = 8


@dataclass(slots=True, eq=False)
class Item:
    """One file of a job."""

    id: int
    repo: str
    revision: str
    commit: str
    entry: FileEntry
    url: str
    local_path: str | None
    origin: str | None = None  # the repo's ORG/NAME=URL URL (None: the Hub)
    downloaded: int = 0  # bytes cached so far
    fetched: int = 0  # of those, bytes this job fetched from the origin
    shared: int = 0  # ... and from the fleet's shared tier
    state: str = "queued"
    error: str | None = None

    def public(self) -> ItemDoc:
        """The item as the API shows it (`schema.ITEM`)."""
        return {"id": self.id, "repo": self.repo, "revision": self.revision,
                "commit": self.commit, "path": self.entry.path, "url": self.url,
                "local_path": self.local_path, "bytes": self.entry.size,
                "downloaded_bytes": self.downloaded, "fetched_bytes": self.fetched,
                "shared_bytes": self.shared,
                "checksum": self.entry.sha256, "state": self.state, "error": self.error}

    def record(self) -> dict[str, Any]:
        e = self.entry
        return {**self.public(), "content_id": e.content_id, "etag": e.etag,
                "version": e.version, "origin": self.origin}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Item:
        entry = FileEntry(r["path"], r["bytes"], r["content_id"], r["checksum"], r["etag"],
                          r.get("version"))
        state = "queued" if r["state"] == "running" else r["state"]
        return cls(r["id"], r["repo"], r["revision"], r["commit"], entry, r["url"],
                   r["local_path"], r.get("origin"), r["downloaded_bytes"], r["fetched_bytes"],
                   r.get("shared_bytes", 0), state, r["error"])


@dataclass(slots=True, eq=False)
class Job:
    id: str
    spec: JobSpec
    created: float
    items: list[Item] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # repos that could not be resolved
    resolved: bool = False
    paused: bool = False  # paused as a whole (also before its items are known)
    cancelled: bool = False
    finished: float | None = None
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        if not self.resolved:
            return "paused" if self.paused else "running"
        states = {i.state for i in self.items}
        if "running" in states:
            return "running"
        if "queued" in states:
            return "queued"  # every item waits for a slot
        if "paused" in states:
            return "paused"
        if "failed" in states or self.errors:
            return "partial" if "done" in states else "failed"
        if "cancelled" in states and "done" not in states:
            return "cancelled"
        return "done"

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def summary(self) -> JobSummaryDoc:
        """The job without its items, as the API shows it (`schema.JOB_SUMMARY`)."""
        items = self.items
        return {"id": self.id, "state": self.state, "created": self.created,
                "finished": self.finished, "pin": self.spec.pin,
                "repos": [r.to_json() for r in self.spec.repos], "errors": list(self.errors),
                "files": len(items),
                "files_done": sum(i.state == "done" for i in items),
                "files_failed": sum(i.state == "failed" for i in items),
                "bytes": sum(i.entry.size for i in items),
                "downloaded_bytes": sum(i.downloaded for i in items),
                "fetched_bytes": sum(i.fetched for i in items),
                "shared_bytes": sum(i.shared for i in items)}

    def public(self) -> JobDoc:
        """The job as the API shows it (`schema.JOB`)."""
        return {**self.summary(), "items": [i.public() for i in self.items]}

    def record(self) -> dict[str, Any]:
        return {**self.summary(), "force": self.spec.force, "resolved": self.resolved,
                "paused": self.paused, "cancelled": self.cancelled,
                "items": [i.record() for i in self.items]}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Job:
        spec = JobSpec(tuple(RepoRequest(x["id"], x["revision"], tuple(x["include"]),
                                         tuple(x["exclude"]), x.get("url")) for x in r["repos"]),
                       pin=r["pin"], force=r["force"])
        job = cls(r["id"], spec, r["created"], [Item.from_record(i) for i in r["items"]],
                  list(r["errors"]), r["resolved"], r["paused"], r["cancelled"], r["finished"])
        if job.finished is not None:
            job.done.set()
        return job


# Saved jobs while no daemon runs (`modelfs jobs` / `cancel` fall back to these) -------


def saved_jobs(index: Index) -> list[JobSummaryDoc | dict[str, Any]]:
    """Summaries of the jobs saved in the index; a record this version cannot read
    shows as state `unreadable` (the next daemon start drops it)."""
    out: list[JobSummaryDoc | dict[str, Any]] = []
    for rec in index.jobs():
        try:
            out.append(Job.from_record(rec).summary())
        except Exception:
            out.append({"id": rec["id"], "state": "unreadable", "repos": [], "files": 0,
                        "files_done": 0, "bytes": 0, "downloaded_bytes": 0})
    return out


def cancel_saved(index: Index, job_id: str) -> JobSummaryDoc | dict[str, Any]:
    """Cancel a saved job (so no daemon takes it up again); an unreadable one is deleted."""
    rec = next((r for r in index.jobs() if r["id"] == job_id), None)
    if rec is None:
        raise UnknownJob(f"no saved job {job_id!r} in {index.path}")
    try:
        job = Job.from_record(rec)
    except Exception:
        index.delete_job(job_id)
        return {"id": job_id, "state": "deleted"}
    job.cancelled = True
    for item in job.items:
        if item.state in ("queued", "running", "paused"):
            item.state = "cancelled"
    job.finished = job.finished or time.time()
    index.put_job(job.id, job.record())
    return job.summary()


class JobManager:
    """Runs prefetch jobs on a shared `ChunkReader`; see the module docstring.

    `sources(repo_id, url)` gives the source a repo is read from (`url`: what
    ORG/NAME=URL named, None for the Hub) and may refuse it; `local_path(repo,
    revision, path)` where a file shows under the mount (None when not mounted).
    """

    def __init__(self, reader: ChunkReader, cache: ChunkCache,
                 sources: Callable[[str, str | None], Source],
                 config: JobsConfig | None = None, *, persist: bool = True,
                 local_path: Callable[[str, str, str], str | None] | None = None) -> None:
        self._reader = reader
        self._cache = cache
        self._index: Index = cache.index
        self._sources = sources
        self.config = config or JobsConfig()
        self._persist = persist
        self._local_path = local_path or (lambda repo, rev, path: None)
        self.jobs: dict[str, Job] = {}
        self._slots = trio.Semaphore(self.config.parallel_files)
        self._work = trio.Event()
        self._turn = 0
        self._live: set[tuple[str, int]] = set()  # items whose task has not ended yet
        self._dirty: dict[str, set[int]] = {}  # job id -> ids of items changed since the last batch
        self._unsaved: set[str] = set()
        self._listeners: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._nursery: trio.Nursery | None = None

    # Running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve jobs until cancelled; first takes up the unfinished jobs of a previous run."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._persist:
                for rec in await trio.to_thread.run_sync(self._index.jobs):
                    try:
                        job = Job.from_record(rec)
                    except Exception as exc:
                        # A record this version cannot read must not stop the daemon
                        # from starting (and then again at every restart).
                        job_id = str(rec.get("id", "?"))
                        log.error("job %s: saved record is unusable (%s: %s); dropping it",
                                  printable(job_id), type(exc).__name__, printable(str(exc)))
                        await trio.to_thread.run_sync(self._index.delete_job, job_id)
                        continue
                    self.jobs[job.id] = job
                    if job.finished is None:
                        log.info("job %s: resuming (%s)", job.id, job.state)
                        if not job.resolved and not job.cancelled:
                            nursery.start_soon(self._resolve, job)
                self.jobs = dict(sorted(self.jobs.items(), key=lambda kv: kv[1].created))
            nursery.start_soon(self._dispatch)
            nursery.start_soon(self._pump)
            task_status.started()
            self._wake()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self.flush()  # the last word of each job survives a stop

    def submit(self, spec: JobSpec) -> Job:
        """Start a job; it resolves its repos and runs in the background."""
        if self._nursery is None:
            raise RuntimeError("JobManager.run() is not running")
        job = Job(f"{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}", spec, time.time())
        self.jobs[job.id] = job
        self._changed(job)
        log.info("job %s: %s", job.id, ", ".join(f"{r.id}@{r.revision}" for r in spec.repos))
        self._nursery.start_soon(self._resolve, job)
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id!r}")
        return job

    def _items(self, job: Job, item_id: int | None) -> list[Item]:
        if item_id is None:
            return job.items
        if not 0 <= item_id < len(job.items):
            raise UnknownJob(f"job {job.id}: no item {item_id}")
        return [job.items[item_id]]

    def pause(self, job_id: str, item_id: int | None = None) -> Job:
        job = self.get(job_id)
        if item_id is None and not job.resolved:
            job.paused = True
        for item in self._items(job, item_id):
            if item.state in ("queued", "running"):
                self._stop(job, item, "paused")
        self._changed(job)
        return job

    def resume(self, job_id: str, item_id: int | None = None) -> Job:
        """Queue paused items again (and, for a whole job, failed ones: a retry)."""
        job = self.get(job_id)
        if job.cancelled:
            return job
        if item_id is None:
            job.paused = False
        for item in self._items(job, item_id):
            if item.state in ("paused", "failed"):
                item.state, item.error = "queued", None
                self._changed(job, item)
        if job.active and job.finished is not None:
            job.finished, job.done = None, trio.Event()
        self._changed(job)
        self._wake()
        return job

    def cancel(self, job_id: str, item_id: int | None = None) -> Job:
        job = self.get(job_id)
        if item_id is None:
            job.cancelled = True
        for item in self._items(job, item_id):
            if item.state in ("queued", "running", "paused"):
                self._stop(job, item, "cancelled")
        self._changed(job)
        self._maybe_finished(job)
        return job

    def _stop(self, job: Job, item: Item, state: str) -> None:
        item.state = state  # a running item's task sees it before its next chunk
        self._changed(job, item)

    # Resolving and fetching -------------------------------------------------------------

    async def _resolve(self, job: Job) -> None:
        job.errors.clear()  # a resolution cut short by a restart starts over
        limiter = trio.CapacityLimiter(self.config.resolve_parallel)
        found: list[list[Item]] = [[] for _ in job.spec.repos]

        async def one(n: int, req: RepoRequest) -> None:
            async with limiter:
                ref = req.ref
                try:
                    source = self._sources(req.id, req.url)
                    snap, _ = await load_snapshot(source, self._index, ref, force=job.spec.force)
                    if job.spec.pin:
                        await trio.to_thread.run_sync(self._index.pin, source.key, ref.repo_id,
                                                      ref.revision)
                except Exception as exc:  # one repo's failure is the job's error, never the daemon's
                    job.errors.append(f"{req.id}@{req.revision}: {exc}")
                    log.info("job %s: %s", job.id, exc, exc_info=not isinstance(exc, ModelfsError))
                    return
                for entry in snap.files:
                    if not req.selects(entry.path):
                        continue
                    if job.spec.force:
                        await trio.to_thread.run_sync(self._cache.drop_content,
                                                      entry.content_id)
                    found[n].append(Item(
                        0, req.id, req.revision, snap.commit, entry,
                        source.file_url(req.id, snap.commit, entry.path),
                        self._local_path(req.id, req.revision, entry.path), req.url))

        async with trio.open_nursery() as nursery:
            for n, req in enumerate(job.spec.repos):
                nursery.start_soon(one, n, req)
        # Largest first within a job: they take longest, so they should start first.
        items = sorted(itertools.chain.from_iterable(found), key=lambda i: -i.entry.size)
        for n, item in enumerate(items):
            item.id = n
            if job.paused:
                item.state = "paused"
        job.items, job.resolved = items, True
        log.info("job %s: %d files, %d bytes", job.id, len(items), sum(i.entry.size for i in items))
        self._changed(job)
        self._maybe_finished(job)
        self._wake()

    def _next(self) -> tuple[Job, Item] | None:
        """The next queued item, taking turns between jobs."""
        jobs = [j for j in self.jobs.values() if j.resolved and not j.cancelled]
        for k in range(len(jobs)):
            job = jobs[(self._turn + k) % len(jobs)]
            item = next((i for i in job.items
                         if i.state == "queued" and (job.id, i.id) not in self._live), None)
            if item is not None:
                self._turn = (self._turn + k + 1) % len(jobs)
                return job, item
        return None

    def _wake(self) -> None:
        self._work.set()

    async def _dispatch(self) -> None:
        assert self._nursery is not None
        while True:
            await self._slots.acquire()
            while (pick := self._next()) is None:
                await self._work.wait()
                self._work = trio.Event()
            job, item = pick
            item.state = "running"
            self._live.add((job.id, item.id))
            self._changed(job, item)
            self._nursery.start_soon(self._run_item, job, item)

    async def _run_item(self, job: Job, item: Item) -> None:
        def progress(n: int, got: Got) -> None:
            item.downloaded += n
            item.fetched += got.origin
            item.shared += got.shared
            self._changed(job, item)

        try:
            item.downloaded = 0  # counted again from what is cached
            try:
                f = RemoteFile(self._sources(item.repo, item.origin), item.repo, item.commit,
                               item.entry)
                await prefetch_file(self._reader, f, parallel=self.config.per_file,
                                    priority=Priority.PREFETCH, progress=progress,
                                    stopped=lambda: item.state != "running")
            except* Exception as group:
                exc = group.exceptions[0]
                if item.state == "running":  # not paused or cancelled meanwhile
                    item.state, item.error = "failed", str(exc)
                if not isinstance(exc, ModelfsError):
                    log.error("job %s: %s/%s failed", job.id, item.repo, item.entry.path,
                              exc_info=exc)
                else:
                    log.info("job %s: %s", job.id, exc)
            else:
                if item.downloaded >= item.entry.size:
                    item.state = "done"  # even if paused meanwhile: it is all cached
        finally:
            self._live.discard((job.id, item.id))
            self._slots.release()
            self._wake()  # it may have been resumed while it wound down
            self._changed(job, item)
            self._maybe_finished(job)

    def _maybe_finished(self, job: Job) -> None:
        if not job.resolved or job.finished is not None:
            return
        if any(i.state in ("queued", "running", "paused") for i in job.items):
            return
        job.finished = time.time()
        job.done.set()
        self._changed(job)
        log.info("job %s: %s (%d files)", job.id, job.state, len(job.items))
        finished = [j for j in self.jobs.values() if j.finished is not None]
        for old in finished[:-self.config.keep_finished or None]:
            del self.jobs[old.id]
            self._dirty.pop(old.id, None)
            self._unsaved.add(old.id)  # saving a job that is gone deletes it

    # Updates: listeners and the index ---------------------------------------------------

    def _changed(self, job: Job, item: Item | None = None) -> None:
        items = self._dirty.setdefault(job.id, set())
        if item is not None:
            items.add(item.id)
        self._unsaved.add(job.id)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Updates as they are batched: `{"type": "job", "job": summary, "items":
        [changed items]}`, starting with the summary of every job. A listener that
        falls 1000 updates behind is dropped (its channel ends)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](1000)
        for job in self.jobs.values():
            send.send_nowait({"type": "job", "job": job.summary(), "items": []})
        self._listeners.add(send)
        try:
            yield receive
        finally:
            self._listeners.discard(send)
            send.close()

    async def _pump(self) -> None:
        while True:
            await trio.sleep(EVENT_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Send the batched updates now, and write changed jobs to the index."""
        dirty, self._dirty = self._dirty, {}
        for job_id, item_ids in dirty.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            event = {"type": "job", "job": job.summary(),
                     "items": [job.items[i].public() for i in sorted(item_ids)
                               if i < len(job.items)]}
            for send in list(self._listeners):
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    self._listeners.discard(send)
                    send.close()
        unsaved, self._unsaved = self._unsaved, set()
        if not self._persist:
            return
        for job_id in unsaved:
            job = self.jobs.get(job_id)
            if job is None:
                await trio.to_thread.run_sync(self._index.delete_job, job_id)
            else:
                await trio.to_thread.run_sync(self._index.put_job, job_id, job.record())

    async def wait(self, job_id: str) -> Job:
        job = self.get(job_id)
        await job.done.wait()
        await self.flush()
        return job
