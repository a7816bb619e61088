"""The console script ``fsledger`` (``[project.scripts]``): the full CLI (``fsledger.cli``,
on click), with a fast path for the two commands that should start as fast as Python does.

``fsledger [--db URL] scan [REPO]... [--json] [--verify]`` is handed to the running daemon
that keeps the repositories, if there is one (``fsledger.control``: the daemon's writer is
the repositories' only one), with the standard library only.
``fsledger --version`` and ``fsledger [--db URL] files REPO --json`` on a SQLite ledger are
served here with the standard library, ``fsledger.jsonform`` and ``fsledger.leanread``: no
click (whose import alone costs 4× a bare interpreter's start), no dataclasses, no settings
object (docs/benchmarks.md, "The CLI's start-up"). Everything else goes to the full CLI, and
so does any case the fast path would not answer exactly as it does: other options or
arguments, ``--help``, any setting in the environment but the database's (a bad one is an
error there), shell completion, PostgreSQL, and whatever ``fsledger.leanread`` declines
(a missing database, another schema version, a lock held, an unknown repository...).
The tests (tests/test_cli_fast.py) compare both paths' output byte for byte.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing costs the fast path its import; mypy still reads the block
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

VERSION_MESSAGE = "%(prog)s, version %(version)s"
"""What ``--version`` prints (click's template, which the full CLI is given too)."""

_SETTINGS = ("FSLEDGER_", "RECONCILIATION_", "FILE_WATCHER_", "_FSLEDGER_")
"""The environment the full CLI reads (``Settings.from_env``, the log level, click's shell
completion ``_FSLEDGER_COMPLETE``): any of it but the database URL sends a command there."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The values ``FSLEDGER_LOG_LEVEL`` takes (any case)."""


def data_home(env: Mapping[str, str]) -> str:
    """``$XDG_DATA_HOME/fsledger``, falling back to ``~/.local/share/fsledger``."""
    base = env.get("XDG_DATA_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(os.path.abspath(base), "fsledger")


def default_database_url(env: Mapping[str, str]) -> str:
    """``sqlite:///$XDG_DATA_HOME/fsledger/fsledger.db``, falling back to ``~/.local/share``."""
    return "sqlite://" + os.path.join(data_home(env), "fsledger.db")


def env_database_url(env: Mapping[str, str]) -> str:
    """The database of the environment (``FSLEDGER_DATABASE_URL``, else the default); the
    ``--db`` option overrides it."""
    return env.get("FSLEDGER_DATABASE_URL") or default_database_url(env)


def main(argv: Sequence[str] | None = None) -> int | None:
    """Run ``fsledger`` with ``argv`` (``sys.argv[1:]`` when None); its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    env = os.environ
    settings = [k for k in env if k.startswith(_SETTINGS) and k != "FSLEDGER_DATABASE_URL"]
    if not settings or (
        settings == ["FSLEDGER_LOG_LEVEL"] and env["FSLEDGER_LOG_LEVEL"].upper() in LOG_LEVELS
    ):
        # The log level decides nothing a served scan prints (the daemon logs its own).
        served = _served_scan(args, env)
        if served is not None:
            return served
    if not settings:
        if args == ["--version"]:
            from fsledger import __version__

            sys.stdout.write(
                VERSION_MESSAGE
                % {"prog": "fsledger", "package": "fsledger", "version": __version__}
                + "\n"
            )
            return 0
        served = _files_json(args, env)
        if served is not None:
            return served
    from fsledger.cli import main as full

    if argv is None:
        return full()  # type: ignore[no-any-return]
    return full(args)  # type: ignore[no-any-return]


def _split_db(args: list[str]) -> tuple[str | None, list[str]]:
    """The ``--db`` option in front of the command, and the rest."""
    if args[:1] == ["--db"] and len(args) > 1:
        return args[1], args[2:]
    if args[:1] and args[0].startswith("--db="):
        return args[0].removeprefix("--db="), args[1:]
    return None, args


def _served_scan(args: list[str], env: Mapping[str, str]) -> int | None:
    """``[--db URL] scan [REPO]... [--json] [--verify]`` run by the daemon that keeps the
    repositories (``fsledger.control``), or None (not served: nothing printed)."""
    url, args = _split_db(args)
    if args[:1] != ["scan"]:
        return None
    flags = {"--json", "--verify"}
    refs = [a for a in args[1:] if a not in flags]
    if any(a.startswith("-") for a in refs) or "--" in args:
        return None  # options for the full CLI (--force, --help, ...)
    from fsledger.control import ACCEPTED_NOTE, Declined, ask_scan

    def out(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def err(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    try:
        return ask_scan(
            url or env_database_url(env),
            refs,
            verify="--verify" in args,
            as_json="--json" in args,
            env=env,
            out=out,
            err=err,
            accepted=(lambda: err(ACCEPTED_NOTE)) if sys.stderr.isatty() else None,
        )
    except Declined:
        return None
    except BrokenPipeError:
        _pacify()
        return 1


def _pacify() -> None:
    """As click does when the reader went away (``| head``): no traceback at exit."""
    from click.utils import _PacifyFlushWrapper

    sys.stdout = _PacifyFlushWrapper(sys.stdout)
    sys.stderr = _PacifyFlushWrapper(sys.stderr)


def _files_json(args: list[str], env: Mapping[str, str]) -> int | None:
    """``[--db URL] files REPO --json`` on SQLite, or None (not served: nothing printed)."""
    url, args = _split_db(args)
    if len(args) != 3 or args[0] != "files" or "--json" not in args[1:]:
        return None
    (ref,) = [a for a in args[1:] if a != "--json"] or [""]
    if url is None:
        url = env_database_url(env)
    if not url.startswith("sqlite:///") or not ref:
        return None
    from fsledger.leanread import Declined, files_json

    try:
        files_json(url.removeprefix("sqlite://"), ref, sys.stdout)
    except Declined:
        return None
    except BrokenPipeError:
        _pacify()
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
