"""`modelfs cache ...`: inspect and manage the chunk cache (no origin needed,
safe beside a running daemon)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click

from .cache import CacheConfig, ChunkCache, ChunkStore, Index, admin, check_cache_dir
from .config import build_hub_config, cache_dir_path
from .errors import ConfigError, ModelfsError
from .types import RepoRef


def human_size(n: float) -> str:
    """Bytes for people: `512 B`, `10.0 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@contextmanager
def _open(cache_dir: str | None) -> Iterator[ChunkCache]:
    path = cache_dir_path(cache_dir, os.environ)
    if not (path / "index").is_dir():
        raise click.ClickException(f"no cache at {path} (give --cache-dir)")
    try:
        check_cache_dir(path)
        index = Index(path / "index")
        cache = ChunkCache(index, ChunkStore(path), CacheConfig())
    except ModelfsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield cache
    finally:
        index.close()


def _repo_arg(text: str | None) -> str | None:
    """`ORG/NAME[@REV]` checked, returned as given (None: every repo)."""
    if text is None:
        return None
    try:
        RepoRef.parse(text)
    except ConfigError as exc:
        raise click.UsageError(str(exc.labelled("REPO"))) from None
    return text


_cache_dir_option = click.option("--cache-dir", help="Chunk cache and index directory.")


@click.group("cache")
def cache_group() -> None:
    """Inspect and manage the chunk cache."""


@cache_group.command("ls")
@click.argument("repo", required=False, metavar="[ORG/NAME[@REV]]")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def ls(repo: str | None, cache_dir: str | None, as_json: bool) -> None:
    """Repos, revisions and cached/total bytes per file."""
    with _open(cache_dir) as cache:
        states = admin.list_cache(cache, _repo_arg(repo))
        usage = cache.index.usage()
    if as_json:
        click.echo(json.dumps({"usage": usage, "revisions": [asdict(s) for s in states]},
                              indent=1))
        return
    for s in states:
        pin = "  pinned" if s.pinned else ""
        click.echo(f"{s.repo_id}@{s.revision} -> {s.commit[:12]}{pin}  "
                   f"{human_size(s.cached)} of {human_size(s.size)} cached")
        width = max((len(f.path) for f in s.files), default=0)
        for f in s.files:
            click.echo(f"  {f.path:<{width}}  {human_size(f.cached):>10} / {human_size(f.size)}")
    click.echo(f"cache uses {human_size(usage)} on disk")


def _verdict(f: admin.FileState) -> tuple[str, bool]:
    c = f.check
    if c is None:
        return "not cached", False
    if c.sha256_ok is False:
        return f"{(c.kind or 'sha256').upper()} MISMATCH: all chunks dropped", True
    if c.damaged:
        return f"DAMAGED: {c.damaged} of {c.chunks} chunks dropped", True
    if c.sha256_ok:
        return f"ok, {c.kind or 'sha256'} verified", False
    return ("ok" if c.complete else f"ok, partial ({c.chunks} chunks)"), False


@cache_group.command("verify")
@click.argument("repo", required=False, metavar="[ORG/NAME[@REV]]")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def verify_cmd(repo: str | None, cache_dir: str | None, as_json: bool) -> None:
    """Check every cached chunk against its sha256 (and whole files where the origin
    gave one). Damaged chunks are dropped and fetched again when read. Exit 1 if any
    were found."""
    with _open(cache_dir) as cache:
        states = admin.verify(cache, _repo_arg(repo))
    bad = False
    report = []
    for s in states:
        if not as_json:
            click.echo(f"{s.repo_id}@{s.revision} -> {s.commit[:12]}")
        for f in s.files:
            text, damaged = _verdict(f)
            bad |= damaged
            report.append({"repo": s.repo_id, "revision": s.revision, "path": f.path,
                           "result": text, "damaged": damaged})
            if not as_json:
                click.echo(f"  {f.path}: {text}")
    if as_json:
        click.echo(json.dumps(report, indent=1))
    elif not bad:
        click.echo("nothing damaged")
    sys.exit(1 if bad else 0)


@cache_group.command("gc")
@_cache_dir_option
def gc_cmd(cache_dir: str | None) -> None:
    """Drop unreferenced chunks: files the index does not name (e.g. after a crash),
    index entries without a file, and versions no known revision uses any more."""
    with _open(cache_dir) as cache:
        r = admin.gc(cache)
    click.echo(f"removed {r.unindexed_files} unindexed chunk files, {r.missing_files} entries "
               f"without a file, {r.old_chunks} chunks of old versions; freed {human_size(r.freed)}")


@cache_group.command("evict")
@click.argument("repo", metavar="ORG/NAME[@REV]")
@_cache_dir_option
def evict_cmd(repo: str, cache_dir: str | None) -> None:
    """Drop a repo's cached chunks (every revision unless @REV); pinned content stays."""
    with _open(cache_dir) as cache:
        n = admin.evict_repo(cache, _repo_arg(repo) or repo)
    click.echo(f"evicted {n} files of {repo}")


@cache_group.command("rebuild-index")
@_cache_dir_option
def rebuild_cmd(cache_dir: str | None) -> None:
    """Rebuild a damaged index: the old one is kept as index.damaged-TIME, what of it
    still reads is copied, and only chunks that check out stay indexed. Run it with
    no daemon on this cache."""
    from .cache.rebuild import rebuild_index

    path = cache_dir_path(cache_dir, os.environ)
    try:
        check_cache_dir(path)
        r = rebuild_index(path)
    except ModelfsError as exc:
        raise click.ClickException(str(exc)) from None
    copied = ", ".join(f"{n} {db}" for db, n in sorted(r.records.items()) if n) or "nothing"
    click.echo(f"rebuilt {path / 'index'}: copied {copied}; kept {r.chunks_kept} chunks that "
               f"check out, dropped {r.chunks_dropped}; the damaged index is at {r.moved_to}")
    if r.salvage_error:
        click.echo(f"copying stopped early: {r.salvage_error}")


@cache_group.command("clear")
@_cache_dir_option
@click.option("--yes", is_flag=True, help="Do not ask.")
def clear_cmd(cache_dir: str | None, yes: bool) -> None:
    """Delete every cached chunk (listings and pins stay)."""
    if not yes:
        click.confirm("Delete every cached chunk?", abort=True)
    with _open(cache_dir) as cache:
        n = admin.clear(cache)
    click.echo(f"deleted {n} chunk files")


def _pin_command(name: str, doc: str, fn: Callable[[Index, str, str, str], Any]) -> None:
    @cache_group.command(name, help=doc)
    @click.argument("repos", nargs=-1, required=True, metavar="ORG/NAME[@REV]...")
    @_cache_dir_option
    @click.option("--endpoint", help="Hub endpoint the repo comes from (default: $HF_ENDPOINT).")
    def cmd(repos: tuple[str, ...], cache_dir: str | None, endpoint: str | None) -> None:
        try:
            refs = [RepoRef.parse(r) for r in repos]
            key = build_hub_config({"endpoint": endpoint}, os.environ).key
        except ModelfsError as exc:
            raise click.UsageError(str(exc)) from None
        with _open(cache_dir) as cache:
            for ref in refs:
                fn(cache.index, key, ref.repo_id, ref.revision)
                click.echo(f"{name}ned {ref.repo_id}@{ref.revision}")


_pin_command("pin", "Pin repos: eviction never removes their chunks.", Index.pin)
_pin_command("unpin", "Unpin repos: their chunks may be evicted again.", Index.unpin)
