"""The merge of a walk with the stored records, in one process and in key ranges.

The ranges are checked where it matters: cutting a tree anywhere gives back exactly the
walk of the whole, and a rescan merged in worker processes leaves the same ledger (equal
to the disk) with the same counts as the merge in one process.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fsledger.hashing
import fsledger.merge
import fsledger.reconcile
from fsledger.config import Settings
from fsledger.errors import RootUnavailable, StoreError
from fsledger.ignore import IgnoreRules
from fsledger.ledger import Ledger
from fsledger.merge import (
    RANGE_STALL_FACTOR,
    Absent,
    Look,
    LookRule,
    Merge,
    RangeResult,
    RangeTask,
    is_racy,
    merge_range,
    plan_ranges,
)
from fsledger.model import NS_PER_S, ScanStats
from fsledger.reconcile import scan_wants_workers, start_workers
from fsledger.store.base import Store
from fsledger.walk import FileEntry, Unreadable, walk
from support import assert_exact, wait_for
from test_reconcile import no_change, p
from treeutil import age_tree, make_tree

RULES = IgnoreRules.default()


def photo_tree(root: bytes, files: int = 600, seed: int = 7) -> None:
    """Year/month/event folders with files directly in some folders, and odd names."""
    rng = random.Random(seed)
    spec: dict[str, bytes | None] = {}
    for i in range(files):
        year = 2004 + i % 5
        month = 1 + (i // 5) % 12
        spec[f"{year}/{year}-{month:02d}/ev{i % 3}/IMG_{i:04d}.jpg"] = rng.randbytes(i % 200)
    spec.update({"top.jpg": b"top", "2005.txt": b"sorts before 2005/", "zz/last": b"z"})
    spec["2006/caf\xe9 d\xe9j\xe0/x.jpg"] = b"nfc"
    make_tree(root, spec)


def walked(root: bytes, lo: bytes = b"", hi: bytes | None = None) -> list[bytes]:
    return [i.path for i in walk(root, RULES, lo=lo, hi=hi) if isinstance(i, FileEntry)]


def test_ranges_partition_the_walk(tree: bytes) -> None:
    """Any cut points, directory keys or not, split the walk into consecutive pieces."""
    photo_tree(tree)
    whole = walked(tree)
    assert whole == sorted(whole) and len(whole) == 604
    rng = random.Random(3)
    for _ in range(20):
        cuts = sorted(set(rng.sample(whole, 3) + [b"2005/", b"2005.txt", b"2006/2006-0", b"zz"]))
        bounds: list[bytes | None] = [b"", *cuts, None]
        pieces: list[bytes] = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            assert lo is not None
            pieces += walked(tree, lo, hi)
        assert pieces == whole


def test_plan_ranges_cuts_at_directories(tree: bytes) -> None:
    photo_tree(tree)
    cuts = plan_ranges(tree, RULES, 4)
    assert cuts == sorted(cuts) and 2 <= len(cuts) <= 3
    assert all(c.endswith(b"/") and os.path.isdir(p(tree, c)) for c in cuts)
    assert plan_ranges(tree, RULES, 1) == []


def test_plan_ranges_cuts_inside_a_big_folder(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder holding many files (a phone's dump) is cut between its files too, and the
    ranges still partition the walk; so are deep trees, below the top three levels."""
    monkeypatch.setattr(fsledger.merge, "FILES_PER_CUT", 10)
    monkeypatch.setattr(fsledger.merge, "_SMALL_DIR_BYTES", 0)
    spec = {f"DCIM/{d}CAM/IMG_{i:03d}.jpg": b"x" for d in (100, 101) for i in range(45)}
    spec |= {f"DCIM/loose_{i:02d}.jpg": b"l" for i in range(25)}  # beside subfolders
    spec |= {"a/b/c/d/e/f.jpg": b"f", "a/b/c/d/e2/g.jpg": b"g", "a/b/c/d2/h.jpg": b"h"}
    make_tree(tree, spec)
    whole = walked(tree)
    cuts = plan_ranges(tree, RULES, 8)
    assert cuts == sorted(cuts) and len(cuts) >= 7
    assert any(c.startswith(b"DCIM/100CAM/IMG_") for c in cuts)
    assert any(c.startswith(b"DCIM/101CAM/IMG_") for c in cuts)
    assert any(c.startswith(b"DCIM/loose_") for c in plan_ranges(tree, RULES, 40))
    bounds: list[bytes | None] = [b"", *cuts, None]
    pieces = [
        walked(tree, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if lo is not None
    ]
    assert [f for piece in pieces for f in piece] == whole
    assert max(len(piece) for piece in pieces) < 45  # no folder is one range
    assert b"a/b/c/d/e/" in plan_ranges(tree, RULES, 40)


@pytest.mark.parametrize("subfolders", [False, True], ids=["files-only", "with-subfolders"])
def test_ranges_walk_the_planners_listing_of_a_big_folder_as_their_own(
    tree: bytes, monkeypatch: pytest.MonkeyPatch, subfolders: bool
) -> None:
    """A folder cut between its files is listed once, by the planner; each range's walk
    takes its slice of that listing and yields exactly what listing it again would: the
    same files in the same order, FIFOs as special files, symlinks and ignored names left
    out, non-UTF-8 names, and (with subfolders, listed with their types) the subtrees."""
    monkeypatch.setattr(fsledger.merge, "FILES_PER_CUT", 10)
    monkeypatch.setattr(fsledger.merge, "_SMALL_DIR_BYTES", 0)
    spec: dict[str, bytes | None] = {f"big/IMG_{i:03d}.jpg": b"x" * i for i in range(120)}
    spec |= {"big/.hidden.jpg": b"h", "big/Thumbs.db": b"t", "a.jpg": b"a", "zz/z.jpg": b"z"}
    if subfolders:
        spec |= {"big/IMG_050/inner.jpg": b"i", "big/IMG_05/x.jpg": b"x", "big/sub/y": b"y"}
    make_tree(tree, spec)
    big = os.path.join(tree, b"big")
    os.mkfifo(os.path.join(big, b"IMG_077.fifo"))
    os.symlink(b"IMG_001.jpg", os.path.join(big, b"IMG_078.link"))
    with open(os.path.join(big, b"IMG_\xff\xfe.jpg"), "wb") as f:
        f.write(b"latin")
    listings: dict[bytes, Any] = {}
    cuts = plan_ranges(tree, RULES, 12, listings=listings)
    # The big folder, and (every folder being "big" here) the root, cut between its folders.
    assert set(listings) == {b"", b"big"}
    assert sum(not c.endswith(b"/") for c in cuts) >= 5
    whole = list(walk(tree, RULES, flat=True))
    bounds: list[bytes | None] = [b"", *cuts, None]
    pieces: list[Any] = []
    handed = 0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        assert lo is not None
        slices = fsledger.merge.listing_slices(listings, lo, hi)
        own = list(walk(tree, RULES, lo=lo, hi=hi, flat=True))
        given = list(walk(tree, RULES, lo=lo, hi=hi, flat=True, listings=slices))
        assert given == own, (lo, hi)
        handed += len(slices[b"big"].keys) if slices and b"big" in slices else 0
        pieces += given
    assert pieces == whole
    assert handed <= len(listings[b"big"].keys) + 2 * len(cuts), "each range its slice, not all"
    # Any cut points (files, directory keys, paths below a subfolder) slice exactly too.
    rng = random.Random(5)
    keys: list[bytes] = [i[0] if isinstance(i, tuple) else i.path for i in whole]
    keys += [b"big/", b"big/IMG_05/", b"big/IMG_050/", b"big/IMG_050/inner.jpg", b"big/sub/"]
    for _ in range(30):
        chosen = sorted(set(rng.sample(keys, 4)))
        ends: list[bytes | None] = [b"", *chosen, None]
        for lo, hi in zip(ends, ends[1:], strict=False):
            assert lo is not None
            slices = fsledger.merge.listing_slices(listings, lo, hi)
            assert list(walk(tree, RULES, lo=lo, hi=hi, flat=True, listings=slices)) == list(
                walk(tree, RULES, lo=lo, hi=hi, flat=True)
            ), (lo, hi)
    assert any(type(i).__name__ == "Special" for i in whole)
    # A file gone since the planner listed it is not there; one created since is the next
    # pass's (as for any listing made before the file).
    os.unlink(os.path.join(big, b"IMG_030.jpg"))
    (lo, hi) = next(
        (lo, hi)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
        if lo is not None and lo <= b"big/IMG_030.jpg" and (hi is None or hi > b"big/IMG_030.jpg")
    )
    assert lo is not None
    got = [
        i[0]
        for i in walk(
            tree,
            RULES,
            lo=lo,
            hi=hi,
            flat=True,
            listings=fsledger.merge.listing_slices(listings, lo, hi),
        )
        if type(i) is tuple
    ]
    assert b"big/IMG_030.jpg" not in got and got == sorted(got)


def test_plan_ranges_of_a_flat_or_missing_tree(tree: bytes) -> None:
    make_tree(tree, {f"f{i}": b"" for i in range(50)})
    assert plan_ranges(tree, RULES, 4) == []
    assert plan_ranges(tree + b"/gone", RULES, 4) == []


def test_merge_yields_only_differences(ledger: Ledger, store: Store, tree: bytes) -> None:
    photo_tree(tree, files=60)
    age_tree(tree)
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    os.unlink(p(tree, "top.jpg"))
    make_tree(tree, {"2004/new.jpg": b"new"})
    with open(p(tree, "zz/last"), "ab") as f:
        f.write(b"+")
    merge = Merge(walk(tree, RULES), store.iter_record_rows(repo.id), LookRule("blake3"))
    items = list(merge)
    assert merge.scanned == 64
    looks = {i.entry.path: i.old for i in items if isinstance(i, Look)}
    assert set(looks) == {b"2004/new.jpg", b"zz/last"}
    assert looks[b"2004/new.jpg"] is None
    assert looks[b"zz/last"] == store.get_record(repo.id, b"zz/last")
    assert [i.path for i in items if isinstance(i, Absent)] == [b"top.jpg"]
    # Another algorithm, or --verify, looks at everything.
    for rule in (LookRule("sha256"), LookRule("blake3", verify=True)):
        merge = Merge(walk(tree, RULES), store.iter_record_rows(repo.id), rule)
        assert sum(isinstance(i, Look) for i in merge) == 64


def test_a_range_result_crosses_to_the_parent_intact(
    ledger: Ledger, store: Store, tree: bytes
) -> None:
    """Every kind of item survives the flat pickling that carries results out of a worker:
    new files hashed there (plain tuples), changed files with their records and hashes,
    absent records and unreadable paths, in order."""
    photo_tree(tree, files=30)
    age_tree(tree)
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    os.unlink(p(tree, "top.jpg"))
    make_tree(tree, {"2004/new.jpg": b"new", "2005/b.jpg": b"b"})
    with open(p(tree, "zz/last"), "ab") as f:
        f.write(b"+")
    task = RangeTask(store.url, repo.id, tree, RULES, LookRule("blake3"), b"", None)
    try:
        result = merge_range(dataclasses.replace(task, hash_looks=True))
    finally:
        # It ran here, not in a worker: close the store it keeps for a next range (a SQLite
        # store's checkpointer thread would outlive the test).
        fsledger.merge._worker_stores.pop(store.url).close()
    odd = Unreadable(b"2006/locked", True, "Permission denied (errno 13)")
    result.items.append(odd)
    back = pickle.loads(pickle.dumps(result))
    assert isinstance(back, RangeResult)
    assert back.items == result.items and (back.scanned, back.specials) == (result.scanned, 0)
    kinds = {type(i).__name__ for i in back.items}
    assert kinds == {"tuple", "Look", "Absent", "Unreadable"}
    new = {i[0]: i for i in back.items if type(i) is tuple}
    assert set(new) == {b"2004/new.jpg", b"2005/b.jpg"}
    st = os.lstat(p(tree, "2004/new.jpg"))
    hex_ = fsledger.hashing.hash_file(p(tree, "2004/new.jpg")).hex
    assert new[b"2004/new.jpg"] == (
        b"2004/new.jpg",
        hex_,
        3,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )
    (changed,) = [i for i in back.items if isinstance(i, Look)]
    assert changed.entry.path == b"zz/last" and changed.old is not None
    assert changed.hashed is not None and changed.hashed.size == changed.entry.stat.size


def test_a_range_without_records_gives_what_the_merge_would(
    store: Store, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range without records (every range of a first index) skips ``Merge``: its result
    is exactly what the merge and the hashing of its looks give, items and counts, with a
    FIFO, a symlink, a directory passed as unreadable and a file that fails to hash."""
    photo_tree(tree, files=40)
    os.mkfifo(p(tree, "2004/pipe"))
    os.symlink(b"../top.jpg", p(tree, "2005/link.jpg"))
    real = fsledger.hashing.hash_at

    def failing(
        dir_fd: int, name: bytes, algo: str = "blake3", threads: int = 1, expect: Any = None
    ) -> Any:
        if name == b"IMG_0005.jpg":
            return fsledger.hashing.HashOutcome(None, error="Input/output error (errno 5)")
        return real(dir_fd, name, algo, threads, expect)

    monkeypatch.setattr(fsledger.merge, "hash_at", failing)
    unreadable = {b"2006": "not mounted"}
    task = RangeTask(
        store.url, uuid.uuid4(), tree, RULES, LookRule("blake3"), b"", None, unreadable, True
    )
    try:
        result = merge_range(task)
    finally:
        fsledger.merge._worker_stores.pop(store.url).close()

    merge = Merge(walk(tree, RULES, unreadable=unreadable, flat=True), [], LookRule("blake3"))
    expected: list[Any] = []
    for item in merge:
        if isinstance(item, Look):
            parent, _sep, name = (b"/" + item.entry.path).rpartition(b"/")
            dir_fd = os.open(tree + parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                out = failing(dir_fd, name)
            finally:
                os.close(dir_fd)
            if out.hex is None:
                expected.append(Look(item.entry, None, out))
            else:
                expected.append((item.entry.path, out.hex, *out[1:5]))
        else:
            expected.append(item)
    assert result.items == expected
    assert (result.scanned, result.specials) == (merge.scanned, merge.specials) == (35, 1)
    kinds = {type(i).__name__ for i in result.items}
    assert kinds == {"tuple", "Look", "Unreadable"}


def test_record_rows_match_records(ledger: Ledger, store: Store, tree: bytes) -> None:
    photo_tree(tree, files=40)
    repo = ledger.add_repository(tree)
    ledger.scan(repo)
    rows = list(store.iter_record_rows(repo.id, page=7))
    assert [r.record() for r in rows] == list(store.iter_records(repo.id))
    lo, hi = b"2005/", b"2007/"
    ranged = [r.path for r in store.iter_record_rows(repo.id, lo, hi, page=3)]
    assert ranged == [r.path for r in rows if lo <= r.path < hi] and ranged


def changes_across_the_tree(tree: bytes) -> None:
    """Edits, deletions and additions all over the tree; a file and a folder moved across
    ranges."""

    def img(i: int) -> bytes:
        year = 2004 + i % 5
        return p(tree, f"{year}/{year}-{1 + (i // 5) % 12:02d}/ev{i % 3}/IMG_{i:04d}.jpg")

    for i in range(1, 600, 7):
        with open(img(i), "ab") as f:
            f.write(b"edit")
    for i in range(3, 600, 11):
        os.unlink(img(i))
    make_tree(tree, {f"2008/new/n{i}.jpg": b"new %d" % i for i in range(30)})
    os.rename(img(0), p(tree, "zz/moved.jpg"))
    os.rename(p(tree, "2005/2005-01"), p(tree, "2008/2005-01-moved"))
    age_tree(tree)


def summary(stats: ScanStats) -> tuple[int, ...]:
    return (
        stats.files_scanned,
        stats.files_added,
        stats.files_updated,
        stats.files_removed,
        stats.files_moved,
        stats.files_hashed,
        stats.error_count,
    )


def test_rescan_in_key_ranges_equals_the_disk_and_the_serial_merge(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two identical trees with identical changes: one rescanned with its merge in worker
    processes over key ranges, one in a single process. Both ledgers equal their disks,
    and the counts agree."""
    caplog.set_level(logging.DEBUG, logger="fsledger.reconcile")
    first = tmp_path / "ranged"
    photo_tree(os.fsencode(str(first)))
    age_tree(os.fsencode(str(first)))
    shutil.copytree(first, tmp_path / "serial", copy_function=shutil.copy2)
    outcome: dict[bool, tuple[int, ...]] = {}
    with Ledger(Settings(database_url=store.url, max_concurrency=2), store) as ledger:
        for ranged, name in ((True, "ranged"), (False, "serial")):
            minimum = 1 if ranged else 10**9
            monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", minimum)
            tree = os.fsencode(str(tmp_path / name))
            repo = ledger.add_repository(tree)
            assert ledger.scan(repo).files_added == 604
            caplog.clear()
            assert no_change(ledger.scan(repo))
            changes_across_the_tree(tree)
            stats = ledger.scan(repo)
            used = any("key ranges in workers" in r.getMessage() for r in caplog.records)
            assert used == ranged
            assert_exact(ledger, repo)
            assert no_change(ledger.scan(repo))
            outcome[ranged] = summary(stats)
    assert outcome[True] == outcome[False]
    scanned, added, _updated, _removed, moved, _hashed, errors = outcome[True]
    assert (scanned, errors) == (604 - 55 + 30, 0)
    # zz/moved.jpg and the unedited files of the moved folder keep their hashes.
    assert added >= 30 and moved >= 2


def test_a_big_flat_folder_is_indexed_and_rescanned_in_ranges(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A phone's dump (one folder of many files) is cut between its files: its first index
    goes to the workers although the tree has no folders to speak of, and the ledger equals
    the disk after it and after a rescan with changes in several of its ranges."""
    caplog.set_level(logging.DEBUG, logger="fsledger.reconcile")
    monkeypatch.setattr(fsledger.merge, "FILES_PER_CUT", 10)
    monkeypatch.setattr(fsledger.merge, "_SMALL_DIR_BYTES", 0)
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 1)
    tree = os.fsencode(str(tmp_path / "phone"))
    make_tree(tree, {f"DCIM/IMG_{i:04d}.jpg": f"photo {i}".encode() for i in range(120)})
    age_tree(tree)
    with Ledger(Settings(database_url=store.url, max_concurrency=2), store) as ledger:
        repo = ledger.add_repository(tree)
        assert ledger.scan(repo).files_added == 120
        assert any("key ranges in workers" in r.getMessage() for r in caplog.records)
        assert_exact(ledger, repo)
        assert no_change(ledger.scan(repo))
        for i in (3, 57, 119):
            os.unlink(p(tree, f"DCIM/IMG_{i:04d}.jpg"))
        make_tree(tree, {"DCIM/IMG_0057b.jpg": b"new", "DCIM/IMG_9999.jpg": b"last"})
        stats = ledger.scan(repo)
        assert (stats.files_added, stats.files_removed) == (2, 3)
        assert_exact(ledger, repo)


@pytest.mark.parametrize("workers_store", ["sqlite", "postgres"])
def test_a_store_failure_in_a_worker_fails_the_scan(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers_store: str
) -> None:
    """A worker that cannot read the records fails the scan as the in-process merge would:
    the operation is marked failed and nothing is deleted."""
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 1)
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=100)
    with Ledger(Settings(database_url=store.url, max_concurrency=2), store) as ledger:
        repo = ledger.add_repository(tree)
        ledger.scan(repo)
        before = store.count_records(repo.id)
        shutil.rmtree(p(tree, "2004"))
        # A store the workers cannot open, while the parent's connection keeps working.
        if workers_store == "sqlite":
            (tmp_path / "a-file").write_bytes(b"")
            bad, message = f"sqlite://{tmp_path}/a-file/ledger.db", "cannot be created"
        else:
            # A server that refuses the connection (nothing listens on port 1).
            bad, message = "postgresql://postgres@127.0.0.1:1/test", "cannot be reached"
        monkeypatch.setattr(store, "url", bad)
        with pytest.raises(StoreError, match=message):
            ledger.scan(repo)
        monkeypatch.undo()
        assert store.count_records(repo.id) == before
        (op,) = store.recent_operations(repo.id, 1)
        assert op.status.value == "failed"


def _hang(*args: Any, **kwargs: Any) -> Any:
    time.sleep(30)  # a read stuck on a dead network mount
    raise AssertionError("unreachable within the test")


def test_a_stalled_range_fails_the_scan_without_deleting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stuck in a read (a hung mount) cannot be interrupted: after five hash
    timeouts without a result the scan gives up as 'root unavailable', deletes nothing and
    is marked failed; the next scan, with the mount back, completes.

    SQLite only: the store does not matter here. The workers are forks, started as a
    scanning command starts them (``start_workers``), which is how they get the hanging
    function.
    """
    url = "sqlite://" + str(tmp_path / "ledger.db")
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 1)
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=100)
    settings = Settings(database_url=url, max_concurrency=2, hash_timeout_s=0.4)
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(tree)
        ledger.scan(repo)
        before = ledger.store.count_records(repo.id)
    make_tree(tree, {"2004/new.jpg": b"new"})
    shutil.rmtree(p(tree, "2005"))

    # Forks, whatever threads other tests left behind in this process: they are idle.
    monkeypatch.setattr(fsledger.hashing, "_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(fsledger.merge, "hash_at", _hang)
    with Ledger(settings, pool=start_workers(settings)) as ledger:
        started = time.monotonic()
        with pytest.raises(RootUnavailable, match="stopped answering"):
            ledger.scan(repo)
        assert time.monotonic() - started < 15
        assert ledger.store.count_records(repo.id) == before
        assert ledger.store.recent_operations(repo.id, 1)[0].status.value == "failed"
    monkeypatch.undo()
    with Ledger(settings) as ledger:
        assert ledger.scan(repo).errors == []
        assert_exact(ledger, repo)


def _slow_hash_at(*args: Any, **kwargs: Any) -> Any:
    time.sleep(0.02)  # a loaded machine: every file slow, none stuck
    return fsledger.hashing.hash_at(*args, **kwargs)


def test_a_slow_range_that_makes_progress_is_not_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stall detection counts files, not ranges: a first index whose ranges each take
    longer than the stall time (five hash timeouts), while every file of them takes a
    fraction of it, completes."""
    url = "sqlite://" + str(tmp_path / "ledger.db")
    tree = os.fsencode(str(tmp_path / "photos"))
    make_tree(tree, {f"a/{i:03d}.jpg": b"x" * i for i in range(100)})
    make_tree(tree, {f"b/{i:03d}.jpg": b"y" * i for i in range(100)})
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_DIRS", 1)
    settings = Settings(database_url=url, max_concurrency=2, hash_timeout_s=0.1)
    monkeypatch.setattr(fsledger.hashing, "_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(fsledger.merge, "hash_at", _slow_hash_at)
    with Ledger(settings, pool=start_workers(settings)) as ledger:
        repo = ledger.add_repository(tree)
        started = time.monotonic()
        stats = ledger.scan(repo)
        assert time.monotonic() - started > RANGE_STALL_FACTOR * 0.1
        assert stats.errors == []
        assert stats.files_added == 200
    monkeypatch.undo()
    with Ledger(Settings(database_url=url)) as ledger:
        assert_exact(ledger, repo)


def test_racy_means_hashed_within_the_clock_granularity_of_the_write() -> None:
    """One rule for both tiers (the watcher's applier uses it too): a hash taken within 2 s
    of the last write may predate another write with the same mtime; a future mtime (a
    camera's wrong clock) is not racy, or such files would be rehashed forever."""
    now = 1_800_000_000 * NS_PER_S
    assert is_racy(now - NS_PER_S, now) and is_racy(now, now)
    assert not is_racy(now - 3 * NS_PER_S, now)
    assert not is_racy(now + 86_400 * NS_PER_S, now)


def test_a_scans_workers_connect_as_they_start(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers started for a scan (``start_workers``) open their PostgreSQL connection at
    once, while the scanning process opens its own; the scan's ranges then use those
    connections and leave the ledger equal to the disk. Workers that cannot connect start
    all the same, and the scan reports the database as a range meets it."""
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 1)
    monkeypatch.setattr(fsledger.hashing, "_context", lambda: multiprocessing.get_context("fork"))
    name = f"fsl-warm-{os.getpid()}"
    url = f"{pg_url}&application_name={name}"
    tree = os.fsencode(str(tmp_path / "photos"))
    photo_tree(tree, files=200)
    settings = Settings(database_url=url, max_concurrency=2)

    def connections() -> int:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
        return int(row[0]) if row else 0

    pool = start_workers(settings)
    assert pool is not None
    wait_for("both workers' connections", lambda: connections() == 2)
    with Ledger(settings, pool=pool) as ledger:
        repo = ledger.add_repository(tree)
        ledger.scan(repo)
        make_tree(tree, {"2004/new.jpg": b"new"})
        shutil.rmtree(p(tree, "2005"))
        stats = ledger.scan(repo)
        assert (stats.files_added, stats.files_removed) == (1, 40)
        assert_exact(ledger, repo)
    unreachable = Settings(database_url="postgresql://postgres@127.0.0.1:1/x", max_concurrency=2)
    pool = start_workers(unreachable)
    assert pool is not None
    try:
        assert list(pool.map_ordered(abs, [-1, -2], 10)) == [1, 2]
    finally:
        pool.close()


def test_a_scan_command_starts_workers_only_when_a_repository_may_use_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``scan_wants_workers`` (asked by ``fsledger scan`` before it opens the store): a small
    repository's rescan merges in-process, so no workers are forked for it; a first index,
    a big repository, an unknown name or another store than SQLite get them."""
    url = "sqlite://" + str(tmp_path / "ledger.db")
    settings = Settings(database_url=url, max_concurrency=2)
    assert scan_wants_workers(settings, ("photos",))  # no database yet
    small = os.fsencode(str(tmp_path / "small"))
    new = os.fsencode(str(tmp_path / "new"))
    make_tree(small, {"a/1.jpg": b"1", "a/2.jpg": b"2"})
    make_tree(new, {"b/1.jpg": b"1"})
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(small, name="small")
        ledger.scan(repo)
        ledger.add_repository(new, name="new")
    assert not scan_wants_workers(settings, ("small",))
    assert not scan_wants_workers(settings, (str(repo.id),))
    assert not scan_wants_workers(settings, (os.fsdecode(small),))
    assert scan_wants_workers(settings, ("new",))  # a first index may be cut in ranges
    assert scan_wants_workers(settings, ("small", "new"))
    assert scan_wants_workers(settings, ())  # every repository, "new" among them
    assert scan_wants_workers(settings, ("nosuch",))  # the scan reports it
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 2)
    assert scan_wants_workers(settings, ("small",))
    assert not scan_wants_workers(dataclasses.replace(settings, max_concurrency=1), ("new",))
    pg = dataclasses.replace(settings, database_url="postgresql://nobody@127.0.0.1:1/none")
    assert scan_wants_workers(pg, ("small",))
