"""Loaders that declare their reads: span plans.

A tensor-parallel rank reads its own slices of the same shards as the other ranks
(safetensors' `safe_open(...).prefetch(plan)`, vLLM's per-rank loading). Told the
byte spans it will read (`POST /v1/plans`, `modelfs.spans.prefetch`), the daemon
fetches the chunks that cover them at read-ahead priority, ahead of the faults,
merged into runs and shared by every rank that asked for the same chunk (each is
one single-flight fetch). A planned file gets no guessing: neither stream
read-ahead nor the whole-file prefetch on open, so the origin sends the bytes the
ranks asked for and about nothing else (chunk granularity rounds each run out to
whole chunks).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from ..chunks import chunk_count
from ..errors import ModelfsError
from ..types import RemoteFile
from .reader import ChunkReader, Got
from .scheduler import Priority

log = logging.getLogger(__name__)

# Bounds of one plan (it comes from outside).
MAX_FILES = 10_000
MAX_SPANS = 1_000_000
PLANS_KEPT = 1000  # the newest, for GET /v1/plans/ID


class PlanError(ValueError):
    pass


@dataclass
class Plan:
    id: str
    chunks: int  # chunks its spans cover
    span_bytes: int  # bytes of the union of its spans
    left: int = 0  # chunks not yet cached
    failed: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    def public(self) -> dict[str, object]:
        return {"id": self.id, "chunks": self.chunks, "span_bytes": self.span_bytes,
                "left": self.left, "state": "done" if self.done.is_set() else "running",
                "failed": self.failed}


def union(spans: Sequence[Sequence[int]], size: int, *, where: str) -> list[tuple[int, int]]:
    """Merged, sorted [start, end) intervals of `[[offset, length], ...]`, checked
    against the file's size."""
    out: list[tuple[int, int]] = []
    for s in spans:
        if (not isinstance(s, (list, tuple)) or len(s) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
            raise PlanError(f"{where}: a span is [offset, length] of integers, not {s!r:.40}")
        off, length = s
        if off < 0 or length < 0 or off + length > size:
            raise PlanError(f"{where}: span [{off}, {length}] is outside the file "
                            f"({size} bytes)")
        if length:
            out.append((off, off + length))
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class Plans:
    """The daemon's span plans: what loaders asked for, fetched at READAHEAD priority,
    `per_file` runs of at most `run_chunks` chunks at a time per file."""

    def __init__(self, reader: ChunkReader, *, per_file: int, run_chunks: int) -> None:
        self._reader = reader
        self._per_file = per_file
        self._run_chunks = max(1, run_chunks)
        self._ids = itertools.count(1)
        self.plans: dict[str, Plan] = {}

    def submit(self, files: Sequence[tuple[RemoteFile, Sequence[Sequence[int]]]]) -> Plan:
        if len(files) > MAX_FILES:
            raise PlanError(f"a plan names at most {MAX_FILES} files")
        if sum(len(s) for _, s in files) > MAX_SPANS:
            raise PlanError(f"a plan has at most {MAX_SPANS} spans")
        cs = self._reader.config.chunk_size
        wanted: dict[str, tuple[RemoteFile, set[int]]] = {}
        span_bytes = 0
        for f, spans in files:
            merged = union(spans, f.entry.size, where=f.name)
            span_bytes += sum(b - a for a, b in merged)
            _, idxs = wanted.setdefault(f.entry.content_id, (f, set()))
            for a, b in merged:
                idxs.update(range(a // cs, min(chunk_count(f.entry.size, cs), -(-b // cs))))
        plan = Plan(f"p{next(self._ids)}", sum(len(i) for _, i in wanted.values()), span_bytes)
        self.plans[plan.id] = plan
        while len(self.plans) > PLANS_KEPT:
            self.plans.pop(next(iter(self.plans)))
        for f, _ in wanted.values():
            self._reader.planned.add(f.entry.content_id)  # no guessing for this file now
        self._reader.spawn(self._run, plan, list(wanted.values()))
        return plan

    async def _run(self, plan: Plan, wanted: list[tuple[RemoteFile, set[int]]]) -> None:
        missing = [(f, sorted(i for i in idxs if not self._reader.is_cached(f, i)))
                   for f, idxs in wanted]
        plan.left = sum(len(m) for _, m in missing)
        try:
            async with trio.open_nursery() as nursery:
                for f, idxs in missing:
                    if idxs:
                        nursery.start_soon(self._file, plan, f, idxs)
        finally:
            plan.done.set()

    async def _file(self, plan: Plan, f: RemoteFile, idxs: list[int]) -> None:
        runs: list[tuple[int, int]] = []
        for i in idxs:
            if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < self._run_chunks:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        limit = trio.Semaphore(self._per_file)

        def done(_idx: int, _got: Got) -> None:
            plan.left -= 1

        async def one(first: int, count: int) -> None:
            async with limit:
                try:
                    await self._reader.ensure_run(f, first, count, Priority.READAHEAD, done)
                except ModelfsError as exc:
                    if f.name not in plan.failed:
                        plan.failed.append(f.name)
                    log.warning("span plan %s: %s", plan.id, exc)

        async with trio.open_nursery() as nursery:
            for first, count in runs:
                nursery.start_soon(one, first, count)
