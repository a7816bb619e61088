"""``fsledger doctor``: the checks that tell an operator what stands in the way of a ledger
kept true to disk, each finding with what to do about it.

The checks read the system (``/proc``, ``statvfs``, ``statfs``, the mount table) and the
database through the ``Ledger``; they change nothing. A failed check is something that
keeps fsledger from working as it should (exit code 1 from the CLI); a warning is worth
knowing before it becomes one.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from fsledger.errors import FsledgerError, MissingExtra
from fsledger.human import duration, size
from fsledger.model import Repository, utcnow
from fsledger.text import show_path

if TYPE_CHECKING:
    from fsledger.ledger import Ledger

MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"
WATCHES_WARN_SHARE = 0.8
"""Warn when the trees need more than this share of the watch limit: the limit is per
user, and editors, IDEs and sync tools of the same user take watches too."""
CLOCK_WARN_S = 2.0
CLOCK_FAIL_S = 60.0
"""Clock skew against the database server. A scan's racy-mtime window is 2 s, and
operations, the feed's times and schedules are compared across hosts."""
FREE_FAIL_BYTES = 100 * 1000 * 1000


_GRANT = (
    "run fsledger as the user that owns the database, or grant this one write access "
    "(PostgreSQL: USAGE and CREATE on the schema, INSERT/UPDATE/DELETE on its tables); the "
    "daemon and the CLI must both be able to write the ledger"
)


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result: what was found and, unless all is well, what to do."""

    check: str
    level: Level
    detail: str
    advice: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "level": self.level.value,
            "detail": self.detail,
            "advice": self.advice,
        }


@dataclass(frozen=True, slots=True)
class System:
    """Where the checks read the system: the real one unless a test says otherwise."""

    max_user_watches: str = MAX_USER_WATCHES
    mountinfo: str | None = None
    """A mount table to read instead of ``/proc/self/mountinfo``."""


def diagnose(open_ledger: Callable[[], Ledger], system: System = System()) -> list[Finding]:
    """Run every check. ``open_ledger`` opens the database (it may fail: that is a finding,
    and the checks that need the database are then skipped)."""
    try:
        ledger = open_ledger()
    except MissingExtra as exc:
        return [Finding("database", Level.FAIL, str(exc), "install the extra it names")]
    except FsledgerError as exc:
        if "permission denied" in str(exc).lower():
            return [
                Finding("permissions", Level.FAIL, f"cannot open the database: {exc}", _GRANT),
                *_watch_limit(None, system),
            ]
        return [
            Finding(
                "database",
                Level.FAIL,
                f"cannot open the database: {exc}",
                "check --db / FSLEDGER_DATABASE_URL, that the server runs and accepts this "
                "user (PostgreSQL: pg_hba.conf, the password), and that the path exists",
            ),
            *_watch_limit(None, system),
        ]
    repos = ledger.list_repositories()
    findings = [*_database(ledger), *_clock(ledger)]
    findings += _watch_limit([(r, ledger.directory_count(r)) for r in repos], system)
    findings += _roots(repos, system)
    return findings


def exit_code(findings: list[Finding]) -> int:
    """1 when a check failed, else 0 (warnings are not failures)."""
    return 1 if any(f.level is Level.FAIL for f in findings) else 0


# --- the database ----------------------------------------------------------------------
def _database(ledger: Ledger) -> list[Finding]:
    info = ledger.server_info()
    where = f" at {info.path}" if info.path else ""
    out = [Finding("database", Level.OK, f"{info.kind} {info.version}{where}, reachable")]
    problem = ledger.write_problem()
    if problem:
        out.append(Finding("permissions", Level.FAIL, problem, _GRANT))
    else:
        out.append(Finding("permissions", Level.OK, "this user can write the ledger"))
    if info.path is not None:
        out.append(_free_space(info.path))
    else:
        out.append(Finding("free space", Level.OK, f"the database lives on the {info.kind} server"))
    return out


def _free_space(path: str) -> Finding:
    directory = os.path.dirname(path)
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return Finding(
            "free space", Level.WARN, f"cannot read the free space of {directory}: {exc}"
        )
    free = st.f_bavail * st.f_frsize
    db_size = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(OSError):  # no write-ahead log right now
            db_size += os.stat(name).st_size
    # Building the duplicate index again (after a big first index) or a VACUUM can need as
    # much again as the database holds.
    want = max(1000**3, 2 * db_size)
    detail = f"{size(free)} free where the database lives ({directory}; it holds {size(db_size)})"
    if free < max(FREE_FAIL_BYTES, db_size):
        return Finding(
            "free space",
            Level.FAIL,
            detail,
            f"free space on that filesystem (at least {size(want)}), or move the database "
            "with --db / FSLEDGER_DATABASE_URL",
        )
    if free < want:
        return Finding(
            "free space",
            Level.WARN,
            detail,
            f"keep at least {size(want)} free: index rebuilds need room to write",
        )
    return Finding("free space", Level.OK, detail)


def _clock(ledger: Ledger) -> list[Finding]:
    out: list[Finding] = []
    before = time.time()
    info = ledger.server_info()
    after = time.time()
    local = datetime.fromtimestamp((before + after) / 2, UTC)
    if info.now is not None:
        skew = (info.now - local).total_seconds()
        detail = (
            f"this host's clock is {duration(abs(skew))} "
            f"{'behind' if skew > 0 else 'ahead of'} the database server's"
        )
        advice = "keep both clocks synchronised with NTP (chrony, systemd-timesyncd)"
        if abs(skew) > CLOCK_FAIL_S:
            out.append(Finding("clock", Level.FAIL, detail, advice))
        elif abs(skew) > CLOCK_WARN_S:
            out.append(Finding("clock", Level.WARN, detail, advice))
        else:
            out.append(Finding("clock", Level.OK, detail))
    ops = ledger.operations(None, 1)
    now = utcnow()
    if ops and ops[0].start_time - now > timedelta(seconds=CLOCK_FAIL_S):
        ahead = (ops[0].start_time - now).total_seconds()
        out.append(
            Finding(
                "clock",
                Level.FAIL,
                f"the newest operation started {duration(ahead)} in this host's future: "
                "the clock went back (or another host's is ahead)",
                "set the clock right (NTP); schedules and the racy-mtime rule rely on it",
            )
        )
    elif info.now is None:
        out.append(Finding("clock", Level.OK, "no operation lies in this host's future"))
    return out


# --- the watcher -----------------------------------------------------------------------
def _watch_limit(trees: list[tuple[Repository, int]] | None, system: System) -> list[Finding]:
    try:
        with open(system.max_user_watches) as fh:
            limit = int(fh.read().strip())
    except (OSError, ValueError) as exc:
        return [
            Finding(
                "inotify watches",
                Level.WARN,
                f"cannot read {system.max_user_watches}: {exc}",
                "live watching needs Linux inotify; without it, scans on schedule keep "
                "the ledger true",
            )
        ]
    if trees is None:
        return [Finding("inotify watches", Level.OK, f"limit {limit:,} watches per user")]
    polled = {r.id for r, _ in trees if _network_type(r.root, system) is not None}
    need = sum(n for r, n in trees if r.id not in polled)
    detail = f"the trees need {need:,} watches (one per directory); the limit is {limit:,}"
    advice = (
        f"raise it: sudo sysctl fs.inotify.max_user_watches={max(2 * need, 524288)}, and "
        "put the same line in /etc/sysctl.d/90-fsledger.conf to keep it"
    )
    if need > limit:
        return [
            Finding(
                "inotify watches",
                Level.FAIL,
                detail + ": directories past it are only seen by scans",
                advice,
            )
        ]
    if need > WATCHES_WARN_SHARE * limit:
        return [
            Finding(
                "inotify watches",
                Level.WARN,
                detail + ": other programs of this user take watches too",
                advice,
            )
        ]
    return [Finding("inotify watches", Level.OK, detail)]


# --- the roots -------------------------------------------------------------------------
def _roots(repos: list[Repository], system: System) -> list[Finding]:
    from fsledger.roots import root_present

    out = []
    for repo in repos:
        check = f"root {repo.name}"
        shown = show_path(repo.root)
        if not root_present(repo.root, repo.root_dev):
            out.append(
                Finding(
                    check,
                    Level.FAIL,
                    f"{shown} is missing, not a directory or not the device it was on "
                    "(not mounted?)",
                    "mount it again (its records are kept meanwhile), or remove the "
                    f"repository: fsledger repo remove {repo.name}",
                )
            )
            continue
        fs_name = _fs_name(repo.root, system)
        network = _network_type(repo.root, system)
        if network is not None:
            out.append(
                Finding(
                    check,
                    Level.OK,
                    f"{shown} is on {fs_name or network}, a network filesystem: polled by "
                    "scans, since inotify does not see other clients' changes",
                )
            )
        else:
            out.append(Finding(check, Level.OK, f"{shown} is on {fs_name or 'a local fs'}"))
    return out


def _fs_name(root: bytes, system: System) -> str | None:
    """The type the mount table gives the filesystem holding ``root`` (``ext4``,
    ``nfs4``), or None when the table cannot be read."""
    from fsledger.mounts import read_mountinfo

    entries = read_mountinfo(system.mountinfo)
    if not entries:
        return None
    real = os.path.realpath(root)
    best = None
    for entry in entries:  # the last, longest match: later lines are mounts on top
        point = entry.mount_point.rstrip(b"/")
        if (real == point or real.startswith(point + b"/")) and (
            best is None or len(point) >= len(best.mount_point.rstrip(b"/"))
        ):
            best = entry
    return best.fs_type if best else None


def _network_type(root: bytes, system: System) -> str | None:
    """The network filesystem ``root`` is on (by ``statfs``, as the watcher decides), or
    None. A test's mount table names it instead."""
    if system.mountinfo is not None:
        name = _fs_name(root, system) or ""
        network = ("nfs", "cifs", "smb", "fuse")
        return name if name.startswith(network) else None
    from fsledger.watch.netfs import NETWORK_FS_TYPES, fs_type

    try:
        return NETWORK_FS_TYPES.get(fs_type(root))
    except OSError:
        return None
