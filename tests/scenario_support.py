"""The harness of the scenario, peer-scenario and model tests: one tree, checked live or offline.

A ``Scenario`` indexes a tree with one scan, then either

- ``live``: starts a ``Watcher`` in a process of its own (``watch_runner.py``; as root under
  ``setpriv`` without the capabilities that let root read through any mode, so ``chmod``
  means what it means for a user). No periodic reconciliation runs. ``check`` waits, with a
  deadline, until the ledger equals the oracle; or
- ``offline``: no watcher; ``check`` runs one scan (``ledger.scan``) and compares once.

Either way ``check`` then replays the change feed from its beginning and requires exactly
the ledger's paths, sizes and hashes: a consumer following the feed must end where the
ledger is. Filesystem helpers for what ``os`` does not offer directly (``renameat2``,
directories deeper than ``PATH_MAX``) live here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fsledger.feed import Cursor, Feed
from fsledger.ledger import Ledger
from fsledger.model import FeedEntry, Repository
from oracle import Files, oracle_files, replay_feed
from support import wait_for
from treeutil import describe_diff

MODES = ("live", "offline")
RUNNER = Path(__file__).with_name("watch_runner.py")
LIVE_TIMEOUT_S = 15.0
"""How long a live check waits for the ledger to reach the disk (a correct watcher needs
about its debounce, 0.5 s)."""

RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: bytes | str | Path, b: bytes | str | Path) -> None:
    """``renameat2(a, b, RENAME_EXCHANGE)``: swap two names atomically."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(os.fsencode(a)))


def unprivileged_prefix() -> list[str]:
    """Run a command without root's DAC bypass (nothing to add when not root)."""
    if os.geteuid() != 0:
        return []
    tool = shutil.which("setpriv")
    assert tool is not None, "as root the tests need setpriv (util-linux) to drop CAP_DAC_*"
    return [tool, "--bounding-set=-dac_override,-dac_read_search"]


# === deep trees through directory descriptors ============================================
def mkdirs_at(top: bytes | str | Path, names: Iterable[bytes]) -> list[bytes]:
    """Create the chain ``top/n1/n2/...`` one level at a time relative to descriptors (no
    path string beyond one name, so any depth works); returns the relative path of each
    level."""
    fd = os.open(os.fsencode(top), os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    made: list[bytes] = []
    try:
        for name in names:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            rel = rel + b"/" + name if rel else name
            made.append(rel)
    finally:
        os.close(fd)
    return made


def open_dir_at(top: bytes | str | Path, rel: bytes) -> int:
    """A descriptor of ``top/rel`` reached one component at a time (any depth)."""
    fd = os.open(os.fsencode(top), os.O_RDONLY | os.O_DIRECTORY)
    for name in [n for n in rel.split(b"/") if n]:
        try:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def write_at(top: bytes | str | Path, rel: bytes, data: bytes, append: bool = False) -> None:
    """Write a file at ``top/rel`` through a descriptor of its directory (any depth)."""
    parent, _, name = rel.rpartition(b"/")
    dfd = open_dir_at(top, parent)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(name, flags, 0o644, dir_fd=dfd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def unlink_at(top: bytes | str | Path, rel: bytes) -> None:
    parent, _, name = rel.rpartition(b"/")
    dfd = open_dir_at(top, parent)
    try:
        os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


# === the watcher's process ===============================================================
class WatcherProcess:
    """``watch_runner.py watch`` (or ``run``: the daemon's manager with its watcher) on one
    repository: started, awaited ready, stopped."""

    def __init__(
        self,
        store_url: str,
        repo: Repository,
        workdir: Path,
        env: dict[str, str] | None = None,
        command: str = "watch",
    ) -> None:
        self.log = workdir / f"applied-{repo.id.hex[:8]}.jsonl"
        self.err = workdir / f"runner-{repo.id.hex[:8]}.stderr"
        self.log.touch()
        full_env = runner_env(store_url, env)
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    *unprivileged_prefix(),
                    sys.executable,
                    str(RUNNER),
                    command,
                    str(repo.id),
                    str(self.log),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=full_env,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise AssertionError(f"the watcher did not start: {line!r}\n{self.stderr_tail()}")

    def applied(self) -> list[dict[str, Any]]:
        """Every change the watcher's writer applied, in order (paths as bytes)."""
        out = []
        for line in self.log.read_text().splitlines():
            row = json.loads(line)
            row["path"] = bytes.fromhex(row["path"])
            if row["old_path"] is not None:
                row["old_path"] = bytes.fromhex(row["old_path"])
            out.append(row)
        return out

    def stderr_tail(self, limit: int = 3000) -> str:
        try:
            return self.err.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def runner_env(store_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "FSLEDGER_DATABASE_URL": store_url,
        "RECONCILIATION_INTERVAL": "0",
        "RECONCILIATION_DAILY_AT": "off",
        "RECONCILIATION_MAX_CONCURRENCY": "2",
        "FSLEDGER_LOG_LEVEL": "WARNING",
        # Never "busy" (pressure cannot pass 100%): conftest.calm_machine, in this process.
        "FSLEDGER_SCHEDULE_BUSY_CPU_PRESSURE": "100",
        "FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE": "100",
        "PYTHONPATH": os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH", ""), str(RUNNER.parent)) if p
        ),
    }
    env.update(extra or {})
    return env


def run_unprivileged_scan(store_url: str, repo: Repository, workdir: Path) -> list[str]:
    """One reconciliation in a process without root's DAC bypass; returns its errors."""
    log = workdir / f"scan-{repo.id.hex[:8]}.jsonl"
    done = subprocess.run(
        [*unprivileged_prefix(), sys.executable, str(RUNNER), "scan", str(repo.id), str(log)],
        env=runner_env(store_url),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return list(json.loads(done.stdout.decode().splitlines()[-1])["errors"])


# === the scenario ========================================================================
def ledger_files(ledger: Ledger, repo: Repository) -> Files:
    return {r.path: (r.size, r.content_hash) for r in ledger.files(repo)}


def read_feed(ledger: Ledger, repo: Repository, after: int = 0) -> list[FeedEntry]:
    """The repository's change feed after sequence number ``after``, read as a consumer does
    (``Feed.read`` page by page)."""
    feed = Feed(ledger.store)
    cursor = None if after == 0 else Cursor(feed.head().feed_id, after)
    out: list[FeedEntry] = []
    while True:
        page = feed.read(cursor, 1000, repo.id)
        out.extend(page.entries)
        cursor = page.cursor
        if not page.has_more:
            return out


def show(path: bytes, limit: int = 120) -> str:
    text = os.fsdecode(path)
    return text if len(text) <= limit else f"{text[:40]}...({len(path)} bytes)...{text[-60:]}"


def diff(want: Files, got: Files) -> str:
    """``describe_diff`` with paths beyond 120 bytes shortened (deep trees stay readable)."""
    return describe_diff(
        {os.fsencode(show(k)): v for k, v in want.items()},
        {os.fsencode(show(k)): v for k, v in got.items()},
    )


def follow_identities(
    identity: dict[bytes, bytes], entries: Iterable[FeedEntry]
) -> dict[bytes, bytes]:
    """Which starting file each path holds after ``entries``, for a consumer following the
    feed: ``moved`` and ``dir_moved`` carry a file's identity along, ``modified`` keeps it,
    ``created`` starts a new one (not in the result), ``deleted`` ends one."""
    ids = dict(identity)
    for e in entries:
        kind = e.kind.value
        if kind in ("created", "deleted"):
            ids.pop(e.path, None)
        elif kind == "moved":
            assert e.old_path is not None
            was = ids.pop(e.old_path, None)
            ids.pop(e.path, None)
            if was is not None:
                ids[e.path] = was
        elif kind == "dir_moved":
            assert e.old_path is not None
            new_prefix, old_prefix = e.path + b"/", e.old_path + b"/"
            for p in [p for p in ids if p.startswith(new_prefix)]:
                del ids[p]
            for p in [p for p in ids if p.startswith(old_prefix)]:
                ids[new_prefix + p[len(old_prefix) :]] = ids.pop(p)
    return ids


def feed_rows(entries: Iterable[FeedEntry]) -> list[str]:
    """Feed entries as short readable lines, for assertion messages."""
    rows = []
    for e in entries:
        old = f" <- {show(e.old_path)}" if e.old_path is not None else ""
        rows.append(f"{e.kind.value} {show(e.path)}{old} size={e.size}")
    return rows


class Scenario:
    """One repository on ``tmp_path/tree`` (plus ``tmp_path/outside``), live or offline.

    Args:
        ledger: the test's ledger (its store is the one checked).
        store_url: the same store, for the watcher's process.
        tmp_path: where the tree, the outside directory and the logs go.
        mode: ``live`` or ``offline``.
        env: extra environment of the watcher's process (``FSLEDGER_HASH_ALGO``...).
    """

    def __init__(
        self,
        ledger: Ledger,
        store_url: str,
        tmp_path: Path,
        mode: str,
        env: dict[str, str] | None = None,
        name: str = "tree",
        algo: str = "blake3",
    ) -> None:
        assert mode in MODES
        self.ledger = ledger
        self.store_url = store_url
        self.tmp_path = tmp_path
        self.mode = mode
        self.env = env
        self.algo = algo
        self.unprivileged_scans = False
        """Offline checks scan in a process without root's DAC bypass (``chmod`` tests)."""
        self.daemon = False
        """Live: run the daemon's ``SyncManager`` (periodic reconciliation off) around the
        watcher, for what the manager owns (a root that goes away and comes back)."""
        self.root = tmp_path / name
        self.outside = tmp_path / f"{name}-outside"
        self.root.mkdir(exist_ok=True)  # two scenarios may check one tree
        self.outside.mkdir(exist_ok=True)
        self.repo: Repository | None = None
        self.watcher: WatcherProcess | None = None
        self.seq0 = 0

    @property
    def live(self) -> bool:
        return self.mode == "live"

    def p(self, rel: str | bytes) -> Path:
        return self.root / os.fsdecode(rel)

    def start(self, populate: Callable[[Path, Path], None] | None = None) -> Repository:
        """Build the initial tree, index it with one scan (checked), start the watcher if
        live."""
        if populate is not None:
            populate(self.root, self.outside)
        repo = self.ledger.add_repository(os.fsencode(self.root))
        self.ledger.scan(repo)
        self.repo = self.ledger.store.get_repository(repo.id)
        assert self.repo is not None
        want = oracle_files(self.root, algo=self.algo)
        got = ledger_files(self.ledger, self.repo)
        assert got == want, f"the initial scan is not exact: {diff(want, got)}"
        self.seq0 = self.ledger.store.latest_seq()
        if self.live:
            command = "run" if self.daemon else "watch"
            self.watcher = WatcherProcess(
                self.store_url, self.repo, self.tmp_path, self.env, command
            )
        return self.repo

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def files(self) -> Files:
        assert self.repo is not None
        return ledger_files(self.ledger, self.repo)

    def feed(self, after: int | None = None) -> list[FeedEntry]:
        """The feed entries since the scenario's operations began (or after ``after``)."""
        assert self.repo is not None
        return read_feed(self.ledger, self.repo, self.seq0 if after is None else after)

    def check(self, step: str = "") -> Files:
        """Ledger == oracle (live: wait for it; offline: after one scan), then the feed
        replayed from its beginning == the ledger. Returns the oracle's files."""
        assert self.repo is not None
        want = oracle_files(self.root)
        where = f"[{self.mode}{' ' + step if step else ''}]"
        if self.live:
            assert self.watcher is not None
            watcher = self.watcher

            def details() -> str:
                got = self.files()
                return (
                    f"{where} ledger != disk: {diff(want, got)}"
                    f"\n{self.diff_details(want, got)}\nfeed since start:\n  "
                    + "\n  ".join(feed_rows(self.feed())[-30:])
                    + f"\nwatcher stderr:\n{watcher.stderr_tail(1500)}"
                )

            wait_for(
                f"{where} the ledger to equal the disk",
                lambda: self.files() == want,
                LIVE_TIMEOUT_S,
                detail=details,
            )
        else:
            self.scan()
            got = self.files()
            assert got == want, (
                f"{where} ledger != disk after a scan: {diff(want, got)}"
                f"\n{self.diff_details(want, got)}\nfeed since start:\n  "
                + "\n  ".join(feed_rows(self.feed())[-30:])
            )
        self.check_feed(where)
        return want

    def check_moves(self, moves: Iterable[tuple[bytes, bytes]], where: str = "") -> None:
        """Every ``(old, new)``: the file that was at ``old`` when the operations began is
        at ``new`` for a consumer following the feed; it got there through ``moved`` /
        ``dir_moved`` entries (and ``modified``, which keeps a file's identity), never as a
        deletion and a creation."""
        assert self.repo is not None
        start = read_feed(self.ledger, self.repo, 0)
        before = [e for e in start if e.seq <= self.seq0]
        identity = {p: p for p in replay_feed(before)}
        identity = follow_identities(identity, self.feed())
        wrong = {
            show(old): show(identity[new]) if new in identity else "(created anew)"
            for old, new in moves
            if identity.get(new) != old
        }
        assert not wrong, (
            f"[{self.mode}{' ' + where if where else ''}] files that moved did not reach the "
            f"feed as moves (where each came from, for a feed consumer): {wrong}\nfeed since "
            "start:\n  " + "\n  ".join(feed_rows(self.feed())[-40:])
        )

    def scan(self) -> list[str]:
        """One reconciliation (offline tier); returns its errors."""
        assert self.repo is not None
        if self.unprivileged_scans:
            return run_unprivileged_scan(self.store_url, self.repo, self.tmp_path)
        return list(self.ledger.scan(self.repo).errors)

    def check_feed(self, where: str = "") -> None:
        """Replaying the whole feed (from seq 0) gives exactly the ledger."""
        assert self.repo is not None
        entries = read_feed(self.ledger, self.repo, 0)
        replayed = replay_feed(entries)
        got = self.files()
        assert replayed == got, (
            f"{where} feed replayed from seq 0 != ledger: {diff(got, replayed)} "
            f"(missing/extra/wrong are the replay's)\n{self.diff_details(got, replayed)}"
            "\nfeed since start:\n  " + "\n  ".join(feed_rows(self.feed())[-30:])
        )

    @staticmethod
    def diff_details(want: Files, got: Files, limit: int = 6) -> str:
        lines = []
        for p in sorted(set(want) | set(got))[:2000]:
            if want.get(p) != got.get(p):
                w, g = want.get(p), got.get(p)
                lines.append(
                    f"  {show(p)}: want {w[0] if w else None}/{(w[1] or '')[:8] if w else ''}"
                    f" got {g[0] if g else None}/{(g[1] or '')[:8] if g else ''}"
                )
                if len(lines) >= limit:
                    break
        return "\n".join(lines)
