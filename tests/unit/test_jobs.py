"""The job manager on a real origin (no mount): fair turns between jobs, and a job's
record in the index surviving a new manager."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from modelfs.fetch import FetchConfig
from modelfs.jobs import JobManager, JobsConfig, JobSpec, RepoRequest
from modelfs.testing.origin import Origin

from .conftest import Kit, MiB


def file_order(origin: Origin) -> list[str]:
    seen: list[str] = []
    for r in origin.data_requests():
        name = r.path.rsplit("/", 1)[-1]
        if name not in seen:
            seen.append(name)
    return seen


async def test_a_later_job_is_not_starved_by_an_earlier_one(kit: Kit, origin: Origin, repo_data,
                                                            tmp_path: Path) -> None:
    rng = random.Random(9)
    for n in range(4):
        origin.put_file("org/a", "main", f"a{n}.json", rng.randbytes(2 * MiB))
    for n in range(2):
        origin.put_file("org/b", "main", f"b{n}.json", rng.randbytes(2 * MiB))
    src = kit.source()
    # One request per chunk, so each of a's files takes two round trips of the origin.
    index, reader = kit.reader(FetchConfig(chunk_size=MiB, request_size=MiB))
    jobs = JobManager(reader, reader.cache, lambda repo, url: src, JobsConfig(parallel_files=1, per_file=1),
                      persist=False)
    origin.reset_stats()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        await nursery.start(jobs.run)
        origin.delay = 0.02  # every request: so each of a's files takes a while
        a = jobs.submit(JobSpec((RepoRequest("org/a"),)))
        while not any(i.state == "running" for i in a.items):  # noqa: ASYNC110 -- a0 starts
            await trio.sleep(0.005)
        b = jobs.submit(JobSpec((RepoRequest("org/b"),)))
        await jobs.wait(a.id)
        await jobs.wait(b.id)
        nursery.cancel_scope.cancel()
    assert a.state == b.state == "done"
    order = file_order(origin)
    assert sorted(order) == ["a0.json", "a1.json", "a2.json", "a3.json", "b0.json", "b1.json"]
    # Turns: b's files run between a's, not after all of them (first come, first served
    # would give a a a a b b).
    assert order.index("b1.json") < max(order.index(f"a{n}.json") for n in range(4))
    index.close()
    await src.aclose()


async def test_jobs_persist_and_resume_in_a_new_manager(kit: Kit, origin: Origin, repo_data,
                                                        tmp_path: Path) -> None:
    src = kit.source()
    index, reader = kit.reader()
    spec = JobSpec((RepoRequest("org/model", include=("*.json",)),))
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        jobs = JobManager(reader, reader.cache, lambda repo, url: src)
        await nursery.start(jobs.run)
        job = jobs.submit(spec)
        jobs.pause(job.id)  # before its repos are even listed
        await trio.sleep(0.3)
        assert job.state == "paused" and {i.state for i in job.items} == {"paused"}
        await jobs.flush()
        nursery.cancel_scope.cancel()
    origin.reset_stats()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        again = JobManager(reader, reader.cache, lambda repo, url: src)
        await nursery.start(again.run)
        restored = again.get(job.id)
        assert restored.state == "paused" and len(restored.items) == len(job.items) == 2
        assert origin.data_requests() == []  # paused: nothing fetched
        again.resume(job.id)
        done = await again.wait(job.id)
        nursery.cancel_scope.cancel()
    assert done.state == "done"
    assert {i.entry.path for i in done.items} == {"config.json", "tokenizer.json"}
    assert len(origin.data_requests()) == 2
    index.close()
    await src.aclose()
