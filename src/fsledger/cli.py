"""The command line: a thin face over ``fsledger.ledger`` and ``fsledger.manager``.

Every command takes ``--json`` for machine output. Errors are one line on stderr,
never a traceback. Exit codes: 0 ok, 1 operational error (e.g. the database is
unreachable), 2 usage or bad input, 3 corruption found by ``scan --verify``,
4 refused by the root guard (missing or unmounted root), 5 a change-feed cursor older
than the feed keeps (``changes --since``: list the files again, then resume).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

import click

from fsledger import __version__, human
from fsledger.entry import VERSION_MESSAGE
from fsledger.errors import (
    ConfigError,
    CorruptionFound,
    FsledgerError,
    MissingExtra,
    RepositoryExists,
    StoreUnavailable,
)

if TYPE_CHECKING:
    # What a command needs is imported in it: ``fsledger --version`` loads click and
    # nothing else, a reading command no scanning machinery and no command the web stack.
    from fsledger.config import Settings
    from fsledger.hashing import HashPool
    from fsledger.ledger import Ledger
    from fsledger.manager import LiveFactory, LiveSource, ResyncCallback
    from fsledger.model import FeedEntry, Repository, ScanStats


def _fail(exc: FsledgerError) -> NoReturn:
    click.echo(f"fsledger: error: {_show(str(exc))}", err=True)
    sys.exit(exc.exit_code)


def _dumps(obj: Any) -> str:
    from fsledger.jsonform import dumps  # here, as every import --version does not need

    return dumps(obj)


def _emit(obj: Any) -> None:
    click.echo(_dumps(obj))


def _setup_logging(level: str) -> None:
    import logging

    from fsledger.text import SafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    # A file name can hold a newline or an escape sequence: one record, one line.
    handler.setFormatter(SafeFormatter("%(asctime)s [%(levelname)s] %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])


def _show(text: str | bytes) -> str:
    """A name or path for human output, control characters escaped."""
    from fsledger.text import escape_controls, show_path

    return show_path(text) if isinstance(text, bytes) else escape_controls(text)


class Context:
    """What every command gets: settings (read once, here at the edge) and a lazy ledger."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ledger: Ledger | None = None
        self._recovered = False

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = _open_ledger(self.settings)
        return self._ledger

    def scanning_ledger(self) -> Ledger:
        """The ledger, for a command that scans: its workers start first, as plain forks of
        this still single-threaded process (see ``start_workers``)."""
        if self._ledger is None:
            from fsledger.reconcile import start_workers

            self._ledger = _open_ledger(self.settings, pool=start_workers(self.settings))
        return self._ledger

    def writing_ledger(self, scanning: bool = False) -> Ledger:
        """The ledger, for a command that writes: operations left "running" by a process of
        this host that died (a scan killed from cron, say) are marked failed first, as
        ``run`` does at start; otherwise they would show as running until a daemon starts."""
        ledger = self.scanning_ledger() if scanning else self.ledger
        if not self._recovered:
            self._recovered = True
            ledger.recover_interrupted()
        return ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()


def _open_ledger(settings: Settings, attempts: int = 3, pool: HashPool | None = None) -> Ledger:
    """Open the store, retrying a database that is briefly unreachable (after 0.5 s, then
    twice as long each time, at most 4 s; a loop, not tenacity, which every command's
    start would pay ~10 ms to import)."""
    from fsledger.ledger import Ledger

    for attempt in range(1, attempts + 1):
        try:
            return Ledger(settings, pool=pool)
        except StoreUnavailable:
            if attempt >= attempts:
                raise
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
    raise AssertionError("unreachable")


pass_ctx = click.make_pass_decorator(Context)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn fsledger errors into one clear line and the documented exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FsledgerError as exc:
            _fail(exc)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "database_url",
    metavar="URL",
    help="Database URL: sqlite:///PATH or postgresql://... "
    "[env FSLEDGER_DATABASE_URL; default: SQLite in $XDG_DATA_HOME/fsledger]",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Log level on stderr [env FSLEDGER_LOG_LEVEL; default INFO for run, WARNING otherwise].",
)
@click.version_option(__version__, prog_name="fsledger", message=VERSION_MESSAGE)
@click.pass_context
def main(ctx: click.Context, database_url: str | None, log_level: str | None) -> None:
    """fsledger keeps a database of every file in your directory trees true to disk."""
    from fsledger.config import Settings

    try:
        settings = Settings.from_env(database_url=database_url)
    except ConfigError as exc:
        _fail(exc)
    default_level = "INFO" if ctx.invoked_subcommand == "run" else "WARNING"
    explicit = log_level or os.environ.get("FSLEDGER_LOG_LEVEL")
    _setup_logging((explicit or default_level).upper())
    ctx.obj = Context(settings)
    ctx.call_on_close(ctx.obj.close)


# --- repositories ---------------------------------------------------------------------------
@main.group()
def repo() -> None:
    """Add, list and remove repositories (directory trees kept in the ledger)."""


@contextmanager
def _progress(
    enabled: bool, label: str, expected: int | None
) -> Iterator[Callable[[ScanStats], None] | None]:
    """A progress bar of a scan, on a terminal only: files looked at against ``expected``
    (the records the ledger holds: a rescan's estimate; unknown on a first index, then the
    bar only shows that work goes on). Nothing when stdout is not a terminal or under
    --json (``enabled`` False)."""
    if not enabled or not sys.stdout.isatty():
        yield None
        return

    latest: list[ScanStats] = []

    def info(_pos: int | None) -> str | None:
        if not latest:
            return None
        stats = latest[-1]
        done = "" if expected else f"{stats.files_scanned:,} files, "
        return f"{done}{stats.files_hashed:,} hashed ({human.size(stats.bytes_hashed)})"

    import itertools

    with click.progressbar(
        itertools.count() if not expected else None,
        length=expected or None,
        label=label,
        file=sys.stdout,
        show_pos=bool(expected),
        show_eta=True,
        item_show_func=info,
        # Without an estimate a bar would say nothing: the counts alone.
        bar_template="%(label)s  [%(bar)s]  %(info)s" if expected else "%(label)s  %(info)s",
    ) as bar:

        def show(stats: ScanStats) -> None:
            latest[:] = [stats]
            bar.update(max(0, stats.files_scanned - bar.pos))

        yield show


def _scan_progress(
    ctx: Context, repo: Repository, as_json: bool, verify: bool = False
) -> AbstractContextManager[Callable[[ScanStats], None] | None]:
    """The progress bar of one repository's scan (see ``_progress``)."""
    if as_json or not sys.stdout.isatty():
        return _progress(False, "", None)
    expected = ctx.ledger.status(repo).total_files
    what = "indexing" if not expected else "verifying" if verify else "scanning"
    return _progress(True, f"{what} {_show(repo.name)}", expected)


def _stats_line(repo: Repository, stats: ScanStats) -> str:
    from fsledger.control_server import stats_line

    return stats_line(repo, stats)


@repo.command("add")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--name", help="Name of the repository [default: the directory's basename].")
@click.option("--no-scan", is_flag=True, help="Register only; the next scan or run indexes it.")
@click.option("--if-missing", is_flag=True, help="Succeed quietly if PATH is already added.")
@click.option("--ignore", "ignore", multiple=True, help="Extra ignore pattern (repeatable).")
@click.option(
    "--trust-repo-config",
    is_flag=True,
    help="Honour the root's own .fsledger.yaml (off by default: whoever can write into the "
    "tree can write it). Its ignore patterns never retire records without 'scan "
    "--accept-ignores'.",
)
@click.option(
    "--endpoint-url",
    help="For s3://BUCKET[/PREFIX]: the S3 endpoint (MinIO, SeaweedFS, R2, B2...) [default: "
    "AWS_ENDPOINT_URL, else AWS]. Credentials come from the AWS variables or profiles only.",
)
@click.option(
    "--quick-interval",
    type=float,
    help="Seconds between quick scans under 'fsledger run' (a bucket is polled: default 15).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the repository as JSON.")
@pass_ctx
@_guard
def repo_add(
    ctx: Context,
    path: str,
    name: str | None,
    no_scan: bool,
    if_missing: bool,
    ignore: tuple[str, ...],
    trust_repo_config: bool,
    endpoint_url: str | None,
    quick_interval: float | None,
    as_json: bool,
) -> None:
    """Add PATH (a directory, or a bucket as s3://BUCKET[/PREFIX]) as a repository and
    index it."""
    from fsledger.ledger import normalize_root
    from fsledger.model import OperationType, RepoSettings
    from fsledger.s3.location import S3Location, is_s3_url

    if endpoint_url is not None and not is_s3_url(path):
        raise ConfigError("--endpoint-url is for s3://BUCKET[/PREFIX] repositories")
    if quick_interval is not None and quick_interval <= 0:
        raise ConfigError("--quick-interval must be positive")
    from fsledger.control import serving

    # While 'fsledger run' serves this database, the first index is the daemon's (handed
    # over below): scanning here too would index the tree twice, side by side.
    to_daemon = not no_scan and serving(ctx.settings.database_url, os.environ)
    ledger = ctx.writing_ledger(scanning=not no_scan and not to_daemon and not is_s3_url(path))
    wanted = RepoSettings(
        ignore_patterns=ignore,
        trust_repo_config=trust_repo_config,
        endpoint_url=endpoint_url,
        quick_scan_interval_s=quick_interval,
    )
    try:
        repository = ledger.add_repository(path, name, wanted)
    except RepositoryExists:
        root = str(S3Location.parse(path)).encode() if is_s3_url(path) else normalize_root(path)
        existing = [r for r in ledger.list_repositories() if r.root == root]
        if not (if_missing and existing):
            raise
        repository = existing[0]
        if not as_json:
            click.echo(
                f"{_show(repository.name)} ({_show(repository.root)}) is already a repository"
            )
    else:
        if not as_json:
            click.echo(
                f"added {_show(repository.name)} ({_show(repository.root)}) as {repository.id}"
            )
    out = repository.to_json()
    if to_daemon and _daemon_indexes(ctx, repository, out, as_json):
        return
    if not no_scan:
        with _scan_progress(ctx, repository, as_json) as progress:
            stats = ledger.scan(repository, op_type=OperationType.STARTUP, progress=progress)
        out["scan"] = stats.to_json()
        if not as_json:
            click.echo(_stats_line(repository, stats))
    if as_json:
        _emit(out)


def _daemon_indexes(
    ctx: Context, repository: Repository, out: dict[str, Any], as_json: bool
) -> bool:
    """Have the running daemon index a repository ``repo add`` has just added, and print
    what the command prints when it indexes it itself. False (nothing printed) if the
    daemon declines: the command indexes it."""
    import json

    from fsledger.control import ACCEPTED_NOTE, Declined, ask_scan

    lines: list[str] = []
    try:
        code = ask_scan(
            ctx.settings.database_url,
            [str(repository.id)],
            verify=False,
            as_json=as_json,
            env=os.environ,
            out=lines.append if as_json else click.echo,
            err=lambda text: click.echo(text, err=True),
            accepted=(
                (lambda: click.echo(ACCEPTED_NOTE, err=True)) if sys.stderr.isatty() else None
            ),
            new=True,
        )
    except Declined:
        return False
    if as_json:
        # The scan's own JSON line, under "scan"; on an error (told on stderr), nothing,
        # as when the command's own index fails.
        scanned = json.loads(lines[0]) if lines else {"error": "no answer"}
        if "error" not in scanned:
            scanned.pop("repository", None)
            scanned.pop("id", None)
            out["scan"] = scanned
            _emit(out)
    if code:
        sys.exit(code)
    return True


@repo.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def repo_list(ctx: Context, as_json: bool) -> None:
    """List repositories."""
    repos = ctx.ledger.list_repositories()
    if as_json:
        _emit([r.to_json() for r in repos])
        return
    if not repos:
        click.echo("no repositories yet: add one with 'fsledger repo add PATH'")
    for r in repos:
        click.echo(f"{r.id}  {_show(r.name):<20} {r.state.value:<8} {_show(r.root)}")


@repo.command("set")
@click.argument("ref", metavar="REPO")
@click.option(
    "--ignore",
    "ignore",
    multiple=True,
    help="The repository's ignore patterns, replacing its current ones (repeatable); "
    "records they match are retired at the next scan.",
)
@click.option("--no-ignore", is_flag=True, help="Remove every ignore pattern of the operator.")
@click.option(
    "--trust-repo-config/--no-trust-repo-config",
    default=None,
    help="Honour the root's own .fsledger.yaml, or stop (its stored copy is then cleared).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the repository as JSON.")
@pass_ctx
@_guard
def repo_set(
    ctx: Context,
    ref: str,
    ignore: tuple[str, ...],
    no_ignore: bool,
    trust_repo_config: bool | None,
    as_json: bool,
) -> None:
    """Change the settings of REPO (the operator's: a root's file cannot reach them)."""
    from dataclasses import replace

    repository = ctx.ledger.resolve(ref)
    settings = repository.settings
    if ignore or no_ignore:
        settings = replace(settings, ignore_patterns=() if no_ignore else ignore)
    if trust_repo_config is not None:
        settings = replace(settings, trust_repo_config=trust_repo_config)
    repository = ctx.writing_ledger().set_settings(repository, settings)
    if as_json:
        _emit(repository.to_json())
    else:
        click.echo(f"{_show(repository.name)}: {_dumps(repository.settings.to_json())}")


@repo.command("remove")
@click.argument("ref", metavar="REPO")
@click.option("--purge", is_flag=True, help="Also delete its file records and history.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def repo_remove(ctx: Context, ref: str, purge: bool, as_json: bool) -> None:
    """Remove REPO (an id, a name or a root path). Records are kept unless --purge."""
    repository = ctx.writing_ledger().resolve(ref)
    ctx.ledger.remove_repository(repository, purge)
    if as_json:
        _emit({"id": str(repository.id), "name": repository.name, "purged": purge})
    else:
        click.echo(f"removed {_show(repository.name)}{' and its records' if purge else ''}")


# --- scanning and reading ---------------------------------------------------------------------
def _repos(ctx: Context, refs: tuple[str, ...]) -> list[Repository]:
    if refs:
        return [ctx.ledger.resolve(r) for r in refs]
    repos = ctx.ledger.list_repositories()
    if not repos:
        raise ConfigError("no repositories yet: add one with 'fsledger repo add PATH'")
    return repos


@main.command()
@click.argument("refs", nargs=-1, metavar="[REPO]...")
@click.option("--verify", is_flag=True, help="Rehash every file and report silent corruption.")
@click.option(
    "--force",
    is_flag=True,
    help="Override the root guard (empty root or another device than recorded).",
)
@click.option(
    "--accept-ignores",
    is_flag=True,
    help="Retire the records that the root's own .fsledger.yaml ignores (otherwise they are "
    "kept and reported).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def scan(
    ctx: Context,
    refs: tuple[str, ...],
    verify: bool,
    force: bool,
    accept_ignores: bool,
    as_json: bool,
) -> None:
    """Reconcile repositories with the disk (all of them without REPO).

    While ``fsledger run`` keeps the repositories asked for, it runs the scan (its writer is
    the repositories' only one) and this command prints its outcome."""
    from fsledger.control import ACCEPTED_NOTE, Declined, ask_scan
    from fsledger.control_server import scan_exit, scan_lines
    from fsledger.reconcile import scan_wants_workers

    def echo_out(text: str) -> None:
        click.echo(text)

    def echo_err(text: str) -> None:
        click.echo(text, err=True)

    if not force and not accept_ignores:
        try:
            code = ask_scan(
                ctx.settings.database_url,
                list(refs),
                verify=verify,
                as_json=as_json,
                env=os.environ,
                out=echo_out,
                err=echo_err,
                accepted=(lambda: echo_err(ACCEPTED_NOTE)) if sys.stderr.isatty() else None,
            )
        except Declined:
            pass
        else:
            sys.exit(code)
    # Small rescans merge in-process: no workers to fork, warm and end.
    ctx.writing_ledger(scanning=scan_wants_workers(ctx.settings, refs))
    outcomes: list[ScanStats | BaseException] = []
    for repository in _repos(ctx, refs):
        outcome: ScanStats | BaseException
        try:
            with _scan_progress(ctx, repository, as_json, verify) as progress:
                outcome = ctx.ledger.scan(
                    repository,
                    verify=verify,
                    force=force,
                    progress=progress,
                    accept_ignores=accept_ignores,
                )
        except FsledgerError as exc:
            outcome = exc
        outcomes.append(outcome)
        for to_err, text in scan_lines(repository, outcome, as_json):
            click.echo(text, err=to_err)
    if code := scan_exit(outcomes):
        sys.exit(code)


@main.command()
@click.argument("ref", metavar="REPO")
@click.option("--prefix", default="", help="Only files below this directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
@_guard
def files(ctx: Context, ref: str, prefix: str, as_json: bool) -> None:
    """List the files the ledger holds for REPO, in path byte order."""
    repository = ctx.ledger.resolve(ref)
    raw_prefix = os.fsencode(prefix).strip(b"/")
    if b".." in raw_prefix.split(b"/"):
        raise ConfigError(f"--prefix {prefix!r} must stay inside the repository")
    out = sys.stdout
    for rec in ctx.ledger.files(repository, raw_prefix):
        if as_json:
            out.write(_dumps(rec.to_json()) + "\n")
        else:
            out.write(
                f"{human.size(rec.size):>8}  {(rec.content_hash or '-')[:16]:<16}  "
                f"{_show(rec.path)}\n"
            )


@main.command()
@click.argument("ref", metavar="[REPO]", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def status(ctx: Context, ref: str | None, as_json: bool) -> None:
    """Show the sync status of one or every repository."""
    repos = [ctx.ledger.resolve(ref)] if ref else ctx.ledger.list_repositories()
    statuses = [ctx.ledger.status(r).to_json() for r in repos]
    if as_json:
        _emit(statuses[0] if ref else statuses)
        return
    if not statuses:
        click.echo("no repositories yet: add one with 'fsledger repo add PATH'")
        return
    if ref:
        _status_detail(statuses[0])
        return
    rows = [
        (
            _show(s["name"]),
            _state(s),
            f"{s['total_files']:,}",
            human.size(s.get("total_bytes") or 0),
            human.local_time(_parse_time(s["last_scan_time"])),
            _show(_reason(s) or ""),
        )
        for s in statuses
    ]
    headers = ("NAME", "STATE", "FILES", "SIZE", "LAST SCAN", "REASON")
    click.echo(human.table(headers, rows, right=frozenset({2, 3})))


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _state(status: dict[str, Any]) -> str:
    """The repository's state as the status says it (its condition when the daemon
    publishes one: degraded, polling)."""
    condition = status.get("condition") or {}
    return str(condition.get("state") or status["state"])


def _reason(status: dict[str, Any]) -> str | None:
    """Why a repository is not online: the condition's reason, else what its last failed
    operation said."""
    condition = status.get("condition") or {}
    if condition.get("reason"):
        since = condition.get("since")
        when = f" since {human.local_time(_parse_time(since))}" if since else ""
        return f"{condition['reason']}{when}"
    if _state(status) == "online":
        return None
    last = status.get("last_sync_operation") or {}
    message = last.get("error_message") if last.get("status") == "failed" else None
    return str(message).splitlines()[0] if message else "root unavailable"


def _status_detail(s: dict[str, Any]) -> None:
    """One repository's status, one fact a line."""
    click.echo(f"{_show(s['name'])} ({_show(s['path'])})")
    state = _state(s)
    reason = _reason(s)
    click.echo(f"  state      {state}" + (f": {_show(reason)}" if reason else ""))
    click.echo(f"  files      {s['total_files']:,} ({human.size(s.get('total_bytes') or 0)})")
    click.echo(f"  last scan  {human.local_time(_parse_time(s['last_scan_time']))}")
    last = s["last_sync_operation"]
    if last:
        took = (
            f" in {human.duration(last['duration_ms'] / 1000)}"
            if last["duration_ms"] is not None
            else ""
        )
        started = human.local_time(_parse_time(last["start_time"]))
        click.echo(
            f"  last op    {last['operation_type']} {last['status']}, started {started}{took}"
        )
    if s.get("schedule"):
        click.echo("  schedule   " + _schedule_line(s["schedule"]))


def _schedule_line(sched: dict[str, Any]) -> str:
    """The running manager's schedule of a repository, in one line."""
    next_run = sched["next_run"]
    parts = [
        f"next run {human.local_time(_parse_time(next_run)) if next_run else 'none scheduled'}"
    ]
    if sched.get("waiting_reason"):
        since = human.local_time(_parse_time(sched["waiting_since"]))
        parts.append(f"waiting since {since}: {sched['waiting_reason']}")
    if sched.get("interval_s"):
        every = human.duration(sched["interval_s"])
        parts.append(f"interval {every} ({sched['interval_reason']})")
    if sched.get("daily_at"):
        parts.append(f"daily at {sched['daily_at']} ({sched['daily_reason']})")
    return "; ".join(_show(p) for p in parts)


@main.command()
@click.option(
    "--for",
    "duration",
    metavar="DURATION",
    help="How long, e.g. 30m or 2h (at most 7 days).",
)
@click.option("--until", "until", metavar="TIME", help="Until when (ISO 8601, local if no offset).")
@click.option("--by", default="cli", show_default=True, help="Who asks (shown in status).")
@click.option("--off", is_flag=True, help="Withdraw the request: waiting runs start now.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def quiet(
    ctx: Context,
    duration: str | None,
    until: str | None,
    by: str,
    off: bool,
    as_json: bool,
) -> None:
    """Ask the running manager to start no scheduled reconciliation for a while
    ("my pipeline is busy"). Startup and recovery reconciliations still run, and a
    scheduled one waits at most FSLEDGER_SCHEDULE_MAX_DEFERRAL (6h)."""
    now = datetime.now().astimezone()
    if off:
        ctx.ledger.request_quiet(None)
        if as_json:
            _emit({"until": None})
        else:
            click.echo("quiet request withdrawn")
        return
    if (duration is None) == (until is None):
        raise ConfigError("give either --for DURATION or --until TIME (or --off)")
    if duration is not None:
        from fsledger.config import parse_duration

        when = now + timedelta(seconds=parse_duration("--for", duration, 7 * 86400.0))
    else:
        try:
            when = datetime.fromisoformat(str(until))
        except ValueError:
            raise ConfigError(f"--until {until!r} is not an ISO 8601 time") from None
        when = when if when.tzinfo else when.astimezone()
        if when - now > timedelta(days=7):
            raise ConfigError(f"--until {until!r} is more than 7 days ahead")
    from fsledger.schedule import Quiet  # imported by the one command that needs it

    ctx.ledger.request_quiet(Quiet(when, by))
    if as_json:
        _emit({"until": when.isoformat(), "by": by})
    else:
        click.echo(
            f"no scheduled reconciliation starts before {when.isoformat(timespec='minutes')}"
        )


@main.command()
@click.argument("ref", metavar="[REPO]", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def ops(ctx: Context, ref: str | None, limit: int, as_json: bool) -> None:
    """Show recent sync operations."""
    repository = ctx.ledger.resolve(ref) if ref else None
    operations = ctx.ledger.operations(repository, limit)
    if as_json:
        _emit([o.to_json() for o in operations])
        return
    for o in operations:
        click.echo(
            f"{o.id:>6} {human.local_time(o.start_time):<19} {o.operation_type.value:<14} "
            f"{o.status.value:<9} {human.duration((o.duration_ms or 0) / 1000):>8}  "
            f"scanned {o.files_scanned:,}, added {o.files_added:,}, "
            f"updated {o.files_updated:,}, removed {o.files_removed:,}"
            + (f"  {_show(o.error_message)}" if o.error_message else "")
        )


# --- the change feed and duplicates ----------------------------------------------------------
def _feed_line(entry: FeedEntry, names: dict[UUID, str]) -> str:
    name = names.get(entry.repository_id, str(entry.repository_id))
    line = (
        f"{entry.seq:>8} {human.local_time(entry.recorded_at):<19} {entry.kind.value:<18} "
        f"{_show(name)}: {_show(entry.path)}"
    )
    if entry.old_path is not None:
        line += f" (from {_show(entry.old_path)})"
    return line


@main.command()
@click.option(
    "--since",
    metavar="CURSOR",
    help="Only changes after this cursor (as printed before) [default: the oldest kept].",
)
@click.option("--repo", "ref", metavar="REPO", help="Only changes of this repository.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing changes as they happen.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="The API's JSON (lines with --follow).")
@pass_ctx
@_guard
def changes(
    ctx: Context, since: str | None, ref: str | None, follow: bool, limit: int, as_json: bool
) -> None:
    """Print the change feed: exactly the changes after --since, and the cursor to continue from.

    Without --follow, prints up to --limit changes; the cursor goes to stderr (or into the
    JSON object). With --follow, prints one change per line as they are written, each with
    its cursor in --json. A cursor older than the feed's retention exits with code 5: list
    the files again, then continue from the cursor the error names.
    """
    from fsledger.feed import Cursor, entry_json

    ledger = ctx.ledger
    repo = ledger.resolve(ref) if ref else None
    cursor = Cursor.parse(since) if since else ledger.feed.oldest()
    names = {r.id: r.name for r in ledger.list_repositories()}
    if not follow:
        page = ledger.changes(cursor, limit, repo)
        if as_json:
            _emit(page.to_json())
            return
        for entry in page.entries:
            click.echo(_feed_line(entry, names))
        more = " (more: run again with this cursor)" if page.has_more else ""
        click.echo(f"cursor: {page.cursor}{more}", err=True)
        return

    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.is_set():
        page = ledger.changes(cursor, limit, repo)
        for entry in page.entries:
            if entry.repository_id not in names:
                names = {r.id: r.name for r in ledger.list_repositories()}
            if as_json:
                click.echo(_dumps(entry_json(entry, page.cursor.feed_id)))
            else:
                click.echo(_feed_line(entry, names))
        sys.stdout.flush()
        cursor = page.cursor
        if not page.has_more:
            # Another process writes the feed: poll its head, cheaply, until it moves.
            while not stop.wait(0.25) and ledger.feed_head().seq <= cursor.seq:
                pass


@main.command()
@click.argument("ref", metavar="[REPO]", required=False)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--min-size", default=1, show_default=True, type=click.IntRange(0), help="Bytes.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def duplicates(ctx: Context, ref: str | None, limit: int, min_size: int, as_json: bool) -> None:
    """List groups of files with the same content, largest waste first (in REPO, or across
    every repository)."""
    ledger = ctx.ledger
    groups = ledger.duplicates(ledger.resolve(ref) if ref else None, limit, min_size)
    wasted = sum(g.wasted_bytes for g in groups)
    if as_json:
        _emit({"groups": [g.to_json() for g in groups], "wasted_bytes": wasted})
        return
    names = {r.id: r.name for r in ledger.list_repositories()}
    for g in groups:
        click.echo(
            f"{human.size(g.size)} x {len(g.files)} (wastes {human.size(g.wasted_bytes)}) "
            f"{g.hash_algo}:{g.content_hash[:16]}"
        )
        for f in g.files:
            name = names.get(f.repository_id, str(f.repository_id))
            click.echo(f"  {_show(name)}: {_show(f.path)}")
    click.echo(f"{len(groups)} group(s), {human.size(wasted)} wasted", err=True)


# --- health ------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="The findings as a JSON list.")
@pass_ctx
def doctor(ctx: Context, as_json: bool) -> None:
    """Check what fsledger depends on and say what to do about each problem: the inotify
    watch limit against the trees, free space where the database lives, the database
    (reachable, its version, write permission), the clock, each root's filesystem.
    Exits 1 when a check fails (warnings do not)."""
    from fsledger.doctor import Level, diagnose, exit_code

    findings = diagnose(lambda: _open_ledger(ctx.settings, attempts=1))
    if as_json:
        _emit([f.to_json() for f in findings])
    else:
        marks = {Level.OK: "ok  ", Level.WARN: "WARN", Level.FAIL: "FAIL"}
        width = max(len(f.check) for f in findings)
        for f in findings:
            click.echo(f"{marks[f.level]}  {_show(f.check):<{width}}  {_show(f.detail)}")
            if f.advice and f.level is not Level.OK:
                click.echo(f"      {'':<{width}}  -> {_show(f.advice)}")
        failed = sum(f.level is Level.FAIL for f in findings)
        warned = sum(f.level is Level.WARN for f in findings)
        click.echo(f"{failed} failed, {warned} warning(s), {len(findings)} checks", err=True)
    sys.exit(exit_code(findings))


# --- mirrors to buckets ----------------------------------------------------------------------
@main.group()
def mirror() -> None:
    """Mirror repositories to S3 buckets, kept from the change feed by 'fsledger run'.

    Credentials, region and endpoint come from the standard AWS chain (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, profiles); see docs/cloud.md.
    """


def _mirrors(ctx: Context) -> Any:
    from fsledger.s3.mirrors import Mirrors

    return Mirrors(ctx.ledger)


def _mirror_line(status: Any) -> str:
    m = status.mirror
    c = m.counters
    state = m.state.value + (f" ({_show(m.reason)})" if m.reason else "")
    synced = "not synced yet" if m.cursor_seq is None else f"backlog {status.backlog}"
    line = (
        f"{m.url} <- {_show(status.repository)}: {state}, {synced}; uploaded {c.uploaded} "
        f"({c.uploaded_bytes} bytes), skipped {c.skipped}, copied {c.copied}, deleted "
        f"{c.deleted}, deferred {c.deferred}, errors {c.errors}"
    )
    if m.last_error:
        line += f"; last error: {_show(m.last_error)}"
    return line


@mirror.command("add")
@click.argument("ref", metavar="REPO")
@click.argument("url", metavar="s3://BUCKET[/PREFIX]")
@click.option("--endpoint-url", metavar="URL", help="S3 endpoint [env AWS_ENDPOINT_URL].")
@click.option(
    "--max-delete",
    type=click.IntRange(0),
    help="Pause rather than delete more than N objects in one go (as rclone's).",
)
@click.option("--no-check", is_flag=True, help="Do not check that the bucket answers.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def mirror_add(
    ctx: Context,
    ref: str,
    url: str,
    endpoint_url: str | None,
    max_delete: int | None,
    no_check: bool,
    as_json: bool,
) -> None:
    """Mirror REPO to a bucket: 'fsledger run' uploads it and keeps it from the feed."""
    m = _mirrors(ctx).add(ref, url, endpoint_url, max_delete, check=not no_check)
    if as_json:
        _emit(m.to_json())
    else:
        click.echo(f"added mirror {m.url} as {m.id}")


@mirror.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def mirror_list(ctx: Context, as_json: bool) -> None:
    """List the mirrors."""
    statuses = _mirrors(ctx).status()
    if as_json:
        _emit({"mirrors": [s.to_json() for s in statuses]})
        return
    for s in statuses:
        click.echo(f"{s.mirror.id}  {s.mirror.url}  <- {_show(s.repository)}  {s.mirror.state}")


@mirror.command("status")
@click.argument("ref", metavar="[MIRROR]", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def mirror_status(ctx: Context, ref: str | None, as_json: bool) -> None:
    """Where each mirror stands: state, backlog, counters, the last error."""
    statuses = _mirrors(ctx).status()
    if ref is not None:
        wanted = _mirrors(ctx).get(ref).id
        statuses = [s for s in statuses if s.mirror.id == wanted]
    if as_json:
        _emit({"mirrors": [s.to_json() for s in statuses]})
        return
    for s in statuses:
        click.echo(_mirror_line(s))


@mirror.command("remove")
@click.argument("ref", metavar="MIRROR")
@pass_ctx
@_guard
def mirror_remove(ctx: Context, ref: str) -> None:
    """Stop mirroring (by id or URL); the bucket is left as it is."""
    m = _mirrors(ctx).remove(ref)
    click.echo(f"removed mirror {m.url}")


@mirror.command("resume")
@click.argument("ref", metavar="MIRROR")
@click.option("--accept-deletes", is_flag=True, help="Let the deletions that paused it go ahead.")
@pass_ctx
@_guard
def mirror_resume(ctx: Context, ref: str, accept_deletes: bool) -> None:
    """Resume a paused mirror."""
    m = _mirrors(ctx).resume(ref, accept_deletes)
    click.echo(f"resumed mirror {m.url}" + (" (deletions accepted)" if accept_deletes else ""))


@mirror.command("sync")
@click.argument("ref", metavar="MIRROR")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def mirror_sync(ctx: Context, ref: str, as_json: bool) -> None:
    """Catch a mirror up with the feed now, in this process (as 'fsledger run' does)."""
    m = _mirrors(ctx).sync(ref)
    if as_json:
        _emit(m.to_json())
    else:
        click.echo(f"{m.url}: {m.state.value}" + (f" ({_show(m.reason)})" if m.reason else ""))


@mirror.command("verify")
@click.argument("ref", metavar="REPO")
@click.option("--repair", is_flag=True, help="Upload what is missing or wrong, delete extras.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@_guard
def mirror_verify(ctx: Context, ref: str, repair: bool, as_json: bool) -> None:
    """List each mirror of REPO (or the mirror REPO names) and compare it with the ledger:
    key, size and the hash in each object's metadata. Exit 3 when something differs
    (and was not repaired)."""
    mirrors = _mirrors(ctx)
    targets = mirrors.of_repository(ref) or [mirrors.get(ref)]
    out = []
    differs = False
    for m in targets:
        result = mirrors.verify(m, repair=repair)
        after = mirrors.verify(m) if repair and not result.exact else result
        differs = differs or not after.exact
        item = {
            "mirror": m.url,
            "checked": result.checked,
            "missing": [_show(p) for p in result.missing],
            "wrong": [_show(p) for p in result.wrong],
            "extra": [_show(k) for k in result.extra],
            "repaired": repair and not result.exact,
            "exact": after.exact,
        }
        out.append(item)
        if not as_json:
            click.echo(
                f"{m.url}: {result.checked} files, {len(result.missing)} missing, "
                f"{len(result.wrong)} wrong, {len(result.extra)} extra"
                + ("; repaired" if item["repaired"] else "")
            )
            for kind in ("missing", "wrong", "extra"):
                for p in item[kind]:
                    click.echo(f"  {kind}: {p}")
    if as_json:
        _emit({"mirrors": out})
    if differs:
        sys.exit(CorruptionFound.exit_code)


# --- the daemon ------------------------------------------------------------------------------
@main.command()
@click.option("--no-watch", is_flag=True, help="Reconcile on schedule only, no live watcher.")
@click.option("--once", is_flag=True, help="Run the startup reconciliation, then exit.")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve the HTTP API and dashboard here [env FSLEDGER_LISTEN; default 127.0.0.1:8750]. "
    "Beyond loopback FSLEDGER_API_TOKEN is required.",
)
@click.option("--no-http", is_flag=True, help="Serve no HTTP (webhooks still run).")
@click.option(
    "--webhook",
    "webhooks",
    multiple=True,
    metavar="URL",
    help="POST batches of changes here, signed per Standard Webhooks with "
    "FSLEDGER_WEBHOOK_SECRET (repeatable; env FSLEDGER_WEBHOOKS too).",
)
@click.option(
    "--webhook-from",
    metavar="now|start|CURSOR",
    help="Where a webhook that has no stored cursor yet starts: now (only what happens "
    "next), start (the oldest change kept first) or a cursor [default: now]. A webhook "
    "that has delivered before resumes where its receiver last acknowledged.",
)
@click.option(
    "--distributed/--no-distributed",
    default=None,
    help="PostgreSQL: split big reconciliations into work items that every agent on the "
    "database with the root mounted at the same path helps with, and help with theirs "
    "[env RECONCILIATION_DISTRIBUTED; default off].",
)
@pass_ctx
@_guard
def run(
    ctx: Context,
    no_watch: bool,
    once: bool,
    listen: str | None,
    no_http: bool,
    webhooks: tuple[str, ...],
    webhook_from: str | None,
    distributed: bool | None,
) -> None:
    """Keep every repository in sync: startup reconciliation, live watching, schedules; serve
    the HTTP API, the change feed (SSE, webhooks) and the dashboard.

    Stops cleanly on SIGINT/SIGTERM (pending events are flushed first).
    """
    if not once:
        try:
            from fsledger.api.server import Service
        except ImportError as exc:  # installed without the server extra
            raise MissingExtra(
                "server", "'fsledger run' (its HTTP API, dashboard and webhooks)", exc.name
            ) from exc
    import logging
    from dataclasses import replace

    from fsledger.control_server import serve_for
    from fsledger.manager import SyncManager

    log = logging.getLogger("fsledger")

    if distributed is not None:
        # Before the ledger opens: its reconciler reads the setting too.
        ctx.settings = replace(ctx.settings, distributed=distributed)
    if webhook_from is not None:
        ctx.settings = replace(ctx.settings, webhook_from=webhook_from)
    ledger = ctx.ledger
    live_factory = None if (no_watch or once) else _live_factory()
    manager = SyncManager(ledger, ctx.settings, live_factory=live_factory)
    # Checked and bound before anything starts: an unsafe or busy address fails at once.
    service = (
        None
        if once
        else Service(
            ledger, manager, ctx.settings, http=not no_http, listen=listen, webhooks=webhooks
        )
    )
    if service is not None:
        service.bind()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            _hard_exit(signum, "a second signal")
        log.info("Received %s, stopping", signal.Signals(signum).name)
        stop.set()
        # The main thread may be stuck in something stopping cannot reach (an open or a
        # read that blocks for good: this handler runs when the call is interrupted, and
        # then the call is retried). A clean stop gets STOP_GRACE_S, then the process ends.
        timer = threading.Timer(STOP_GRACE_S, _hard_exit, (signum, "the stop took too long"))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not ledger.list_repositories():
        log.warning(
            "No repositories yet: add one with 'fsledger repo add PATH' (this daemon picks it "
            "up within seconds) or 'make run PHOTOS=PATH'"
        )
    manager.start()
    supervisor = (
        None
        if once
        else _mirror_supervisor(ledger, manager, service.hub if service is not None else None)
    )
    # 'fsledger scan' of a repository kept here is run by this process (fsledger.control).
    control = None if once else serve_for(ledger, manager, ctx.settings.database_url)
    try:
        if service is not None:
            service.start()
        if once:
            while not stop.is_set() and not manager.wait_idle(0.5):
                pass
        else:
            while not stop.wait(1.0):
                pass
    finally:
        if control is not None:
            control.stop()
        if supervisor is not None:
            supervisor.stop()
        if service is not None:
            service.stop()
        manager.stop()


def _mirror_supervisor(ledger: Ledger, manager: Any, hub: Any) -> Any:
    """Runs the mirrors (if any: the s3 extra is only needed then) of the repositories this
    daemon owns; they wake on the feed hub's news."""
    from fsledger.s3.mirrors import MirrorSupervisor

    supervisor = MirrorSupervisor(ledger, manager.owns, hub=hub)
    supervisor.start()
    manager.mirrors = supervisor
    return supervisor


STOP_GRACE_S = 5.0
"""How long ``run`` may take to stop cleanly after SIGTERM/SIGINT before it just exits.
An operation cut short is marked failed by the next command that writes."""


def _hard_exit(signum: int, why: str) -> NoReturn:
    """End the process now, whatever any thread is blocked on."""
    # os.write, not logging: a thread blocked while holding the log handler's lock must
    # not keep the process alive.
    try:
        os.write(2, f"fsledger: stopping at once ({why}): no clean stop\n".encode())
    finally:
        os._exit(128 + signum)


def _live_factory() -> LiveFactory:
    from fsledger.watch import Watcher

    def build(ledger: Ledger, settings: Settings, on_resync: ResyncCallback) -> LiveSource:
        return Watcher(ledger, settings, on_resync=on_resync)

    return build


if __name__ == "__main__":  # pragma: no cover
    main()
