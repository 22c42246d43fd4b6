"""The API's documents: one schema, the docs made from it, a checker that can fail."""

from __future__ import annotations

from pathlib import Path

from modelfs.jobs import Item, Job, JobSpec, RepoRequest
from modelfs.schema import ITEM, JOB, JOB_SUMMARY, check, tables
from modelfs.types import FileEntry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_docs_show_the_current_field_tables() -> None:
    text = DOCS.read_text()
    _, block, _ = text.split("<!-- schema:tables -->\n")
    assert block == tables()


def test_a_job_and_its_items_match_the_schema_and_the_check_can_fail() -> None:
    job = Job("20261201-abcd", JobSpec((RepoRequest("org/model"),)), created=1.0)
    job.items.append(Item(0, "org/model", "main", "c" * 40,
                          FileEntry("w.safetensors", 10, "a" * 64, "a" * 64), "http://x/w",
                          None))
    job.resolved = True
    assert check(job.public(), JOB) == []
    assert check(job.summary(), JOB_SUMMARY) == []
    bad = dict(job.public()["items"][0], state="lost", bytes="10", extra=1)
    del bad["url"]
    assert sorted(check(bad, ITEM)) == [
        "$.bytes: expected integer, got str",
        "$.state: 'lost' is not one of ['queued', 'running', 'paused', 'done', 'failed', "
        "'cancelled']",
        "$: missing 'url'",
        "$: unknown field 'extra'",
    ]
