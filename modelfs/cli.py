"""`modelfs` command line (click).

`mount` without `--foreground` starts the daemon as a detached child and
returns once the mount answers (exit 0), or prints the child's one-line
reason (exit 1) with nothing left mounted. The child reports over a pipe.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio

from .cli_cache import cache_group
from .config import PrefetchJobConfig, build_job_config, build_mount_config
from .errors import ModelfsError
from .jobs import JobResult

log = logging.getLogger("modelfs")

READY = b"READY\n"
START_TIMEOUT = 300.0


class _Redact(logging.Filter):
    """Last line of defence: scrub the token from any log record."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self._secret in msg:
            record.msg, record.args = msg.replace(self._secret, "***"), None
        return True


def setup_logging(level: str, log_file: Path | None, secret: str | None) -> None:
    handler: logging.Handler
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if secret:
        handler.addFilter(_Redact(secret))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; keep that for --log-level debug only.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("httpcore").setLevel(max(root.level, logging.INFO))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="modelfs")
def main() -> None:
    """Mount remote model repositories as a read-only directory, fetched on demand."""


_SHARED_OPTIONS = [
    click.option("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT, else huggingface.co)."),
    click.option("--cache-dir", help="Chunk cache and index directory."),
    click.option("--token-file", help="File holding the Hub token (default: $HF_TOKEN)."),
    click.option("--chunk-size", help="Cache chunk size, a power of two (default 4MiB); a mount "
                                      "and a prefetch share chunks only at the same size."),
    click.option("--retries", type=int, help="Retries of a failing origin request (default 5)."),
    click.option("--retry-backoff", type=float,
                 help="First retry delay in seconds, doubled each time."),
    click.option("--timeout", type=float,
                 help="Per-request connect/read timeout in seconds (default 30)."),
    click.option("--max-connections", type=int,
                 help="Concurrent origin requests in all (default 16; a mount keeps 4 for demand "
                      "reads)."),
    click.option("--per-file-connections", type=int,
                 help="Concurrent ranged GETs of one file's whole-file prefetch (default 8)."),
    click.option("--memory-limit", help="Bytes held by fetches in flight (default 256MiB)."),
    click.option("--bandwidth-limit", help="Cap on origin bandwidth, e.g. 200MiB/s (default none)."),
    click.option("--cache-size", help="Disk the chunk cache may use: a size (200GiB), a share of "
                                      "its file system (80%, the default) or `unlimited`."),
    click.option("--compression", type=click.Choice(["auto", "always", "never"]),
                 help="zstd per chunk: auto (default) keeps a chunk compressed only when that "
                      "saves 10% or more."),
    click.option("--force", is_flag=True,
                 help="Fetch listings and file contents again, whatever is cached."),
]


def _source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that talks to the origin, declared once."""
    for option in reversed(_SHARED_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--repo", "repos", multiple=True, metavar="ORG/NAME[@REV]",
              help="Repo to mount (repeatable). @REV pins a branch, tag or commit.")
@click.option("--url", "urls", multiple=True, metavar="ORG/NAME=URL",
              help="Plain HTTP file, or directory with a JSON index (URL ending in /), to mount "
                   "as ORG/NAME (repeatable). Versions are ETags, revalidated every "
                   "--revision-ttl.")
@_source_options
@click.option("--allow-other", is_flag=True, help="Let other users read the mount.")
@click.option("--max-listing-entries", type=int, help="Refuse repo listings larger than this.")
@click.option("--prefetch-on-open", metavar="GLOBS",
              help="Comma-separated patterns of files fetched whole in the background when "
                   "opened (default *.safetensors,*.gguf,*.bin,*.pt,*.pth; '' for none).")
@click.option("--revision-ttl", type=float,
              help="Seconds between re-resolving branches and tags (default 60).")
@click.option("--foreground", is_flag=True, help="Stay attached (for systemd).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-file", type=click.Path(dir_okay=False),
              help="Log here (default: stderr with --foreground, else CACHE_DIR/modelfs.log).")
@click.option("--ready-fd", type=int, hidden=True)
def mount(mountpoint: str, foreground: bool, log_level: str, log_file: str | None,
          ready_fd: int | None, **opts: Any) -> None:
    """Mount REPOs at MOUNTPOINT."""
    try:
        config = build_mount_config(mountpoint=mountpoint, **opts)
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    if not foreground:
        default_log = config.cache_dir / "modelfs.log"
        sys.exit(_spawn_daemon(sys.argv[2:], Path(log_file) if log_file else default_log))

    setup_logging(log_level, Path(log_file) if log_file else None, config.token)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)

    from .daemon import serve  # pyfuse3 is only needed by the daemon itself

    try:
        trio.run(serve, config, ready)
    except ModelfsError as exc:
        log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {exc}\n".encode())
        click.echo(f"modelfs: {exc}", err=True)
        sys.exit(1)


def _spawn_daemon(args: list[str], log_file: Path) -> int:
    """Run `modelfs mount ARGS --foreground` detached; wait until it is ready."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.touch()
    except OSError as exc:
        raise click.ClickException(f"log file {log_file}: {exc.strerror or exc}") from None
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "modelfs", "mount", *args, "--foreground",
           "--ready-fd", str(wfd)]
    if "--log-file" not in " ".join(args):
        cmd += ["--log-file", str(log_file)]
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as logf:
        child = subprocess.Popen(cmd, stdin=devnull, stdout=logf, stderr=logf, pass_fds=(wfd,),
                                 start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        line = pipe.readline()  # EOF when the child exits without a word
    if line == READY:
        click.echo(f"modelfs: mounted (pid {child.pid}, log {log_file})")
        return 0
    if line.startswith(b"ERROR "):
        click.echo(f"modelfs: {line[6:].decode().strip()}", err=True)
    else:
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        click.echo(f"modelfs: daemon exited (status {child.poll()}) before the mount was ready; "
                   f"see {log_file}", err=True)
    child.wait(timeout=30)
    return 1


@main.command()
@click.argument("repos", nargs=-1, metavar="ORG/NAME[@REV]...")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching (repeatable).")
@_source_options
@click.option("--parallel-files", type=int, help="Files fetched at once (default 4).")
@click.option("--pin", is_flag=True, help="Pin the repos: eviction never removes them.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def prefetch(log_level: str, **opts: Any) -> None:
    """Warm the cache with whole repos (no mount needed); rerun to resume.

    Exit status: 0 when every selected file is cached, 1 when some failed (listed), 2 for
    usage errors.
    """
    try:
        config = build_job_config(**opts)
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(log_level, None, config.token)
    try:
        result = trio.run(_run_prefetch, config)
    except ModelfsError as exc:
        click.echo(f"modelfs: {exc}", err=True)
        sys.exit(1)
    failed = [f for f in result.files if f.state != "done"]
    for err in result.errors:
        click.echo(f"modelfs: {err}", err=True)
    for f in failed:
        click.echo(f"modelfs: failed {f.repo}/{f.path}: {f.error}", err=True)
    if failed or result.errors:
        sys.exit(1)


async def _run_prefetch(config: PrefetchJobConfig) -> JobResult:
    from .cache import ChunkCache, ChunkStore, Index
    from .jobs import run_job
    from .progress import JobProgress
    from .remote import HubSource

    index = Index(config.cache_dir / "index")
    cache = ChunkCache(index, ChunkStore(config.cache_dir), config.cache)
    source = HubSource(config.hub, config.token)
    try:
        with JobProgress(sys.stderr) as progress:
            return await run_job(config.spec, source, cache, config.fetch,
                                 on_update=progress.update)
    finally:
        await source.aclose()
        index.close()


main.add_command(cache_group)


@main.command()
def demo() -> None:
    """Offline end to end: serve a real small model from a local origin, mount it,
    load it with transformers from the mount, show what was fetched, unmount."""
    from . import demo as demo_mod

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    demo_mod.run(click.echo)


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the daemon.")
def umount(mountpoint: str, timeout: float) -> None:
    """Unmount MOUNTPOINT cleanly (the daemon then exits)."""
    from .daemon import is_mounted

    path = Path(mountpoint).absolute()
    if not is_mounted(path):
        raise click.ClickException(f"{path} is not mounted")
    res = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise click.ClickException(res.stderr.strip() or f"fusermount3 -u {path} failed")
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        if time.monotonic() > deadline:
            raise click.ClickException(f"{path} still mounted after {timeout:.0f}s")
        time.sleep(0.05)
