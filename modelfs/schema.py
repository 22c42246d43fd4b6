"""The JSON documents of the local API, in one place: prefetch jobs, their items,
job events and the daemon's status.

The job manager and the control plane build them (typed by the `TypedDict`s
here), the CLI reads them, and `docs/api.md` shows the field tables made from
the schemas here (`python -m modelfs.schema` prints them; a test checks the
docs hold the current ones). `check` validates a document against a schema:
the tests run it on what the API really answers.
"""

from __future__ import annotations

import sys
from typing import Any, TypedDict

Schema = dict[str, Any]


def _obj(fields: dict[str, tuple[Any, str]], *, optional: tuple[str, ...] = ()) -> Schema:
    """An object schema: field -> (JSON type, or a schema; description)."""
    props = {k: ({"type": t} if isinstance(t, str | list) else t) | {"description": d}
             for k, (t, d) in fields.items()}
    return {"type": "object", "properties": props,
            "required": [k for k in fields if k not in optional]}


def _list(item: Any) -> Schema:
    return {"type": "array", "items": {"type": item} if isinstance(item, str) else item}


JOB_STATES = ("queued", "running", "paused", "done", "partial", "failed", "cancelled")
ITEM_STATES = ("queued", "running", "paused", "done", "failed", "cancelled")

REPO_REQUEST = _obj({
    "id": ("string", "ORG/NAME"),
    "revision": ("string", "branch, tag or commit"),
    "include": (_list("string"), "only files matching these globs (none: all)"),
    "exclude": (_list("string"), "skip files matching these globs"),
    "url": (["string", "null"], "where an ORG/NAME=URL repo is read from (s3://, http(s)://, "
                                "file://); null for the Hub"),
})

ITEM = _obj({
    "id": ("integer", "the item's index in its job"),
    "repo": ("string", "ORG/NAME"),
    "revision": ("string", "as asked for"),
    "commit": ("string", "what the revision resolved to"),
    "path": ("string", "the file's path in the repo"),
    "url": ("string", "where it is fetched from"),
    "local_path": (["string", "null"], "where it shows under the mount, when its repo is "
                                       "mounted at that revision"),
    "bytes": ("integer", "the file's size"),
    "downloaded_bytes": ("integer", "bytes of the file in the cache"),
    "fetched_bytes": ("integer", "of those, bytes this job fetched from the origin"),
    "shared_bytes": ("integer", "of those, bytes this job read from the fleet's shared "
                                "cache (`--shared-cache`)"),
    "checksum": (["string", "null"], "the sha256 the origin vouches for (LFS files); the "
                                     "whole file is checked against it as it is cached"),
    "state": ({"enum": list(ITEM_STATES)}, "queued, running, paused, done, failed (with "
                                           "`error`) or cancelled"),
    "error": (["string", "null"], "why it failed, naming the repo and file"),
})

JOB_SUMMARY_FIELDS: dict[str, tuple[Any, str]] = {
    "id": ("string", "the job's id"),
    "state": ({"enum": list(JOB_STATES)}, "queued (every item waits for a slot), running, "
                                          "paused, done (every file cached), partial (some "
                                          "failed, others cached), failed, cancelled"),
    "created": ("number", "Unix time"),
    "finished": (["number", "null"], "Unix time, once no item is left to run"),
    "pin": ("boolean", "its repos are pinned: eviction never removes them"),
    "repos": (_list(REPO_REQUEST), "what was asked for"),
    "errors": (_list("string"), "repos that could not be resolved or listed"),
    "files": ("integer", "items"),
    "files_done": ("integer", "items done"),
    "files_failed": ("integer", "items failed"),
    "bytes": ("integer", "the files' sizes in all"),
    "downloaded_bytes": ("integer", "bytes of them in the cache"),
    "fetched_bytes": ("integer", "of those, bytes this job fetched from the origin"),
    "shared_bytes": ("integer", "of those, bytes this job read from the fleet's shared "
                                "cache (`--shared-cache`)"),
}
JOB_SUMMARY = _obj(JOB_SUMMARY_FIELDS)
JOB = _obj({**JOB_SUMMARY_FIELDS, "items": (_list(ITEM), "the job's files")})
JOB_EVENT = _obj({
    "type": ({"enum": ["job"]}, "the event's type"),
    "job": (JOB_SUMMARY, "the job's summary (no items)"),
    "items": (_list("object"), "the items that changed (all fields)"),
})

STATUS = _obj({
    "mountpoint": ("string", "where the daemon mounted"),
    "cache_dir": ("string", "its cache directory"),
    "pid": ("integer", "the daemon's process id"),
    "started": ("number", "Unix time"),
    "repos": (_list(_obj({
        "id": ("string", "ORG/NAME"), "revision": ("string", "as mounted"),
        "source": ("string", "the origin, as the cache index names it"),
        "commit": ("string", "what the mount shows now"),
        "resolved_at": ("number", "when that commit was first resolved"),
        "path": ("string", "its directory under the mount"),
        "url": (["string", "null"], "what ORG/NAME=URL named (credentials cut out); null "
                                    "for the Hub"),
        "files": ("integer", "files in the snapshot")})), "the mounted repos"),
    "cache": (_obj({
        "usage_bytes": ("integer", "disk used by chunk files"),
        "limit_bytes": (["integer", "null"], "--cache-size (null: unlimited)"),
        "compression": ("string", "auto, always or never")}), "the chunk cache"),
    "reads": (_obj({
        "hits": ("integer", "chunk reads answered from memory or disk"),
        "misses": ("integer", "chunk reads that had to fetch"),
        "bytes_served": ("integer", "bytes served to readers of the mount"),
        "chunk_loads": ("integer", "chunks loaded from disk on a read's own time"),
        "chunk_loads_ahead": ("integer", "chunks loaded from disk ahead of their reader")}),
        "reads through the mount"),
    "fetch": (_obj({
        "bytes_fetched": ("integer", "bytes fetched from origins"),
        "fetches": ("integer", "chunk fetches"),
        "in_flight": ("integer", "origin requests in flight now"),
        "errors": ("object", "errors by kind"),
        "requests": (_obj({
            "demand": ("integer", "for a read waiting on the bytes"),
            "readahead": ("integer", "ahead of a sequential reader"),
            "prefetch": ("integer", "for prefetch jobs and the on-open prefetch")}),
            "origin requests sent, by what asked for them"),
        "connections": ("integer", "origin requests allowed at once now (adapted to the "
                                   "throughput, within max_connections)"),
        "max_connections": ("integer", "--max-connections: the ceiling"),
        "throughput_bytes_per_s": ("integer", "origin bytes per second over the last 5 s")}),
        "the origin side"),
    "shared_cache": (_obj({
        "url": (["string", "null"], "--shared-cache (null: none)"),
        "hits": ("integer", "chunks read from the shared tier"),
        "misses": ("integer", "chunks the tier did not have"),
        "damaged": ("integer", "tier objects of the wrong size or digest (not served)"),
        "errors": ("integer", "tier requests that failed (down, slow, refused)"),
        "bytes_read": ("integer", "bytes read from the tier"),
        "bytes_written": ("integer", "bytes written to the tier"),
        "writes_skipped": ("integer", "chunks not written (too many in flight, or the tier "
                                      "backing off)"),
        "writes_refused": ("integer", "writes and leases the store refused (access denied): "
                                      "the tier is still read from"),
        "lease_waits": ("integer", "misses another node had claimed: waited for its write"),
        "lease_wait_hits": ("integer", "... and found it written in time")}),
        "the fleet's shared chunk tier"),
    "memory": (_obj({
        "limit": ("integer", "--memory-limit"),
        "used": ("integer", "bytes of chunk buffers charged now"),
        "peak": ("integer", "the most ever charged"),
        "readers": ("integer", "chunks kept in memory for readers"),
        "hashing": ("integer", "chunks held for a whole-file hash"),
        "spare": ("integer", "load buffers kept for reuse"),
        "in_flight": ("integer", "fetches and loads under way")}), "the memory budget"),
    "jobs": ("object", "prefetch jobs by state"),
})


class ItemDoc(TypedDict):
    id: int
    repo: str
    revision: str
    commit: str
    path: str
    url: str
    local_path: str | None
    bytes: int
    downloaded_bytes: int
    fetched_bytes: int
    shared_bytes: int
    checksum: str | None
    state: str
    error: str | None


class JobSummaryDoc(TypedDict):
    id: str
    state: str
    created: float
    finished: float | None
    pin: bool
    repos: list[dict[str, Any]]
    errors: list[str]
    files: int
    files_done: int
    files_failed: int
    bytes: int
    downloaded_bytes: int
    fetched_bytes: int
    shared_bytes: int


class JobDoc(JobSummaryDoc):
    items: list[ItemDoc]


_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": (int, float),
                          "boolean": bool, "object": dict, "array": list, "null": type(None)}


def check(doc: Any, schema: Schema, where: str = "$") -> list[str]:
    """What in `doc` does not match `schema` (type, enum, required and unknown fields,
    array items), as `path: problem` lines; empty when it matches."""
    out: list[str] = []
    if "enum" in schema:
        if doc not in schema["enum"]:
            out.append(f"{where}: {doc!r} is not one of {schema['enum']}")
        return out
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        ok = any(isinstance(doc, _TYPES[k]) and not (k in ("integer", "number")
                                                       and isinstance(doc, bool))
                 for k in kinds)
        if not ok:
            return [f"{where}: expected {' or '.join(kinds)}, got {type(doc).__name__}"]
    if isinstance(doc, dict) and "properties" in schema:
        props = schema["properties"]
        out += [f"{where}: missing {k!r}" for k in schema.get("required", ()) if k not in doc]
        out += [f"{where}: unknown field {k!r}" for k in doc if k not in props]
        for k, v in doc.items():
            if k in props:
                out += check(v, props[k], f"{where}.{k}")
    if isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            out += check(v, schema["items"], f"{where}[{i}]")
    return out


def markdown(schema: Schema, prefix: str = "") -> list[str]:
    """Rows `| field | type | meaning |` of a schema, nested fields as `a.b`."""
    rows = []
    for k, p in schema.get("properties", {}).items():
        kind = p.get("type", "enum" if "enum" in p else "")
        shown = " or ".join(kind) if isinstance(kind, list) else kind
        if "enum" in p:
            shown = "string"
        rows.append(f"| `{prefix}{k}` | {shown} | {p['description']} |")
        if "properties" in p:
            rows += markdown(p, f"{prefix}{k}.")
    return rows


DOCUMENTS: dict[str, Schema] = {"job": JOB, "item": ITEM, "status": STATUS}


def tables() -> str:
    """The field tables docs/api.md shows."""
    out = []
    for name, schema in DOCUMENTS.items():
        out += [f"**{name}**", "", "| field | type | meaning |", "|---|---|---|",
                *markdown(schema), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(tables())
