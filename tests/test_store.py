"""The ``Store`` contract, run against SQLite and PostgreSQL through one fixture."""

from __future__ import annotations

import itertools
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from fsledger.errors import RepositoryExists, StoreUnavailable
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    MountPoint,
    OperationStatus,
    OperationType,
    RelPath,
    RepoSettings,
    Repository,
    RepoState,
    ScanStats,
    datetime_to_ns,
)
from fsledger.store import Store, open_store, open_worker_store
from fsledger.store import postgres as pg_store
from fsledger.store import sqlite as sqlite_store
from fsledger.store.migrations import POSTGRES, SQLITE
from fsledger.store.postgres import PostgresWorkerStore
from fsledger.store.sql import SqlStore
from support import wait_for

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
_inodes = itertools.count(1000)


def make_repo(name: str = "photos", root: bytes = b"/srv/photos", **kw: Any) -> Repository:
    return Repository(id=uuid.uuid4(), name=name, root=root, created_at=T0, **kw)


def make_record(
    path: RelPath,
    size: int = 10,
    mtime_ns: int = 1_700_000_000_123_456_789,
    inode: int | None = None,
    digest: str | None = "ab" * 32,
    algo: str = "blake3",
    scanned: datetime = T0,
) -> FileRecord:
    return FileRecord(
        path=path,
        stat=FileStat(size, mtime_ns, mtime_ns + 1, next(_inodes) if inode is None else inode),
        digest=Digest(algo, digest) if digest is not None else None,
        last_scanned=scanned,
    )


def created(*paths: RelPath) -> list[Change]:
    return [Change(ChangeKind.CREATED, p, make_record(p)) for p in paths]


def all_records(store: Store, repo: Repository) -> dict[RelPath, FileRecord]:
    return {r.path: r for r in store.iter_records(repo.id)}


@pytest.fixture
def repo(store: Store) -> Repository:
    r = make_repo()
    store.add_repository(r)
    return r


def _migration_versions(store: Store) -> list[int]:
    with cast(SqlStore, store)._tx() as cur:
        cur.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [int(row[0]) for row in cur.fetchall()]


# --- migrations -----------------------------------------------------------------------


def test_migrates_an_empty_database_and_reopens_idempotently(store_url: str) -> None:
    first = open_store(store_url)
    try:
        expected = list(range(1, len(SQLITE if store_url.startswith("sqlite") else POSTGRES) + 1))
        assert _migration_versions(first) == expected
        assert first.list_repositories() == []
        assert first.latest_seq() == 0
        repo = make_repo()
        first.add_repository(repo)
        first.apply(repo.id, created(b"kept.jpg"))
    finally:
        first.close()

    second = open_store(store_url)  # migrating again must be a no-op that keeps the data
    try:
        assert _migration_versions(second) == expected
        assert second.list_repositories() == [repo]
        assert list(all_records(second, repo)) == [b"kept.jpg"]
    finally:
        second.close()


def test_two_open_stores_on_one_database_see_each_other(store_url: str, store: Store) -> None:
    other = open_store(store_url)
    try:
        repo = make_repo()
        store.add_repository(repo)
        assert other.get_repository(repo.id) == repo
    finally:
        other.close()


# --- repositories ---------------------------------------------------------------------


def test_repository_round_trip(store: Store) -> None:
    repo = make_repo(
        name="Fotos é",
        root=b"/mnt/\xff\xfe disk",
        settings=RepoSettings(("*.xmp", "cache/*"), 30.0, 86400.0),
        root_dev=2**63 + 5,  # st_dev values do not always fit a signed 64-bit column
        state=RepoState.OFFLINE,
    )
    store.add_repository(repo)
    assert store.get_repository(repo.id) == repo
    assert store.list_repositories() == [repo]
    assert store.get_repository(uuid.uuid4()) is None


def test_list_repositories_sorted_by_name(store: Store) -> None:
    b = make_repo("b", b"/b")
    a = make_repo("a", b"/a")
    store.add_repository(b)
    store.add_repository(a)
    assert [r.name for r in store.list_repositories()] == ["a", "b"]


def test_duplicate_name_or_root_is_refused(store: Store, repo: Repository) -> None:
    with pytest.raises(RepositoryExists):
        store.add_repository(make_repo(name=repo.name, root=b"/elsewhere"))
    with pytest.raises(RepositoryExists):
        store.add_repository(make_repo(name="other", root=repo.root))
    assert store.list_repositories() == [repo]


def test_update_repository(store: Store, repo: Repository) -> None:
    updated = replace(
        repo,
        name="renamed",
        root=b"/srv/new",
        settings=RepoSettings(("*.tmp2",)),
        root_dev=42,
        state=RepoState.OFFLINE,
    )
    store.update_repository(updated)
    assert store.get_repository(repo.id) == updated


def test_delete_repository_with_purge_removes_everything(store: Store, repo: Repository) -> None:
    keep = make_repo("keep", b"/keep")
    store.add_repository(keep)
    store.apply(repo.id, created(b"a", b"b"))
    store.apply(keep.id, created(b"c"))
    op = store.start_operation(repo.id, OperationType.RECONCILIATION, "h:1", T0)
    store.finish_operation(op.id, OperationStatus.COMPLETED, ScanStats(), None, T0)

    head = store.latest_seq()
    store.delete_repository(repo.id, purge=True)

    assert store.get_repository(repo.id) is None
    assert store.count_records(repo.id) == 0
    assert store.recent_operations(repo.id, 10) == []
    # Its feed entries are blanked, not deleted: the head moves on (by the removal event)
    # instead of back, and the only entry of the repository left to read is the removal.
    assert store.latest_seq() == head + 1
    assert [(e.kind, e.path) for e in store.changes_since(0, 100, repo.id)] == [
        (ChangeKind.REPO_REMOVED, b"")
    ]
    # The other repository is untouched.
    assert store.count_records(keep.id) == 1
    assert [(e.kind, e.path) for e in store.changes_since(0, 100, keep.id)] == [
        (ChangeKind.REPO_ADDED, b""),
        (ChangeKind.CREATED, b"c"),
    ]


def test_repository_head_moves_with_every_change_that_adds_or_removes_a_record(
    store: Store, repo: Repository
) -> None:
    """``Ledger.status`` keeps a repository's record count by this head: a change that adds
    or removes a record must move it, and only the repository's own changes do."""
    other = make_repo("other", b"/other")
    store.add_repository(other)
    heads = [store.repository_head(repo.id)]
    store.apply(repo.id, created(b"a", b"b", b"dir/c"))
    heads.append(store.repository_head(repo.id))
    store.apply(repo.id, [Change(ChangeKind.DELETED, b"b")])
    heads.append(store.repository_head(repo.id))
    moved = replace(make_record(b"z"), path=b"z")
    store.apply(repo.id, [Change(ChangeKind.MOVED, b"z", moved, old_path=b"a")])
    heads.append(store.repository_head(repo.id))
    store.apply(repo.id, [Change(ChangeKind.DIR_MOVED, b"e", old_path=b"dir")])
    heads.append(store.repository_head(repo.id))
    assert heads == sorted(set(heads)), heads  # strictly increasing
    # A metadata-only update (not news) and another repository's changes leave it alone.
    before = store.repository_head(repo.id)
    store.apply(repo.id, [Change(ChangeKind.META, b"z", replace(moved, last_scanned=T0))])
    store.apply(other.id, created(b"x"))
    assert store.repository_head(repo.id) == before
    assert store.count_records(repo.id) == 2
    assert store.repository_head(uuid.uuid4()) == 0


def test_delete_repository_without_purge_keeps_records(store: Store, repo: Repository) -> None:
    store.apply(repo.id, created(b"a", b"b"))
    store.delete_repository(repo.id, purge=False)
    assert store.get_repository(repo.id) is None
    assert store.list_repositories() == []
    assert list(all_records(store, repo)) == [b"a", b"b"]
    # The same root can be added back under the same id and finds its records again.
    store.add_repository(repo)
    assert store.count_records(repo.id) == 2


# --- mount points below the root -------------------------------------------------------


def test_mount_points_round_trip_per_repository(store: Store, repo: Repository) -> None:
    other = make_repo("other", b"/srv/other")
    store.add_repository(other)
    assert store.mount_points(repo.id) == []
    points = [
        MountPoint(b"nas", "nfs4", "fileserver:/export/photos", True),
        MountPoint(b"a b/\xff\xfe", "fuse.sshfs", "me@host:/pics", False),
        MountPoint(b"usb"),
    ]
    store.set_mount_points(repo.id, points)
    store.set_mount_points(other.id, [MountPoint(b"x", "ext4", "/dev/sdb1")])
    # In path byte order, every field kept, the other repository's apart.
    assert store.mount_points(repo.id) == sorted(points, key=lambda p: p.path)
    assert store.mount_points(other.id) == [MountPoint(b"x", "ext4", "/dev/sdb1")]
    # Replaced as a whole.
    store.set_mount_points(repo.id, [MountPoint(b"nas", "nfs4", "fileserver:/e", False)])
    assert store.mount_points(repo.id) == [MountPoint(b"nas", "nfs4", "fileserver:/e", False)]
    store.set_mount_points(repo.id, [])
    assert store.mount_points(repo.id) == []
    assert len(store.mount_points(other.id)) == 1


def test_mount_points_survive_a_reopen_and_go_with_a_purge(store_url: str) -> None:
    first = open_store(store_url)
    repo = make_repo()
    try:
        first.add_repository(repo)
        first.set_mount_points(repo.id, [MountPoint(b"nas", "nfs", "srv:/x", False)])
    finally:
        first.close()
    second = open_store(store_url)
    try:
        assert second.mount_points(repo.id) == [MountPoint(b"nas", "nfs", "srv:/x", False)]
        second.delete_repository(repo.id, purge=True)
        assert second.mount_points(repo.id) == []
    finally:
        second.close()


# --- apply ----------------------------------------------------------------------------


def test_apply_created_round_trips_every_field(store: Store, repo: Repository) -> None:
    rec = make_record(b"IMG_0001.jpg", size=123_456, inode=77, digest="cd" * 32)
    no_hash = make_record(b"raw.cr2", digest=None)
    store.apply(
        repo.id,
        [
            Change(ChangeKind.CREATED, rec.path, rec),
            Change(ChangeKind.CREATED, no_hash.path, no_hash),
        ],
    )
    assert store.get_record(repo.id, rec.path) == rec
    got = store.get_record(repo.id, no_hash.path)
    assert got == no_hash
    assert got is not None and got.digest is None and got.content_hash is None
    assert store.get_record(repo.id, b"missing") is None
    assert store.count_records(repo.id) == 2


@pytest.mark.parametrize("batch", [1, 1200], ids=["one", "bulk"])
def test_mod_time_is_the_mtime_to_the_microsecond(
    store: Store, repo: Repository, batch: int
) -> None:
    """The seed's ``mod_time`` column, computed by the database from ``mtime_ns``: exact to
    the microsecond (floored), before 1970 too, by the one-row and the bulk paths."""
    cases = {
        b"now.jpg": 1_700_000_000_123_456_789,
        b"whole.jpg": 1_700_000_000_000_000_000,
        b"epoch.jpg": 0,
        b"1969.jpg": -1_500_000_000,
        b"1901.jpg": -2_147_483_648_000_000_001,
    }
    changes = [
        Change(ChangeKind.CREATED, p, make_record(p, mtime_ns=ns)) for p, ns in cases.items()
    ]
    changes += created(*(b"pad/%05d" % i for i in range(batch - len(changes))))
    store.apply(repo.id, changes)
    with cast(SqlStore, store)._tx() as cur:
        cur.execute(
            "SELECT file_path, mod_time FROM file_records WHERE repository_id = ?",
            (cast(SqlStore, store)._uuid_in(repo.id),),
        )
        got = {bytes(p): m for p, m in cur.fetchall() if not bytes(p).startswith(b"pad/")}
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for path, ns in cases.items():
        value = got[path]
        stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
        assert stamp == epoch + timedelta(microseconds=ns // 1000), path


def test_bulk_created_batch_over_an_existing_record_still_upserts(
    store: Store, repo: Repository
) -> None:
    """A big batch of CREATED changes is copied in bulk; when another writer recorded one of
    its paths in between (the watcher, during a first index), the batch still lands whole
    and that record takes the batch's state."""
    early = make_record(b"b/0500", size=1)
    store.apply(repo.id, [Change(ChangeKind.CREATED, early.path, early)])
    batch = created(*(b"b/%04d" % i for i in range(1500)))
    last_seq = store.apply(repo.id, batch)
    records = all_records(store, repo)
    assert len(records) == 1500
    assert records == {c.path: c.record for c in batch}
    assert last_seq is not None
    assert [e.path for e in store.changes_since(last_seq - 1500, 2000)] == [c.path for c in batch]
    # The next batch is copied in bulk again.
    more = created(*(b"c/%04d" % i for i in range(1200)))
    store.apply(repo.id, more)
    assert store.count_records(repo.id) == 2700


def _has_dup_index(store: Store) -> bool:
    with cast(SqlStore, store)._tx() as cur:
        if store.url.startswith("sqlite"):
            cur.execute("SELECT count(*) FROM sqlite_master WHERE name = 'idx_file_records_dup'")
        else:
            cur.execute(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_file_records_dup' "
                "AND schemaname = current_schema()"
            )
        return int(cur.fetchone()[0]) == 1


def test_deferred_indexes_keep_queries_right_and_come_back(
    store_url: str, store: Store, repo: Repository
) -> None:
    """While indexes are deferred (a big first index) duplicates are still found; nested
    deferrals end with the outer one and build the index again."""
    twin = [make_record(b"a", digest="ee" * 32), make_record(b"b", digest="ee" * 32)]
    assert _has_dup_index(store)
    with store.defer_indexes():
        with store.defer_indexes():
            store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in twin])
        assert [g.content_hash for g in store.duplicates(repo.id, 10)] == ["ee" * 32]
        assert not _has_dup_index(store)
        store.apply(repo.id, created(b"c"))
    assert _has_dup_index(store)
    (group,) = store.duplicates(repo.id, 10)
    assert [f.path for f in group.files] == [b"a", b"b"]


def test_an_index_a_crash_left_deferred_is_rebuilt_at_open(
    store_url: str, store: Store, repo: Repository
) -> None:
    """SQLite cannot tell a live deferral from a dead one: every open rebuilds the index.
    PostgreSQL can (the deferring session's lock): an open during a live deferral leaves it
    dropped, one after its session died rebuilds it, and the deferral still ends well."""
    with store.defer_indexes():
        assert not _has_dup_index(store)
        reopened = open_store(store_url)
        try:
            if store_url.startswith("sqlite"):
                assert _has_dup_index(reopened)
                return
            assert not _has_dup_index(reopened)
            with psycopg.connect(store_url, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2",
                    (pg_store._DEFERRAL_LOCK,),
                ).fetchall()
            assert killed == [(True,)]
            wait_for("the deferring session to end", lambda: not _deferral_sessions(store_url))
            again = open_store(store_url)
            again.close()
            assert _has_dup_index(reopened)
        finally:
            reopened.close()
    assert _has_dup_index(store)
    store.apply(repo.id, created(b"after"))
    assert store.count_records(repo.id) == 1


def test_postgres_keeps_the_index_when_the_table_is_busy(pg_url: str) -> None:
    """A transaction that holds file_records (a long read of another process) makes the drop
    wait at most its lock timeout: the deferral is declined, the index stays, writes go on."""
    store, repo = open_store(pg_url), make_repo()
    try:
        store.add_repository(repo)
        with psycopg.connect(pg_url) as reader:
            reader.execute("SELECT count(*) FROM file_records").fetchone()  # holds its lock
            started = time.monotonic()
            with store.defer_indexes():
                assert time.monotonic() - started < 10
                assert _has_dup_index(store)
                store.apply(repo.id, created(b"a", b"b"))
            reader.rollback()
        assert _has_dup_index(store)
        assert store.count_records(repo.id) == 2
    finally:
        store.close()


def _deferral_sessions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s",
            (pg_store._DEFERRAL_LOCK,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_apply_modified_meta_deleted(store: Store, repo: Repository) -> None:
    store.apply(repo.id, created(b"a", b"b", b"c"))
    a2 = make_record(b"a", size=99, digest="01" * 32, scanned=T0 + timedelta(seconds=5))
    b2 = replace(
        make_record(b"b", mtime_ns=1_800_000_000_000_000_001),
        digest=all_records(store, repo)[b"b"].digest,
    )
    store.apply(
        repo.id,
        [
            Change(ChangeKind.MODIFIED, b"a", a2),
            Change(ChangeKind.META, b"b", b2),
            Change(ChangeKind.DELETED, b"c"),
        ],
    )
    assert all_records(store, repo) == {b"a": a2, b"b": b2}


def test_apply_mixed_batch_keeps_order(store: Store, repo: Repository) -> None:
    """Create, delete and re-create one path in one batch: the last change wins."""
    first = make_record(b"x", size=1)
    again = make_record(b"x", size=2)
    store.apply(
        repo.id,
        [
            Change(ChangeKind.CREATED, b"x", first),
            Change(ChangeKind.DELETED, b"x"),
            Change(ChangeKind.CREATED, b"x", again),
            Change(ChangeKind.CREATED, b"y", make_record(b"y")),
            Change(ChangeKind.DELETED, b"y"),
        ],
    )
    assert all_records(store, repo) == {b"x": again}


def test_apply_moved(store: Store, repo: Repository) -> None:
    src = make_record(b"old/name.jpg", inode=5)
    occupied = make_record(b"new/name.jpg", inode=6)
    store.apply(
        repo.id,
        [Change(ChangeKind.CREATED, r.path, r) for r in (src, occupied)],
    )
    moved = replace(src, path=b"new/name.jpg", last_scanned=T0 + timedelta(seconds=1))
    store.apply(repo.id, [Change(ChangeKind.MOVED, moved.path, moved, old_path=src.path)])
    # The destination's previous record is replaced, the source's is gone.
    assert all_records(store, repo) == {b"new/name.jpg": moved}


def test_apply_dir_moved_moves_exactly_the_subtree(store: Store, repo: Repository) -> None:
    paths = [
        b"photos/a.jpg",
        b"photos/sub/b.jpg",
        b"photos.txt",  # '.' sorts before '/'
        b"photos-old/c.jpg",  # '-' sorts before '/'
        b"photos0/d.jpg",  # '0' is the byte right after '/'
        b"photos2/e.jpg",  # a plain string prefix would catch this one
        b"archive/stale.jpg",  # replaced by the move
    ]
    store.apply(repo.id, created(*paths))
    before = all_records(store, repo)

    store.apply(repo.id, [Change(ChangeKind.DIR_MOVED, b"archive", old_path=b"photos")])

    after = all_records(store, repo)
    assert sorted(after) == sorted(
        [
            b"archive/a.jpg",
            b"archive/sub/b.jpg",
            b"photos.txt",
            b"photos-old/c.jpg",
            b"photos0/d.jpg",
            b"photos2/e.jpg",
        ]
    )
    # Moved records keep everything but the path.
    assert after[b"archive/a.jpg"] == replace(before[b"photos/a.jpg"], path=b"archive/a.jpg")
    assert after[b"archive/sub/b.jpg"] == replace(
        before[b"photos/sub/b.jpg"], path=b"archive/sub/b.jpg"
    )
    for p in (b"photos.txt", b"photos-old/c.jpg", b"photos0/d.jpg", b"photos2/e.jpg"):
        assert after[p] == before[p]


def test_apply_dir_moved_with_awkward_bytes(store: Store, repo: Repository) -> None:
    store.apply(repo.id, created(b"\xff\xfe/\x01x", b"\xff\xfe/n\nl"))
    store.apply(repo.id, [Change(ChangeKind.DIR_MOVED, b"d\xc3\xa9j\xe0", old_path=b"\xff\xfe")])
    assert sorted(all_records(store, repo)) == [b"d\xc3\xa9j\xe0/\x01x", b"d\xc3\xa9j\xe0/n\nl"]


def test_apply_empty_batch(store: Store, repo: Repository) -> None:
    assert store.apply(repo.id, []) is None
    assert store.count_records(repo.id) == 0


def test_records_are_per_repository(store: Store, repo: Repository) -> None:
    other = make_repo("other", b"/other")
    store.add_repository(other)
    store.apply(repo.id, created(b"same"))
    store.apply(other.id, created(b"same", b"only-other"))
    assert store.count_records(repo.id) == 1
    assert store.count_records(other.id) == 2
    store.apply(other.id, [Change(ChangeKind.DELETED, b"same")])
    assert list(all_records(store, repo)) == [b"same"]


# --- reading --------------------------------------------------------------------------

AWKWARD: list[RelPath] = [
    b"a.txt",
    b"a/x",
    b"a/y/z",
    b"a-b",
    b"a0",
    b"a",
    b"A",
    b"\xff\xfe",
    b"\xff",
    b"\xc3\xa9t\xc3\xa9.jpg",
    b"e\xcc\x81",
    b"with\nnewline",
    b"with space",
    b"\x01ctl",
    b"\x7f",
    b"Z",
    b"z",
    b"b/\xff/c",
]


def test_page_records_order_is_python_bytes_order(store: Store, repo: Repository) -> None:
    store.apply(repo.id, created(*reversed(AWKWARD)))
    expected = sorted(AWKWARD)

    paged: list[RelPath] = []
    after: RelPath | None = None
    while batch := store.page_records(repo.id, after, 3):
        assert len(batch) <= 3
        paged += [r.path for r in batch]
        after = batch[-1].path
    assert paged == expected
    assert [r.path for r in store.iter_records(repo.id, page=4)] == expected
    assert [r.path for r in store.page_records(repo.id, None, 1000)] == expected
    # Paging resumes strictly after the cursor, even from a path that is not stored.
    assert [r.path for r in store.page_records(repo.id, b"a/", 2)] == [b"a/x", b"a/y/z"]


def test_page_records_prefix_is_a_directory_not_a_string_prefix(
    store: Store, repo: Repository
) -> None:
    store.apply(repo.id, created(*AWKWARD))
    assert [r.path for r in store.page_records(repo.id, None, 100, b"a")] == [b"a/x", b"a/y/z"]
    assert [r.path for r in store.page_records(repo.id, None, 100, b"a/")] == [b"a/x", b"a/y/z"]
    assert [r.path for r in store.page_records(repo.id, b"a/x", 100, b"a")] == [b"a/y/z"]
    assert [r.path for r in store.page_records(repo.id, None, 1, b"a")] == [b"a/x"]
    assert [r.path for r in store.page_records(repo.id, None, 100, b"b/\xff")] == [b"b/\xff/c"]
    assert store.page_records(repo.id, None, 100, b"a.txt") == []
    assert store.page_records(repo.id, None, 100, b"nothing") == []


def test_records_by_inode_including_unsigned_64_bit(store: Store, repo: Repository) -> None:
    big = make_record(b"big", inode=2**64 - 1)
    half = make_record(b"half", inode=2**63)
    small = make_record(b"small", inode=1)
    twin = make_record(b"twin", inode=1)  # hard links share an inode
    store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in (big, half, small, twin)])

    assert store.get_record(repo.id, b"big") == big
    assert store.get_record(repo.id, b"half") == half
    assert {r.path for r in store.records_by_inode(repo.id, [2**64 - 1])} == {b"big"}
    assert {r.path for r in store.records_by_inode(repo.id, [2**63])} == {b"half"}
    assert {r.path for r in store.records_by_inode(repo.id, [1, 404])} == {b"small", b"twin"}
    assert store.records_by_inode(repo.id, []) == []
    other = make_repo("other", b"/other")
    store.add_repository(other)
    assert store.records_by_inode(other.id, [1]) == []


def test_record_rows_are_the_records_flat(store: Store, repo: Repository) -> None:
    """A rescan's flat rows carry what the records hold, exactly: unsigned 64-bit inodes
    (stored negative), last_scanned to the microsecond in nanoseconds (before 1970, in
    the far future, the shared value of a scan), unhashed records, every page and bound."""
    scans = [
        T0,
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2099, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2024, 5, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),
    ]
    recs = [
        make_record(
            b"d%d/f%03d" % (i % 3, i),
            inode=[2**64 - 1 - i, 2**63 + i, i + 1, 2**63 - 1 - i][i % 4],
            digest=None if i % 5 == 0 else f"{i:064x}",
            scanned=scans[i % len(scans)],
        )
        for i in range(40)
    ]
    store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in recs])
    expected = sorted(recs, key=lambda r: r.path)
    for page in (1, 7, 10_000):
        rows = list(store.iter_record_rows(repo.id, page=page))
        assert [r.record() for r in rows] == expected
        for row in rows:
            assert (row.scanned_ns, type(row.inode)) == (
                datetime_to_ns(row.record().last_scanned),
                int,
            )
            assert row[1:5] == row.record().stat  # the merge's comparison
        ranged = list(store.iter_record_rows(repo.id, b"d1/", b"d2/f", page=page))
        assert [r.record() for r in ranged] == [r for r in expected if r.path.startswith(b"d1/")]
    assert list(store.iter_record_rows(repo.id, b"d3/")) == []


def test_a_worker_store_reads_the_records_and_outlives_a_lost_connection(pg_url: str) -> None:
    """A range worker's store (one plain connection, no pool) reads what the store holds.
    When the server ends its session while it sits idle between scans (a restart), the next
    read reconnects; a session lost mid-use fails that read, and the next one reconnects."""
    store = open_store(pg_url)
    worker = open_worker_store(pg_url)
    try:
        repo = make_repo()
        store.add_repository(repo)
        recs = [make_record(b"d/f%03d" % i) for i in range(25)]
        store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in recs])
        assert isinstance(worker, PostgresWorkerStore)
        expected = list(store.iter_record_rows(repo.id))
        assert [r.record() for r in expected] == recs
        assert list(worker.iter_record_rows(repo.id, page=10)) == expected

        def end_session() -> None:
            with closing(psycopg.connect(pg_url, autocommit=True)) as admin:
                pid = worker._conn.info.backend_pid
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        end_session()
        worker._used -= PostgresWorkerStore.IDLE_CHECK_S + 1  # idle since
        assert list(worker.iter_record_rows(repo.id)) == expected
        end_session()
        with pytest.raises(StoreUnavailable):
            list(worker.iter_record_rows(repo.id))
        assert list(worker.iter_record_rows(repo.id, b"d/f010", b"d/f020")) == expected[10:20]
    finally:
        worker.close()
        store.close()


def test_records_by_inode_many(store: Store, repo: Repository) -> None:
    """More inodes than one IN (...) list holds."""
    recs = [make_record(b"f%05d" % i, inode=10_000 + i) for i in range(1203)]
    store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in recs])
    found = store.records_by_inode(repo.id, [r.stat.inode for r in recs])
    assert sorted(r.path for r in found) == [r.path for r in recs]
    assert store.count_records(repo.id) == 1203


def test_get_records_by_path(store: Store, repo: Repository) -> None:
    """Many paths in one call (more than one IN (...) list), missing ones left out, and
    nothing of another repository."""
    recs = [make_record(b"d/f%05d" % i) for i in range(1203)]
    store.apply(repo.id, [Change(ChangeKind.CREATED, r.path, r) for r in recs])
    other = make_repo("other", b"/srv/other")
    store.add_repository(other)
    x = make_record(b"x")
    store.apply(other.id, [Change(ChangeKind.CREATED, x.path, x)])
    asked = [b"missing", b"x", *(r.path for r in recs), b"d"]
    assert store.get_records(repo.id, asked) == {r.path: r for r in recs}
    assert store.get_records(repo.id, []) == {}
    assert store.get_records(other.id, asked) == {b"x": x}


def test_sqlite_log_is_checkpointed_beside_the_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits only append to the WAL; the store's checkpointer thread copies it into the
    database file (what a reader that ignores the WAL sees), and stops with the store."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL_S", 0.05)
    path = tmp_path / "db.sqlite"
    store = open_store(f"sqlite://{path}")
    try:
        repo = make_repo()
        store.add_repository(repo)
        store.apply(repo.id, created(*(b"f%04d" % i for i in range(2000))))

        def in_database_file() -> int:
            try:
                with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
                    return int(db.execute("SELECT count(*) FROM file_records").fetchone()[0])
            except sqlite3.DatabaseError:
                return 0  # read mid-checkpoint: look again

        wait_for("the checkpoint of 2000 records", lambda: in_database_file() == 2000)
        checkpointer = cast(sqlite_store.SqliteStore, store)._checkpointer
        assert checkpointer is not None and checkpointer._thread.is_alive()
    finally:
        store.close()
    assert not checkpointer._thread.is_alive()


# --- sync operations ------------------------------------------------------------------


def test_operation_lifecycle(store: Store, repo: Repository) -> None:
    op = store.start_operation(repo.id, OperationType.STARTUP, "host:123", T0)
    assert op.status is OperationStatus.RUNNING
    assert op.repository_id == repo.id
    running = store.running_operations()
    assert [(o.id, owner) for o, owner in running] == [(op.id, "host:123")]
    assert running[0][0].status is OperationStatus.RUNNING
    assert running[0][0].start_time == T0
    assert store.recent_operations(repo.id, 5)[0].status is OperationStatus.RUNNING
    assert store.last_completed_scan(repo.id) is None

    stats = ScanStats(files_scanned=10, files_added=3, files_updated=2, files_removed=1)
    end = T0 + timedelta(seconds=2, milliseconds=500)
    store.finish_operation(op.id, OperationStatus.COMPLETED, stats, None, end)

    assert store.running_operations() == []
    (done,) = store.recent_operations(repo.id, 5)
    assert done.id == op.id
    assert done.operation_type is OperationType.STARTUP
    assert done.status is OperationStatus.COMPLETED
    assert done.start_time == T0
    assert done.end_time == end
    assert done.duration_ms == 2500
    assert (done.files_scanned, done.files_added, done.files_updated, done.files_removed) == (
        10,
        3,
        2,
        1,
    )
    assert done.error_message is None
    assert store.last_completed_scan(repo.id) == T0


def test_failed_operation_keeps_its_message(store: Store, repo: Repository) -> None:
    op = store.start_operation(repo.id, OperationType.RECONCILIATION, "h:1", T0)
    store.finish_operation(op.id, OperationStatus.FAILED, None, "disk gone", T0)
    (done,) = store.recent_operations(repo.id, 1)
    assert done.status is OperationStatus.FAILED
    assert done.error_message == "disk gone"
    assert store.last_completed_scan(repo.id) is None


def test_recent_operations_newest_first_and_limited(store: Store, repo: Repository) -> None:
    other = make_repo("other", b"/other")
    store.add_repository(other)
    ids = []
    for i in range(4):
        target = repo if i % 2 == 0 else other
        op = store.start_operation(
            target.id, OperationType.RECONCILIATION, "h:1", T0 + timedelta(minutes=i)
        )
        ids.append(op.id)
    assert [o.id for o in store.recent_operations(None, 10)] == ids[::-1]
    assert [o.id for o in store.recent_operations(None, 2)] == ids[:1:-1]
    assert [o.id for o in store.recent_operations(repo.id, 10)] == [ids[2], ids[0]]
    assert [o.id for o in store.recent_operations(other.id, 1)] == [ids[3]]


def test_last_completed_scan_ignores_realtime_rows(store: Store, repo: Repository) -> None:
    scan = store.start_operation(repo.id, OperationType.RECONCILIATION, "h:1", T0)
    store.finish_operation(scan.id, OperationStatus.COMPLETED, None, None, T0)
    later = T0 + timedelta(hours=1)
    rt = store.start_operation(repo.id, OperationType.REALTIME, "h:1", later)
    store.finish_operation(rt.id, OperationStatus.COMPLETED, None, None, later)
    assert store.last_completed_scan(repo.id) == T0


def test_add_to_operation_accumulates(store: Store, repo: Repository) -> None:
    op = store.start_operation(repo.id, OperationType.REALTIME, "h:1", T0)
    store.add_to_operation(op.id, ScanStats(files_scanned=1, files_added=1), T0)
    end = T0 + timedelta(seconds=60)
    store.add_to_operation(op.id, ScanStats(files_scanned=2, files_updated=1, files_removed=1), end)
    (row,) = store.recent_operations(repo.id, 1)
    assert (row.files_scanned, row.files_added, row.files_updated, row.files_removed) == (
        3,
        1,
        1,
        1,
    )
    assert row.end_time == end


# --- the change feed ------------------------------------------------------------------


def test_change_feed(store: Store, repo: Repository) -> None:
    # Adding the repository was the first entry.
    assert [(e.seq, e.kind) for e in store.changes_since(0, 10)] == [(1, ChangeKind.REPO_ADDED)]
    assert store.latest_seq() == 1
    a = make_record(b"a", size=3, digest="aa" * 32)
    b = make_record(b"b\xff", size=4)
    seq1 = store.apply(
        repo.id,
        [Change(ChangeKind.CREATED, b"a", a), Change(ChangeKind.CREATED, b"b\xff", b)],
    )
    assert seq1 is not None and seq1 == store.latest_seq()

    a2 = replace(a, stat=a.stat._replace(size=5), digest=Digest("blake3", "a2" * 32))
    b_meta = replace(b, stat=b.stat._replace(ctime_ns=b.stat.ctime_ns + 7))
    moved = replace(a2, path=b"dir/a")
    batch = [
        Change(ChangeKind.MODIFIED, b"a", a2),
        Change(ChangeKind.META, b"b\xff", b_meta),  # not news: no feed entry
        Change(ChangeKind.MOVED, b"dir/a", moved, old_path=b"a"),
        Change(ChangeKind.DIR_MOVED, b"dir2", old_path=b"dir"),
        Change(ChangeKind.DELETED, b"b\xff"),
    ]
    seq2 = store.apply(repo.id, batch)
    assert seq2 == store.latest_seq()

    entries = store.changes_since(seq1, 100)
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert entries[-1].seq == seq2
    assert [(e.kind, e.path, e.old_path) for e in entries] == [
        (ChangeKind.MODIFIED, b"a", None),
        (ChangeKind.MOVED, b"dir/a", b"a"),
        (ChangeKind.DIR_MOVED, b"dir2", b"dir"),
        (ChangeKind.DELETED, b"b\xff", None),
    ]
    modified = entries[0]
    assert (modified.size, modified.content_hash, modified.hash_algo) == (5, "a2" * 32, "blake3")
    assert modified.repository_id == repo.id
    # A deleted entry carries what the file was: its last size and hash.
    deleted = entries[-1]
    assert (deleted.size, deleted.content_hash, deleted.hash_algo) == (4, "ab" * 32, "blake3")
    # One transaction, one tag; another transaction, another.
    assert len({e.tag for e in entries}) == 1
    assert entries[0].tag != store.changes_since(0, 100)[1].tag

    everything = store.changes_since(0, 100)[1:]
    assert [(e.kind, e.path) for e in everything[:2]] == [
        (ChangeKind.CREATED, b"a"),
        (ChangeKind.CREATED, b"b\xff"),
    ]
    assert everything[2:] == entries
    assert store.changes_since(1, 2) == everything[:2]
    assert store.changes_since(seq2, 100) == []
    # The records agree with the feed's story.
    assert all_records(store, repo) == {b"dir2/a": replace(moved, path=b"dir2/a")}


def test_meta_only_batch_adds_nothing_to_the_feed(store: Store, repo: Repository) -> None:
    store.apply(repo.id, created(b"a"))
    before = store.latest_seq()
    rec = replace(make_record(b"a"), last_scanned=T0 + timedelta(days=1))
    assert store.apply(repo.id, [Change(ChangeKind.META, b"a", rec)]) is None
    assert store.latest_seq() == before
    assert store.changes_since(before, 10) == []
    assert store.get_record(repo.id, b"a") == rec


def test_change_feed_per_repository(store: Store, repo: Repository) -> None:
    other = make_repo("other", b"/other")
    store.add_repository(other)
    store.apply(repo.id, created(b"r1"))
    store.apply(other.id, created(b"o1"))
    store.apply(repo.id, created(b"r2"))
    assert [e.path for e in store.changes_since(0, 10) if e.path] == [b"r1", b"o1", b"r2"]
    assert [e.path for e in store.changes_since(0, 10, repo.id) if e.path] == [b"r1", b"r2"]
    assert [e.path for e in store.changes_since(0, 10, other.id) if e.path] == [b"o1"]
    assert {e.repository_id for e in store.changes_since(0, 10, other.id)} == {other.id}


def backdate_feed(store: Store, times: list[datetime]) -> None:
    """Give the feed's entries, in seq order, the recorded times ``times`` (a history), in
    UTC as the stores write them."""
    sql = cast(SqlStore, store)
    with sql._tx() as cur:
        cur.execute("SELECT seq FROM change_log ORDER BY seq")
        seqs = [int(r[0]) for r in cur.fetchall()]
        for seq, at in zip(seqs, times, strict=True):
            cur.execute(
                "UPDATE change_log SET recorded_at = ? WHERE seq = ?",
                (sql._ts_in(at.astimezone(UTC)), seq),
            )


def test_change_counts_by_hour_and_schedule_state(store: Store, repo: Repository) -> None:
    start = datetime(2026, 10, 20, 0, 0, tzinfo=UTC)
    times = [start + timedelta(minutes=m) for m in (0, 10, 59, 60, 61, 24 * 60 + 5)]
    store.apply(repo.id, created(*(b"h/%d" % i for i in range(len(times)))))
    # The repository's lifecycle entry (repository_added) comes first, far in the past: the
    # history is the files' changes.
    lifecycle = store.latest_seq() - len(times)
    backdate_feed(store, [datetime(2000, 1, 1, tzinfo=UTC)] * lifecycle + times)
    assert store.change_counts_by_hour(start) == [
        (start, 3),
        (start + timedelta(hours=1), 2),
        (start + timedelta(hours=24), 1),
    ]
    assert store.change_counts_by_hour(start + timedelta(hours=2)) == [
        (start + timedelta(hours=24), 1)
    ]
    assert store.get_schedule_state("quiet") is None
    store.set_schedule_state("quiet", '{"until": "x"}')
    store.set_schedule_state("quiet", '{"until": "y"}')
    assert store.get_schedule_state("quiet") == '{"until": "y"}'
    store.set_schedule_state("quiet", None)
    assert store.get_schedule_state("quiet") is None
