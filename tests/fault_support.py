"""Helpers for the fault suite (``test_faults.py``): an independent oracle of the disk, the
real ``fsledger`` command as a subprocess, a daemon handle, a tree mutator, and a record of
the figures each fault produced.

The oracle (``disk_files``) shares no code with fsledger: ``os.walk`` over bytes, its own
copy of the ignore rules, ``blake3`` directly. A bug in fsledger's walker or ignore rules
cannot hide itself by agreeing with itself.

``flaky_main`` is an entry point that runs fsledger's CLI with a directory that fails
(``ENOTCONN``, as a dead network mount does) while a flag file exists: the fault is
injected at the operating-system boundary of a real process, not inside fsledger.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Set
from pathlib import Path
from typing import IO, Any
from uuid import UUID

import httpx
import psycopg

from fsledger.model import ChangeKind, OperationStatus, SyncOperation
from fsledger.store import Store
from support import wait_for
from treeutil import Files, blake3_of_file

FSLEDGER = [str(Path(sys.executable).with_name("fsledger"))]
if not os.path.exists(FSLEDGER[0]):  # pragma: no cover - an environment without the script
    FSLEDGER = [sys.executable, "-m", "fsledger.cli"]


# --- the oracle -------------------------------------------------------------------------------
_blake3_of = blake3_of_file


def store_files(store: Store, repo_id: UUID) -> Files:
    """What the ledger holds for a repository, read through an open store."""
    return {r.path: (r.size, r.content_hash) for r in store.iter_records(repo_id)}


def cli_files(env: Mapping[str, str], repo: str) -> Files:
    """What ``fsledger files REPO --json`` prints, as a real user (or pipeline) reads it."""
    done = cli(env, "files", repo, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {base64.b64decode(r["path_b64"]): (r["size"], r["hash"]) for r in rows}


# --- the command line -------------------------------------------------------------------------
def cli(env: Mapping[str, str], *args: str | bytes, timeout: float = 300.0) -> Any:
    """Run ``fsledger ARGS`` to completion; returns the ``CompletedProcess`` (text output)."""
    return subprocess.run(
        [*FSLEDGER, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
    )


def base_env(url: str, **extra: str) -> dict[str, str]:
    """The environment of an fsledger subprocess on the database ``url``: quick debounce, no
    periodic reconciliation (the tests decide when a scan runs), two hashing workers, and
    no waiting on the machine's CPU or I/O pressure (``conftest.calm_machine``'s rule, for
    the daemon in its own process: a shared, busy machine would hold its scheduled runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSLEDGER_", "RECONCIL"))}
    env.update(
        FSLEDGER_DATABASE_URL=url,
        RECONCILIATION_MAX_CONCURRENCY="2",
        RECONCILIATION_INTERVAL="0",
        FILE_WATCHER_DEBOUNCE="100ms",
        FSLEDGER_SCHEDULE_BUSY_CPU_PRESSURE="100",
        FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE="100",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (a subprocess started with ``start_new_session``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (after the command name), fields[3] the session id.
        if int(fields[3]) == sid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``fsledger run`` as a real process in its own session, its log in a file.

    Args:
        env: its environment (see ``base_env``).
        log_path: where its stderr goes (a file, not a pipe: a full pipe would stall it).
        args: extra ``run`` options.
        prefix: a command that execs the rest (``unshare -m ...``), or the entry point to run
            instead of ``fsledger`` (``[python, -c, ...]``).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: tuple[str, ...] = ("--no-http",),
        prefix: list[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.args = args
        self.prefix = prefix or []
        self.command = command or FSLEDGER
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    def start(self) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command, "run", *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What this run has logged so far."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_start)
            return fh.read().decode("utf-8", "replace")

    def wait_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> None:
        """Wait until ``pattern`` (a regular expression) appears ``count`` times in the log."""

        def seen() -> bool:
            assert self.alive(), f"fsledger run exited early:\n{self.log()[-3000:]}"
            return len(re.findall(pattern, self.log())) >= count

        wait_for(f"{pattern!r} in the daemon's log", seen, timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """``kill -9``, and wait until every process of its session is gone."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_for("the killed daemon's processes to end", lambda: not session_pids(sid), 30)
        self._close_log()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; returns the exit code (kills it if it does not stop in time)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"fsledger run ignored SIGTERM:\n{self.log()[-3000:]}"
                ) from None
        self._close_log()
        return int(self.proc.returncode)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_kib(self) -> int:
        """Resident set size of the daemon process (VmRSS), in KiB."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")


# --- the store, read back ---------------------------------------------------------------------
def operations(store: Store, repo_id: UUID | None = None) -> list[SyncOperation]:
    return store.recent_operations(repo_id, 10_000)


def completed_scans(store: Store, repo_id: UUID) -> int:
    """Reconciliations (startup or not) that completed."""
    return sum(
        1
        for o in operations(store, repo_id)
        if o.status is OperationStatus.COMPLETED and o.operation_type.value != "realtime"
    )


def feed_kinds(
    store: Store, repo_id: UUID, after_seq: int
) -> list[tuple[ChangeKind, bytes, bytes | None]]:
    """The change feed of a repository after ``after_seq``: (kind, path, old path)."""
    return [(e.kind, e.path, e.old_path) for e in store.changes_since(after_seq, 10**6, repo_id)]


# --- a workload -------------------------------------------------------------------------------
class Mutator(threading.Thread):
    """Keeps changing a tree until stopped: creates, appends, overwrites, deletes, renames
    files and directories, and writes ignored names. Paced at ``rate`` operations a second
    (0: as fast as it can). ``seed`` makes the sequence repeatable."""

    def __init__(self, root: Path, seed: int, rate: float = 0.0, max_files: int = 100_000) -> None:
        super().__init__(name="mutator", daemon=True)
        self.root = root
        self.rng = random.Random(seed)
        self.rate = rate
        self.max_files = max_files
        self.ops = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._serial = 0
        self._known: list[Path] | None = None
        self.tag = f"{seed:x}"
        """Part of every name this mutator makes: two mutators never collide."""

    def stop(self) -> int:
        """Stop, and return the number of operations done."""
        self._stop_event.set()
        self.join(60)
        if self.error is not None:
            raise AssertionError(f"the mutator failed: {self.error!r}") from self.error
        return self.ops

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.step()
                self.ops += 1
                if self.rate and self._stop_event.wait(1.0 / self.rate):
                    break
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _files(self) -> list[Path]:
        # Listed once, then kept up to date by the steps (a full listing per step would make
        # the workload crawl on a big tree); a directory rename lists again.
        if self._known is None:
            self._known = [p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink()]
        return self._known

    def _fresh_name(self, suffix: str = ".jpg") -> str:
        self._serial += 1
        return f"m{self.tag}-{self._serial:06}{suffix}"

    def step(self) -> None:
        rng = self.rng
        d = self.root / f"d{rng.randrange(6)}" / f"s{rng.randrange(3)}"
        roll = rng.random()
        files = self._files()
        try:
            if roll < 0.35 or not files:
                d.mkdir(parents=True, exist_ok=True)
                path = d / self._fresh_name()
                path.write_bytes(os.urandom(rng.randrange(1, 20_000)))
                files.append(path)
            elif roll < 0.5:
                with open(rng.choice(files), "r+b") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.write(os.urandom(rng.randrange(1, 5000)))
            elif roll < 0.6:
                with open(rng.choice(files), "r+b") as fh:
                    fh.truncate(0)
                    fh.write(os.urandom(rng.randrange(0, 8000)))
            elif roll < 0.7 or len(files) > self.max_files:
                path = files.pop(rng.randrange(len(files)))
                path.unlink()
            elif roll < 0.85:
                d.mkdir(parents=True, exist_ok=True)
                i = rng.randrange(len(files))
                target = d / self._fresh_name()
                os.rename(files[i], target)
                files[i] = target
            elif roll < 0.93:
                # A directory renamed (with what it holds), or a new one moved in whole.
                src = self.root / f"d{rng.randrange(6)}" / f"s{rng.randrange(3)}"
                dst = self.root / f"d{rng.randrange(6)}" / f"r{self.tag}-{self._serial}"
                self._serial += 1
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    os.rename(src, dst)
                else:
                    staging = self.root / ".staging" / f"t{self.tag}-{self._serial}"
                    staging.mkdir(parents=True)
                    for i in range(3):
                        (staging / f"in{i}.jpg").write_bytes(os.urandom(300))
                    os.rename(staging, dst)
                self._known = None
            else:
                d.mkdir(parents=True, exist_ok=True)
                junk = rng.choice([".DS_Store", "x.tmp", "y.swp", "z~", ".hidden.jpg"])
                (d / junk).write_bytes(b"ignored")
        except (FileNotFoundError, NotADirectoryError):
            self._known = None  # a path went stale (renamed with its directory): list again


def make_tree(root: Path, files: int, dirs: int = 40, size: int = 2000, seed: int = 1) -> None:
    """``files`` files of about ``size`` bytes of random content in ``dirs`` directories."""
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % 6}" / f"s{i % 3}" / f"x{i % dirs}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06}.jpg").write_bytes(rng.randbytes(size))


# --- the daemon, the CLI and the store, as the fault tests use them --------------------------
def add_repo(env: dict[str, str], root: Path, *extra: str) -> UUID:
    done = cli(env, "repo", "add", str(root), "--json", *extra)
    assert done.returncode == 0, done.stderr
    return UUID(json.loads(done.stdout)["id"])


def cli_ops(env: dict[str, str]) -> list[dict[str, object]]:
    done = cli(env, "ops", "--json", "--limit", "10000")
    assert done.returncode == 0, done.stderr
    ops: list[dict[str, object]] = json.loads(done.stdout)
    return ops


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


def scan_running(store: Store, pid: int) -> bool:
    return any(owner.endswith(f":{pid}") for _op, owner in store.running_operations())


def start_daemon(
    env: dict[str, str], log: Path, store: Store, repo_id: UUID, args: tuple[str, ...] = ()
) -> Daemon:
    """Start ``fsledger run`` and wait until its startup reconciliation completed and its
    watcher runs."""
    before = completed_scans(store, repo_id)
    daemon = Daemon(env, log, args=args or ("--no-http",)).start()
    daemon.wait_log(rf"File watcher started for repository {repo_id}")
    wait_for(
        "the startup reconciliation",
        lambda: daemon.alive() and completed_scans(store, repo_id) > before,
        120,
    )
    return daemon


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        with open(f"/proc/{pid}/stat", "rb") as fh:
            pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
    return pids


def other_pytest_runs() -> list[str]:
    """pytest processes other than this run (and what started it)."""
    mine = _ancestors()
    done = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True)
    return [
        line
        for line in done.stdout.splitlines()
        if line.split(maxsplit=1)[0].isdigit() and int(line.split(maxsplit=1)[0]) not in mine
    ]


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    args = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    if action == "stop":
        args += ["-m", "fast"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args}: {done.stderr}"


def pg_ready(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def http_status(port: int, path: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60).status_code
    except httpx.TransportError:
        return 0


_LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class LockHolder:
    """A process holding SQLite's write lock (``BEGIN EXCLUSIVE``) until released."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LOCK_HOLDER, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_locked(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(30) == 0


# clock_nanosleep and nanosleep: x86_64, aarch64 (for a kernel that shows no wait channel).
_SLEEP_SYSCALLS = {"230", "35", "115", "101"}


def sleeping(pid: int) -> bool:
    """Whether a thread of process ``pid`` sleeps in ``nanosleep`` right now.

    SQLite's busy handler sleeps between its tries at a lock another process holds, and an
    ``fsledger scan`` sleeps nowhere else (its other threads wait on futexes): for it, this
    means "waiting for the database lock".
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as fh:
                wchan = fh.read()
            with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
                syscall = fh.read().split(maxsplit=1)[0] if wchan in ("", "0") else ""
        except (OSError, IndexError):
            continue
        if "nanosleep" in wchan or syscall in _SLEEP_SYSCALLS:
            return True
    return False


def sqlite_running_ops(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM sync_operations WHERE status = 'running'"
            ).fetchone()[0]
        )
    finally:
        conn.close()


def cli_status(env: dict[str, str], repo: str) -> dict[str, object]:
    done = cli(env, "status", repo, "--json")
    assert done.returncode == 0, done.stderr
    status: dict[str, object] = json.loads(done.stdout)
    return status


def wait_state(env: dict[str, str], repo: str, state: str, timeout: float = 60.0) -> float:
    """Wait until ``fsledger status --json`` shows the repository ``state``; returns seconds."""
    t0 = time.monotonic()
    wait_for(
        f"the repository to be {state}", lambda: cli_status(env, repo)["state"] == state, timeout
    )
    return time.monotonic() - t0


def assert_no_churn(
    store: Store, repo_id: UUID, after_seq: int, kept: set[bytes], allowed: Set[bytes] = frozenset()
) -> list[str]:
    """No file that was there before the fault and after it was deleted or re-added in the
    feed (no re-add storm); returns the feed's kinds for the figures."""
    entries = feed_kinds(store, repo_id, after_seq)
    churn = [
        (kind.value, path)
        for kind, path, _old in entries
        if kind.value in ("deleted", "created") and path in kept and path not in allowed
    ]
    assert churn == [], f"files deleted or re-added around the fault: {churn[:10]}"
    return sorted({kind.value for kind, _p, _o in entries})


def can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or not os.path.isdir("/dev/shm"):
        return False
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class Appender:
    """Keeps appending to big files (so they change while they are hashed)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.appends = 0

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with open(self.files[self.appends % len(self.files)], "ab") as fh:
                fh.write(os.urandom(4096))
            self.appends += 1

    def __enter__(self) -> Appender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


def mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


class FeedFollower:
    """Follows ``GET /api/v1/changes`` as a pipeline would and replays it into a file map."""

    def __init__(self, port: int) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.cursor: str | None = None
        self.files: dict[bytes, tuple[int, str | None]] = {}
        self.entries = 0

    def poll(self) -> None:
        while True:
            params: dict[str, str | int] = {"limit": 1000}
            if self.cursor:
                params["since"] = self.cursor
            r = self.http.get("/api/v1/changes", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            for c in page["changes"]:
                self.entries += 1
                path = base64.b64decode(c["path_b64"])
                old = base64.b64decode(c["old_path_b64"]) if "old_path_b64" in c else None
                kind = c["kind"]
                if kind in ("created", "modified"):
                    self.files[path] = (c["size"], c["hash"])
                elif kind == "deleted":
                    self.files.pop(path, None)
                elif kind == "moved" and old is not None:
                    self.files.pop(old, None)
                    self.files[path] = (c["size"], c["hash"])
                elif kind == "dir_moved" and old is not None:
                    for p in [p for p in self.files if p.startswith(old + b"/")]:
                        self.files[path + p[len(old) :]] = self.files.pop(p)
            self.cursor = page["cursor"]
            if not page["has_more"]:
                return

    def close(self) -> None:
        self.http.close()


# --- figures ----------------------------------------------------------------------------------
def record_figure(fault: str, **figures: object) -> None:
    """Print what a fault did (``pytest -rP`` shows it) and, with ``FSLEDGER_FAULT_FIGURES=PATH``,
    append it as a JSON line there; ``docs/reliability.md`` quotes these figures."""
    line = {"fault": fault, **figures}
    print("FAULT-FIGURES " + json.dumps(line, default=str))
    path = os.environ.get("FSLEDGER_FAULT_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(line, default=str) + "\n")


# --- a flaky directory, injected at the OS boundary of a real fsledger process -----------------
FLAKY_DIR = "FSLEDGER_TEST_FLAKY_DIR"
FLAKY_FLAG = "FSLEDGER_TEST_FLAKY_FLAG"


def flaky_command() -> list[str]:
    """The command that runs ``flaky_main`` (put ``run ...`` or ``scan ...`` after it)."""
    return [sys.executable, "-c", "import fault_support; fault_support.flaky_main()"]


def flaky_main() -> None:
    """fsledger's CLI, in a process where every path at or below ``$FSLEDGER_TEST_FLAKY_DIR``
    fails with ENOTCONN (a dead network mount) while the file ``$FSLEDGER_TEST_FLAKY_FLAG``
    exists. The ``os`` functions themselves are replaced, so every module of the process
    (walker, reconciler, writer, watcher) meets the same failing directory."""
    target = os.fsencode(os.environ[FLAKY_DIR])
    flag = os.environ[FLAKY_FLAG]
    real = {name: getattr(os, name) for name in ("scandir", "lstat", "stat", "listdir", "open")}

    def failing(path: object) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return False  # a descriptor
        raw = os.fsencode(path)
        if not (raw == target or raw.startswith(target + b"/")):
            return False
        try:
            real["stat"](flag)
        except FileNotFoundError:
            return False
        return True

    def wrap(name: str) -> Callable[..., Any]:
        fn = real[name]

        def wrapper(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if failing(path):
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN), os.fsdecode(path))
            return fn(path, *args, **kwargs)

        return wrapper

    for name in real:
        setattr(os, name, wrap(name))
    from fsledger.cli import main

    main(prog_name="fsledger")


def iter_lines(path: Path) -> Iterator[str]:
    with open(path, errors="replace") as fh:
        yield from fh
