"""The fault suite: what goes wrong on a real NAS, done for real, with nothing lost.

Every test drives real processes (``fsledger scan``, ``fsledger run``), real temporary trees
and, where the fault concerns the database, the real PostgreSQL server; each ends by
comparing the ledger with an independent walk of the disk (``fault_support.disk_files``)
and fails on any difference. Figures (time to recover, records lost) are printed as
``FAULT-FIGURES`` lines (``pytest -rP``) and appended to ``$FSLEDGER_FAULT_FIGURES`` when
set; ``docs/reliability.md`` tabulates them.

Randomness (kill points, workloads) comes from one seed, printed by each test and taken
from ``FSLEDGER_FAULT_SEED`` when set, so a failure can be replayed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fsledger.reconcile
from fault_support import (
    FLAKY_DIR,
    FLAKY_FLAG,
    FSLEDGER,
    Appender,
    Daemon,
    FeedFollower,
    LockHolder,
    Mutator,
    add_repo,
    assert_no_churn,
    base_env,
    can_unshare_mounts,
    cli,
    cli_files,
    cli_ops,
    cli_status,
    completed_scans,
    flaky_command,
    free_port,
    http_status,
    make_tree,
    mount_tmpfs,
    no_traceback,
    other_pytest_runs,
    pg_ctl,
    pg_ready,
    record_figure,
    scan_running,
    session_pids,
    sleeping,
    sqlite_running_ops,
    start_daemon,
    store_files,
    wait_state,
)
from fsledger.api.metrics import Metrics
from fsledger.cli import main
from fsledger.config import Settings
from fsledger.errors import ConfigError
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import Change, ChangeKind
from fsledger.store import Store, open_store
from fsledger.walk import FileEntry, walk
from fsledger.watch import InotifyBackend, Watcher, WatchLimitReached
from support import assert_exact, wait_exact, wait_for
from treeutil import disk_files

# The whole fault suite is `slow`: real daemons killed, stopped, starved and restarted, each
# test tens of seconds. `make test` runs it; `make test-fast` does not.
pytestmark = [
    pytest.mark.skipif(
        not os.path.exists("/proc/sys/fs/inotify"), reason="the fault suite drives Linux processes"
    ),
    pytest.mark.slow,
]


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("FSLEDGER_FAULT_SEED") or random.randrange(1 << 30))
    print(f"FSLEDGER_FAULT_SEED={value}")
    return value


# === kill -9 ===================================================================================
def test_kill_9_of_a_scan_at_random_points(
    store_url: str, store: Store, tmp_path: Path, seed: int
) -> None:
    """``fsledger scan`` killed with SIGKILL during the initial index (while hashing, between
    and inside batches): the next scan recovers exactly, ``run --once`` marks every killed
    operation interrupted, and no process of a killed scan is left behind."""
    rng = random.Random(seed)
    root = tmp_path / "photos"
    # More than one initial batch (5000 changes per transaction), plus big files to hash.
    make_tree(root, 12_000, size=1500, seed=seed)
    for i in range(12):
        (root / "videos").mkdir(exist_ok=True)
        (root / "videos" / f"v{i}.mp4").write_bytes(rng.randbytes(4 << 20))
    env = base_env(store_url)
    repo_id = add_repo(env, root, "--no-scan")

    kills: list[tuple[str, str, int]] = []
    plans = ["hashing", "mid-index", "random", "random"]
    for round_no, plan in enumerate(plans):
        before = store.count_records(repo_id)
        proc = subprocess.Popen(
            [*FSLEDGER, "scan"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:

            def started(p: subprocess.Popen[bytes] = proc) -> bool:
                return scan_running(store, p.pid) or p.poll() is not None

            wait_for("the scan to start", started, 60)
            if plan == "hashing":
                pass  # at once: the walk and the first hashes, nothing committed yet
            elif plan == "mid-index":
                target = before + rng.randrange(1, 6000)

                def committed(t: int = target, p: subprocess.Popen[bytes] = proc) -> bool:
                    return store.count_records(repo_id) >= t or p.poll() is not None

                wait_for("records to be committed", committed, 120)
            else:
                # Not a wait for anything: the random moment of the kill is the fault itself.
                time.sleep(rng.uniform(0.0, 0.8))
        finally:
            # poll() reaps a scan that already finished, and a reaped pid must not be killed
            # (it could be another process's by now); a live or zombie one is.
            was_running = proc.poll() is None
            if was_running:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        sid = proc.pid

        def ended(s: int = sid) -> bool:
            return not session_pids(s)

        wait_for("the killed scan's processes to end", ended, 30)
        kills.append(
            (plan, "killed" if was_running else "had finished", store.count_records(repo_id))
        )
        # Work for the next scan, in batches of 100: files deleted, added and rewritten.
        jpgs = sorted(root.rglob("*.jpg"))
        for victim in rng.sample(jpgs, 50):
            victim.unlink()
        for path in rng.sample(jpgs, 600):
            if path.exists():
                path.write_bytes(rng.randbytes(900))
        for i in range(100):
            (root / "d1" / f"new{round_no}-{i}.jpg").write_bytes(rng.randbytes(700))
        (root / "videos" / "v0.mp4").write_bytes(rng.randbytes(1 << 20))

    running = [o for o in cli_ops(env) if o["status"] == "running"]
    assert running, "the killed scans should have left their operations running"

    t0 = time.monotonic()
    done = cli(env, "scan", "--json")
    recover_s = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    want = disk_files(root)
    got = cli_files(env, "photos")
    assert got == want
    assert_exact(store, repo_id, root)

    once = cli(env, "run", "--once")
    assert once.returncode == 0, once.stderr
    ops = cli_ops(env)
    assert [o for o in ops if o["status"] == "running"] == []
    killed = {o["id"] for o in running}
    for op in ops:
        if op["id"] in killed:
            assert op["status"] == "failed"
            assert "interrupted" in str(op["error_message"])
    record_figure(
        "kill -9 of fsledger scan",
        backend=store_url.split(":")[0],
        files=len(want),
        kills=kills,
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


def test_kill_9_of_the_daemon_while_files_change(
    store_url: str, store: Store, tmp_path: Path, seed: int
) -> None:
    """``fsledger run`` (watcher on) killed with SIGKILL at a random moment while files are
    created, rewritten, renamed and deleted, three times over: each restart's startup
    reconciliation makes the ledger equal the disk, and the dead run's operations are
    marked interrupted."""
    rng = random.Random(seed)
    root = tmp_path / "photos"
    make_tree(root, 1500, size=1200, seed=seed)
    env = base_env(store_url)
    repo_id = add_repo(env, root)
    log = tmp_path / "run.log"
    daemon = start_daemon(env, log, store, repo_id)
    recoveries = []
    try:
        for cycle in range(3):
            mutator = Mutator(root, seed + cycle)
            mutator.start()
            # The random moment of the kill is the fault itself, not a wait for anything.
            time.sleep(rng.uniform(0.2, 2.0))
            dead = daemon.pid
            daemon.kill()
            time.sleep(rng.uniform(0.0, 0.5))  # changes while nobody watches
            ops_done = mutator.stop()
            t0 = time.monotonic()
            daemon = Daemon(env, log).start()
            wait_exact(store, repo_id, root, 120)
            recoveries.append(round(time.monotonic() - t0, 2))
            assert daemon.alive()
            left = [op for op, owner in store.running_operations() if owner.endswith(f":{dead}")]
            assert left == [], f"operations of the killed run still 'running': {left}"
            assert ops_done > 0
        # Live again after the last restart: a new file arrives through the watcher.
        daemon.wait_log(rf"File watcher started for repository {repo_id}")
        (root / "after-restart.jpg").write_bytes(b"live")
        wait_exact(store, repo_id, root, 30)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()[-3000:]
    assert cli_files(env, "photos") == disk_files(root)
    no_traceback(Path(log).read_text(errors="replace"))
    record_figure(
        "kill -9 of fsledger run",
        backend=store_url.split(":")[0],
        cycles=len(recoveries),
        records_lost=0,
        recover_s=recoveries,
    )


# === PostgreSQL stopped and restarted under the daemon =========================================


@pytest.mark.pg_restart
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_postgres_stopped_and_restarted_under_the_daemon(
    store_url: str, store: Store, tmp_path: Path, pg_admin_url: str
) -> None:
    """The PostgreSQL server stops under a running daemon and comes back: the daemon stays up,
    retries with backoff, and every change made while the database was down reaches it."""
    if not (os.path.isdir("/etc/postgresql") and os.geteuid() == 0):
        pytest.skip("needs root and a local PostgreSQL cluster (pg_ctlcluster)")
    others = other_pytest_runs()
    if others and os.environ.get("CI") != "true":
        pytest.skip(f"other test runs use this PostgreSQL server right now: {others}")
    root = tmp_path / "photos"
    make_tree(root, 300, size=800)
    # A password in the URL (the test server trusts local connections and never asks for
    # it): an outage makes many errors, and none of them may show it.
    password = "Outage-S3cret-Pw"
    env = base_env(
        store_url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    )
    repo_id = add_repo(env, root)
    port = free_port()
    log = tmp_path / "run.log"
    daemon = start_daemon(env, log, store, repo_id, args=("--listen", f"127.0.0.1:{port}"))
    stopped_at = started_at = health_s = recover_s = 0.0
    try:
        (root / "before.jpg").write_bytes(b"live before the outage")
        wait_exact(store, repo_id, root, 30)
        try:
            pg_ctl("stop")
            stopped_at = time.monotonic()
            # Changes while the database is away: created, rewritten, deleted, renamed.
            for i in range(40):
                (root / "d2" / f"while-down-{i}.jpg").write_bytes(os.urandom(500))
            for path in sorted((root / "d0").rglob("*.jpg"))[:15]:
                path.write_bytes(os.urandom(300))
            for path in sorted((root / "d1").rglob("*.jpg"))[:10]:
                path.unlink()
            os.rename(root / "d3", root / "d3-renamed")
            os.rename(root / "before.jpg", root / "d2" / "before-renamed.jpg")
            # The daemon notices and backs off (several attempts, growing delays).
            daemon.wait_log(r"retrying in", timeout=60, count=2)
            assert daemon.alive()
            t_health = time.monotonic()
            assert http_status(port, "/healthz") == 503
            health_s = time.monotonic() - t_health
        finally:
            started_at = time.monotonic()
            pg_ctl("start")
            wait_for("PostgreSQL to accept connections", lambda: pg_ready(pg_admin_url), 60)
        wait_exact(store, repo_id, root, 120, outage=True)
        # From "pg_ctlcluster start" to the ledger equal to the disk.
        recover_s = time.monotonic() - started_at
        assert daemon.alive()
        assert http_status(port, "/healthz") == 200
        # Still live afterwards.
        (root / "after.jpg").write_bytes(b"live after the outage")
        wait_exact(store, repo_id, root, 60)
    finally:
        if not pg_ready(pg_admin_url):
            pg_ctl("start")
        code = daemon.stop()
    assert code == 0, daemon.log()[-3000:]
    assert cli_files(env, "photos") == disk_files(root)
    assert password not in daemon.log()
    # (Not asserted: the watcher logs a LeaseLost traceback when the outage ends its lease;
    # harmless, the work is redone by the reconciliation that follows. See the report.)
    tracebacks = daemon.log().count("Traceback")
    retries = daemon.log().count("retrying in")
    record_figure(
        "PostgreSQL stopped and restarted under fsledger run",
        down_s=round(started_at - stopped_at, 1),
        retries_logged=retries,
        tracebacks_in_log=tracebacks,
        healthz_503_after_s=round(health_s, 1),
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


# === SQLite: another process holds the write lock ==============================================


def test_sqlite_write_lock_held_by_another_process(tmp_path: Path, seed: int) -> None:
    """Another process holds SQLite's write lock: a scan waits for it (before it starts, and
    between batches) and completes exactly; past the store's 30 s wait it fails with one clear
    line and exit code 1, and the next scan is exact."""
    rng = random.Random(seed)
    db = tmp_path / "ledger.db"
    env = base_env("sqlite://" + str(db))
    root = tmp_path / "photos"
    make_tree(root, 3000, size=600, seed=seed)
    repo_id = add_repo(env, root, "--no-scan")
    figures: dict[str, object] = {}

    # 1. Held when the scan starts, released once the scan waits for it.
    holder = LockHolder(db)
    holder.wait_locked()
    t0 = time.monotonic()
    scan = subprocess.Popen(
        [*FSLEDGER, "scan"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    # Released once the scan is seen waiting for it (in SQLite's busy handler), not after a
    # fixed time: the scan must have met the lock, and waited instead of failing.
    wait_for(
        "the scan to wait for the lock", lambda: scan.poll() is not None or sleeping(scan.pid), 60
    )
    assert scan.poll() is None, "the scan should be waiting for the lock"
    figures["waited_at_start_s"] = round(time.monotonic() - t0, 2)
    holder.release()
    _, err = scan.communicate(timeout=120)
    assert scan.returncode == 0, err
    figures["wait_at_start_s"] = round(time.monotonic() - t0, 1)
    store = open_store("sqlite://" + str(db))
    try:
        assert_exact(store, repo_id, root)

        # 2. Taken between two batches of a running scan.
        for path in rng.sample(sorted(root.rglob("*.jpg")), 2500):
            path.write_bytes(rng.randbytes(500))
        t0 = time.monotonic()
        scan = subprocess.Popen(
            [*FSLEDGER, "scan"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        wait_for("the scan to run", lambda: sqlite_running_ops(db) > 0, 60)
        holder = LockHolder(db)
        holder.wait_locked()
        mid_scan = scan.poll() is None
        # Held until the scan's next batch is seen waiting for it (or the scan is done).
        wait_for(
            "the scan's next batch to wait for the lock",
            lambda: scan.poll() is not None or sleeping(scan.pid),
            60,
        )
        holder.release()
        _, err = scan.communicate(timeout=120)
        assert scan.returncode == 0, err
        assert mid_scan, "the lock should have been taken while the scan ran"
        figures["wait_mid_scan_s"] = round(time.monotonic() - t0, 1)
        assert_exact(store, repo_id, root)

        # 3. Held for longer than the store waits: a clean failure, then an exact scan.
        for path in rng.sample(sorted(root.rglob("*.jpg")), 100):
            path.unlink()
        holder = LockHolder(db)
        holder.wait_locked()
        try:
            failed = cli(env, "scan", timeout=180)
        finally:
            holder.release()
        assert failed.returncode == 1
        assert failed.stderr.count("\n") == 1, failed.stderr
        assert "locked by another process" in failed.stderr
        no_traceback(failed.stderr)
        figures["error"] = failed.stderr.strip()
        t0 = time.monotonic()
        done = cli(env, "scan")
        assert done.returncode == 0, done.stderr
        figures["recover_s"] = round(time.monotonic() - t0, 2)
        assert_exact(store, repo_id, root)
        assert cli_files(env, "photos") == disk_files(root)
    finally:
        store.close()
    record_figure("SQLite write lock held by another process", records_lost=0, **figures)


# === the watcher's limits =======================================================================
def test_inotify_queue_overflow_in_a_stopped_daemon(tmp_path: Path) -> None:
    """The daemon is frozen (SIGSTOP) while more changes than ``max_queued_events`` happen,
    then thawed: the kernel reports ``IN_Q_OVERFLOW``, the watcher asks for a
    reconciliation, the manager runs it, nothing is lost, and watching goes on.
    (``test_watch_inotify.test_a_real_queue_overflow_loses_nothing`` starves the reader
    in-process; this is the same fault end to end.)"""
    with open("/proc/sys/fs/inotify/max_queued_events") as fh:
        limit = int(fh.read())
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db)
    root = tmp_path / "photos"
    make_tree(root, 200, size=300)
    repo_id = add_repo(env, root)
    store = open_store(db)
    daemon = start_daemon(env, tmp_path / "run.log", store, repo_id)
    try:
        daemon.signal(signal.SIGSTOP)
        try:
            # create + modify + close_write: three events per file, in watched directories.
            dirs = sorted(p for p in root.rglob("x*") if p.is_dir())
            for i in range(limit // 2):
                (dirs[i % len(dirs)] / f"flood{i:06}.jpg").write_bytes(b"%d" % i)
            for path in sorted(root.rglob("f0000*.jpg")):
                path.unlink()
            (root / "new-dir" / "deep").mkdir(parents=True)
            (root / "new-dir" / "deep" / "inside.jpg").write_bytes(b"in a directory made meanwhile")
        finally:
            daemon.signal(signal.SIGCONT)
        t0 = time.monotonic()
        daemon.wait_log(r"inotify queue overflow")
        wait_exact(store, repo_id, root, 120)
        recover_s = time.monotonic() - t0
        # Still watching, the directory created during the overflow included.
        (root / "new-dir" / "deep" / "after.jpg").write_bytes(b"after")
        wait_exact(store, repo_id, root, 30)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.kill()
        store.close()
    record_figure(
        "inotify queue overflow (daemon stopped with SIGSTOP)",
        events_queued_at_least=3 * (limit // 2),
        max_queued_events=limit,
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


def test_watch_limit_exhausted_degrades_to_scheduled_scans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``inotify_add_watch`` fails with the watch limit after three watches (simulated at the
    backend boundary, over real inotify): the repository is watched in part, a warning and
    the ``fsledger_degraded_repositories`` metric say so, scheduled scans stand in for the
    unwatched directories, and nothing is lost."""

    class LimitedInotify(InotifyBackend):
        """Real inotify whose watch limit is three watches."""

        def __init__(self, limit: int) -> None:
            super().__init__()
            self.limit = limit
            self.wds: set[int] = set()

        def add_watch(self, path: bytes) -> int:
            if len(self.wds) >= self.limit:
                raise WatchLimitReached(f"cannot watch {os.fsdecode(path)}: limit {self.limit}")
            wd = super().add_watch(path)
            self.wds.add(wd)
            return wd

        def remove_watch(self, wd: int) -> None:
            self.wds.discard(wd)
            super().remove_watch(wd)

    root = tmp_path / "photos"
    make_tree(root, 120, size=400)
    settings = Settings(
        database_url="sqlite://" + str(tmp_path / "ledger.db"),
        max_concurrency=2,
        debounce_s=0.1,
        reconciliation_interval_s=0,
    )

    def live(ledger: Ledger, s: Settings, on_resync):
        return Watcher(ledger, s, backend=LimitedInotify(3), on_resync=on_resync)

    with Ledger(settings) as ledger, caplog.at_level(logging.WARNING):
        repo = ledger.add_repository(os.fsencode(root))
        manager = SyncManager(ledger, settings, live_factory=live)
        manager.start()
        try:
            assert manager.wait_idle(60)
            assert manager.metrics().degraded_repositories == 1
            text = Metrics(ledger, manager, None).render().decode()
            assert "fsledger_degraded_repositories 1.0" in text
            assert any("only partly watched" in m for m in caplog.messages)
            store = ledger.store
            assert_exact(store, repo.id, root)
            # A change in a watched directory arrives live...
            (root / "live.jpg").write_bytes(b"watched: the root")
            wait_exact(store, repo.id, root, 30)
            # ...one in an unwatched directory waits for the scheduled scan.
            deep = sorted(p for p in root.rglob("x*") if p.is_dir())[-1]
            (deep / "unwatched.jpg").write_bytes(b"not watched")
            scans = completed_scans(store, repo.id)
            # A degraded repository is rescanned at least hourly (every minute at most):
            # move this one's last quick scan an hour back instead of waiting for it.
            manager._repos[repo.id].last_quick -= 3600
            t0 = time.monotonic()
            wait_for("the scheduled scan", lambda: completed_scans(store, repo.id) > scans, 30)
            assert manager.wait_idle(60)
            assert_exact(store, repo.id, root)
            recover_s = time.monotonic() - t0
        finally:
            manager.stop()
    record_figure(
        "inotify watch limit exhausted",
        watches=3,
        records_lost=0,
        recover_s=round(recover_s, 2),
        note="degraded: scheduled scans every max(60 s, min(RECONCILIATION_INTERVAL, 1 h))",
    )


# === the root goes away =========================================================================


def test_root_moved_away_or_emptied_under_the_daemon(tmp_path: Path) -> None:
    """The repository root is renamed away, then replaced by an empty directory, under a
    running daemon: nothing is deleted, ``fsledger status`` says offline, and when the root
    comes back the repository is online again without deleting or re-adding what returned."""
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db)
    root = tmp_path / "photos"
    away = tmp_path / "photos-away"
    make_tree(root, 400, size=500)
    repo_id = add_repo(env, root)
    store = open_store(db)
    daemon = start_daemon(env, tmp_path / "run.log", store, repo_id)
    figures: dict[str, object] = {}
    try:
        seq0 = store.latest_seq()
        kept = set(disk_files(root))
        count0 = store.count_records(repo_id)

        # 1. Renamed away (an unmounted autofs path, a moved library).
        os.rename(root, away)
        figures["moved_away_offline_after_s"] = round(wait_state(env, "photos", "offline"), 2)
        assert store.count_records(repo_id) == count0
        (away / "d0" / "added-while-away.jpg").write_bytes(b"new while away")
        os.rename(away, root)
        t0 = time.monotonic()
        wait_state(env, "photos", "online")
        wait_exact(store, repo_id, root, 60)
        figures["moved_away_recover_s"] = round(time.monotonic() - t0, 2)

        # 2. Replaced by an empty directory (a mount point with nothing mounted on it).
        os.rename(root, away)
        root.mkdir()
        figures["emptied_offline_after_s"] = round(wait_state(env, "photos", "offline"), 2)
        status = cli_status(env, "photos")
        assert status["total_files"] == count0 + 1
        wait_for(
            "a refused reconciliation",
            lambda: "empty" in str(cli_status(env, "photos")["last_sync_operation"] or {}),
            60,
        )
        root.rmdir()
        os.rename(away, root)
        t0 = time.monotonic()
        wait_state(env, "photos", "online")
        wait_exact(store, repo_id, root, 60)
        figures["emptied_recover_s"] = round(time.monotonic() - t0, 2)

        figures["feed_kinds"] = assert_no_churn(store, repo_id, seq0, kept)
        # Watching again.
        (root / "d1" / "live-after.jpg").write_bytes(b"live")
        wait_exact(store, repo_id, root, 30)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.kill()
        store.close()
    no_traceback(daemon.log())
    record_figure("repository root moved away / emptied", records_lost=0, **figures)


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs root and unshare -m (mount namespaces)")
def test_root_unmounted_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """The root is a bind mount of another filesystem (tmpfs), inside the daemon's own mount
    namespace; it is unmounted under the daemon (leaving the empty mount point on the parent's
    device), then mounted again: no deletion, offline meanwhile, online after, no churn."""
    src = Path(tempfile.mkdtemp(prefix="fsledger-fault-", dir="/dev/shm"))
    try:
        make_tree(src, 300, size=500)
        root = tmp_path / "mnt" / "photos"
        root.mkdir(parents=True)
        db = "sqlite://" + str(tmp_path / "ledger.db")
        env = base_env(db)
        repo_id = add_repo(env, root, "--no-scan")  # the mount point, empty out here
        store = open_store(db)
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        before = completed_scans(store, repo_id)
        daemon = Daemon(env, tmp_path / "run.log", prefix=[*prefix, str(src), str(root)]).start()
        figures: dict[str, object] = {}

        def in_ns(*args: str) -> None:
            done = subprocess.run(
                ["nsenter", "-t", str(daemon.pid), "-m", *args], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr

        try:
            daemon.wait_log(rf"File watcher started for repository {repo_id}")
            wait_for("the startup scan", lambda: completed_scans(store, repo_id) > before, 60)
            wait_exact(store, repo_id, src, 30)
            seq0 = store.latest_seq()
            kept = set(disk_files(src))
            count0 = store.count_records(repo_id)

            in_ns("umount", str(root))
            figures["offline_after_s"] = round(wait_state(env, "photos", "offline"), 2)
            assert store.count_records(repo_id) == count0
            (src / "d2" / "added-while-unmounted.jpg").write_bytes(b"new")
            (src / "d0" / "s0" / "x0" / "f000000.jpg").unlink()
            in_ns("mount", "--bind", str(src), str(root))
            t0 = time.monotonic()
            wait_state(env, "photos", "online")
            wait_exact(store, repo_id, src, 60)
            figures["recover_s"] = round(time.monotonic() - t0, 2)
            figures["feed_kinds"] = assert_no_churn(
                store, repo_id, seq0, kept, allowed={b"d0/s0/x0/f000000.jpg"}
            )
            (src / "d3" / "live-after.jpg").write_bytes(b"live")
            wait_exact(store, repo_id, src, 30)
            assert daemon.stop() == 0
        finally:
            if daemon.alive():
                daemon.kill()
            store.close()
        reason = [line for line in daemon.log().splitlines() if "device" in line][:1]
        record_figure(
            "repository root unmounted (bind mount, private namespace)",
            records_lost=0,
            guard=reason,
            **figures,
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)


# === a mount that flaps ========================================================================
def test_flapping_directory_and_root_lose_nothing_and_readd_nothing(tmp_path: Path) -> None:
    """A subdirectory, then the root itself, fails with ENOTCONN for a while and comes back
    (injected at the OS boundary of the real daemon: ``fault_support.flaky_main``), three
    times, under reconciliations every second and real changes elsewhere: nothing below the
    flapping directory is marked deleted, and nothing is re-added when it returns."""
    root = tmp_path / "photos"
    make_tree(root, 300, size=400)
    flaky = root / "d1"
    flag = tmp_path / "flapping"
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db, RECONCILIATION_INTERVAL="1s", RECONCILIATION_DAILY_AT="off")
    env.update({FLAKY_DIR: str(flaky), FLAKY_FLAG: str(flag)})
    repo_id = add_repo(env, root)
    store = open_store(db)
    daemon = Daemon(env, tmp_path / "run.log", command=flaky_command()).start()
    seq0 = store.latest_seq()
    kept = set(disk_files(root))
    flapped = {p for p in kept if p.startswith(b"d1/")}
    figures: dict[str, object] = {"flaps": 0}

    def two_scans_after(n: int) -> Callable[[], bool]:
        return lambda: completed_scans(store, repo_id) - n >= 2

    try:
        daemon.wait_log(rf"File watcher started for repository {repo_id}")
        for flap in range(3):
            flag.touch()
            n = completed_scans(store, repo_id)
            # Reconciliations run while d1/ cannot be listed; a change elsewhere is still seen.
            (root / "d2" / f"during-flap-{flap}.jpg").write_bytes(b"elsewhere")
            wait_for("two reconciliations during the flap", two_scans_after(n), 60)
            assert flapped <= set(store_files(store, repo_id))
            flag.unlink()
            n = completed_scans(store, repo_id)
            wait_for("two reconciliations after it", two_scans_after(n), 60)
            wait_exact(store, repo_id, root, 30)
            figures["flaps"] = flap + 1

        # The root itself flaps: offline (records kept), then online again.
        flag_root = tmp_path / "root-flapping"
        daemon.stop()
        env.update({FLAKY_DIR: str(root), FLAKY_FLAG: str(flag_root)})
        daemon = Daemon(env, tmp_path / "run.log", command=flaky_command()).start()
        daemon.wait_log(rf"File watcher started for repository {repo_id}")
        count = store.count_records(repo_id)
        flag_root.touch()
        figures["root_offline_after_s"] = round(wait_state(env, "photos", "offline"), 2)
        assert store.count_records(repo_id) == count
        flag_root.unlink()
        t0 = time.monotonic()
        wait_state(env, "photos", "online")
        wait_exact(store, repo_id, root, 30)
        figures["root_recover_s"] = round(time.monotonic() - t0, 2)
        figures["feed_kinds"] = assert_no_churn(store, repo_id, seq0, kept)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.kill()
        store.close()
    record_figure("a directory / the root flapping (ENOTCONN)", records_lost=0, **figures)


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs root and unshare -m (mount namespaces)")
def test_a_filesystem_mounted_below_the_root_unmounted(tmp_path: Path) -> None:
    """A subdirectory of the root is another filesystem (a NAS share mounted at
    ``photos/nas``) and is unmounted under the daemon, in its own mount namespace; a file
    is added to the share and one deleted meanwhile, a scan runs, then it is mounted again:
    its records must not be deleted (an unmounted mount point is not an emptied directory),
    nothing is re-added when it returns, and the two real changes arrive."""
    src = Path(tempfile.mkdtemp(prefix="fsledger-fault-", dir="/dev/shm"))
    try:
        make_tree(src, 100, size=300)
        root = tmp_path / "photos"
        make_tree(root, 50, size=300, seed=2)
        nas = root / "nas"
        nas.mkdir()
        db = "sqlite://" + str(tmp_path / "ledger.db")
        env = base_env(db)
        repo_id = add_repo(env, root, "--no-scan")
        store = open_store(db)
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        before = completed_scans(store, repo_id)
        daemon = Daemon(env, tmp_path / "run.log", prefix=[*prefix, str(src), str(nas)]).start()
        figures: dict[str, object] = {}

        def in_ns(*args: str) -> None:
            done = subprocess.run(
                ["nsenter", "-t", str(daemon.pid), "-m", *args], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr

        def expected() -> dict[bytes, tuple[int, str | None]]:
            want = disk_files(root)
            want.update({b"nas/" + p: v for p, v in disk_files(src).items()})
            return want

        def nas_mounted() -> bool | None:
            points = store.mount_points(repo_id)
            return points[0].mounted if [p.path for p in points] == [b"nas"] else None

        try:
            daemon.wait_log(rf"File watcher started for repository {repo_id}")
            wait_for("the startup scan", lambda: completed_scans(store, repo_id) > before, 60)
            want = expected()
            wait_for("the first index", lambda: store_files(store, repo_id) == want, 30)
            assert nas_mounted() is True
            seq0 = store.latest_seq()
            in_ns("umount", str(nas))
            t0 = time.monotonic()
            # A detached bind mount sends no event: the daemon's periodic check notices it.
            wait_for("the unmount to be noticed", lambda: nas_mounted() is False, 30)
            figures["noticed_after_s"] = round(time.monotonic() - t0, 2)
            assert store_files(store, repo_id) == want
            # Changes on the share while it is not mounted here: the daemon's old watches on
            # it still report them, and find the files "gone" below the empty mount point.
            (src / "d2" / "added-while-unmounted.jpg").write_bytes(b"new")
            (src / "d0" / "s0" / "x0" / "f000000.jpg").unlink()
            # Reconcile while it is unmounted, in the daemon's namespace (a scheduled scan
            # would do the same).
            done = subprocess.run(
                ["nsenter", "-t", str(daemon.pid), "-m", *FSLEDGER, "scan"],
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
            assert "nas/: a filesystem was mounted here" in done.stderr
            lost = set(want) - set(store_files(store, repo_id))
            assert not lost, f"{len(lost)} records below the unmounted share were deleted"
            in_ns("mount", "--bind", str(src), str(nas))
            t0 = time.monotonic()
            wait_for("the share's changes", lambda: store_files(store, repo_id) == expected(), 30)
            figures["recover_s"] = round(time.monotonic() - t0, 2)
            assert nas_mounted() is True
            figures["feed_kinds"] = assert_no_churn(
                store, repo_id, seq0, set(want), allowed={b"nas/d0/s0/x0/f000000.jpg"}
            )
            # Watched again: a file written on the share now arrives live.
            (src / "d3" / "live-after.jpg").write_bytes(b"live")
            wait_for("a live change", lambda: store_files(store, repo_id) == expected(), 30)
            assert daemon.stop() == 0
        finally:
            if daemon.alive():
                daemon.kill()
            store.close()
        record_figure(
            "filesystem below the root unmounted (bind mount, private namespace)",
            records_lost=0,
            records=len(want),
            **figures,
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)


# === the tree changes under the scanner =========================================================


def test_tree_changing_during_a_scan_and_during_hashing(
    store_url: str, store: Store, tmp_path: Path, seed: int
) -> None:
    """Files appear, vanish, are rewritten and renamed (files and directories) while a scan
    walks and hashes, and big files grow while they are being hashed: the scan finishes
    without error, records nothing it did not see settled, and the next scan is exact."""
    root = tmp_path / "photos"
    make_tree(root, 4000, size=1500, seed=seed)
    big = []
    for i in range(6):
        path = root / "videos" / f"big{i}.mp4"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(16 << 20))
        big.append(path)
    settings = Settings(database_url=store_url, max_concurrency=2)
    with Ledger(settings, store) as ledger:
        repo = ledger.add_repository(os.fsencode(root))
        mutator = Mutator(root, seed)
        mutator.start()
        with Appender(big) as appender:
            stats = ledger.scan(repo)
        ops = mutator.stop()
        # Once more while it is still changing (an incremental scan, small batches).
        mutator = Mutator(root, seed + 1)
        mutator.start()
        with Appender(big):
            ledger.scan(repo)
        ops += mutator.stop()
        t0 = time.monotonic()
        final = ledger.scan(repo)
        recover_s = time.monotonic() - t0
        assert_exact(store, repo.id, root)
        assert final.errors == []
    record_figure(
        "tree changing during a scan and during hashing",
        backend=store_url.split(":")[0],
        mutations=ops,
        appends=appender.appends,
        unsettled_first_scan=stats.unsettled,
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


def test_tree_changing_during_the_daemons_startup_scan(tmp_path: Path, seed: int) -> None:
    """Under the daemon, the watcher covers what the startup scan raced: with no further
    reconciliation, the ledger ends equal to the disk."""
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db)
    root = tmp_path / "photos"
    make_tree(root, 6000, size=1500, seed=seed)
    repo_id = add_repo(env, root, "--no-scan")
    store = open_store(db)
    daemon = Daemon(env, tmp_path / "run.log").start()
    try:
        daemon.wait_log(rf"File watcher started for repository {repo_id}")
        mutator = Mutator(root, seed)
        mutator.start()
        wait_for("the startup scan", lambda: completed_scans(store, repo_id) >= 1, 120)
        ops = mutator.stop()
        recover_s = wait_exact(store, repo_id, root, 60)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.kill()
        store.close()
    no_traceback(daemon.log())
    record_figure(
        "tree changing during the daemon's startup scan",
        mutations=ops,
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


def test_directory_renamed_by_the_watcher_behind_the_scan(
    store_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the daemon test above found, made deterministic: during a first index, a
    directory the walk has already passed is renamed to a name it has passed too, and the
    watcher writes that rename (``DIR_MOVED``) before the scan wrote the files. The one scan
    must still end exact."""
    root = tmp_path / "photos"
    make_tree(root, 600, size=200)
    real_walk = walk
    # The walk is replaced in this process, so the first index must merge here, not in
    # worker processes (the re-walk of a renamed directory is the same code either way).
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_DIRS", 10**9)
    settings = Settings(database_url=store_url, max_concurrency=2)
    with Ledger(settings, store) as ledger:
        repo = ledger.add_repository(os.fsencode(root))
        writer = ledger.writer(repo)
        done: list[bool] = []

        def walk_with_a_rename(top: bytes, *args: Any, **kw: Any) -> Iterator[object]:
            for item in real_walk(top, *args, **kw):
                yield item
                if not done and isinstance(item, FileEntry) and item.path.startswith(b"d5/"):
                    done.append(True)
                    os.rename(root / "d1" / "s1", root / "d0" / "zz")
                    writer.apply([Change(ChangeKind.DIR_MOVED, b"d0/zz", old_path=b"d1/s1")])

        monkeypatch.setattr(fsledger.reconcile, "walk", walk_with_a_rename)
        ledger.scan(repo)
        assert done
        assert_exact(store, repo.id, root)


# === permissions, odd files, odd names ============================================================
def test_real_permission_errors_keep_records(tmp_path: Path) -> None:
    """A directory and a file that cannot be read (real ``chmod 000``; as root the scans run
    without the capabilities that let root read through any mode): the records below the
    directory are kept (even of a file deleted meanwhile: what cannot be seen is not gone),
    the errors are reported, and once readable again the next scan is exact."""
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        if not shutil.which("setpriv"):
            pytest.skip("as root, needs setpriv to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    root = tmp_path / "photos"
    make_tree(root, 200, size=300)
    env = base_env("sqlite://" + str(tmp_path / "ledger.db"))

    def scan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *FSLEDGER, *args], env=env, capture_output=True, text=True, timeout=300
        )

    done = scan("repo", "add", str(root), "--json")
    assert done.returncode == 0, done.stderr
    closed_dir = root / "d1" / "s1"
    closed_file = sorted((root / "d2").rglob("*.jpg"))[0]
    inside = sorted(closed_dir.rglob("*.jpg"))
    closed_file.write_bytes(b"changed while unreadable")
    closed_file.chmod(0)
    inside[0].unlink()  # deleted behind the closed door
    closed_dir.chmod(0)
    try:
        done = scan("scan", "--json")
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        errors = " ".join(stats["errors"])
        assert "Permission denied" in errors, stats
        no_traceback(done.stderr)
        listed = cli_files(env, "photos")
        assert all(os.fsencode(os.path.relpath(p, root)) in listed for p in inside), (
            "a record behind an unreadable directory was deleted"
        )
        rel = os.fsencode(os.path.relpath(closed_file, root))
        assert listed[rel][0] == len(b"changed while unreadable")  # seen by lstat
    finally:
        closed_dir.chmod(0o755)
        closed_file.chmod(0o644)
    t0 = time.monotonic()
    done = scan("scan", "--json")
    assert done.returncode == 0, done.stderr
    recover_s = time.monotonic() - t0
    assert json.loads(done.stdout)["errors"] == []
    assert cli_files(env, "photos") == disk_files(root)
    record_figure(
        "permission errors (chmod 000 directory and file)",
        scanned_as="root without CAP_DAC_OVERRIDE" if as_root else "the test user",
        errors=stats["errors"],
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


def test_odd_entries_and_names_under_the_daemon(tmp_path: Path) -> None:
    """Under a running daemon: a FIFO (nobody writes to it), a Unix socket, symlink loops,
    a dangling link, links to a file and to a directory, non-UTF-8 names, 255-byte names, a
    newline in a name. The watcher records exactly the regular files, never blocks, and a
    scan afterwards agrees with it (nothing to change)."""
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db)
    root = tmp_path / "photos"
    make_tree(root, 50, size=200)
    repo_id = add_repo(env, root)
    store = open_store(db)
    daemon = start_daemon(env, tmp_path / "run.log", store, repo_id)
    sock = socket.socket(socket.AF_UNIX)
    try:
        broot = os.fsencode(root)
        odd = os.path.join(broot, b"odd")
        os.mkdir(odd)
        os.mkfifo(os.path.join(odd, b"pipe.jpg"))
        sock.bind(os.path.join(odd, b"sock.jpg"))
        os.symlink(b".", os.path.join(odd, b"loop"))
        os.symlink(b"../odd", os.path.join(odd, b"up"))
        os.symlink(b"a", os.path.join(odd, b"b"))
        os.symlink(b"b", os.path.join(odd, b"a"))
        os.symlink(b"nowhere", os.path.join(odd, b"dangling.jpg"))
        names = [
            b"caf\xe9-latin1.jpg",
            b"\xff\xfe\xfd.jpg",
            b"x" * 251 + b".jpg",  # 255 bytes, the limit
            "é".encode() * 125 + b".jpg",  # 254 bytes of two-byte characters
            b"new\nline.jpg",
            b"-rf.jpg",
        ]
        for name in names:
            with open(os.path.join(odd, name), "wb") as fh:
                fh.write(name)
        os.symlink(os.path.join(odd, names[0]), os.path.join(odd, b"link-to-file.jpg"))
        long_dir = os.path.join(odd, b"d" * 255)
        os.mkdir(long_dir)
        with open(os.path.join(long_dir, b"\xc3(.jpg"), "wb") as fh:
            fh.write(b"invalid utf-8 inside a 255-byte directory name")
        os.symlink(long_dir, os.path.join(odd, b"link-to-dir"))
        t0 = time.monotonic()
        wait_exact(store, repo_id, root, 30)
        live_s = time.monotonic() - t0
        assert cli_files(env, "photos") == disk_files(root)
        assert daemon.stop() == 0
        done = cli(env, "scan", "--json")
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        assert stats["errors"] == []
        assert stats["skipped_special"] == 2  # the FIFO and the socket
        assert stats["files_added"] == stats["files_removed"] == stats["files_updated"] == 0
    finally:
        sock.close()
        if daemon.alive():
            daemon.kill()
        store.close()
    no_traceback(daemon.log())
    record_figure("odd entries and names under the daemon", records_lost=0, live_s=round(live_s, 2))


# === the disk under the database fills up ========================================================


def test_disk_full_under_the_sqlite_database(tmp_path: Path) -> None:
    """The filesystem holding the SQLite database fills up during the first index (a tiny
    tmpfs; without root, a file size limit on the process): the scan fails with one clear
    line, the database is not corrupted, and once there is space the next scan is exact."""
    root = tmp_path / "photos"
    make_tree(root, 6000, size=100)
    for path in sorted(root.rglob("*.jpg"))[:3000]:  # long names: fat records and indexes
        path.rename(path.with_name(path.stem + "-" + "n" * 150 + ".jpg"))
    small = tmp_path / "small"
    small.mkdir()
    mounted = mount_tmpfs(small, "600k")
    db = small / "ledger.db"
    env = base_env("sqlite://" + str(db))
    limit = 600 * 1024

    def limited() -> None:
        # Without root: writes past the limit fail with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        failed = subprocess.run(
            [*FSLEDGER, "repo", "add", str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=None if mounted else limited,
        )
        assert failed.returncode == 1, failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("fsledger: error: SQLite database " + str(db)), failed.stderr
        assert "full" in last or "I/O" in last, last
        no_traceback(failed.stderr)
        # Space again.
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        t0 = time.monotonic()
        done = cli(env, "scan")
        recover_s = time.monotonic() - t0
        assert done.returncode == 0, done.stderr
        assert cli_files(env, "photos") == disk_files(root)
        once = cli(env, "run", "--once")
        assert once.returncode == 0, once.stderr
        assert [o for o in cli_ops(env) if o["status"] == "running"] == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)
    record_figure(
        "disk full under the SQLite database",
        how="tmpfs of 600 KiB" if mounted else "RLIMIT_FSIZE 600 KiB",
        error=last,
        records_lost=0,
        recover_s=round(recover_s, 2),
    )


# === bad configuration and bad input ============================================================
ENV_VARIABLES = (
    "FSLEDGER_DATABASE_URL",
    "RECONCILIATION_INTERVAL",
    "RECONCILIATION_DAILY_AT",
    "FILE_WATCHER_DEBOUNCE",
    "RECONCILIATION_BATCH_SIZE",
    "RECONCILIATION_MAX_CONCURRENCY",
    "RECONCILIATION_CALCULATE_HASHES",
    "RECONCILIATION_DISTRIBUTED",
    "FSLEDGER_HASH_ALGO",
    "FSLEDGER_HASH_TIMEOUT",
    "FSLEDGER_LOG_LEVEL",
    "FSLEDGER_LISTEN",
    "FSLEDGER_API_TOKEN",
    "FSLEDGER_WEBHOOKS",
    "FSLEDGER_WEBHOOK_SECRET",
    "FSLEDGER_FEED_RETENTION",
    "FSLEDGER_FEED_RETENTION_ENTRIES",
    "XDG_DATA_HOME",
    "HOME",
)


DURATIONS = ("RECONCILIATION_INTERVAL", "FILE_WATCHER_DEBOUNCE", "FSLEDGER_HASH_TIMEOUT")


def _env(variable: str) -> st.SearchStrategy[str]:
    """Values for one variable: any text, odd literals, and numbers of every length (with a
    unit, for the durations)."""
    digits = st.one_of(
        st.text("0123456789", min_size=1, max_size=400),
        st.integers(0, 10**400).map(str),
    )
    units = ["", "s", "ms", "us", "m", "h", "d"] if variable in DURATIONS else [""]
    return st.one_of(
        st.text(max_size=40),
        st.builds(lambda d, u: d + u, digits, st.sampled_from(units)),
        st.sampled_from(
            ["0", "-1", "1e9", "nan", "inf", "24h", "25:61", "off", "true", "\udcff", " ", "1_000"]
        ),
    )


def test_config_parser_never_raises_anything_but_a_named_config_error() -> None:
    """``Settings.from_env`` over hypothesis-generated values of every variable: it returns
    settings whose durations a timer can hold and whose numbers are in range, or raises a
    ``ConfigError`` (exit code 2) naming the variable at fault, never anything else."""
    from hypothesis import HealthCheck, given, settings

    from fsledger.config import Settings

    envs = st.fixed_dictionaries({}, optional={v: _env(v) for v in ENV_VARIABLES})

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(envs)
    def check(env: dict[str, str]) -> None:
        try:
            s = Settings.from_env(env)
        except ConfigError as exc:
            assert exc.exit_code == 2
            assert any(name in str(exc) for name in env), str(exc)
            return
        durations = (s.reconciliation_interval_s, s.debounce_s, s.hash_timeout_s)
        for value in (*durations, s.feed_retention_s):
            assert math.isfinite(value) and 0 <= value <= threading.TIMEOUT_MAX
        assert s.batch_size >= 1 and 1 <= s.max_concurrency <= 256

    check()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECONCILIATION_INTERVAL", "9" * 40 + "h"),
        ("FSLEDGER_HASH_TIMEOUT", "9" * 400 + "s"),
        ("FILE_WATCHER_DEBOUNCE", "1e3s"),
        ("RECONCILIATION_BATCH_SIZE", "9" * 5000),
        ("RECONCILIATION_MAX_CONCURRENCY", "-3"),
        ("FSLEDGER_DATABASE_URL", "mysql://u@h/db"),
        ("FSLEDGER_DATABASE_URL", "sqlite://relative/path.db"),
        ("FSLEDGER_API_TOKEN", "short"),
        ("FSLEDGER_LOG_LEVEL", "\udcff"),
    ],
)
def test_bad_environment_through_the_real_command(
    tmp_path: Path, variable: str, value: str
) -> None:
    """A bad value through the installed command: one line naming the problem, exit 2."""
    env = base_env("sqlite://" + str(tmp_path / "ledger.db"))
    env[variable] = value
    root = tmp_path / "photos"
    make_tree(root, 3, size=10)
    done = subprocess.run(
        [*FSLEDGER, "repo", "add", str(root)],
        env={k: os.fsencode(v) for k, v in env.items()},
        capture_output=True,
        timeout=120,
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("fsledger: error: "), err
    no_traceback(err)


ODD_ARGS: list[list[str]] = [
    [],
    ["--help"],
    ["nope"],
    ["scan", "no-such-repo"],
    ["scan", "--verify", "--force", "photos", "photos"],
    ["scan", "--json", ""],
    ["files"],
    ["files", "photos", "--prefix", "../.."],
    ["files", "photos", "--prefix", "/etc"],
    ["files", "photos", "--prefix", "a/../../b"],
    ["files", "\x7f\x01"],
    ["files", "photos", "--prefix", "\udcff\udcfe"],
    ["status", "' OR 1=1 --"],
    ["status", "00000000-0000-0000-0000-000000000000"],
    ["ops", "--limit", "0"],
    ["ops", "--limit", "-5"],
    ["ops", "--limit", "99999999999999999999999"],
    ["changes", "--since", "garbage"],
    ["changes", "--since", "1:2:3"],
    ["changes", "--since", "00000000000000000000000000000000:-1"],
    ["changes", "--limit", "0"],
    ["changes", "--repo", "nope"],
    ["duplicates", "--min-size", "-1"],
    ["duplicates", "nope"],
    ["repo", "add", ""],
    ["repo", "add", "/nonexistent/dir"],
    ["repo", "add", "/etc/hostname"],
    ["repo", "add", "--name", "photos", "/tmp"],
    ["repo", "remove", "nope"],
    ["repo", "list", "--bogus"],
    ["--db", "", "repo", "list"],
    ["--db", "sqlite://", "repo", "list"],
    ["--db", "postgresql://nobody@127.0.0.1:1/x?connect_timeout=1", "repo", "list"],
    ["--log-level", "LOUD", "repo", "list"],
    ["run", "--listen", "not-an-address"],
    ["run", "--listen", "0.0.0.0:8750"],
    ["run", "--listen", "127.0.0.1:99999"],
    ["run", "--webhook", "ftp://example.com/hook"],
    ["run", "--webhook", "http://127.0.0.1:9/hook"],
]


def test_odd_command_lines_exit_cleanly(tmp_path: Path) -> None:
    """Odd arguments to every command: a clear message and exit 0 (help), 1 (unreachable),
    2 (usage), 4 (root guard) or 5 (stale cursor), never a traceback. Run through click's
    runner in-process (fast), then a sample through the real command."""

    root = tmp_path / "photos"
    make_tree(root, 5, size=10)
    env = base_env("sqlite://" + str(tmp_path / "ledger.db"))
    add_repo(env, root)
    codes = {}
    for args in ODD_ARGS:
        result = CliRunner().invoke(main, args, env=env, catch_exceptions=True)
        shown = " ".join(args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"fsledger {shown}: {result.exception!r}"
        )
        assert result.exit_code in (0, 1, 2, 4, 5), (shown, result.exit_code, result.output)
        no_traceback(result.output)
        codes[shown] = result.exit_code
    assert codes["files photos --prefix ../.."] == 2
    assert codes["run --listen 0.0.0.0:8750"] == 2
    assert codes["repo add /nonexistent/dir"] == 4
    for args in (["files", "photos", "--prefix", "../.."], ["run", "--listen", "0.0.0.0:1"]):
        done = cli(env, *args, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        no_traceback(done.stderr)


def test_fuzzed_command_lines_exit_cleanly(tmp_path: Path) -> None:
    """Hypothesis-generated arguments for the commands that end by themselves (not ``run``,
    ``changes --follow`` or ``repo add``, which would index whatever path it drew)."""

    root = tmp_path / "photos"
    make_tree(root, 5, size=10)
    env = base_env("sqlite://" + str(tmp_path / "ledger.db"))
    add_repo(env, root)
    options = st.sampled_from(
        ["--json", "--limit", "--prefix", "--since", "--repo", "--min-size", "--verify", "photos"]
    )
    word = st.one_of(options, st.text(max_size=12), st.integers(-(2**70), 2**70).map(str))
    commands = st.sampled_from(
        [["scan"], ["files"], ["status"], ["ops"], ["changes"], ["duplicates"], ["repo", "list"]]
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(commands, st.lists(word, max_size=5))
    def check(command: list[str], args: list[str]) -> None:
        if "--follow" in args or "-f" in args:
            return
        result = CliRunner().invoke(main, [*command, *args], env=env, catch_exceptions=True)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"fsledger {command + args}: {result.exception!r}"
        )
        assert result.exit_code in (0, 1, 2, 3, 4, 5), (command + args, result.output)
        no_traceback(result.output)

    check()


# === a soak ======================================================================================


def test_soak_daemon_under_a_steady_stream_of_changes(tmp_path: Path, seed: int) -> None:
    """``fsledger run`` (watcher, HTTP on loopback) under a steady stream of changes for
    ``FSLEDGER_SOAK_SECONDS`` (90 by default), a client following the change feed over HTTP
    meanwhile: memory stays flat (the last third's average RSS at most 30 % above the first
    third's, sampled after a warm-up of a fifth of the run, 15 s at most), the ledger is exact
    at the end, and replaying the feed the
    client read gives exactly the ledger."""
    seconds = float(os.environ.get("FSLEDGER_SOAK_SECONDS") or 90)
    warmup = min(15.0, seconds / 5)
    db = "sqlite://" + str(tmp_path / "ledger.db")
    env = base_env(db)
    root = tmp_path / "photos"
    make_tree(root, 500, size=2000, seed=seed)
    repo_id = add_repo(env, root)
    store = open_store(db)
    port = free_port()
    daemon = start_daemon(
        env, tmp_path / "run.log", store, repo_id, ("--listen", f"127.0.0.1:{port}")
    )
    follower = FeedFollower(port)
    samples: list[tuple[float, int]] = []
    mutator = Mutator(root, seed, rate=40, max_files=800)
    try:
        mutator.start()
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            assert daemon.alive(), daemon.log()[-3000:]
            if elapsed >= warmup:
                samples.append((elapsed, daemon.rss_kib()))
            follower.poll()
            assert http_status(port, "/healthz") == 200
            time.sleep(1.0)  # the sampling period, not a wait for anything
        ops = mutator.stop()
        recover_s = wait_exact(store, repo_id, root, 60)
        want = store_files(store, repo_id)

        def caught_up() -> bool:
            follower.poll()
            return follower.files == want

        wait_for("the feed to reach the ledger", caught_up, 30)
        assert cli_files(env, "photos") == disk_files(root)
        assert daemon.stop() == 0
    finally:
        if mutator.is_alive():
            mutator.stop()
        follower.close()
        if daemon.alive():
            daemon.kill()
        store.close()
    no_traceback(daemon.log())
    third = max(1, len(samples) // 3)
    first = sum(r for _t, r in samples[:third]) / third
    last = sum(r for _t, r in samples[-third:]) / third
    record_figure(
        "soak: fsledger run under a steady stream of changes",
        seconds=seconds,
        changes=ops,
        feed_entries=follower.entries,
        rss_first_third_mib=round(first / 1024, 1),
        rss_last_third_mib=round(last / 1024, 1),
        rss_peak_mib=round(max(r for _t, r in samples) / 1024, 1),
        records_lost=0,
        settle_s=round(recover_s, 2),
    )
    assert last <= 1.3 * first, f"memory grew: {first / 1024:.1f} MiB -> {last / 1024:.1f} MiB"
