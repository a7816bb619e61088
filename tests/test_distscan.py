"""Distributed scanning: real helper agents (``fsledger run --distributed``), real PostgreSQL.

The owner is this test process: it holds the repository's lease, as the owning agent would,
so the helper agents stand by for the repository and only help with its work items. The
owner is made slow on purpose (no worker processes of its own, a pause before each item it
computes), so that the helpers have items to take; what is asserted is the outcome: the
ledger equals the disk, no job and no claim is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fsledger.distscan as distscan
import fsledger.merge
from fsledger.config import Settings
from fsledger.distscan import JobParams, root_view
from fsledger.errors import RootUnavailable
from fsledger.hashing import HashOutcome, hash_at
from fsledger.ignore import IgnoreRules
from fsledger.ledger import Ledger
from fsledger.merge import Absent, Look, LookRule, RangeResult, decode_result, encode_result
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    OperationStatus,
    Repository,
    utcnow,
)
from fsledger.store import open_store
from fsledger.store.scanwork import create_job, open_jobs
from fsledger.walk import FileEntry, Unreadable
from support import assert_exact, wait_for
from test_merge import changes_across_the_tree, photo_tree
from test_reconcile import no_change
from treeutil import age_tree

FSLEDGER = Path(sys.executable).with_name("fsledger")


# --- encodings --------------------------------------------------------------------------------


def test_results_and_params_survive_their_encoding() -> None:
    """Every kind of merge item, odd file names (not UTF-8, newline) and hash outcomes."""
    odd = b"caf\xe9\n/\xff\xfe.jpg"
    old = FileRecord(
        odd, FileStat(3, 10**18, 10**18 + 5, 77), Digest("blake3", "ab" * 32), utcnow()
    )
    result = RangeResult(
        [
            Look(FileEntry(b"a/new.jpg", FileStat(1, 2, 3, 4)), None),
            Look(
                FileEntry(odd, FileStat(4, 10**18, 10**18 + 9, 77)),
                old,
                HashOutcome(None, 4, 5, 6, 7, unsettled=True),
            ),
            Absent(b"a/gone\x80"),
            Unreadable(b"locked", True, "Permission denied (errno 13)"),
            (b"new\xff/file.jpg", "cd" * 32, 1, 2, 3, 4),
        ],
        scanned=2,
        specials=1,
    )
    back = decode_result(encode_result(result))
    assert back.items[0] == result.items[0] and back.items[2:] == result.items[2:]
    look = back.items[1]
    assert isinstance(look, Look) and look.entry == result.items[1].entry  # type: ignore[union-attr]
    assert look.old is not None and (look.old.path, look.old.stat, look.old.digest) == (
        old.path,
        old.stat,
        old.digest,
    )
    assert abs((look.old.last_scanned - old.last_scanned).total_seconds()) < 1e-5
    assert look.hashed == result.items[1].hashed  # type: ignore[union-attr]
    assert (back.scanned, back.specials) == (2, 1)
    params = JobParams(
        uuid.uuid4(),
        b"/srv/ph\xf6tos",
        ("*.xmp", "exports/*"),
        True,
        LookRule("sha256", True, False),
        True,
        {b"nas\xff": "a filesystem was mounted here"},
        "f" * 32,
    )
    assert JobParams.decode(params.encode()) == params


def test_an_item_stuck_in_the_owner_fails_the_scan_within_its_budget(
    pg_url: str, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never returns (a dead network mount) costs the item's budget (five hash
    timeouts, as a local scan's range), then the scan fails: nothing is deleted, the next
    scan retries. One budget, whoever computes the range."""
    photo_tree(tree, files=30)
    release = threading.Event()
    real = hash_at

    def stuck(dir_fd: int, name: bytes, *args: Any, **kw: Any) -> HashOutcome:
        if name == b"top.jpg":
            release.wait(30)
        return real(dir_fd, name, *args, **kw)

    monkeypatch.setattr(distscan.LocalWorkers, "start", lambda self, job_ids: None)
    settings = Settings(database_url=pg_url, max_concurrency=2, distributed=True)
    settings = dataclasses.replace(settings, hash_timeout_s=0.3)
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(tree)
        ledger.scan(repo)
        before = ledger.store.count_records(repo.id)
        (Path(os.fsdecode(tree)) / "top.jpg").write_bytes(b"changed, must be hashed")
        shutil.rmtree(os.path.join(tree, b"2005"))
        monkeypatch.setattr(fsledger.merge, "hash_at", stuck)
        t0 = time.monotonic()
        try:
            with pytest.raises(RootUnavailable, match="stopped answering"):
                ledger.scan(repo)
        finally:
            release.set()
        assert time.monotonic() - t0 < 15
        assert ledger.store.count_records(repo.id) == before
        ledger.reconciler.close()
    assert left_over(pg_url)[:2] == (0, 0)


def test_root_view_tells_mounts_apart(tree: bytes, tmp_path: Path) -> None:
    """The fingerprint a helper compares: missing or different roots never match."""
    rules = IgnoreRules.default()
    (Path(os.fsdecode(tree)) / "2020").mkdir()
    (Path(os.fsdecode(tree)) / ".hidden").mkdir()
    view = root_view(tree, rules)
    assert view is not None and view == root_view(tree, rules)
    assert root_view(tree + b"/missing", rules) is None
    (tmp_path / "file").write_bytes(b"")
    assert root_view(os.fsencode(str(tmp_path / "file")), rules) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert root_view(os.fsencode(str(empty)), rules) != view


def test_sqlite_ignores_the_setting(tree: bytes, tmp_path: Path) -> None:
    """SQLite is one host's store: the setting changes nothing (local merge, exact ledger)."""
    photo_tree(tree, files=120)
    settings = Settings(
        database_url="sqlite://" + str(tmp_path / "l.db"), max_concurrency=2, distributed=True
    )
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(tree)
        assert ledger.scan(repo).files_added == 124
        assert_exact(ledger, repo)


# --- the store's side -------------------------------------------------------------------------


def test_claims_skip_locked_items_and_die_with_their_session(pg_url: str) -> None:
    """Two claimers never get the same item; a claim whose connection ends is pending again;
    a job whose owner's session ended is offered to nobody."""
    open_store(pg_url).close()  # the schema
    repo_id = uuid.uuid4()
    job = create_job(pg_url, repo_id, "owner:1", b"{}", [(b"", b"m/"), (b"m/", None)])
    from fsledger.store.scanwork import Claimer

    a, b = Claimer(pg_url, "test-a"), Claimer(pg_url, "test-b")
    try:
        assert [j.job_id for j in open_jobs(pg_url)] == [job.job_id]
        first, second = a.claim([job.job_id]), b.claim([job.job_id])
        assert first is not None and second is not None
        assert (first.item.seq, second.item.seq) == (0, 1)
        assert job.claim([job.job_id]) is None  # both held
        first.finish(b"result-0", "test-a")
        b.conn.close()  # dies holding item 1
        got = job.take(1, 1.0)
        assert got is not None and got[2] is not None  # pending, now locked by the owner
        got[2].release()
        assert job.take(0, 0.0) == (b"result-0", "test-a", None)
        job.conn.close()  # the owner's session ends: its job is nobody's business
        assert open_jobs(pg_url) == []
        # The next job created sweeps it.
        create_job(pg_url, repo_id, "owner:2", b"{}", [(b"", None)]).close()
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM scan_jobs").fetchone() == (0,)
    finally:
        a.close()
        b.close()
        job.close()


# --- the owner alone -----------------------------------------------------------------------


@pytest.mark.slow  # worker processes on PostgreSQL: ~6 s
def test_the_owner_alone_with_its_worker_processes(pg_url: str, tmp_path: Path) -> None:
    """No helper: the owner's worker processes and its reconciler thread do every item. A
    first index, changes all over the tree, a no-change rescan, and a ``--verify`` scan that
    finds bit rot through hashes computed in the workers, keeping the known-good hash."""
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=800)
    age_tree(tree)
    settings = Settings(database_url=pg_url, max_concurrency=2, distributed=True)
    with Ledger(settings) as ledger:
        try:
            repo = ledger.add_repository(tree)
            assert ledger.scan(repo).files_added == 804
            assert_exact(ledger, repo)
            changes_across_the_tree(tree)
            ledger.scan(repo)
            assert_exact(ledger, repo)
            assert no_change(ledger.scan(repo))
            # Bit rot: one byte flipped, mtime restored, and the record's ctime made to agree
            # (user space cannot write without moving ctime; real rot moves nothing).
            rel = b"top.jpg"
            path = tree + b"/" + rel
            good = ledger.store.get_record(repo.id, rel)
            assert good is not None
            before = os.stat(path)
            with open(path, "r+b") as f:
                f.write(b"X")
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            rotted = good.stat._replace(ctime_ns=os.lstat(path).st_ctime_ns)
            ledger.store.apply(
                repo.id, [Change(ChangeKind.META, rel, dataclasses.replace(good, stat=rotted))]
            )
            stats = ledger.scan(repo, verify=True)
            assert stats.corrupt == ["top.jpg"] and stats.files_hashed == stats.files_scanned
            kept = ledger.store.get_record(repo.id, rel)
            assert kept is not None and kept.digest == good.digest
            assert left_over(pg_url) == (0, 0, 0)
        finally:
            ledger.reconciler.close()


# --- real agents ------------------------------------------------------------------------------


class Helper:
    """A real ``fsledger run --distributed`` agent, in its own session (so that ``kill -9`` of
    its process group reaches its worker processes, as the death of its host would)."""

    def __init__(self, url: str, log: Path, prefix: list[str] | None = None) -> None:
        env = {
            **os.environ,
            "FSLEDGER_DATABASE_URL": url,
            "RECONCILIATION_MAX_CONCURRENCY": "2",
            "FSLEDGER_LOG_LEVEL": "INFO",
        }
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(prefix or []), str(FSLEDGER), "run", "--distributed", "--no-watch", "--no-http"],
            env=env,
            stderr=self._err,
            start_new_session=True,
        )
        self.tag = f"{socket.gethostname()}:{self.proc.pid}"
        wait_for("helper started", lambda: b"Sync manager started" in self.text().encode(), 60)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def helped(self) -> int:
        return sum(
            int(line.split("Helped with ")[1].split()[0])
            for line in self.text().splitlines()
            if "Helped with " in line
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._err.close()


@contextmanager
def owner(
    url: str, tree: bytes, monkeypatch: pytest.MonkeyPatch, pause: float
) -> Iterator[tuple[Ledger, Repository]]:
    """This process as the owning agent: the lease held, no worker processes of its own, and
    ``pause`` seconds before each item it computes itself."""
    compute = distscan.DistributedMerge._compute

    def slow(self: distscan.DistributedMerge, claim: Any) -> RangeResult:
        time.sleep(pause)
        return compute(self, claim)

    monkeypatch.setattr(distscan.DistributedMerge, "_compute", slow)
    monkeypatch.setattr(distscan.LocalWorkers, "start", lambda self, job_ids: None)
    settings = Settings(database_url=url, max_concurrency=2, distributed=True)
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(tree)
        lease = ledger.store.acquire_lease(repo.id)
        assert lease is not None
        ledger.writer(repo).lease = lease
        try:
            yield ledger, repo
        finally:
            lease.release()
            ledger.reconciler.close()


def left_over(url: str) -> tuple[int, int, int]:
    """Jobs, items and open claim transactions left in the database."""
    with psycopg.connect(url, autocommit=True) as conn:
        jobs = conn.execute("SELECT count(*) FROM scan_jobs").fetchone()
        items = conn.execute("SELECT count(*) FROM scan_work").fetchone()
        claims = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fsledger-scan:%' "
            "AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert jobs and items and claims
    return int(jobs[0]), int(items[0]), int(claims[0])


@pytest.mark.slow  # two agent processes and a tree: ~8 s
def test_two_agents_reconcile_a_tree_exactly(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first index, a rescan after changes all over the tree (moves, edits, deletions, new
    directories) and a no-change rescan, with a helper agent computing items: the ledger
    equals the disk after each, and nothing of the jobs is left."""
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=1500)
    age_tree(tree)
    with owner(pg_url, tree, monkeypatch, pause=0.15) as (ledger, repo):
        helper = Helper(pg_url, tmp_path / "helper.log")
        try:
            stats = ledger.scan(repo)
            assert (stats.files_added, stats.files_hashed, stats.error_count) == (1504, 1504, 0)
            assert_exact(ledger, repo)
            wait_for("the helper took items", lambda: helper.helped() > 0, 30)
            changes_across_the_tree(tree)
            stats = ledger.scan(repo)
            assert stats.error_count == 0 and stats.files_removed > 0 and stats.files_moved > 0
            assert_exact(ledger, repo)
            assert no_change(ledger.scan(repo))
            assert left_over(pg_url) == (0, 0, 0)
        finally:
            helper.stop()
    assert "Traceback" not in helper.text()


@pytest.mark.slow  # agents killed and frozen mid-job
def test_the_owner_killed_mid_job_a_helper_takes_over(pg_url: str, tmp_path: Path) -> None:
    """Two real agents: the owner is frozen during its distributed first index, the other agent
    helps with it, then the owner is killed (its main process, ``kill -9``). The helper takes the
    repository over, reconciles it with a job of its own (the dead owner's is swept), and
    the ledger equals the disk; no job, item or claim is left."""
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=5000)
    age_tree(tree)
    with Ledger(Settings(database_url=pg_url)) as ledger:
        repo = ledger.add_repository(tree)
    first = Helper(pg_url, tmp_path / "first.log")  # owns the repository: started first
    second: Helper | None = None
    try:

        def jobs_of(tag: str) -> int:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM scan_jobs WHERE owner = %s", (tag,)
                ).fetchone()
            return int(row[0]) if row else 0

        wait_for("the owner's job", lambda: jobs_of(first.tag) > 0, 30)
        # Frozen mid-job (its connections, its job's lock and its workers' claims held), so
        # that the helper starting now finds the job open, whatever the machine's speed.
        os.killpg(first.proc.pid, signal.SIGSTOP)
        assert jobs_of(first.tag) > 0, "the owner's job ended before it could be frozen"
        second = Helper(pg_url, tmp_path / "second.log")
        wait_for("the helper helped", lambda: "Helped with" in second.text(), 30)
        first.proc.kill()
        os.killpg(first.proc.pid, signal.SIGCONT)
        first.proc.wait(10)
        wait_for("the owner's workers end", lambda: not session(first.proc.pid), 30)
        with Ledger(Settings(database_url=pg_url)) as ledger:
            wait_for("takeover", lambda: "taking over" in second.text(), 30)
            wait_for(
                "the new owner's job or records",
                lambda: jobs_of(second.tag) > 0 or ledger.store.count_records(repo.id) > 0,
                60,
            )

            def exact() -> bool:
                try:
                    assert_exact(ledger, repo)
                except AssertionError:
                    return False
                return True

            wait_for("the ledger equals the disk", exact, 120)
            wait_for("no job, item or claim left", lambda: left_over(pg_url) == (0, 0, 0), 30)
            (op, *_rest) = ledger.store.recent_operations(repo.id, 1)
            assert op.status is OperationStatus.COMPLETED
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert second is not None and "Traceback" not in second.text()


def holds_an_item(url: str, tag: str) -> bool:
    """Whether a worker of the agent ``tag`` is inside a claim (its transaction open)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'idle in transaction'",
            (f"fsledger-scan:{tag}",),
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.slow  # an agent killed mid-job
def test_a_helper_killed_holding_an_item_loses_nothing(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper agent is frozen (SIGSTOP of its process group) at a moment one of its workers
    holds an item, and its main process is killed (SIGKILL): its worker processes end with it,
    their claims end with their connections, the item is done again by the owner, the ledger
    equals the disk, and no operation, job or claim is left."""
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=1500)
    for i in range(24):  # some weight in every range, so that items take a while
        (tmp_path / "photos" / f"{2004 + i % 5}" / f"big{i}.raw").write_bytes(os.urandom(4 << 20))
    age_tree(tree)
    with owner(pg_url, tree, monkeypatch, pause=0.3) as (ledger, repo):
        helper = Helper(pg_url, tmp_path / "helper.log")
        errors: list[BaseException] = []
        scan = threading.Thread(target=lambda: _catch(errors, lambda: ledger.scan(repo)))
        try:
            scan.start()
            killed, killed_at = False, 0.0
            deadline = time.monotonic() + 60
            while not killed and scan.is_alive() and time.monotonic() < deadline:
                os.killpg(helper.proc.pid, signal.SIGSTOP)
                if holds_an_item(pg_url, helper.tag):
                    # The agent process only, as a crash would: its worker processes must
                    # not outlive it (and keep the item).
                    helper.proc.kill()
                    killed_at = time.monotonic()
                    os.killpg(helper.proc.pid, signal.SIGCONT)
                    killed = True
                else:
                    os.killpg(helper.proc.pid, signal.SIGCONT)
                    time.sleep(0.02)
            assert killed, "the helper never held an item"
            helper.proc.wait(10)
            wait_for("the helper's workers end", lambda: not session(helper.proc.pid), 30)
            scan.join(120)
            assert not scan.is_alive() and errors == []
            done_after = time.monotonic() - killed_at
        finally:
            helper.stop()
        assert_exact(ledger, repo)
        (op,) = ledger.store.recent_operations(repo.id, 1)
        assert op.status is OperationStatus.COMPLETED
        assert ledger.store.running_operations() == []
        wait_for("no job, item or claim left", lambda: left_over(pg_url) == (0, 0, 0), 10)
        assert no_change(ledger.scan(repo))
    print(f"DIST-FIGURES reconciliation done {done_after:.2f}s after the helper was killed")


def session(sid: int) -> list[int]:
    """The processes still alive in a session."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def _catch(errors: list[BaseException], fn: Callable[[], object]) -> None:
    try:
        fn()
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def _can_unshare_mounts() -> bool:
    from fault_support import can_unshare_mounts

    return can_unshare_mounts()


@pytest.mark.slow  # an agent in a mount namespace of its own
@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and unshare -m")
def test_an_agent_without_the_root_mounted_takes_no_item(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper whose path holds an empty filesystem (a tmpfs mounted over the root in its
    private mount namespace) would see every file gone and none new: it takes nothing, says
    why, and the owner does the job alone."""
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=300)
    age_tree(tree)
    script = 'mount -t tmpfs none "$1" && shift && exec "$@"'
    prefix = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(tree, "utf-8"),
    ]
    with owner(pg_url, tree, monkeypatch, pause=0.1) as (ledger, repo):
        helper = Helper(pg_url, tmp_path / "helper.log", prefix=prefix)
        try:
            stats = ledger.scan(repo)
            assert stats.files_added == 304
            assert_exact(ledger, repo)
            wait_for("skip", lambda: "not mounted here as on the owner" in helper.text(), 10)
        finally:
            helper.stop()
    assert "Helping with" not in helper.text() and helper.helped() == 0
