"""Showing a prefetch job's progress (rich).

On a terminal: a bar per active file plus a total with throughput and ETA.
Elsewhere (logs, CI): one line when a file starts, finishes or fails.
"""

from __future__ import annotations

import time
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .jobs import FileProgress


class JobProgress:
    def __init__(self, stream: IO[str]) -> None:
        self._console = Console(file=stream)
        self._tty = self._console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}", justify="left"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self._console, transient=False)
        self._tasks: dict[tuple[str, str, str], TaskID] = {}
        self._total: TaskID | None = None
        self._total_size = 0
        self._done: dict[tuple[str, str, str], int] = {}
        self._fetched: dict[tuple[str, str, str], int] = {}
        self._t0 = time.monotonic()

    def __enter__(self) -> JobProgress:
        if self._tty:
            self._progress.start()
            self._total = self._progress.add_task("total", total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tty:
            self._progress.stop()
        secs = time.monotonic() - self._t0
        done, fetched = sum(self._done.values()), sum(self._fetched.values())
        rate = fetched / secs / 1e6 if secs > 0 else 0.0
        self._console.print(
            f"{len(self._done)} files, {done} bytes cached; fetched {fetched} bytes in "
            f"{secs:.1f}s ({rate:.0f} MB/s)", highlight=False, markup=False)

    def update(self, p: FileProgress) -> None:
        key = (p.repo, p.revision, p.path)
        first = key not in self._done
        delta = p.done - self._done.get(key, 0)
        self._done[key] = p.done
        self._fetched[key] = p.fetched
        if first:
            self._total_size += p.size
        if not self._tty:
            if p.state in ("running", "done", "failed") and (p.state != "running" or p.done == 0):
                err = f": {p.error}" if p.error else ""
                self._console.print(f"{p.state} {p.repo}/{p.path} ({p.size} bytes){err}",
                                    highlight=False, markup=False)
            return
        assert self._total is not None
        self._progress.update(self._total, total=self._total_size, advance=delta)
        task = self._tasks.get(key)
        if p.state == "running" and task is None:
            self._tasks[key] = self._progress.add_task(p.path, total=p.size, completed=p.done)
        elif task is not None:
            self._progress.update(task, completed=p.done)
            if p.state in ("done", "failed"):
                self._progress.remove_task(task)
                del self._tasks[key]
                if p.state == "failed":
                    self._progress.console.print(f"[red]failed[/] {p.repo}/{p.path}: {p.error}")
