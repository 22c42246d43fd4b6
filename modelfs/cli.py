"""`modelfs` command line (click).

`mount` without `--foreground` starts the daemon as a detached child and
returns once the mount answers (exit 0), or prints the child's one-line
reason (exit 1) with nothing left mounted. The child reports over a pipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio

from . import _startup  # noqa: F401  (first: before anything imports httpx)
from .cache import check_cache_dir
from .cli_cache import cache_group, human_size
from .config import (
    MountConfig,
    PrefetchJobConfig,
    cache_dir_path,
    control_socket_path,
    load_job_config,
    load_mount_config,
)
from .errors import ConfigError, ControlError, DaemonNotRunning, ModelfsError
from .progress import JobProgress
from .redaction import redact, secret_forms
from .schema import JobDoc
from .settings import BY_NAME, Layered, layer, render_settings

if TYPE_CHECKING:  # loaded by the commands that talk to a daemon: it brings httpx
    from .control.client import ControlClient

log = logging.getLogger("modelfs")

READY = b"READY\n"
# How long `mount` waits for its daemon: the daemon's own bound on resolving its repos
# (daemon.START_TIMEOUT), and some.
START_TIMEOUT = 330.0
# A prefetch in this process waits at most this long for its writes to the shared tier.
TIER_DRAIN = 60.0


class _Redact(logging.Filter):
    """Last line of defence: scrub the token, in any form, from any log record
    (tracebacks included)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._forms = secret_forms(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        scrubbed = redact(msg, self._forms)
        if scrubbed != msg:
            record.msg, record.args = scrubbed, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg}\n{redact(text, self._forms)}"
        return True


def open_log(path: Path) -> Any:
    """The log file for appending, owner-only, never through a symlink (a link planted
    where the log goes would have root append to its target)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise click.ClickException(f"log file {path}: {exc.strerror or exc}") from None
    return os.fdopen(fd, "a", buffering=1)


def setup_logging(level: str, log_file: Path | None, secret: str | None) -> None:
    handler = logging.StreamHandler(open_log(log_file) if log_file else sys.stderr)
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
    os.umask(0o077)  # the cache, its index, chunks and log are the daemon's user's alone


_TYPES: dict[str, Any] = {"int": int, "float": float}


def setting_option(name: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The flag of setting `name`: its type, help text and default shown are read from
    the one settings table (`settings.SETTINGS`); `kw` adds what only a flag has."""
    s = BY_NAME[name]
    args: dict[str, Any] = {"help": f"{s.help} (default: {s.default})"}
    if s.kind == "bool":
        args["is_flag"] = True
    elif s.kind in _TYPES:
        args["type"] = _TYPES[s.kind]
    args.update(kw)
    return click.option(s.flag, s.name, **args)


_PATH = click.Path(dir_okay=False)
_SHARED_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    *(setting_option(n) for n in (
        "endpoint", "cache_dir", "token_file", "chunk_size", "retries", "retry_backoff",
        "timeout", "request_deadline", "min_rate", "max_response_size", "max_file_size",
        "allow_private_redirects", "max_connections", "per_file_connections", "request_size",
        "shared_cache", "shared_cache_required", "proxy",
        "memory_limit",
        "bandwidth_limit", "cache_size", "s3_endpoint", "s3_region", "s3_anonymous",
        "s3_profile")),
    setting_option("s3_addressing", type=click.Choice(["auto", "path", "virtual"])),
    setting_option("compression", type=click.Choice(["auto", "always", "never"])),
    click.option("--force", is_flag=True,
                 help="Fetch listings and file contents again, whatever is cached."),
]


def _source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that talks to the origin, declared once."""
    for option in reversed(_SHARED_OPTIONS):
        fn = option(fn)
    return fn


def _config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False),
        help="TOML config file (default: $MODELFS_CONFIG, else /etc/modelfs/config.toml if "
             "present). Flags > MODELFS_* environment > file > defaults.")(fn)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(layered: Layered, default: str) -> str:
    level = str(layered.values.get("log_level") or default).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level {level!r} is not one of {', '.join(LOG_LEVELS)}",
                          setting="log_level", label=layered.origin("log_level"))
    return level


@main.command()
@click.argument("mountpoint", type=str, required=False)
@click.option("--repo", "repos", multiple=True, metavar="SPEC",
              help="Repo to mount (repeatable): ORG/NAME[@REV] from the Hub (@REV pins a branch, "
                   "tag or commit), datasets/ORG/NAME[@REV] a Hub dataset, or ORG/NAME=URL with "
                   "URL s3://BUCKET/PREFIX/, http(s)://... (a file, or a directory with a JSON "
                   "index) or file:///path/ (a local or NFS directory). A URL repo's versions "
                   "are re-listed every --revision-ttl.")
@click.option("--url", "urls", multiple=True, metavar="ORG/NAME=URL",
              help="The same as --repo ORG/NAME=URL.")
@_source_options
@_config_option
@setting_option("allow_other")
@setting_option("max_listing_entries")
@setting_option("prefetch_on_open", metavar="GLOBS")
@setting_option("revision_ttl")
@setting_option("max_header_size")
@setting_option("read_deadline")
@setting_option("parallel_files")
@setting_option("control_socket", type=_PATH)
@click.option("--rebuild-index", is_flag=True,
              help="If the cache index is damaged, rebuild it (keeping the chunks that check "
                   "out) instead of refusing to start.")
@click.option("--foreground", is_flag=True, help="Stay attached (for systemd).")
@click.option("--take-over", is_flag=True,
              help="If MOUNTPOINT is served by another modelfs with this cache, take the mount "
                   "over from it without unmounting (an upgrade: open files stay open).")
@setting_option("log_level", type=click.Choice(LOG_LEVELS, case_sensitive=False))
@setting_option("log_file", type=_PATH)
@click.option("--ready-fd", type=int, hidden=True)
def mount(foreground: bool, take_over: bool, config_file: str | None, ready_fd: int | None,
          **opts: Any) -> None:
    """Mount repos at MOUNTPOINT (or the config file's [mount] mountpoint).

    The daemon also serves the local API (jobs, status, metrics) on its control socket.
    """
    try:
        config, layered = load_mount_config(opts, config=config_file)
        log_level = _log_level(layered, "info")
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    log_file = layered.values.get("log_file")
    try:
        check_cache_dir(config.cache_dir)
    except ModelfsError as exc:
        click.echo(f"modelfs: {exc}", err=True)
        sys.exit(1)
    if not foreground:
        default_log = config.cache_dir / "modelfs.log"
        sys.exit(_spawn_daemon(sys.argv[2:], Path(log_file) if log_file else default_log))

    setup_logging(log_level, Path(log_file) if log_file else None, config.token)
    from .daemon.connection import Connection  # pyfuse3 is only needed by the daemon itself

    try:
        conn = Connection.from_env(os.environ)
        if conn is None:
            sys.exit(_supervise(config, ready_fd, take_over))
    except ModelfsError as exc:
        _start_failed(exc, config, ready_fd)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)

    from .daemon.serve import serve
    from .daemon.supervisor import HANDED_OVER

    try:
        handed_over = trio.run(serve, config, ready, conn)
    except ModelfsError as exc:
        _start_failed(exc, config, ready_fd)
    sys.exit(HANDED_OVER if handed_over else 0)


def _supervise(config: MountConfig, ready_fd: int | None, take_over: bool) -> int:
    """The process that owns the mount (`daemon.supervisor`): the daemon runs as its
    child, so it can be restarted without unmounting."""
    from .control.server import check_socket_free
    from .daemon.mountpoint import check_mountpoint, modelfs_mounted
    from .daemon.supervisor import Supervisor, worker_command

    take_over = take_over and modelfs_mounted(config.mountpoint)
    if not take_over:
        check_mountpoint(config.mountpoint)
        if config.control_socket:
            check_socket_free(config.control_socket)
    options = ["ro", "nosuid", "nodev", "fsname=modelfs", "subtype=modelfs",
               "default_permissions"] + (["allow_other"] if config.allow_other else [])
    args = [a for a in sys.argv[2:] if a != "--take-over"]  # its daemons serve, never take
    return Supervisor(config.mountpoint, options, worker_command(args), config.cache_dir,
                      ready_fd, take_over=take_over).run()


def _start_failed(exc: ModelfsError, config: MountConfig, ready_fd: int | None) -> NoReturn:
    log.error("%s", exc)
    reason = redact(str(exc), secret_forms(config.token)) if config.token else str(exc)
    if ready_fd is not None:
        with contextlib.suppress(OSError):  # the supervisor told it already
            os.write(ready_fd, f"ERROR {reason}\n".encode())
    click.echo(f"modelfs: {reason}", err=True)
    sys.exit(1)


def _spawn_daemon(args: list[str], log_file: Path) -> int:
    """Run `modelfs mount ARGS --foreground` detached; wait until it is ready."""
    logf = open_log(log_file)
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "modelfs", "mount", *args, "--foreground",
           "--ready-fd", str(wfd)]
    if "--log-file" not in " ".join(args):
        cmd += ["--log-file", str(log_file)]
    with open(os.devnull, "rb") as devnull, logf:
        child = subprocess.Popen(cmd, stdin=devnull, stdout=logf, stderr=logf, pass_fds=(wfd,),
                                 start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], START_TIMEOUT)
        if not ready:
            child.kill()
            child.wait()
            click.echo(f"modelfs: the daemon did not come up within {START_TIMEOUT:.0f}s; "
                       f"see {log_file}", err=True)
            return 1
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
@click.argument("repos", nargs=-1, metavar="SPEC...")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching (repeatable).")
@_source_options
@_config_option
@setting_option("parallel_files")
@click.option("--pin", is_flag=True, help="Pin the repos: eviction never removes them.")
@setting_option("control_socket", type=_PATH)
@click.option("--no-wait", is_flag=True,
              help="Start the job on the running daemon and print its id; do not follow it.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: item updates, then the job.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(LOG_LEVELS, case_sensitive=False))
def prefetch(log_level: str, config_file: str | None, no_wait: bool, as_json: bool,
             **opts: Any) -> None:
    """Warm the cache with whole repos: ORG/NAME[@REV], datasets/ORG/NAME[@REV] or
    ORG/NAME=URL, as --repo of `mount` takes them.

    With a daemon running (its control socket answers), the job runs there: it
    survives this command, and `modelfs jobs` / `pause` / `resume` / `cancel` act on
    it. Otherwise the same engine runs in this process; rerun to resume.

    Exit status: 0 when every selected file is cached, 1 when some failed (listed), 2 for
    usage errors.
    """
    try:
        config, _ = load_job_config(opts, config=config_file)
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(log_level, None, config.token)
    from .control.client import ControlClient

    with ControlClient(config.control_socket) as client:
        daemon = client.alive()
        if no_wait and not daemon:
            raise click.UsageError(f"--no-wait: no daemon answers on {config.control_socket}; "
                                   "without one the job runs in this process")
        try:
            if daemon:
                job = _prefetch_via_daemon(client, config, no_wait, as_json)
            else:
                job = trio.run(_prefetch_in_process, config, as_json)
        except ModelfsError as exc:
            click.echo(f"modelfs: {exc}", err=True)
            sys.exit(1)
    if no_wait:
        click.echo(json.dumps({"id": job["id"], "state": job["state"]}) if as_json else job["id"])
        return
    for err in job["errors"]:
        click.echo(f"modelfs: {err}", err=True)
    for item in job["items"]:
        if item["state"] != "done":
            click.echo(f"modelfs: {item['state']} {item['repo']}/{item['path']}: "
                       f"{item['error'] or item['state']}", err=True)
    if job["state"] != "done":
        sys.exit(1)


def _job_body(config: PrefetchJobConfig) -> dict[str, Any]:
    return {"repos": [r.to_json() for r in config.spec.repos], "pin": config.spec.pin,
            "force": config.spec.force}


def _prefetch_via_daemon(client: ControlClient, config: PrefetchJobConfig, no_wait: bool,
                         as_json: bool) -> dict[str, Any]:
    job = client.prefetch(_job_body(config))
    if no_wait:
        return job
    log.info("job %s runs in the daemon on %s", job["id"], client.socket_path)
    with JobProgress(sys.stderr if not as_json else sys.stdout, json_lines=as_json) as progress:
        while job["finished"] is None:
            time.sleep(0.5)
            job = client.job(job["id"])
            for item in job["items"]:
                progress.update(item)
        progress.finish(job)
    return job


async def _prefetch_in_process(config: PrefetchJobConfig, as_json: bool) -> JobDoc:
    from .cache import ChunkCache, ChunkStore, Index, check_cache_dir
    from .fetch import ChunkReader
    from .jobs import JobManager
    from .remote.sources import Sources

    check_cache_dir(config.cache_dir)
    index = Index(config.cache_dir / "index")
    cache = ChunkCache(index, ChunkStore(config.cache_dir), config.cache)
    sources = Sources(config.sources, config.token)
    try:
        reader = ChunkReader(cache, config.fetch, tier=await sources.tier())
        jobs = JobManager(reader, cache, lambda repo, url: sources.get(url), config.jobs,
                          persist=False)
        with JobProgress(sys.stderr if not as_json else sys.stdout,
                         json_lines=as_json) as progress:
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.run)
                await nursery.start(jobs.run)
                async with jobs.subscribe() as updates:
                    job = jobs.submit(config.spec)

                    async def show() -> None:
                        async for event in updates:
                            for item in event["items"]:
                                progress.update(item)

                    nursery.start_soon(show)
                    await jobs.wait(job.id)
                with trio.move_on_after(TIER_DRAIN):
                    await reader.shared_written()
                nursery.cancel_scope.cancel()
            progress.finish(job.public())
        return job.public()
    finally:
        await sources.aclose()
        index.close()


def _cache_dir(config_file: str | None, control_socket: str | None,
               cache_dir: str | None = None) -> tuple[Path, Path]:
    """The cache directory and the control socket the settings name."""
    try:
        layered = layer({"control_socket": control_socket, "cache_dir": cache_dir},
                        config=config_file)
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    cdir = cache_dir_path(layered.values.get("cache_dir"), os.environ)
    return cdir, control_socket_path(layered.values.get("control_socket"), cdir)


def _talk(config_file: str | None, control_socket: str | None, cache_dir: str | None,
          fn: Callable[[ControlClient], Any],
          offline: Callable[[Any], Any] | None = None) -> Any:
    """Run `fn` against the daemon; a daemon that is not there or says no is exit 1.
    With `offline`, no daemon means `offline(index)` on the cache's index instead."""
    from .control.client import ControlClient

    cdir, sock = _cache_dir(config_file, control_socket, cache_dir)
    with ControlClient(sock) as client:
        try:
            try:
                return fn(client)
            except DaemonNotRunning:
                if offline is None or not (cdir / "index").is_dir():
                    raise
            from .cache import Index

            index = Index(cdir / "index")
            try:
                return offline(index)
            finally:
                index.close()
        except ModelfsError as exc:
            click.echo(f"modelfs: {exc}", err=True)
            sys.exit(1)


def _socket_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--control-socket`, and `--cache-dir` (the socket's default lives there)."""
    fn = click.option("--cache-dir", help="The daemon's cache directory (its socket is "
                                          "CACHE_DIR/control.sock).")(fn)
    return click.option("--control-socket", type=click.Path(dir_okay=False),
                        help="The daemon's API socket (default CACHE_DIR/control.sock).")(fn)


@main.command()
@_config_option
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="The raw /v1/status JSON.")
def status(config_file: str | None, control_socket: str | None, cache_dir: str | None,
           as_json: bool) -> None:
    """What the running daemon serves: repos and commits, cache, counters, jobs."""
    st = _talk(config_file, control_socket, cache_dir, lambda c: c.status())
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"mount      {st['mountpoint']} (pid {st['pid']})")
    for r in st["repos"]:
        name = f"{r['id']}={r['url']}" if r.get("url") else f"{r['id']}@{r['revision']}"
        click.echo(f"repo       {name} -> {r['commit'][:12]} ({r['files']} files)")
    c, rd, f = st["cache"], st["reads"], st["fetch"]
    limit = human_size(c["limit_bytes"]) if c["limit_bytes"] is not None else "unlimited"
    click.echo(f"cache      {human_size(c['usage_bytes'])} of {limit} ({st['cache_dir']})")
    click.echo(f"reads      {rd['hits']} hits, {rd['misses']} misses, "
               f"{human_size(rd['bytes_served'])} served")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(f["errors"].items())) or "none"
    click.echo(f"fetch      {human_size(f['bytes_fetched'])} in {f['fetches']} fetches, "
               f"{f['in_flight']} in flight, {human_size(f['throughput_bytes_per_s'])}/s; "
               f"errors: {errors}")
    rq = f["requests"]
    click.echo(f"requests   {rq['demand']} demand, {rq['readahead']} read-ahead, "
               f"{rq['prefetch']} prefetch; window {f['connections']} of "
               f"{f['max_connections']} connections")
    jobs = ", ".join(f"{n} {s}" for s, n in st["jobs"].items()) or "none"
    click.echo(f"jobs       {jobs}")


@main.command()
@_config_option
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="The jobs with their items, as JSON.")
def jobs(config_file: str | None, control_socket: str | None, cache_dir: str | None,
         as_json: bool) -> None:
    """Prefetch jobs of the running daemon (without one: the jobs saved in the cache)."""
    from .jobs import saved_jobs

    listed = _talk(config_file, control_socket, cache_dir, lambda c: c.jobs(), saved_jobs)
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    for j in listed:
        repos = ", ".join(f"{r['id']}@{r['revision']}" for r in j["repos"])
        click.echo(f"{j['id']}  {j['state']:<9} {j['files_done']}/{j['files']} files  "
                   f"{human_size(j['downloaded_bytes'])}/{human_size(j['bytes'])}  {repos}")


def _act(action: str) -> click.Command:
    @click.command(name=action, help=f"{action.capitalize()} a job of the running daemon, or "
                                     f"one file of it (PATH: its path, or REPO/PATH).")
    @click.argument("job")
    @click.argument("path", required=False)
    @_config_option
    @_socket_option
    def cmd(job: str, path: str | None, config_file: str | None,
            control_socket: str | None, cache_dir: str | None) -> None:
        def go(client: ControlClient) -> dict[str, Any]:
            item = None
            if path is not None:
                items = client.job(job)["items"]
                hits = [i for i in items
                        if path in (i["path"], f"{i['repo']}/{i['path']}")]
                if len(hits) != 1:
                    raise ControlError(f"job {job}: {'no' if not hits else 'more than one'} "
                                       f"file {path!r}")
                item = hits[0]["id"]
            return client.act(job, action, item)

        def offline(index: Any) -> Any:
            from .jobs import cancel_saved

            if action != "cancel" or path is not None:
                raise ControlError(f"no daemon runs: only a whole job can be cancelled "
                                   f"(`modelfs cancel {job}`), not {action}ed")
            return cancel_saved(index, job)

        j = _talk(config_file, control_socket, cache_dir, go, offline)
        click.echo(f"{j['id']} {j['state']}")

    return cmd


for _action in ("pause", "resume", "cancel"):
    main.add_command(_act(_action))


@main.group("config")
def config_group() -> None:
    """The effective configuration."""


@config_group.command("show")
@_config_option
def config_show(config_file: str | None) -> None:
    """Print the effective configuration as TOML, each value with where it came from
    (secrets redacted)."""
    try:
        layered = layer({}, config=config_file)
    except ModelfsError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(render_settings(layered, os.environ))


main.add_command(cache_group)


@main.command()
def demo() -> None:
    """Offline end to end: serve a real small model from a local origin, mount it,
    load it with transformers from the mount, show what was fetched, unmount."""
    from . import demo as demo_mod

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    demo_mod.run(click.echo)


@main.command()
@click.argument("mountpoint", type=str)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the daemon.")
@click.option("--lazy", is_flag=True,
              help="Detach it even while files are open (they read on until the daemon stops).")
def umount(mountpoint: str, timeout: float, lazy: bool) -> None:
    """Unmount MOUNTPOINT cleanly (the daemon then exits)."""
    from .daemon.mountpoint import modelfs_mounted

    path = Path(mountpoint).absolute()
    if not modelfs_mounted(path):
        raise click.ClickException(f"{path} is not mounted")
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise click.ClickException(res.stderr.strip() or f"{' '.join(cmd)} failed")
    deadline = time.monotonic() + timeout
    while modelfs_mounted(path):
        if time.monotonic() > deadline:
            raise click.ClickException(f"{path} still mounted after {timeout:.0f}s")
        time.sleep(0.05)


@main.command()
@click.argument("mountpoint", type=str, required=False)
@_config_option
@click.option("--cache-dir", help="The mount's cache directory (default: the config's).")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for the new daemon to serve.")
def restart(mountpoint: str | None, config_file: str | None, cache_dir: str | None,
            timeout: float) -> None:
    """Restart the daemon serving MOUNTPOINT without unmounting: open files stay open.

    A new daemon (the installed version: this is also how to upgrade) takes the FUSE
    connection over; reads pause meanwhile, they do not fail. Settings other than the
    repos take effect; a changed repo list needs a remount. Exit status 0 once the new
    daemon serves.
    """
    from .daemon.supervisor import restart as restart_daemon

    # The config file is read (and a broken one refused) before the daemon is asked.
    cdir, _ = _cache_dir(config_file, None, cache_dir)
    t0 = time.monotonic()
    try:
        pid = restart_daemon(cdir, Path(mountpoint).absolute() if mountpoint else None, timeout)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"modelfs: restarted (daemon pid {pid}, {time.monotonic() - t0:.1f}s)")
