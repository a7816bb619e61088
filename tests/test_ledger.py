"""The library API: repositories, the one writer per repository, status, recovery."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_settings
from fsledger.config import Settings
from fsledger.errors import RepositoryExists, RepositoryNotFound, RootUnavailable
from fsledger.ledger import Ledger, normalize_root
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    OperationStatus,
    OperationType,
    RepoSettings,
    RepoState,
    utcnow,
)
from fsledger.reconcile import owner_tag
from fsledger.store import Store
from treeutil import age_tree, disk_snapshot, ledger_snapshot, make_tree


def test_normalize_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert normalize_root(str(tmp_path / "link")) == os.fsencode(str(real))
    assert normalize_root(os.fsencode(str(real)) + b"/./") == os.fsencode(str(real))


def test_add_repository(ledger: Ledger, tree: bytes) -> None:
    repo = ledger.add_repository(tree, settings=RepoSettings(ignore_patterns=("*.xmp",)))
    assert repo.name == "tree"
    assert repo.root == tree
    assert repo.state is RepoState.ONLINE
    assert ledger.list_repositories() == [repo]
    assert ledger.store.count_records(repo.id) == 0  # added, not scanned


def test_add_repository_through_a_symlink_stores_the_real_root(
    ledger: Ledger, tree: bytes, tmp_path: Path
) -> None:
    link = tmp_path / "via-link"
    link.symlink_to(os.fsdecode(tree))
    repo = ledger.add_repository(str(link), name="linked")
    assert repo.root == tree


def test_add_repository_refuses_what_is_not_a_directory(ledger: Ledger, tmp_path: Path) -> None:
    with pytest.raises(RootUnavailable):
        ledger.add_repository(tmp_path / "missing")  # type: ignore[arg-type]
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(RootUnavailable, match="not a directory"):
        ledger.add_repository(str(tmp_path / "file"))
    assert ledger.list_repositories() == []


def test_add_repository_refuses_duplicates_and_nesting(ledger: Ledger, tmp_path: Path) -> None:
    for d in ("photos/inner", "photos2", "other"):
        (tmp_path / d).mkdir(parents=True)
    photos = ledger.add_repository(str(tmp_path / "photos"))
    with pytest.raises(RepositoryExists):
        ledger.add_repository(str(tmp_path / "photos"), name="again")
    with pytest.raises(RepositoryExists):
        ledger.add_repository(str(tmp_path / "other"), name="photos")
    with pytest.raises(RepositoryExists, match="overlaps"):
        ledger.add_repository(str(tmp_path / "photos" / "inner"))
    with pytest.raises(RepositoryExists, match="overlaps"):
        ledger.add_repository(str(tmp_path), name="parent")
    # "/photos2" starts with the string "/photos" but is not inside it.
    photos2 = ledger.add_repository(str(tmp_path / "photos2"))
    assert ledger.list_repositories() == [photos, photos2]


def test_resolve(ledger: Ledger, tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ledger.add_repository(tree, name="family")
    assert ledger.resolve(str(repo.id)) == repo
    assert ledger.resolve("family") == repo
    assert ledger.resolve(os.fsdecode(tree)) == repo
    assert ledger.resolve(os.fsdecode(tree) + "/") == repo
    monkeypatch.chdir(os.fsdecode(os.path.dirname(tree)))
    assert ledger.resolve("tree") == repo  # a relative path, not the name
    with pytest.raises(RepositoryNotFound, match="family"):
        ledger.resolve("nope")


def test_resolve_with_no_repositories(ledger: Ledger) -> None:
    with pytest.raises(RepositoryNotFound, match="none yet"):
        ledger.resolve("anything")


def test_remove_repository(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a": b"a", "b": b"b"})
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    ledger.remove_repository(repo)
    assert ledger.list_repositories() == []
    assert ledger.store.count_records(repo.id) == 2  # kept without purge

    again = ledger.add_repository(tree)
    ledger.scan(again)
    ledger.remove_repository(again, purge=True)
    assert ledger.store.count_records(again.id) == 0
    assert ledger.operations(again) == []


def test_set_state(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = ledger.add_repository(tree)
    offline = ledger.set_state(repo, RepoState.OFFLINE)
    assert offline.state is RepoState.OFFLINE
    stored = store.get_repository(repo.id)
    assert stored is not None and stored.state is RepoState.OFFLINE
    assert ledger.set_state(offline, RepoState.OFFLINE) == stored
    # A successful scan brings it back online.
    ledger.scan(offline)
    stored = store.get_repository(repo.id)
    assert stored is not None and stored.state is RepoState.ONLINE


def test_one_writer_per_repository(ledger: Ledger, tree: bytes, tmp_path: Path) -> None:
    repo = ledger.add_repository(tree)
    (tmp_path / "second").mkdir()
    other = ledger.add_repository(str(tmp_path / "second"))
    assert ledger.writer(repo) is ledger.writer(repo)
    assert ledger.writer(repo) is not ledger.writer(other)
    ledger.remove_repository(repo)
    assert ledger.writer(repo) is not None  # a fresh one, if asked again


def test_writer_drops_changes_the_disk_has_moved_past(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a.jpg": b"a"})
    repo = ledger.add_repository(tree)
    path = os.path.join(tree, b"a.jpg")
    st = os.lstat(path)
    now = FileRecord(b"a.jpg", FileStat.from_stat(st), None, utcnow())
    stale = FileRecord(
        b"a.jpg",
        FileStat(st.st_size + 1, st.st_mtime_ns, st.st_ctime_ns, st.st_ino),
        None,
        now.last_scanned,
    )
    writer = ledger.writer(repo)
    applied = writer.apply(
        [
            Change(ChangeKind.CREATED, b"a.jpg", stale),  # the disk says otherwise
            Change(
                ChangeKind.CREATED,
                b"gone.jpg",
                FileRecord(b"gone.jpg", now.stat, None, now.last_scanned),
            ),
            Change(ChangeKind.DELETED, b"a.jpg"),  # the file is still there
        ]
    )
    assert applied.changes == ()
    assert len(applied.dropped) == 3
    assert applied.last_seq is None
    applied = writer.apply([Change(ChangeKind.CREATED, b"a.jpg", now)])
    assert applied.changes and applied.last_seq == ledger.store.latest_seq()
    assert [r.path for r in ledger.files(repo)] == [b"a.jpg"]


def test_a_check_made_ahead_holds_until_another_run_writes(ledger: Ledger, tree: bytes) -> None:
    """A batch checked against the disk before the writer's lock (``check_ahead``, what a
    scan does while its previous batch is written) is checked again if another run of the
    same writer (the watcher) wrote in between: its newer record stays."""
    make_tree(tree, {"a.jpg": b"a", "b.jpg": b"b"})
    repo = ledger.add_repository(tree)
    writer = ledger.writer(repo)

    def record(name: bytes) -> FileRecord:
        return FileRecord(
            name, FileStat.from_stat(os.lstat(os.path.join(tree, name))), None, utcnow()
        )

    scan, other = writer.ticket(), writer.ticket()
    batch = [Change(ChangeKind.CREATED, b"a.jpg", record(b"a.jpg"))]
    checked = writer.check_ahead(batch, scan)
    assert checked is not None and checked.kept == batch and checked.dropped == []
    # The file grows; the watcher looks and writes what it is now, before the scan's write.
    with open(os.path.join(tree, b"a.jpg"), "ab") as f:
        f.write(b"more")
    newer = record(b"a.jpg")
    assert writer.apply([Change(ChangeKind.MODIFIED, b"a.jpg", newer)]).changes
    applied = writer.apply(batch, checked=checked)
    assert applied.changes == () and applied.dropped == tuple(batch)
    assert [(r.path, r.stat) for r in ledger.files(repo)] == [(b"a.jpg", newer.stat)]

    # Unspoilt by the run's own writes: its verdict is taken as it was (a disk changed
    # after the check is the next look's to write, as after a check under the lock).
    first = [Change(ChangeKind.CREATED, b"b.jpg", record(b"b.jpg"))]
    second = [Change(ChangeKind.MODIFIED, b"a.jpg", record(b"a.jpg"))]
    ahead = [writer.check_ahead(first, scan), writer.check_ahead(second, scan)]
    assert writer.apply(first, checked=ahead[0]).changes == tuple(first)
    os.unlink(os.path.join(tree, b"a.jpg"))
    assert writer.apply(second, checked=ahead[1]).changes == tuple(second)
    assert [r.path for r in ledger.files(repo)] == [b"a.jpg", b"b.jpg"]
    # For any other run, every write but its own counts: the watcher's and the scan's two.
    assert (scan.others, other.others) == (1, 3)

    # With a live run attached (the watcher, which writes nothing where the records already
    # show the disk), nothing is checked ahead, and a check made before it came is made
    # again: b.jpg deleted after the check, the watcher finding no record to remove.
    stale = [Change(ChangeKind.MODIFIED, b"b.jpg", record(b"b.jpg"))]
    early = writer.check_ahead(stale, scan)
    assert early is not None and early.kept == stale
    os.unlink(os.path.join(tree, b"b.jpg"))
    writer.attach_live()
    try:
        assert writer.check_ahead(stale, scan) is None
        assert writer.apply(stale, checked=early).changes == ()
    finally:
        writer.detach_live()
    assert writer.check_ahead(stale, scan) is not None


def test_a_run_no_other_wrote_beside_writes_what_it_saw(ledger: Ledger, tree: bytes) -> None:
    """While no other run has written since a run began and no live run is attached, the
    run's created, modified and metadata changes are written as it saw them, unlooked at
    (``check_ahead``): a file deleted after its look keeps the record written for it until
    the next scan removes it, as after a deletion just after the write. Deletions are
    still looked at; once another run writes, everything is."""
    make_tree(tree, {"a.jpg": b"a", "b.jpg": b"b"})
    repo = ledger.add_repository(tree)
    writer = ledger.writer(repo)
    a_stat = FileStat.from_stat(os.lstat(os.path.join(tree, b"a.jpg")))
    a = FileRecord(b"a.jpg", a_stat, Digest("blake3", "00" * 32), utcnow())
    unread = FileRecord(b"b.jpg", a_stat, None, utcnow())  # a look that failed: no hash
    scan = writer.ticket()
    batch = [
        Change(ChangeKind.CREATED, b"a.jpg", a),
        Change(ChangeKind.DELETED, b"b.jpg"),  # b.jpg is still there
        Change(ChangeKind.CREATED, b"b.jpg", unread),  # b.jpg is not that
    ]
    os.unlink(os.path.join(tree, b"a.jpg"))
    checked = writer.check_ahead(batch, scan)
    assert checked is not None
    assert checked.kept == batch[:1] and checked.dropped == batch[1:]
    assert writer.apply(batch, checked=checked).changes == tuple(batch[:1])
    assert [r.path for r in ledger.files(repo)] == [b"a.jpg"]
    stats = ledger.scan(repo)
    assert (stats.files_removed, stats.files_added) == (1, 1)
    assert [r.path for r in ledger.files(repo)] == [b"b.jpg"]

    # The scan wrote: for this older run, every change is looked at again.
    assert scan.others > 0
    gone = [Change(ChangeKind.MODIFIED, b"a.jpg", a)]
    checked = writer.check_ahead(gone, scan)
    assert checked is not None and checked.kept == [] and checked.dropped == gone


def test_files_below_a_prefix(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a/x": b"", "a/y/z": b"", "a.txt": b"", "a0": b"", "b": b""})
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    assert [r.path for r in ledger.files(repo, b"a")] == [b"a/x", b"a/y/z"]
    assert [r.path for r in ledger.files(repo)] == [b"a.txt", b"a/x", b"a/y/z", b"a0", b"b"]


def test_status_and_operations(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a": b"a", "b/c": b"c"})
    repo = ledger.add_repository(tree)
    empty = ledger.status(repo)
    assert (empty.total_files, empty.last_scan_time, empty.last_sync_operation) == (0, None, None)

    ledger.scan(repo)
    status = ledger.status(repo, is_watching=True)
    assert status.total_files == 2
    assert status.is_watching
    assert status.last_sync_operation is not None
    assert status.last_sync_operation.status is OperationStatus.COMPLETED
    assert status.last_scan_time == status.last_sync_operation.start_time
    doc = status.to_json()
    assert doc["total_files"] == 2 and doc["state"] == "online"
    assert [o.id for o in ledger.operations(None)] == [status.last_sync_operation.id]


def test_status_count_follows_changes_made_by_another_process(
    ledger: Ledger, tree: bytes, settings: Settings
) -> None:
    """The count ``status`` shows is kept between polls; it must still follow every change,
    including those another process (a CLI scan) writes to the same database."""
    make_tree(tree, {"a": b"a", "b/c": b"c"})
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 2
    make_tree(tree, {"d": b"d", "e/f": b"f"})
    os.unlink(os.path.join(tree, b"a"))
    with Ledger(settings) as other:
        other.scan(repo)
    assert ledger.status(repo).total_files == 3
    os.rename(os.path.join(tree, b"e"), os.path.join(tree, b"g"))
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 3
    os.unlink(os.path.join(tree, b"d"))
    ledger.scan(repo)
    assert ledger.status(repo).total_files == ledger.store.count_records(repo.id) == 2


def test_recover_interrupted_marks_dead_owners_failed(ledger: Ledger, tree: bytes) -> None:
    repo = ledger.add_repository(tree)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    store = ledger.store
    dead = store.start_operation(repo.id, OperationType.STARTUP, f"{host}:{child.pid}", utcnow())
    mine = store.start_operation(repo.id, OperationType.RECONCILIATION, owner_tag(), utcnow())
    remote = store.start_operation(repo.id, OperationType.RECONCILIATION, "elsewhere:1", utcnow())

    assert ledger.recover_interrupted() == 1

    ops = {o.id: o for o in ledger.operations(repo)}
    assert ops[dead.id].status is OperationStatus.FAILED
    assert "interrupted" in (ops[dead.id].error_message or "")
    assert ops[dead.id].end_time is not None
    # A live process's scan, and another host's, are left alone.
    assert ops[mine.id].status is OperationStatus.RUNNING
    assert ops[remote.id].status is OperationStatus.RUNNING
    assert ledger.recover_interrupted() == 0


def test_ledger_opens_its_own_store(store_url: str, tree: bytes) -> None:
    make_tree(tree, {"a": b"a"})
    age_tree(tree)
    with Ledger(make_settings(store_url)) as led:
        repo = led.add_repository(tree)
        led.scan(repo)
        assert ledger_snapshot(led, repo) == disk_snapshot(tree)
    with Ledger(make_settings(store_url)) as led:  # a second process, later
        (again,) = led.list_repositories()
        assert ledger_snapshot(led, again) == disk_snapshot(tree)
