"""Tier 2 on real trees: after every step, the ledger equals an independent walk of the disk.

Every test runs on both stores. ``age_tree`` pushes fresh mtimes out of the 2-second
"racy" window, so a rescan that should hash nothing really has nothing to hash.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest

import fsledger.beneath
import fsledger.hashing
import fsledger.reconcile
import fsledger.walk
import fsledger.writer
from conftest import make_settings
from fsledger.errors import GuardRefused, RootUnavailable
from fsledger.ledger import Ledger
from fsledger.model import (
    Change,
    ChangeKind,
    OperationStatus,
    OperationType,
    RepoSettings,
    Repository,
    RepoState,
    ScanStats,
)
from fsledger.store import Store
from fsledger.walk import FileEntry
from support import assert_exact
from treeutil import (
    OsWith,
    age_tree,
    disk_snapshot,
    failing_open,
    hash_bytes,
    ledger_snapshot,
    make_tree,
    resolve,
)

SPEC: dict[str, bytes | None] = {
    "a.jpg": b"alpha",
    "b.jpg": b"bravo" * 100,
    "albums/2019/one.jpg": b"one",
    "albums/2019/two.jpg": b"two two",
    "albums/2020/three.png": b"three" * 1000,
    "albums/2020/empty.txt": b"",
    "empty-dir": None,
    "docs/readme.md": b"# hi\n",
}


def p(root: bytes, rel: str | bytes) -> bytes:
    return os.path.join(root, os.fsencode(rel))


def no_change(stats: ScanStats) -> bool:
    return (
        stats.files_added,
        stats.files_updated,
        stats.files_removed,
        stats.files_moved,
        stats.metadata_updated,
        stats.files_hashed,
        stats.errors,
    ) == (0, 0, 0, 0, 0, 0, [])


def scanned(
    ledger: Ledger,
    tree: bytes,
    spec: dict[str, bytes | None] | None = None,
    settings: RepoSettings | None = None,
) -> Repository:
    """Build ``spec`` in ``tree``, add it as a repository, scan it, check it."""
    make_tree(tree, SPEC if spec is None else spec)
    age_tree(tree)
    repo = ledger.add_repository(tree, settings=settings)
    stats = ledger.scan(repo)
    assert stats.errors == []
    assert_exact(ledger, repo, rules=settings.ignore_patterns if settings else ())
    return repo


@contextmanager
def ledger_with(store: Store, **overrides: Any) -> Iterator[Ledger]:
    """A second ledger on the same store, with other settings (or a fresh writer cache)."""
    led = Ledger(make_settings(store.url, **overrides), store)
    try:
        yield led
    finally:
        led.reconciler.close()


# --- the everyday steps ---------------------------------------------------------------


def test_initial_scan(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, SPEC)
    age_tree(tree)
    repo = ledger.add_repository(tree)
    stats = ledger.scan(repo)
    files = [k for k, v in SPEC.items() if v is not None]
    assert stats.files_scanned == len(files)
    assert stats.files_added == len(files)
    assert stats.files_hashed == len(files)
    assert stats.bytes_hashed == sum(len(v or b"") for v in SPEC.values())
    assert stats.errors == []
    assert_exact(ledger, repo)
    rec = next(r for r in ledger.files(repo) if r.path == b"b.jpg")
    assert rec.hash_algo == "blake3"
    assert rec.content_hash == hash_bytes(b"bravo" * 100)


def test_a_scan_leaves_the_garbage_collector_as_it_found_it(
    ledger: Ledger, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scans collect less often while they run (nested ones too), and put the process's
    thresholds back afterwards, failed or not."""
    import gc

    before = gc.get_threshold()
    make_tree(tree, SPEC)
    repo = ledger.add_repository(tree)
    with fsledger.reconcile.fewer_collections():
        assert gc.get_threshold()[0] >= fsledger.reconcile.SCAN_GC_THRESHOLD
        ledger.scan(repo)
        assert gc.get_threshold()[0] >= fsledger.reconcile.SCAN_GC_THRESHOLD
    assert gc.get_threshold() == before

    def fail(self: object) -> None:
        assert gc.get_threshold()[0] >= fsledger.reconcile.SCAN_GC_THRESHOLD
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsledger.reconcile._Run, "_merge", fail)
    with pytest.raises(OSError):
        ledger.scan(repo)
    assert gc.get_threshold() == before


def test_a_first_index_defers_indexes_as_soon_as_the_store_holds_few_records(
    ledger: Ledger, store: Store, tree: bytes
) -> None:
    """Rebuilding deferred indexes sorts every repository's records: an empty store defers
    at the first batch, one holding others' records once this scan wrote as many (at most
    DEFER_INDEXES_AFTER)."""
    after = fsledger.reconcile.defer_indexes_after
    assert store.records_bound() == 0
    assert after(store) == fsledger.reconcile.INITIAL_BATCH
    make_tree(tree, SPEC)
    ledger.scan(ledger.add_repository(tree))
    assert 0 < store.records_bound() <= fsledger.reconcile.INITIAL_BATCH
    assert after(store) == fsledger.reconcile.INITIAL_BATCH


def test_a_big_first_index_defers_the_duplicate_index_and_rebuilds_it(
    ledger: Ledger, store: Store, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DEFER_INDEXES_AFTER records a first index writes with the store's query-only
    indexes deferred (the duplicate index is dropped), and they are back at the end: the
    ledger is exact and duplicates are found."""
    monkeypatch.setattr(fsledger.reconcile, "DEFER_INDEXES_AFTER", 1)
    make_tree(tree, {**SPEC, "copy/of-b.jpg": b"bravo" * 100})
    repo = ledger.add_repository(tree)
    seen: list[int] = []

    def index_count(_repo: object, _applied: object) -> None:
        with store._tx() as cur:  # type: ignore[attr-defined]
            cur.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'idx_file_records_dup'"
                if store.url.startswith("sqlite")
                else "SELECT count(*) FROM pg_indexes WHERE indexname = 'idx_file_records_dup' "
                "AND schemaname = current_schema()"
            )
            seen.append(int(cur.fetchone()[0]))

    ledger.writer(repo).listeners.append(index_count)
    ledger.scan(repo)
    assert_exact(ledger, repo)
    assert seen == [0]
    (group,) = store.duplicates(repo.id, 10)
    assert [f.path for f in group.files] == [b"b.jpg", b"copy/of-b.jpg"]
    seen.clear()
    index_count(None, None)
    assert seen == [1]


def test_no_change_rescan_hashes_nothing(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    for _ in range(2):
        stats = ledger.scan(repo)
        assert no_change(stats), stats
        assert stats.files_scanned == 7
        assert_exact(ledger, repo)


def test_append(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    with open(p(tree, "albums/2019/one.jpg"), "ab") as f:
        f.write(b" more")
    age_tree(tree)
    stats = ledger.scan(repo)
    assert (stats.files_updated, stats.files_hashed, stats.files_added) == (1, 1, 0)
    assert_exact(ledger, repo)
    assert no_change(ledger.scan(repo))


def test_delete(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    os.unlink(p(tree, "a.jpg"))
    shutil.rmtree(p(tree, "albums/2020"))
    stats = ledger.scan(repo)
    assert stats.files_removed == 3
    assert stats.files_hashed == 0
    assert_exact(ledger, repo)
    assert no_change(ledger.scan(repo))


def test_same_size_edit(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    path = p(tree, "albums/2019/two.jpg")
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"TWO")  # same length, new bytes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    stats = ledger.scan(repo)
    assert (stats.files_updated, stats.files_hashed) == (1, 1)
    assert_exact(ledger, repo)
    rec = next(r for r in ledger.files(repo) if r.path == b"albums/2019/two.jpg")
    assert rec.content_hash == hash_bytes(b"TWO two")


def test_content_change_with_restored_mtime_is_seen_through_ctime(
    ledger: Ledger, tree: bytes
) -> None:
    """``cp -p`` / ``rsync -t`` style: new bytes, same size, old mtime. The write changed the
    ctime, which is part of the "maybe changed" key, so a normal scan rehashes and sees it."""
    repo = scanned(ledger, tree)
    path = p(tree, "a.jpg")
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"ALPHA")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    stats = ledger.scan(repo)
    assert (stats.files_updated, stats.files_hashed, stats.corrupt) == (1, 1, [])
    assert_exact(ledger, repo)


def test_new_files(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    make_tree(tree, {"new.jpg": b"new", "albums/2021/x.jpg": b"x", "empty-dir/y.jpg": b"y"})
    age_tree(tree)
    stats = ledger.scan(repo)
    assert (stats.files_added, stats.files_hashed, stats.files_removed) == (3, 3, 0)
    assert_exact(ledger, repo)
    assert no_change(ledger.scan(repo))


def test_directory_rename_is_a_move_without_rehashing(
    ledger: Ledger, store: Store, tree: bytes
) -> None:
    repo = scanned(ledger, tree)
    seq = store.latest_seq()
    os.rename(p(tree, "albums"), p(tree, "Albums-renamed"))
    stats = ledger.scan(repo)
    assert stats.files_moved == 4
    assert stats.files_hashed == 0
    assert (stats.files_added, stats.files_removed) == (0, 0)
    assert_exact(ledger, repo)
    feed = store.changes_since(seq, 100, repo.id)
    assert {(e.kind, e.old_path, e.path) for e in feed} == {
        (ChangeKind.MOVED, b"albums/2019/one.jpg", b"Albums-renamed/2019/one.jpg"),
        (ChangeKind.MOVED, b"albums/2019/two.jpg", b"Albums-renamed/2019/two.jpg"),
        (ChangeKind.MOVED, b"albums/2020/three.png", b"Albums-renamed/2020/three.png"),
        (ChangeKind.MOVED, b"albums/2020/empty.txt", b"Albums-renamed/2020/empty.txt"),
    }
    assert no_change(ledger.scan(repo))


def test_directory_rename_to_a_name_sorting_later(ledger: Ledger, tree: bytes) -> None:
    """The new paths come after the vanished ones in the walk: the records are absent
    first and claimed by the move later."""
    repo = scanned(ledger, tree)
    os.rename(p(tree, "albums"), p(tree, "zz"))
    stats = ledger.scan(repo)
    assert (stats.files_moved, stats.files_hashed, stats.files_removed) == (4, 0, 0)
    assert_exact(ledger, repo)


def test_file_rename_is_a_move(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    old = store.get_record(repo.id, b"b.jpg")
    assert old is not None
    seq = store.latest_seq()
    os.rename(p(tree, "b.jpg"), p(tree, "docs/b-renamed.jpg"))
    stats = ledger.scan(repo)
    assert (stats.files_moved, stats.files_hashed, stats.files_added, stats.files_removed) == (
        1,
        0,
        0,
        0,
    )
    assert_exact(ledger, repo)
    new = store.get_record(repo.id, b"docs/b-renamed.jpg")
    assert new is not None and new.digest == old.digest
    (entry,) = store.changes_since(seq, 10, repo.id)
    assert (entry.kind, entry.old_path, entry.path) == (
        ChangeKind.MOVED,
        b"b.jpg",
        b"docs/b-renamed.jpg",
    )


def test_replaced_file_is_not_a_move(ledger: Ledger, tree: bytes) -> None:
    """An atomic save (write elsewhere, rename over) gives a new inode at the old path."""
    repo = scanned(ledger, tree)
    make_tree(tree, {"docs/readme.md.new": b"# hello\n"})
    os.replace(p(tree, "docs/readme.md.new"), p(tree, "docs/readme.md"))
    age_tree(tree)
    stats = ledger.scan(repo)
    assert (stats.files_updated, stats.files_moved, stats.files_hashed) == (1, 0, 1)
    assert_exact(ledger, repo)


@pytest.mark.parametrize("chunk", [128, 1], ids=["one-chunk", "chunk-per-file"])
@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("f/g.jpg", "d/e/c.jpg"),  # the source walked after the target (the model's case)
        ("a/g.jpg", "z/c.jpg"),  # the source walked first
        ("f/g.jpg", "d/new.jpg"),  # onto a path without a record
    ],
)
@pytest.mark.parametrize("refill", ["write", "hard-link", "swap-in"])
def test_a_move_whose_source_path_holds_another_file_keeps_both(
    ledger: Ledger,
    store: Store,
    tree: bytes,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
    source: str,
    target: str,
    refill: str,
) -> None:
    """``mv g c`` and then another file at ``g`` (written anew, a hard link of another
    file, or renamed there): the record of ``g`` follows its file to ``c`` and ``g`` gets a
    record of its own, written after that move. The move onto ``c`` (a record of its own)
    is written at the end of the run, and used to carry away ``g``'s new record, written
    before it: ``g`` went missing from the ledger (the model-based test, on PostgreSQL:
    ``exchange f/g.jpg d/e/c.jpg; atomic_save f/g.jpg`` then a scan). Both stores, with
    the paths in one hashing chunk and in chunks of their own."""
    monkeypatch.setattr(fsledger.reconcile, "CHUNK_FILES", chunk)
    spec: dict[str, bytes | None] = {
        source: b"gggg",
        "z/c.jpg" if target == "z/c.jpg" else "d/e/c.jpg": b"cccc",
        "m/other.jpg": b"other",
        "m/spare.jpg": b"spare",
    }
    repo = scanned(ledger, tree, spec)
    moved = store.get_record(repo.id, os.fsencode(source))
    assert moved is not None
    seq = store.latest_seq()
    os.rename(p(tree, source), p(tree, target))
    if refill == "write":
        make_tree(tree, {source: b"new!"})
    elif refill == "hard-link":
        os.link(p(tree, "m/other.jpg"), p(tree, source))
    else:
        os.rename(p(tree, "m/spare.jpg"), p(tree, source))
    age_tree(tree)
    stats = ledger.scan(repo)
    assert stats.errors == []
    assert_exact(ledger, repo)
    after = store.get_record(repo.id, os.fsencode(target))
    assert after is not None and after.digest == moved.digest
    feed = [(c.kind, c.path, c.old_path) for c in store.changes_since(seq, 100, repo.id)]
    src, dst = os.fsencode(source), os.fsencode(target)
    assert (ChangeKind.MOVED, dst, src) in feed
    if refill == "swap-in":
        assert (ChangeKind.MOVED, src, b"m/spare.jpg") in feed
        assert feed.index((ChangeKind.MOVED, dst, src)) < feed.index(
            (ChangeKind.MOVED, src, b"m/spare.jpg")
        )
    else:
        # After the move away from it, the path holds a new file: created, not modified.
        assert (ChangeKind.CREATED, src, None) in feed
        assert feed.index((ChangeKind.MOVED, dst, src)) < feed.index(
            (ChangeKind.CREATED, src, None)
        )


def test_a_new_hard_link_of_a_file_still_in_place_is_not_a_move(
    ledger: Ledger, store: Store, tree: bytes
) -> None:
    """A new name with the inode of a record whose own path still holds it is a new hard
    link: created (its hash the record's), and the record stays."""
    repo = scanned(ledger, tree)
    os.link(p(tree, "b.jpg"), p(tree, "0-first.jpg"))  # walked before b.jpg
    os.link(p(tree, "b.jpg"), p(tree, "docs/z-last.jpg"))  # and after it
    age_tree(tree)
    stats = ledger.scan(repo)
    assert (stats.files_moved, stats.files_added, stats.files_removed) == (0, 2, 0)
    assert_exact(ledger, repo)


def test_many_files_use_the_worker_pool(ledger: Ledger, tree: bytes) -> None:
    """More files than one hashing chunk: hashing goes to worker processes."""
    spec: dict[str, bytes | None] = {
        f"d{i % 7}/f{i:04d}.bin": os.urandom(i % 300) for i in range(700)
    }
    repo = scanned(ledger, tree, spec)
    assert no_change(ledger.scan(repo))
    for i in range(0, 700, 3):
        with open(p(tree, f"d{i % 7}/f{i:04d}.bin"), "ab") as f:
            f.write(b"+")
    age_tree(tree)
    stats = ledger.scan(repo)
    assert (stats.files_updated, stats.files_hashed) == (234, 234)
    assert_exact(ledger, repo)


# --- silent corruption ----------------------------------------------------------------


def test_verify_reports_bitrot_and_keeps_the_stored_hash(
    ledger: Ledger, store: Store, tree: bytes
) -> None:
    repo = scanned(ledger, tree)
    path = p(tree, "b.jpg")
    good = store.get_record(repo.id, b"b.jpg")
    assert good is not None and good.digest is not None
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(42)
        f.write(b"X")  # one flipped byte
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    # Real bit rot changes no metadata at all, but user space cannot write a byte without
    # the kernel moving ctime. Make the ledger agree with the disk's new ctime (as if the
    # rot happened below the filesystem) so the "maybe changed" key really is unchanged.
    now = os.lstat(path)
    rotted_key = good.stat._replace(ctime_ns=now.st_ctime_ns)
    assert rotted_key == good.stat._replace(ctime_ns=rotted_key.ctime_ns)
    store.apply(repo.id, [Change(ChangeKind.META, b"b.jpg", replace(good, stat=rotted_key))])

    # A normal scan trusts the metadata: it does not notice.
    stats = ledger.scan(repo)
    assert no_change(stats)
    assert stats.corrupt == []
    assert store.get_record(repo.id, b"b.jpg") == replace(good, stat=rotted_key)

    # --verify rehashes everything and reports the file, keeping the known-good hash.
    seq = store.latest_seq()
    stats = ledger.scan(repo, verify=True)
    assert stats.corrupt == ["b.jpg"]
    assert stats.files_hashed == 7
    assert (stats.files_updated, stats.files_added, stats.files_removed) == (0, 0, 0)
    kept = store.get_record(repo.id, b"b.jpg")
    assert kept is not None and kept.digest == good.digest
    assert kept.content_hash != disk_snapshot(tree)[b"b.jpg"][2]
    assert store.changes_since(seq, 10) == []
    # Everything else is exact.
    snap = ledger_snapshot(ledger, repo)
    disk = disk_snapshot(tree)
    del snap[b"b.jpg"], disk[b"b.jpg"]
    assert snap == disk


def test_verify_of_a_healthy_tree_finds_nothing(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    stats = ledger.scan(repo, verify=True)
    assert stats.corrupt == []
    assert stats.files_hashed == 7
    assert (stats.files_updated, stats.metadata_updated) == (0, 0)
    assert_exact(ledger, repo)


# --- the mass-deletion guard ----------------------------------------------------------


def test_emptied_root_is_refused_then_forced(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    for name in os.listdir(tree):
        full = p(tree, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
    make_tree(tree, {".DS_Store": b"junk", ".hidden/x": b"x"})  # ignored: still "empty"

    with pytest.raises(GuardRefused):
        ledger.scan(repo)
    assert store.count_records(repo.id) == 7
    assert ledger.status(repo).repository.state is RepoState.OFFLINE
    last = ledger.operations(repo, 1)[0]
    assert last.status is OperationStatus.FAILED
    assert last.error_message and "empty" in last.error_message

    stats = ledger.scan(repo, force=True)
    assert stats.files_removed == 7
    assert store.count_records(repo.id) == 0
    assert_exact(ledger, repo)
    assert ledger.status(repo).repository.state is RepoState.ONLINE


def test_empty_root_without_records_is_fine(ledger: Ledger, tree: bytes) -> None:
    repo = ledger.add_repository(tree)
    assert no_change(ledger.scan(repo))
    assert_exact(ledger, repo)


def test_root_missing(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    shutil.rmtree(tree)
    with pytest.raises(RootUnavailable) as info:
        ledger.scan(repo)
    assert not isinstance(info.value, GuardRefused)
    assert store.count_records(repo.id) == 7
    assert ledger.status(repo).repository.state is RepoState.OFFLINE
    # Not even force deletes what cannot be seen.
    with pytest.raises(RootUnavailable):
        ledger.scan(repo, force=True)
    assert store.count_records(repo.id) == 7


def test_root_is_a_file(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    shutil.rmtree(tree)
    with open(tree, "wb") as f:
        f.write(b"not a directory")
    with pytest.raises(RootUnavailable) as info:
        ledger.scan(repo, force=True)
    assert "not a directory" in str(info.value)
    assert store.count_records(repo.id) == 7


def test_root_comes_back(ledger: Ledger, tree: bytes) -> None:
    """Offline, then the disk returns: records were kept, nothing is re-imported."""
    repo = scanned(ledger, tree)
    hidden = tree + b".away"
    os.rename(tree, hidden)
    with pytest.raises(RootUnavailable):
        ledger.scan(repo)
    os.rename(hidden, tree)
    stats = ledger.scan(repo)
    assert no_change(stats)
    assert ledger.status(repo).repository.state is RepoState.ONLINE
    assert_exact(ledger, repo)


def test_other_device_is_refused_then_forced(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    recorded = store.get_repository(repo.id)
    assert recorded is not None and recorded.root_dev == os.stat(tree).st_dev
    # What an unmounted disk looks like: the root is there, on another device.
    store.update_repository(replace(recorded, root_dev=recorded.root_dev + 1))
    os.unlink(p(tree, "a.jpg"))

    with ledger_with(store) as fresh:  # a new process: the repository as stored
        stored = fresh.resolve(repo.name)
        with pytest.raises(GuardRefused) as info:
            fresh.scan(stored)
        assert "device" in str(info.value)
        assert store.count_records(repo.id) == 7

        # The library really moved: --force accepts the new device and deletes.
        stats = fresh.scan(stored, force=True)
        assert stats.files_removed == 1
        assert_exact(fresh, repo)
        after = store.get_repository(repo.id)
        assert after is not None and after.root_dev == os.stat(tree).st_dev
        assert no_change(fresh.scan(stored))


def test_root_emptied_during_the_walk_deletes_nothing(
    ledger: Ledger, store: Store, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that drops out mid-scan leaves an empty directory on the same device: the
    guard after the walk must refuse the mass deletion."""
    repo = scanned(ledger, tree)
    real_walk = fsledger.walk.walk

    def walk_then_vanish(root: bytes, *args: Any, **kw: Any) -> Iterator[Any]:
        for n, item in enumerate(real_walk(root, *args, **kw)):
            yield item
            if n == 0:
                for name in os.listdir(root):
                    full = p(root, name)
                    shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)

    monkeypatch.setattr(fsledger.reconcile, "walk", walk_then_vanish)
    with pytest.raises(GuardRefused):
        ledger.scan(repo)
    assert store.count_records(repo.id) == 7


# --- what cannot be read --------------------------------------------------------------


def deny(monkeypatch: pytest.MonkeyPatch, directory: bytes, code: int = errno.EACCES) -> None:
    """Make ``directory`` unreadable the way the kernel does for a user without permission
    (or for a failing disk): listing it fails, and so does ``lstat`` of anything below it.

    Tests run as root, where ``chmod 000`` does not stop a read, so the error is injected
    into the ``os`` that the walker and the writer see.
    """
    below = directory + b"/"

    def fail(path: Any) -> OSError:
        return OSError(code, os.strerror(code), path)

    def lstat(path: Any, *args: Any, dir_fd: int | None = None, **kw: Any) -> os.stat_result:
        if resolve(path, dir_fd).startswith(below):
            raise fail(path)
        return os.lstat(path, *args, dir_fd=dir_fd, **kw)

    def stat(path: Any, *args: Any, dir_fd: int | None = None, **kw: Any) -> os.stat_result:
        if not isinstance(path, int) and resolve(path, dir_fd).startswith(below):
            raise fail(path)
        return os.stat(path, *args, dir_fd=dir_fd, **kw)

    opener = failing_open(directory, fail(directory))
    monkeypatch.setattr(fsledger.walk, "os", OsWith(open=opener, lstat=lstat))
    # The writer's re-check looks below the root through fsledger.beneath (lstat = a stat
    # without following, relative to the parent directory's descriptor).
    monkeypatch.setattr(fsledger.beneath, "os", OsWith(stat=stat, open=opener))


def test_unreadable_directory_keeps_its_records(
    ledger: Ledger, store: Store, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = scanned(ledger, tree)
    before = ledger_snapshot(ledger, repo)
    os.unlink(p(tree, "albums/2019/one.jpg"))  # unseen: its record must stay too
    make_tree(tree, {"albums/2019/new.jpg": b"new"})
    os.unlink(p(tree, "a.jpg"))  # readable elsewhere: still noticed
    deny(monkeypatch, p(tree, "albums/2019"), errno.EIO)

    stats = ledger.scan(repo)

    assert len(stats.errors) == 1
    assert stats.errors[0].startswith("albums/2019/:")
    assert "errno 5" in stats.errors[0]
    assert stats.files_removed == 1
    expected = {k: v for k, v in before.items() if k != b"a.jpg"}
    assert ledger_snapshot(ledger, repo) == expected

    monkeypatch.undo()
    ledger.scan(repo)
    assert_exact(ledger, repo)


def test_unreadable_directory_next_to_a_deleted_sibling_file(
    ledger: Ledger, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``d-x`` and ``d.txt`` sort between ``d`` and ``d/a``: their deletion must not make the
    merge lose its place and delete the records of the unreadable ``d/``."""
    spec: dict[str, bytes | None] = {
        "d/a": b"a",
        "d/b/c": b"c",
        "d-x": b"dash",
        "d.txt": b"dot",
        "e": b"e",
    }
    repo = scanned(ledger, tree, spec)
    os.unlink(p(tree, "d.txt"))
    os.unlink(p(tree, "d-x"))
    deny(monkeypatch, p(tree, "d"))

    stats = ledger.scan(repo)

    assert [e.split(":")[0] for e in stats.errors] == ["d/"]
    assert stats.files_removed == 2
    assert sorted(ledger_snapshot(ledger, repo)) == [b"d/a", b"d/b/c", b"e"]
    monkeypatch.undo()
    assert ledger.scan(repo).errors == []
    assert_exact(ledger, repo)


def test_unreadable_root_listing_deletes_nothing(
    ledger: Ledger, store: Store, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root passed the guard, then its listing failed (a flapping mount)."""
    repo = scanned(ledger, tree)
    before = ledger_snapshot(ledger, repo)
    deny(monkeypatch, tree, errno.EIO)
    stats = ledger.scan(repo)
    assert len(stats.errors) == 1
    assert stats.files_removed == 0
    assert ledger_snapshot(ledger, repo) == before
    monkeypatch.undo()
    assert no_change(ledger.scan(repo))


def test_unreadable_file(ledger: Ledger, tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tree, SPEC)
    age_tree(tree)
    repo = ledger.add_repository(tree)
    bad = p(tree, "albums/2019/two.jpg")

    def failing_open(path: Any, flags: int, *args: Any, dir_fd: int | None = None) -> int:
        if resolve(path, dir_fd) == bad:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return os.open(path, flags, *args, dir_fd=dir_fd)

    monkeypatch.setattr(fsledger.hashing, "os", OsWith(open=failing_open))
    stats = ledger.scan(repo)

    assert len(stats.errors) == 1
    assert stats.errors[0].startswith("albums/2019/two.jpg: cannot hash")
    assert stats.files_hashed == 6
    # The file is known (it exists) but its hash is not; everything else is exact.
    snap = ledger_snapshot(ledger, repo)
    disk = disk_snapshot(tree)
    assert snap[b"albums/2019/two.jpg"] == (*disk[b"albums/2019/two.jpg"][:2], None)
    del snap[b"albums/2019/two.jpg"], disk[b"albums/2019/two.jpg"]
    assert snap == disk

    monkeypatch.undo()  # readable again: the next scan fills the hash in
    stats = ledger.scan(repo)
    assert stats.files_hashed == 1
    assert_exact(ledger, repo)


def test_files_vanishing_during_the_walk(
    ledger: Ledger, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = scanned(ledger, tree)
    make_tree(tree, {"fresh.jpg": b"fresh"})
    age_tree(tree)
    # One new file (to be hashed) and one recorded file disappear right after the walk
    # yields them, before the reconciler gets to them.
    doomed = {b"fresh.jpg", b"albums/2019/one.jpg"}
    real_walk = fsledger.walk.walk

    def vanishing_walk(root: bytes, *args: Any, **kw: Any) -> Iterator[Any]:
        for item in real_walk(root, *args, **kw):
            yield item
            if isinstance(item, FileEntry) and item.path in doomed:
                os.unlink(p(root, item.path))

    monkeypatch.setattr(fsledger.reconcile, "walk", vanishing_walk)
    stats = ledger.scan(repo)
    snap = ledger_snapshot(ledger, repo)
    assert b"fresh.jpg" not in snap  # never recorded: it was gone before it was written
    assert stats.files_added == 0

    monkeypatch.undo()
    ledger.scan(repo)
    assert_exact(ledger, repo)
    assert no_change(ledger.scan(repo))


# --- names and special files ----------------------------------------------------------

AWKWARD_NAMES: list[bytes] = [
    b"\xff\xfe.jpg",
    b"new\nline.jpg",
    b"x" * 251 + b".jpg",
    b"with  spaces .jpg",
    "ünïcödé 日本語.jpg".encode(),
    "e\u0301.jpg".encode(),  # decomposed: a different name from the composed one
    "\u00e9.jpg".encode(),
    b"\xff dir/inner\xfe.jpg",
    b"tab\there.jpg",
    b"-leading-dash.jpg",
]


def test_awkward_names_round_trip(ledger: Ledger, tree: bytes) -> None:
    spec: dict[bytes | str, bytes | None] = {n: n for n in AWKWARD_NAMES}
    make_tree(tree, spec)
    age_tree(tree)
    repo = ledger.add_repository(tree)
    stats = ledger.scan(repo)
    assert stats.errors == []
    assert stats.files_added == len(AWKWARD_NAMES)
    assert_exact(ledger, repo)
    records = list(ledger.files(repo))
    assert [r.path for r in records] == sorted(AWKWARD_NAMES)
    for rec in records:
        doc = json.loads(json.dumps(rec.to_json()))
        assert base64.b64decode(doc["path_b64"]) == rec.path
        # The text form always encodes (a byte that is not UTF-8 shows as U+FFFD); the
        # exact bytes are path_b64's.
        assert doc["path"] == rec.path.decode("utf-8", "replace")
        assert rec.content_hash == hash_bytes(rec.path)
    assert no_change(ledger.scan(repo))


def test_symlinks_are_neither_followed_nor_recorded(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a/x.jpg": b"x", "b/y.jpg": b"y"})
    age_tree(tree)
    os.symlink("..", p(tree, "a/loop"))
    os.symlink("nowhere", p(tree, "dangling"))
    os.symlink("x.jpg", p(tree, "a/link-to-file.jpg"))
    os.symlink(p(tree, "b"), p(tree, "link-to-dir"))
    repo = ledger.add_repository(tree)
    stats = ledger.scan(repo)
    assert stats.errors == []
    assert sorted(ledger_snapshot(ledger, repo)) == [b"a/x.jpg", b"b/y.jpg"]
    assert_exact(ledger, repo)


def test_fifo_is_skipped_without_hanging(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, {"a.jpg": b"a"})
    age_tree(tree)
    os.mkfifo(p(tree, "pipe"))
    repo = ledger.add_repository(tree)
    stats = ledger.scan(repo)
    assert stats.skipped_special == 1
    assert stats.errors == []
    assert_exact(ledger, repo)
    assert [r.path for r in ledger.files(repo)] == [b"a.jpg"]


def test_ignored_names_are_never_recorded(ledger: Ledger, tree: bytes) -> None:
    spec: dict[str, bytes | None] = {
        "keep.jpg": b"k",
        "keep.xmp.jpg": b"k",
        ".DS_Store": b"d",
        "x.tmp": b"t",
        "Thumbs.db": b"t",
        "backup.jpg~": b"b",
        ".hidden/dir/file.jpg": b"h",
        "sub/.also-hidden.jpg": b"h",
        "sub/IMG_1.xmp": b"sidecar",
        "sub/IMG_1.jpg": b"img",
        "cache.tmp/inside.jpg": b"ignored with its directory",
    }
    repo = scanned(ledger, tree, spec, RepoSettings(ignore_patterns=("*.xmp",)))
    assert sorted(ledger_snapshot(ledger, repo)) == [b"keep.jpg", b"keep.xmp.jpg", b"sub/IMG_1.jpg"]


# --- operations and settings ----------------------------------------------------------


def test_scan_records_a_completed_operation(ledger: Ledger, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    os.unlink(p(tree, "a.jpg"))
    make_tree(tree, {"n.jpg": b"n"})
    with open(p(tree, "b.jpg"), "ab") as f:
        f.write(b"!")
    age_tree(tree)
    stats = ledger.scan(repo, op_type=OperationType.STARTUP)
    op = ledger.operations(repo, 1)[0]
    assert op.status is OperationStatus.COMPLETED
    assert op.operation_type is OperationType.STARTUP
    assert op.end_time is not None and op.end_time >= op.start_time
    assert op.error_message is None
    assert (op.files_scanned, op.files_added, op.files_updated, op.files_removed) == (
        stats.files_scanned,
        1,
        1,
        1,
    )
    assert [o.status for o in ledger.operations(repo)] == [OperationStatus.COMPLETED] * 2
    status = ledger.status(repo)
    assert status.total_files == 7
    assert status.last_scan_time == op.start_time


def test_without_hashes(store: Store, tree: bytes) -> None:
    with ledger_with(store, calculate_hashes=False) as led:
        make_tree(tree, SPEC)
        age_tree(tree)
        repo = led.add_repository(tree)
        stats = led.scan(repo)
        assert stats.files_hashed == 0
        assert stats.files_added == 7
        assert ledger_snapshot(led, repo) == disk_snapshot(tree, algo=None)
        assert all(r.digest is None for r in led.files(repo))

        with open(p(tree, "a.jpg"), "ab") as f:
            f.write(b"more")
        age_tree(tree)
        stats = led.scan(repo)
        assert (stats.files_updated, stats.files_hashed) == (1, 0)
        assert ledger_snapshot(led, repo) == disk_snapshot(tree, algo=None)
        assert no_change(led.scan(repo))


def test_sha256(store: Store, tree: bytes) -> None:
    with ledger_with(store, hash_algo="sha256") as led:
        make_tree(tree, SPEC)
        age_tree(tree)
        repo = led.add_repository(tree)
        led.scan(repo)
        assert ledger_snapshot(led, repo) == disk_snapshot(tree, algo="sha256")
        assert {r.hash_algo for r in led.files(repo)} == {"sha256"}
        assert no_change(led.scan(repo))


def test_changing_the_algorithm_rehashes(ledger: Ledger, store: Store, tree: bytes) -> None:
    repo = scanned(ledger, tree)
    with ledger_with(store, hash_algo="sha256") as led:
        stats = led.scan(repo)
        assert stats.files_hashed == 7
        assert ledger_snapshot(led, repo) == disk_snapshot(tree, algo="sha256")
        assert no_change(led.scan(repo))


def test_progress_is_reported(ledger: Ledger, tree: bytes) -> None:
    make_tree(tree, SPEC)
    repo = ledger.add_repository(tree)
    seen: list[int] = []
    ledger.scan(repo, progress=lambda s: seen.append(s.files_scanned))
    assert seen and seen[-1] == 7


def test_files_dated_in_the_future_are_not_rehashed_on_every_scan(
    ledger: Ledger, tree: bytes
) -> None:
    """A camera with a wrong clock writes mtimes years ahead: such a file is not "racy"."""
    make_tree(tree, SPEC)
    future = time.time_ns() + 5 * 365 * 86400 * 10**9
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            os.utime(os.path.join(dirpath, name), ns=(future, future))
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    assert no_change(ledger.scan(repo))
