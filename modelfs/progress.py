"""Showing a prefetch job's progress (rich), from item updates as the API gives them.

On a terminal: a bar per active file plus a total with throughput and ETA.
Elsewhere (logs, CI): one line when a file starts, finishes, fails or is paused.
With `json_lines`: every item update as one JSON object per line, then the job.
The same display serves a job run in-process and one followed through the daemon.
rich is imported only for a terminal: it is ~45 ms of a `modelfs prefetch` start.
"""

from __future__ import annotations

import json
import time
from typing import IO, TYPE_CHECKING, Any

from .schema import ItemDoc, JobDoc

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class JobProgress:
    def __init__(self, stream: IO[str], *, json_lines: bool = False) -> None:
        self._stream = stream
        self._json = json_lines
        self._progress: Progress | None = None
        if not json_lines and stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}", justify="left"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(file=stream),
                transient=False)
        self._tasks: dict[tuple[str, str, str], TaskID] = {}
        self._total: TaskID | None = None
        self._seen: dict[tuple[str, str, str], ItemDoc | dict[str, Any]] = {}
        self._t0 = time.monotonic()

    def __enter__(self) -> JobProgress:
        if self._progress is not None:
            self._progress.start()
            self._total = self._progress.add_task("total", total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _line(self, text: str) -> None:
        if self._progress is not None:  # above the bars
            self._progress.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            self._stream.write(text + "\n")
            self._stream.flush()

    def update(self, item: ItemDoc | dict[str, Any]) -> None:
        key = (item["repo"], item["revision"], item["path"])
        before = self._seen.get(key)
        self._seen[key] = item
        if self._json:
            if before != item:
                self._stream.write(json.dumps({"type": "item", **item}) + "\n")
                self._stream.flush()
            return
        state = item["state"]
        moved = before is None or before["state"] != state
        if self._progress is None:
            if moved and state != "queued":
                err = f": {item['error']}" if item["error"] else ""
                self._line(f"{state} {item['repo']}/{item['path']} ({item['bytes']} bytes){err}")
            return
        assert self._total is not None
        self._progress.update(self._total, total=sum(i["bytes"] for i in self._seen.values()),
                              completed=sum(i["downloaded_bytes"] for i in self._seen.values()))
        task = self._tasks.get(key)
        if state == "running" and task is None:
            self._tasks[key] = self._progress.add_task(item["path"], total=item["bytes"],
                                                       completed=item["downloaded_bytes"])
        elif task is not None:
            self._progress.update(task, completed=item["downloaded_bytes"])
            if state != "running":
                self._progress.remove_task(task)
                del self._tasks[key]
        if moved and state in ("failed", "paused", "cancelled"):
            err = f": {item['error']}" if item["error"] else ""
            self._line(f"{state} {item['repo']}/{item['path']}{err}")

    def finish(self, job: JobDoc | dict[str, Any]) -> None:
        """The job's last word: its state and totals."""
        for item in job.get("items", []):
            self.update(item)
        if self._json:
            summary = {k: v for k, v in job.items() if k != "items"}
            self._stream.write(json.dumps({"type": "job", **summary}) + "\n")
            self._stream.flush()
            return
        secs = time.monotonic() - self._t0
        rate = job["fetched_bytes"] / secs / 1e6 if secs > 0 else 0.0
        shared = job.get("shared_bytes", 0)  # a daemon of an older version has none
        tier = f", {shared} bytes from the shared cache" if shared else ""
        self._line(f"job {job['id']} {job['state']}: {job['files_done']}/{job['files']} files, "
                   f"{job['downloaded_bytes']} bytes cached; fetched {job['fetched_bytes']} "
                   f"bytes in {secs:.1f}s ({rate:.0f} MB/s){tier}")
