"""The watcher driven by a scripted backend: deterministic event sequences on a real tree.

Each test changes a real temporary tree, pushes the events inotify would have sent (or
deliberately not all of them), processes them with ``flush()`` and compares the ledger
with an independent walk of the disk.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

import fsledger.mounts
from fsledger.config import Settings
from fsledger.errors import StoreError
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, FeedEntry, OperationStatus, OperationType, Repository
from fsledger.watch import ScriptedBackend, Watcher
from fsledger.watch.backend import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_UNMOUNT,
)
from scenario_support import follow_identities
from support import assert_exact, ledger_state, wait_for
from treeutil import FakeMounts
from watch_support import digest_of, exchange, write

_cookies = itertools.count(1000)


class Rig:
    """A ledger on a SQLite file, a repository at ``root`` and a watcher on a scripted backend.

    Populate ``root``, call ``start()`` (registers, scans, watches), then change the tree
    and push the matching events.
    """

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.root = tmp_path / "lib"
        self.root.mkdir()
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        kw: dict[str, Any] = {
            "database_url": "sqlite://" + str(tmp_path / "db.sqlite"),
            "max_concurrency": 2,
        }
        kw.update(overrides)
        self.settings = Settings(**kw)
        self.ledger = Ledger(self.settings)
        self.backend = ScriptedBackend()
        self.resyncs: list[tuple[UUID, bytes, str]] = []
        self.watcher = Watcher(self.ledger, self.settings, self.backend, on_resync=self._on_resync)
        self.watcher.retry_initial_s = 0.001
        self.repo: Repository | None = None
        self.seq0 = 0

    def _on_resync(self, repo: Repository, prefix: bytes, reason: str) -> None:
        self.resyncs.append((repo.id, prefix, reason))

    def start(self) -> Repository:
        self.repo = self.ledger.add_repository(os.fsencode(self.root))
        self.ledger.scan(self.repo)
        self.repo = self.ledger.store.get_repository(self.repo.id)
        assert self.repo is not None
        self.watcher.add(self.repo)
        self.mark()
        return self.repo

    def close(self) -> None:
        self.watcher.stop()
        self.ledger.close()

    # --- paths and events -----------------------------------------------------------
    def p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def wd(self, rel_dir: str) -> int:
        return self.backend.wd_of(os.fsencode(self.p(rel_dir)))

    def emit(self, rel: str, mask: int, cookie: int = 0, wd: int | None = None) -> None:
        """Push one event for ``rel`` (a path relative to the root) to its parent's watch."""
        parent, _, name = rel.rpartition("/")
        self.backend.emit(self.wd(parent) if wd is None else wd, mask, os.fsencode(name), cookie)

    def created(self, rel: str) -> None:
        for mask in (IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE):
            self.emit(rel, mask)

    def renamed(self, src: str, dst: str, is_dir: bool = False) -> None:
        cookie = next(_cookies)
        flag = IN_ISDIR if is_dir else 0
        self.emit(src, IN_MOVED_FROM | flag, cookie)
        self.emit(dst, IN_MOVED_TO | flag, cookie)

    def exchanged(self, a: str, b: str) -> None:
        """The events of ``renameat2(RENAME_EXCHANGE)`` of the directories ``a`` and ``b``:
        two rename pairs, ``a`` onto ``b``, then ``b`` onto ``a``."""
        self.renamed(a, b, is_dir=True)
        self.renamed(b, a, is_dir=True)

    # --- what the ledger says ---------------------------------------------------------
    def mark(self) -> None:
        self.seq0 = self.ledger.store.latest_seq()

    def feed(self) -> list[FeedEntry]:
        assert self.repo is not None
        return self.ledger.store.changes_since(self.seq0, 100_000, self.repo.id)

    def kinds(self) -> list[tuple[ChangeKind, bytes, bytes | None]]:
        return [(e.kind, e.path, e.old_path) for e in self.feed()]

    def state(self) -> dict[bytes, tuple[int, str | None]]:
        assert self.repo is not None
        return ledger_state(self.ledger, self.repo)

    def assert_exact(self) -> None:
        assert self.repo is not None
        assert_exact(self.ledger, self.repo, self.root)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def make_rig(tmp_path: Path, request: pytest.FixtureRequest, **overrides: Any) -> Rig:
    r = Rig(tmp_path, **overrides)
    request.addfinalizer(r.close)
    return r


# === creation, modification, deletion ==================================================
def test_create_modify_delete_follow_the_disk(rig: Rig) -> None:
    write(rig.p("keep.jpg"), "keep")
    write(rig.p("old.jpg"), "old")
    write(rig.p("edit.jpg"), "v1")
    rig.start()

    write(rig.p("new.jpg"), "brand new")
    rig.created("new.jpg")
    write(rig.p("edit.jpg"), "version two")
    rig.emit("edit.jpg", IN_MODIFY)
    rig.emit("edit.jpg", IN_CLOSE_WRITE)
    os.unlink(rig.p("old.jpg"))
    rig.emit("old.jpg", IN_DELETE)
    rig.watcher.flush()

    rig.assert_exact()
    assert set(rig.kinds()) == {
        (ChangeKind.CREATED, b"new.jpg", None),
        (ChangeKind.MODIFIED, b"edit.jpg", None),
        (ChangeKind.DELETED, b"old.jpg", None),
    }
    assert rig.watcher.metrics.events_processed == 6
    # Duplicate events change nothing: processing is state-based.
    rig.mark()
    rig.created("new.jpg")
    rig.watcher.flush()
    assert rig.kinds() == []


def test_create_then_delete_within_the_debounce_window_leaves_nothing(rig: Rig) -> None:
    rig.start()
    write(rig.p("flash.jpg"), "here for a moment")
    rig.created("flash.jpg")
    os.unlink(rig.p("flash.jpg"))
    rig.emit("flash.jpg", IN_DELETE)
    rig.watcher.flush()

    assert rig.state() == {}
    assert rig.kinds() == []
    rig.assert_exact()


def test_debounce_holds_writes_in_progress_but_a_close_settles_at_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rig = make_rig(tmp_path, request, debounce_s=3600.0)
    rig.start()
    write(rig.p("growing.mov"), "first chunk")
    rig.emit("growing.mov", IN_CREATE)
    rig.emit("growing.mov", IN_MODIFY)
    rig.watcher.process_due()
    assert rig.state() == {}, "a file still being written waits for the debounce"

    write(rig.p("growing.mov"), "first chunk, second chunk")
    rig.emit("growing.mov", IN_CLOSE_WRITE)
    wait_for(
        "growing.mov recorded",
        lambda: (rig.watcher.process_due(), b"growing.mov" in rig.state())[1],
    )
    rig.assert_exact()
    assert len(rig.watcher.metrics.latency_ms) == 1


def test_create_and_delete_inside_the_window_with_debounce_pending(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rig = make_rig(tmp_path, request, debounce_s=3600.0)
    rig.start()
    write(rig.p("tmpfile.jpg"), "x")
    rig.emit("tmpfile.jpg", IN_CREATE)
    rig.watcher.process_due()
    os.unlink(rig.p("tmpfile.jpg"))
    rig.emit("tmpfile.jpg", IN_DELETE)
    rig.watcher.flush()
    assert rig.state() == {}
    assert rig.kinds() == []


def test_attrib_only_refreshes_metadata(rig: Rig) -> None:
    write(rig.p("a.jpg"), "same content")
    rig.start()
    os.utime(rig.p("a.jpg"), ns=(1_000_000_000, 1_000_000_000))
    rig.emit("a.jpg", IN_ATTRIB)
    rig.watcher.flush()
    assert rig.kinds() == []  # metadata-only updates are not news
    assert rig.ledger.store.get_record(rig.repo.id, b"a.jpg").stat.mtime_ns == 1_000_000_000  # type: ignore[union-attr]
    rig.assert_exact()


# === ignore rules ======================================================================
def test_events_for_ignored_names_never_reach_the_store(rig: Rig) -> None:
    rig.start()
    names = [".hidden.jpg", "swap.swp", "draft.tmp", "Thumbs.db", "backup.jpg~", ".DS_Store"]
    for name in names:
        write(rig.p(name), "ignored")
        rig.created(name)
    (rig.p(".cache")).mkdir()
    rig.emit(".cache", IN_CREATE | IN_ISDIR)
    write(rig.p("real.jpg"), "real")
    rig.created("real.jpg")
    rig.watcher.flush()

    assert set(rig.state()) == {b"real.jpg"}
    assert rig.watcher.metrics.events_ignored == 3 * len(names) + 1
    with pytest.raises(KeyError):
        rig.wd(".cache")  # ignored directories are not watched
    rig.assert_exact()


def test_a_write_through_an_ignored_hard_link_refreshes_the_recorded_name(rig: Rig) -> None:
    """inotify names only the name written: through an ignored link (``.hidden``) of a
    recorded file, that is the only event, and it must not be dropped unseen. A plain
    ignored file (one link) costs one lstat and changes nothing."""
    write(rig.p("a/photo.jpg"), "pixels")
    os.link(rig.p("a/photo.jpg"), rig.p("a/.hidden"))
    write(rig.p("a/.plain"), "ignored, one link")
    rig.start()
    with open(rig.p("a/.hidden"), "ab") as fh:
        fh.write(b", edited")
    rig.emit("a/.hidden", IN_MODIFY)
    rig.emit("a/.hidden", IN_CLOSE_WRITE)
    write(rig.p("a/.plain"), "ignored, edited")
    rig.emit("a/.plain", IN_CLOSE_WRITE)
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.kinds() == [(ChangeKind.MODIFIED, b"a/photo.jpg", None)]
    assert set(rig.state()) == {b"a/photo.jpg"}


def test_rsync_style_hidden_temp_renamed_into_place(rig: Rig) -> None:
    rig.start()
    write(rig.p(".photo.jpg.Xa81k"), "synced content")
    rig.created(".photo.jpg.Xa81k")
    os.rename(rig.p(".photo.jpg.Xa81k"), rig.p("photo.jpg"))
    rig.renamed(".photo.jpg.Xa81k", "photo.jpg")
    rig.watcher.flush()
    assert rig.kinds() == [(ChangeKind.CREATED, b"photo.jpg", None)]
    rig.assert_exact()


def test_repository_ignore_patterns_apply_to_events(tmp_path: Path) -> None:
    from fsledger.model import RepoSettings

    r = Rig(tmp_path)
    try:
        r.repo = r.ledger.add_repository(
            os.fsencode(r.root), settings=RepoSettings(ignore_patterns=("*.xmp",))
        )
        r.ledger.scan(r.repo)
        r.watcher.add(r.repo)
        write(r.p("IMG_1.xmp"), "sidecar")
        r.created("IMG_1.xmp")
        write(r.p("IMG_1.jpg"), "photo")
        r.created("IMG_1.jpg")
        r.watcher.flush()
        assert set(r.state()) == {b"IMG_1.jpg"}
    finally:
        r.close()


# === renames ===========================================================================
def test_file_rename_inside_keeps_the_stored_hash(rig: Rig) -> None:
    write(rig.p("a/IMG_1.jpg"), "pixels")
    write(rig.p("b/other.jpg"), "other")
    rig.start()
    before = rig.state()[b"a/IMG_1.jpg"]

    os.rename(rig.p("a/IMG_1.jpg"), rig.p("b/IMG_1.jpg"))
    cookie = next(_cookies)
    rig.emit("a/IMG_1.jpg", IN_MOVED_FROM, cookie)
    # The two halves need not be adjacent.
    write(rig.p("b/other.jpg"), "other, edited")
    rig.emit("b/other.jpg", IN_CLOSE_WRITE)
    rig.emit("b/IMG_1.jpg", IN_MOVED_TO, cookie)
    rig.watcher.flush()

    assert (ChangeKind.MOVED, b"b/IMG_1.jpg", b"a/IMG_1.jpg") in rig.kinds()
    assert not any(k is ChangeKind.CREATED for k, _, _ in rig.kinds())
    assert rig.state()[b"b/IMG_1.jpg"] == before
    rig.assert_exact()


def test_chained_file_renames_in_one_window(rig: Rig) -> None:
    write(rig.p("one.jpg"), "content one")
    rig.start()
    os.rename(rig.p("one.jpg"), rig.p("two.jpg"))
    rig.renamed("one.jpg", "two.jpg")
    os.rename(rig.p("two.jpg"), rig.p("three.jpg"))
    rig.renamed("two.jpg", "three.jpg")
    rig.watcher.flush()
    assert rig.kinds() == [(ChangeKind.MOVED, b"three.jpg", b"one.jpg")]
    rig.assert_exact()


def test_editor_atomic_save_over_an_existing_file(rig: Rig) -> None:
    write(rig.p("notes.txt"), "draft 1")
    rig.start()
    # A temp name that is not ignored: it is recorded, then renamed over the original.
    write(rig.p("notes.txt.new"), "draft 2, longer")
    rig.created("notes.txt.new")
    rig.watcher.flush()
    os.replace(rig.p("notes.txt.new"), rig.p("notes.txt"))
    rig.renamed("notes.txt.new", "notes.txt")
    rig.watcher.flush()
    rig.assert_exact()
    # An ignored temp name: only the rename into place is seen.
    write(rig.p("notes.txt.swp"), "draft 3")
    rig.created("notes.txt.swp")
    os.replace(rig.p("notes.txt.swp"), rig.p("notes.txt"))
    rig.renamed("notes.txt.swp", "notes.txt")
    rig.watcher.flush()
    rig.assert_exact()


def test_directory_rename_is_one_dir_moved_and_rehashes_nothing(rig: Rig) -> None:
    for i in range(20):
        write(rig.p(f"2023/trip/day{i % 3}/IMG_{i}.jpg"), f"photo {i}")
    write(rig.p("2023/notes.txt"), "notes")
    rig.start()
    hashes = {p.replace(b"2023/", b"2024/", 1): v for p, v in rig.state().items()}

    os.rename(rig.p("2023"), rig.p("2024"))
    rig.renamed("2023", "2024", is_dir=True)
    rig.watcher.flush()

    assert rig.kinds() == [(ChangeKind.DIR_MOVED, b"2024", b"2023")]
    assert rig.state() == hashes
    rig.assert_exact()

    # The watches of the directory and all its descendants now map to the new paths.
    rig.mark()
    write(rig.p("2024/trip/day1/new.jpg"), "new after the rename")
    rig.created("2024/trip/day1/new.jpg")
    rig.watcher.flush()
    assert rig.kinds() == [(ChangeKind.CREATED, b"2024/trip/day1/new.jpg", None)]
    rig.assert_exact()


def test_pending_event_follows_a_renamed_parent(rig: Rig) -> None:
    write(rig.p("album/a.jpg"), "a")
    rig.start()
    parent_wd = rig.wd("album")
    write(rig.p("album/b.jpg"), "b")
    rig.emit("album/b.jpg", IN_CLOSE_WRITE)
    os.rename(rig.p("album"), rig.p("album2"))
    rig.renamed("album", "album2", is_dir=True)
    rig.watcher.flush()
    assert rig.wd("album2") == parent_wd
    rig.assert_exact()


def test_chained_and_swapped_directory_renames_in_one_window(rig: Rig) -> None:
    write(rig.p("x/1.jpg"), "x1")
    write(rig.p("y/2.jpg"), "y2")
    write(rig.p("z/3.jpg"), "z3")
    rig.start()
    # z -> t -> w (a chain), and x <-> y (a swap through a temporary name).
    os.rename(rig.p("z"), rig.p("t"))
    rig.renamed("z", "t", is_dir=True)
    os.rename(rig.p("t"), rig.p("w"))
    rig.renamed("t", "w", is_dir=True)
    os.rename(rig.p("x"), rig.p("tmp"))
    rig.renamed("x", "tmp", is_dir=True)
    os.rename(rig.p("y"), rig.p("x"))
    rig.renamed("y", "x", is_dir=True)
    os.rename(rig.p("tmp"), rig.p("y"))
    rig.renamed("tmp", "y", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.state()[b"y/1.jpg"][1] == digest_of(os.fsencode(rig.p("y/1.jpg")))


def test_each_hop_of_a_directory_rename_chain_reaches_the_feed(rig: Rig) -> None:
    """By the time a pass writes ``D0 -> C/D1``, ``C/D1`` is gone (renamed on): the hop is
    still written, as a move, and so is every later one; no file is deleted and created."""
    write(rig.p("D0/x/f.jpg"), "f")
    write(rig.p("a/y/h.jpg"), "h")
    write(rig.p("b/keep.jpg"), "k")
    rig.p("C").mkdir()
    rig.start()
    for src, dst in (("D0", "C/D1"), ("C/D1", "D2"), ("D2", "D3"), ("a", "b/c"), ("b", "c2")):
        os.rename(rig.p(src), rig.p(dst))
        rig.renamed(src, dst, is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.kinds() == [
        (ChangeKind.DIR_MOVED, b"C/D1", b"D0"),
        (ChangeKind.DIR_MOVED, b"D2", b"C/D1"),
        (ChangeKind.DIR_MOVED, b"D3", b"D2"),
        (ChangeKind.DIR_MOVED, b"b/c", b"a"),
        (ChangeKind.DIR_MOVED, b"c2", b"b"),
    ]


def test_a_write_through_one_hard_link_refreshes_every_name(rig: Rig) -> None:
    """inotify reports a write only for the name written; the other names of the file
    (records with its inode) are refreshed in the same pass."""
    write(rig.p("a/x.dat"), "shared")
    rig.p("b").mkdir()
    os.link(rig.p("a/x.dat"), rig.p("b/y.dat"))
    os.link(rig.p("a/x.dat"), rig.p("a/z.dat"))
    write(rig.p("a/other.dat"), "not a link")
    rig.start()
    with open(rig.p("a/x.dat"), "ab") as fh:
        fh.write(b" and appended")
    rig.emit("a/x.dat", IN_MODIFY)
    rig.emit("a/x.dat", IN_CLOSE_WRITE)
    rig.watcher.flush()
    rig.assert_exact()
    assert sorted(rig.kinds()) == [
        (ChangeKind.MODIFIED, b"a/x.dat", None),
        (ChangeKind.MODIFIED, b"a/z.dat", None),
        (ChangeKind.MODIFIED, b"b/y.dat", None),
    ]


@pytest.mark.parametrize("how", ["unlinked", "renamed"])
def test_unlinking_or_renaming_one_hard_link_refreshes_the_others_ctime(rig: Rig, how: str) -> None:
    """An unlink or a rename of one name of a file changes the ctime of every other name,
    and inotify names only the one changed: the other records follow (their whole lstat
    key, as a reconciliation would write it)."""
    write(rig.p("a/x.dat"), "shared")
    rig.p("b").mkdir()
    os.link(rig.p("a/x.dat"), rig.p("b/y.dat"))
    rig.start()
    time.sleep(0.01)  # a ctime the change below can differ from (coarse clocks)
    if how == "unlinked":
        os.unlink(rig.p("a/x.dat"))
        rig.emit("a/x.dat", IN_DELETE)
    else:
        os.rename(rig.p("a/x.dat"), rig.p("a/w.dat"))
        rig.renamed("a/x.dat", "a/w.dat")
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.repo is not None
    record = rig.ledger.store.get_records(rig.repo.id, [b"b/y.dat"])[b"b/y.dat"]
    assert record.stat.ctime_ns == os.lstat(rig.p("b/y.dat")).st_ctime_ns


@pytest.mark.parametrize("had_records", [False, True], ids=["listed", "reconciled"])
def test_a_file_still_open_in_a_new_directory_is_recorded_once_closed(
    tmp_path: Path, request: pytest.FixtureRequest, had_records: bool
) -> None:
    """A directory created and filled at once: its file is found by the directory's check
    (a listing, or a subtree reconciliation when records were below its path) while the
    writer still has it open. Like any path, it is recorded once closed (or quiet for the
    debounce time): one ``created``, at the final size."""
    rig = make_rig(tmp_path, request, debounce_s=3600.0)
    if had_records:
        write(rig.p("d/old.jpg"), "old")
    write(rig.p("keep.jpg"), "keep")
    rig.start()
    if had_records:  # deleted and made again before the watcher wrote the deletion
        os.unlink(rig.p("d/old.jpg"))
        os.rmdir(rig.p("d"))
        rig.emit("d", IN_DELETE | IN_ISDIR)
    rig.p("d").mkdir()
    rig.emit("d", IN_CREATE | IN_ISDIR)
    with open(rig.p("d/f.bin"), "wb") as fh:
        fh.write(b"a" * 65536)
        fh.flush()
        # The directory's check is due after the settle time; the file is still open.
        wait_for("due work processed", rig.watcher.process_due)
        assert b"d/f.bin" not in rig.state()
        fh.write(b"b" * 65536)
    rig.emit("d/f.bin", IN_MODIFY)
    rig.emit("d/f.bin", IN_CLOSE_WRITE)
    # Settled by its close (not the hour of debounce): written by a pass that is due.
    wait_for("d/f.bin recorded", lambda: rig.watcher.process_due() and b"d/f.bin" in rig.state())
    rig.assert_exact()
    assert [(e.kind, e.path, e.size) for e in rig.feed()] == [
        *([(ChangeKind.DELETED, b"d/old.jpg", 3)] if had_records else []),
        (ChangeKind.CREATED, b"d/f.bin", 131072),
    ]


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "split-reads"])
def test_an_exchange_of_two_directories_is_written_as_one_swap(rig: Rig, split: bool) -> None:
    """renameat2(RENAME_EXCHANGE) sends a rename pair for each side, from and to the same
    two names. Written one after the other, the second would take the records the first
    just moved; they are one swap, also when a pass runs between the two pairs."""
    write(rig.p("L/a.jpg"), "left a")
    write(rig.p("L/s/b.jpg"), "left b")
    write(rig.p("R/c.jpg"), "right c")
    rig.start()
    before = rig.state()
    exchange(rig.p("L"), rig.p("R"))
    c1, c2 = next(_cookies), next(_cookies)
    rig.emit("L", IN_MOVED_FROM | IN_ISDIR, c1)
    rig.emit("R", IN_MOVED_TO | IN_ISDIR, c1)
    if split:
        rig.watcher.process_due()
        assert rig.state() == before  # nothing written while the other half may come
    rig.emit("R", IN_MOVED_FROM | IN_ISDIR, c2)
    rig.emit("L", IN_MOVED_TO | IN_ISDIR, c2)
    rig.watcher.flush()
    rig.assert_exact()
    assert {kind for kind, _, _ in rig.kinds()} == {ChangeKind.DIR_MOVED}
    # The watches follow their directories: events below them name the right paths.
    rig.mark()
    write(rig.p("R/s/new.jpg"), "new")
    rig.created("R/s/new.jpg")
    write(rig.p("L/new.jpg"), "new too")
    rig.created("L/new.jpg")
    rig.watcher.flush()
    rig.assert_exact()
    assert sorted(rig.kinds()) == [
        (ChangeKind.CREATED, b"L/new.jpg", None),
        (ChangeKind.CREATED, b"R/s/new.jpg", None),
    ]


@pytest.mark.parametrize("renamed_on", [False, True], ids=["stays", "renamed-on"])
def test_a_rename_onto_an_empty_watched_directory(rig: Rig, renamed_on: bool) -> None:
    """Not an exchange: the directory renamed over is gone (its IN_DELETE_SELF comes
    within the rename), also when the directory that took its name moves on at once."""
    write(rig.p("A/x.jpg"), "x")
    rig.p("E").mkdir()
    rig.start()
    e_wd = rig.wd("E")
    os.rename(rig.p("A"), rig.p("E"))
    rig.renamed("A", "E", is_dir=True)
    rig.backend.emit(e_wd, IN_DELETE_SELF)
    final = "E"
    if renamed_on:
        os.rename(rig.p("E"), rig.p("F"))
        rig.renamed("E", "F", is_dir=True)
        final = "F"
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.kinds() == [(ChangeKind.DIR_MOVED, b"E", b"A")] + (
        [(ChangeKind.DIR_MOVED, b"F", b"E")] if renamed_on else []
    )
    rig.mark()
    write(rig.p(f"{final}/y.jpg"), "y")
    rig.created(f"{final}/y.jpg")
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.kinds() == [(ChangeKind.CREATED, f"{final}/y.jpg".encode(), None)]
    assert rig.watcher.metrics.watched_directories == 2


# === moves out of and into the repository ==============================================
def test_move_out_deletes_and_move_in_scans(rig: Rig) -> None:
    write(rig.p("leaving.jpg"), "bye")
    write(rig.p("gone/deep/a.jpg"), "a")
    write(rig.p("gone/b.jpg"), "b")
    write(rig.p("stays.jpg"), "stays")
    rig.start()
    gone_wds = [rig.wd("gone"), rig.wd("gone/deep")]

    os.rename(rig.p("leaving.jpg"), rig.outside / "leaving.jpg")
    rig.emit("leaving.jpg", IN_MOVED_FROM, next(_cookies))
    os.rename(rig.p("gone"), rig.outside / "gone")
    rig.emit("gone", IN_MOVED_FROM | IN_ISDIR, next(_cookies))
    rig.watcher.flush()

    rig.assert_exact()
    assert set(rig.state()) == {b"stays.jpg"}
    assert not set(gone_wds) & set(rig.backend.watches), "moved-out directories are unwatched"

    write(rig.outside / "arriving.jpg", "hello")
    os.rename(rig.outside / "arriving.jpg", rig.p("arriving.jpg"))
    rig.emit("arriving.jpg", IN_MOVED_TO, next(_cookies))
    write(rig.outside / "tree/sub/c.jpg", "c")
    write(rig.outside / "tree/d.jpg", "d")
    os.rename(rig.outside / "tree", rig.p("tree"))
    rig.emit("tree", IN_MOVED_TO | IN_ISDIR, next(_cookies))
    rig.watcher.flush()

    rig.assert_exact()
    rig.wd("tree/sub")  # moved-in directories are watched, subdirectories included
    kinds = {(k, p) for k, p, _ in rig.kinds()}
    assert (ChangeKind.CREATED, b"tree/sub/c.jpg") in kinds


def test_new_directory_is_watched_then_scanned(rig: Rig) -> None:
    rig.start()
    # mkdir -p and files written before the watcher could add a watch: one event only.
    write(rig.p("a/b/c/deep.jpg"), "deep")
    write(rig.p("a/top.jpg"), "top")
    rig.emit("a", IN_CREATE | IN_ISDIR)
    rig.watcher.flush()
    rig.assert_exact()
    for d in ("a", "a/b", "a/b/c"):
        rig.wd(d)


def test_rm_rf_of_a_subtree(rig: Rig) -> None:
    for i in range(10):
        write(rig.p(f"old/{i % 2}/f{i}.jpg"), str(i))
    write(rig.p("keep.jpg"), "keep")
    rig.start()
    wds = {d: rig.wd(d) for d in ("old", "old/0", "old/1")}
    for i in range(10):
        os.unlink(rig.p(f"old/{i % 2}/f{i}.jpg"))
        rig.emit(f"old/{i % 2}/f{i}.jpg", IN_DELETE)
    for sub in ("old/0", "old/1"):
        os.rmdir(rig.p(sub))
        rig.backend.emit(wds[sub], IN_DELETE_SELF)
        rig.backend.emit(wds[sub], IN_IGNORED)
        rig.emit(sub, IN_DELETE | IN_ISDIR, wd=wds["old"])
    os.rmdir(rig.p("old"))
    rig.emit("old", IN_DELETE | IN_ISDIR)
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.resyncs == [], "an expected IN_IGNORED is not a lost watch"
    assert rig.watcher.metrics.watched_directories == 1


def test_directory_deleted_with_only_its_own_event(rig: Rig) -> None:
    for i in range(5):
        write(rig.p(f"d/sub/{i}.jpg"), str(i))
    rig.start()
    import shutil

    shutil.rmtree(rig.p("d"))
    rig.emit("d", IN_DELETE | IN_ISDIR)  # the file events were "lost": the check clears them
    rig.watcher.flush()
    rig.assert_exact()


# === recovery ==========================================================================
def test_overflow_requests_a_resync_and_the_resync_makes_it_exact(rig: Rig) -> None:
    write(rig.p("a.jpg"), "a")
    rig.start()
    # Changes whose events were lost in the overflow.
    write(rig.p("lost/new.jpg"), "never announced")
    write(rig.p("a.jpg"), "changed silently")
    rig.backend.overflow()
    rig.watcher.flush()

    assert rig.watcher.metrics.overflows == 1
    assert rig.resyncs == [(rig.repo.id, b"", "inotify queue overflow")]  # type: ignore[union-attr]
    rig.wd("lost")  # the watch tree was rebuilt from the disk
    rig.ledger.reconciler.reconcile(rig.ledger.writer(rig.repo), prefix=b"")  # type: ignore[arg-type]
    rig.assert_exact()

    # Watching goes on: an event in the directory created during the overflow is seen.
    write(rig.p("lost/after.jpg"), "after")
    rig.created("lost/after.jpg")
    rig.watcher.flush()
    rig.assert_exact()


def test_without_a_manager_the_watcher_runs_the_resync_itself(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.watcher.on_resync = None
    try:
        r.start()
        write(r.p("silent.jpg"), "silent")
        r.backend.overflow()
        r.watcher.flush()
        assert r.repo is not None
        wait_for("silent.jpg recorded", lambda: b"silent.jpg" in r.state())
        repo_id = r.repo.id
        ops = r.ledger.store.recent_operations(repo_id, 10)
        wait_for(
            "every operation completed",
            lambda: all(
                o.status is OperationStatus.COMPLETED
                for o in r.ledger.store.recent_operations(repo_id, 10)
            ),
        )
        assert sum(o.operation_type is OperationType.RECONCILIATION for o in ops) == 2
    finally:
        r.close()


def test_lost_watch_requests_a_resync_and_is_rewatched(rig: Rig) -> None:
    write(rig.p("sub/a.jpg"), "a")
    rig.start()
    wd = rig.wd("sub")
    rig.backend.watches.pop(wd)  # the kernel dropped it (an unmount, say)
    rig.backend._by_inode.clear()
    rig.backend.emit(wd, IN_IGNORED)
    rig.watcher.flush()
    assert rig.resyncs == [(rig.repo.id, b"sub", "inotify watch lost")]  # type: ignore[union-attr]
    write(rig.p("sub/b.jpg"), "b")
    rig.created("sub/b.jpg")
    rig.watcher.flush()
    rig.assert_exact()


def test_a_filesystem_unmounted_below_the_root_keeps_its_records(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nas`` is another filesystem (a mount table of the test's own says so). Unmounted:
    events read from its old watches, its ``IN_UNMOUNT``/``IN_IGNORED``, and its mount
    point removed (an automounter) delete nothing and re-add nothing; mounted again, a
    ``check`` watches it again and brings what changed on it meanwhile."""
    mounts = FakeMounts(tmp_path / "mountinfo", os.fsencode(rig.root))
    monkeypatch.setattr(fsledger.mounts, "MOUNTINFO", str(mounts.path))
    mounts.mount(b"nas")
    write(rig.p("a.jpg"), "a")
    write(rig.p("nas/1.jpg"), "one")
    write(rig.p("nas/d/2.jpg"), "two")
    repo = rig.start()
    kept = {b"nas/1.jpg", b"nas/d/2.jpg"}
    nas, nas_d = rig.wd("nas"), rig.wd("nas/d")

    # Unmounted: the empty mount point is left. A bind mount detached sends nothing, and its
    # old watches still report what happens on the share: here a deletion.
    away = rig.outside / "nas"
    os.rename(rig.p("nas"), away)
    os.mkdir(rig.p("nas"))
    mounts.umount(b"nas")
    (away / "1.jpg").unlink()
    rig.emit("nas/1.jpg", IN_DELETE, wd=nas)
    rig.watcher.flush()
    assert kept <= set(rig.state())
    # A real unmount: IN_UNMOUNT then IN_IGNORED for every watch on it.
    for wd in (nas_d, nas):
        rig.backend.emit(wd, IN_UNMOUNT)
    for wd in (nas_d, nas):
        rig.backend.watches.pop(wd)
        rig.backend.emit(wd, IN_IGNORED)
    rig.watcher.flush()
    assert kept <= set(rig.state())
    assert (repo.id, b"nas", "a filesystem below it was unmounted") in rig.resyncs
    # The reconciliations asked for (the manager runs them) keep the records too.
    for _rid, prefix, _reason in rig.resyncs:
        stats = rig.ledger.scan(repo, prefix=prefix)
        assert stats.files_removed == 0
    assert kept <= set(rig.state())
    # The mount point removed too, as an automounter does.
    os.rmdir(rig.p("nas"))
    rig.emit("nas", IN_DELETE | IN_ISDIR)
    rig.watcher.flush()
    assert kept <= set(rig.state())

    # Mounted again, with a file added on the share meanwhile.
    write(away / "d" / "3.jpg", "three")
    os.rename(away, rig.p("nas"))
    mounts.mount(b"nas")
    rig.watcher.check(repo.id, b"nas")
    rig.watcher.flush()
    rig.assert_exact()
    # Only the two real changes: nothing below it deleted and re-added.
    assert sorted((k.value, p) for k, p, _o in rig.kinds()) == [
        ("created", b"nas/d/3.jpg"),
        ("deleted", b"nas/1.jpg"),
    ]
    # Watched again: a file written there now arrives through its new watch.
    write(rig.p("nas/d/4.jpg"), "four")
    rig.created("nas/d/4.jpg")
    rig.watcher.flush()
    rig.assert_exact()


def test_root_going_away_stops_watching_and_asks_for_a_resync(rig: Rig) -> None:
    write(rig.p("a.jpg"), "a")
    rig.start()
    assert rig.repo is not None
    assert rig.watcher.is_watching(rig.repo.id)
    rig.backend.emit(rig.wd(""), IN_DELETE_SELF)
    rig.watcher.flush()
    assert not rig.watcher.is_watching(rig.repo.id)
    assert rig.resyncs == [(rig.repo.id, b"", "the repository root was deleted")]
    assert set(rig.state()) == {b"a.jpg"}, "records are kept: the manager decides"


def test_watch_limit_degrades_instead_of_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = Rig(tmp_path)
    r.backend.watch_limit = 2
    try:
        for d in ("a", "b", "c", "d"):
            write(r.p(f"{d}/x.jpg"), d)
        with caplog.at_level(logging.WARNING, logger="fsledger.watch"):
            repo = r.start()
        assert r.watcher.degraded(repo.id)
        assert r.watcher.is_watching(repo.id)
        assert r.watcher.metrics.degraded_repositories == 1
        assert r.watcher.metrics.watched_directories == 2
        assert any("only partly watched" in m for m in caplog.messages)
    finally:
        r.close()


def test_database_errors_are_retried_and_no_event_is_lost(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.start()
    real_apply = rig.ledger.store.apply
    failures = {"left": 3}

    def flaky(repo_id: UUID, changes: Any) -> int | None:
        if failures["left"]:
            failures["left"] -= 1
            raise StoreError("database is away")
        return real_apply(repo_id, changes)

    monkeypatch.setattr(rig.ledger.store, "apply", flaky)
    for i in range(5):
        write(rig.p(f"f{i}.jpg"), str(i))
        rig.created(f"f{i}.jpg")
    rig.watcher.flush()
    rig.assert_exact()
    assert rig.watcher.metrics.store_retries == 3


def test_events_arriving_during_a_reconciliation(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rig = make_rig(tmp_path, request, batch_size=5)
    for i in range(40):
        write(rig.p(f"d{i % 4}/f{i}.jpg"), f"v1 {i}")
    repo = rig.start()
    for i in range(40):  # changed while nobody watched: the reconciliation's work
        write(rig.p(f"d{i % 4}/f{i}.jpg"), f"version two {i}")
    writer = rig.ledger.writer(repo)
    fired: list[bool] = []

    def live_changes(_repo: Repository, _applied: Any) -> None:
        if fired:
            return
        fired.append(True)
        # In the middle of the reconciliation, live events change what it already saw.
        write(rig.p("d0/f0.jpg"), "third version")
        rig.emit("d0/f0.jpg", IN_CLOSE_WRITE)
        os.unlink(rig.p("d3/f39.jpg"))
        rig.emit("d3/f39.jpg", IN_DELETE)
        write(rig.p("d1/brand_new.jpg"), "new")
        rig.created("d1/brand_new.jpg")
        os.rename(rig.p("d2/f2.jpg"), rig.p("d2/renamed.jpg"))
        rig.renamed("d2/f2.jpg", "d2/renamed.jpg")
        rig.watcher.flush()

    writer.listeners.append(live_changes)
    try:
        rig.ledger.reconciler.reconcile(writer)
    finally:
        writer.listeners.remove(live_changes)
    assert fired
    rig.watcher.flush()
    rig.assert_exact()


def test_realtime_work_is_one_operation_row_per_repository(rig: Rig) -> None:
    repo = rig.start()
    for i in range(3):
        write(rig.p(f"n{i}.jpg"), str(i))
        rig.created(f"n{i}.jpg")
        rig.watcher.flush()
    ops = [
        o
        for o in rig.ledger.store.recent_operations(repo.id, 10)
        if o.operation_type is OperationType.REALTIME
    ]
    assert len(ops) == 1
    assert ops[0].files_added == 3
    rig.watcher.stop()
    (op,) = [
        o
        for o in rig.ledger.store.recent_operations(repo.id, 10)
        if o.operation_type is OperationType.REALTIME
    ]
    assert op.status is OperationStatus.COMPLETED
    assert op.files_added == 3


def test_non_utf8_names_are_kept_as_bytes(rig: Rig) -> None:
    rig.start()
    name = b"caf\xe9.jpg"
    (rig.root / os.fsdecode(name)).write_bytes(b"latin-1 name")
    rig.backend.emit(rig.wd(""), IN_CLOSE_WRITE, name)
    rig.watcher.flush()
    assert name in rig.state()
    rig.assert_exact()


def test_without_hashes(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rig = make_rig(tmp_path, request, calculate_hashes=False)
    write(rig.p("a.jpg"), "a")
    rig.start()
    write(rig.p("b.jpg"), "bb")
    rig.created("b.jpg")
    rig.watcher.flush()
    assert rig.state() == {b"a.jpg": (1, None), b"b.jpg": (2, None)}


def test_background_threads_apply_events(rig: Rig) -> None:
    rig.start()
    rig.watcher.start()
    write(rig.p("bg.jpg"), "background")
    rig.created("bg.jpg")
    wait_for("bg.jpg recorded", lambda: b"bg.jpg" in rig.state())
    rig.assert_exact()


def test_remove_stops_watching(rig: Rig) -> None:
    write(rig.p("sub/a.jpg"), "a")
    repo = rig.start()
    rig.watcher.remove(repo.id)
    assert not rig.watcher.is_watching(repo.id)
    assert rig.backend.watches == {}
    assert rig.watcher.metrics.watched_directories == 0


# === regressions: renames racing other events (found by a randomized stress run) ==========
def test_moved_out_directory_follows_a_parent_renamed_while_it_waits(rig: Rig) -> None:
    write(rig.p("d0/s0/f.jpg"), "f")
    write(rig.p("d0/keep.jpg"), "keep")
    rig.start()
    os.rename(rig.p("d0/s0"), rig.outside / "s0")
    rig.emit("d0/s0", IN_MOVED_FROM | IN_ISDIR, next(_cookies))  # unpaired: moved out
    os.rename(rig.p("d0"), rig.p("c2"))
    rig.renamed("d0", "c2", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()


def test_deleted_directory_check_follows_a_later_parent_rename(rig: Rig) -> None:
    write(rig.p("d/x/f.jpg"), "f")
    write(rig.p("d/y.jpg"), "y")
    rig.start()
    x_wd = rig.wd("d/x")
    os.unlink(rig.p("d/x/f.jpg"))
    os.rmdir(rig.p("d/x"))
    rig.emit("d/x", IN_DELETE | IN_ISDIR)
    rig.backend.emit(x_wd, IN_DELETE_SELF)
    rig.backend.emit(x_wd, IN_IGNORED)
    os.rename(rig.p("d"), rig.p("e"))
    rig.renamed("d", "e", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()


def test_subdirectory_renamed_out_of_a_moved_in_tree_before_its_scan(rig: Rig) -> None:
    rig.start()
    write(rig.outside / "tree/sub/deep.jpg", "deep")
    write(rig.outside / "tree/top.jpg", "top")
    os.rename(rig.outside / "tree", rig.p("tree"))
    rig.emit("tree", IN_MOVED_TO | IN_ISDIR, next(_cookies))
    rig.watcher.process_due()  # reads the move in: watched, its scan not due yet
    os.rename(rig.p("tree/sub"), rig.p("elsewhere"))
    rig.renamed("tree/sub", "elsewhere", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()


def test_exchange_inside_a_directory_moved_out_and_back_before_its_scan(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mv d /elsewhere && mv /elsewhere d-back``, then ``renameat2(RENAME_EXCHANGE)`` of
    two of its subdirectories, read before the move out's pair wait ends (found by the
    model-based test under load). Watching ``d-back`` gives its directories the watches
    they had (a watch follows the inode): the exchange's events, read right after the
    arrival, must be applied then, not held back with the unpaired IN_MOVED_FROM of ``d``
    until it expires, by when the subtree's listing has already seen the exchanged disk
    (replayed then, the exchange swapped the records back to the wrong sides, and the
    watches with them)."""
    # The pair wait outlasts the test: the move out is only known at the final flush.
    monkeypatch.setattr("fsledger.watch.watcher.PAIR_WAIT_S", 60.0)
    rig = Rig(tmp_path, database_url=store_url, debounce_s=0.05)
    try:
        write(rig.p("d/e/a.jpg"), "a" * 30)
        write(rig.p("d/e/g.jpg"), "g" * 40)
        write(rig.p("d/x/y/deep.jpg"), "deep" * 10)
        write(rig.p("d/top.jpg"), "top")
        write(rig.p("d/sub/s.jpg"), "sub")
        rig.start()
        time.sleep(0.1)  # every file quiet for the debounce: listed files are recorded at once
        d_wd = rig.wd("d")
        os.rename(rig.p("d"), rig.outside / "parked")
        rig.emit("d", IN_MOVED_FROM | IN_ISDIR, next(_cookies))
        # Changed while outside: events of its watches, held back with the move out; the
        # listing of d-back is what records what they did.
        write(rig.outside / "parked/added-outside.jpg", "added outside")
        for mask in (IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE):
            rig.backend.emit(d_wd, mask, b"added-outside.jpg")
        os.rename(rig.outside / "parked/sub", rig.outside / "parked/sub2")
        cookie = next(_cookies)
        rig.backend.emit(d_wd, IN_MOVED_FROM | IN_ISDIR, b"sub", cookie)
        rig.backend.emit(d_wd, IN_MOVED_TO | IN_ISDIR, b"sub2", cookie)
        os.rename(rig.outside / "parked", rig.p("d-back"))
        rig.emit("d-back", IN_MOVED_TO | IN_ISDIR, next(_cookies))
        rig.watcher.process_due()  # reads both: d-back watched (d's watches), not scanned yet
        exchange(rig.p("d-back/e"), rig.p("d-back/x/y"))
        rig.renamed("d-back/e", "d-back/x/y", is_dir=True)
        rig.renamed("d-back/x/y", "d-back/e", is_dir=True)
        time.sleep(0.1)  # the check of d-back is due
        rig.watcher.process_due()  # reads the exchange, lists d-back
        rig.watcher.flush()  # the move out of d expires
        rig.assert_exact()
        # The watches name the right directories: a file written into each side lands there.
        write(rig.p("d-back/e/new.jpg"), "new in e")
        rig.created("d-back/e/new.jpg")
        write(rig.p("d-back/x/y/new.jpg"), "new in y")
        rig.created("d-back/x/y/new.jpg")
        write(rig.p("d-back/sub2/new.jpg"), "new in sub2")
        rig.created("d-back/sub2/new.jpg")
        rig.watcher.flush()
        rig.assert_exact()
    finally:
        rig.close()


@pytest.mark.parametrize("arrival", ["moved-in", "made"])
def test_an_exchange_with_a_directory_whose_walk_found_it_exchanged_already(
    tmp_path: Path, store_url: str, arrival: str
) -> None:
    """A directory arrives at ``n`` (moved in, or made) and is exchanged with ``d/e``
    (``renameat2(RENAME_EXCHANGE)``) before its arrival is read (found by a targeted
    fuzzer of the model-based test's operations: ``mv f /elsewhere && mv /elsewhere
    f-back``, then an exchange of ``d/e`` and ``f-back``). The walk of ``n`` finds
    ``d/e``'s directory there and leaves ``n`` unplaced until the events explain it; the
    exchange's first half then lands on a name with no known watch. Read as a rename and
    its reverse, the second half took ``d/e``'s watches (and the check of ``n``) back to
    ``d/e``: the records stayed at ``d/e``, the watch of the directory really at ``n``
    was removed as that of a directory gone, and nothing below ``n`` was recorded. The
    arrived directory is the exchange's other side: both land where they are."""
    rig = Rig(tmp_path, database_url=store_url)
    try:
        write(rig.p("d/e/c.jpg"), "c" * 40)
        write(rig.p("d/e/s/deep.jpg"), "deep")
        write(rig.p("keep.jpg"), "keep")
        rig.start()
        if arrival == "moved-in":
            write(rig.outside / "x/sub/moved.jpg", "moved in")
            write(rig.outside / "x/top.jpg", "top")
            os.rename(rig.outside / "x", rig.p("n"))
            mask = IN_MOVED_TO | IN_ISDIR
        else:
            rig.p("n").mkdir()
            mask = IN_CREATE | IN_ISDIR
        exchange(rig.p("d/e"), rig.p("n"))
        rig.emit("n", mask, next(_cookies) if arrival == "moved-in" else 0)
        rig.watcher.process_due()  # the walk of n is ahead: d/e's directory is there
        rig.exchanged("d/e", "n")
        time.sleep(0.15)  # past a disputed walk's recheck (tree.RECHECK_S)
        rig.watcher.flush()
        rig.assert_exact()
        # Both sides are watched under their own paths: files written in each are seen.
        for rel in ("n/new.jpg", "n/s/new.jpg", "d/e/new.jpg"):
            write(rig.p(rel), rel)
            rig.created(rel)
        rig.watcher.flush()
        rig.assert_exact()
    finally:
        rig.close()


@pytest.mark.parametrize("first", ["arrived", "other"])
def test_an_exchange_out_of_a_directory_not_scanned_yet(
    tmp_path: Path, store_url: str, first: str
) -> None:
    """A directory arrives (``mkdir -p``: a deep chain made by the model-based test) and
    one of its subdirectories is exchanged with ``f`` before the arrival is scanned (found
    by the model-based test: ``f/deep10.../bottom.jpg`` missing after an exchange of ``f``
    and ``deep00/.../deep09``). The records of the subdirectory were not stored yet, so
    the swap could not carry them to ``f``, and the scan of the arrival covers only what
    is below it now: the directory that left it is scanned where it went, whichever half
    of the exchange (``renameat2``'s first name or its second) moved it."""
    rig = Rig(tmp_path, database_url=store_url)
    try:
        write(rig.p("f/g.jpg"), "g")
        write(rig.p("keep.jpg"), "keep")
        rig.start()
        write(rig.outside / "n/sub/s/x.jpg", "x" * 30)
        write(rig.outside / "n/sub/y.jpg", "y")
        write(rig.outside / "n/top.jpg", "top")
        os.rename(rig.outside / "n", rig.p("n"))
        rig.emit("n", IN_MOVED_TO | IN_ISDIR, next(_cookies))
        rig.watcher.process_due()  # n watched, its scan not due yet
        a, b = ("n/sub", "f") if first == "arrived" else ("f", "n/sub")
        exchange(rig.p(a), rig.p(b))
        rig.exchanged(a, b)
        rig.watcher.flush()
        rig.assert_exact()
        for rel in ("f/s/new.jpg", "n/sub/new.jpg"):
            write(rig.p(rel), rel)
            rig.created(rel)
        rig.watcher.flush()
        rig.assert_exact()
    finally:
        rig.close()


def test_a_rename_over_a_directory_left_unplaced_then_on_again(rig: Rig) -> None:
    """``mkdir n``, then ``mv a n`` (over the empty ``n``) and ``mv n z`` before the
    IN_CREATE of ``n`` is read: the walk of ``n`` finds ``a``'s directory there and leaves
    ``n`` unplaced, so the rename onto it displaces a directory without a watch, whose
    overwriting nothing reports. The rename from ``n`` to ``z`` is not the other half
    of an exchange (that goes back to ``a``): ``a``'s directory moves on, with its
    watches."""
    write(rig.p("a/s/x.jpg"), "x")
    write(rig.p("a/y.jpg"), "y")
    rig.start()
    rig.p("n").mkdir()
    os.rename(rig.p("a"), rig.p("n"))
    os.rename(rig.p("n"), rig.p("z"))
    rig.emit("n", IN_CREATE | IN_ISDIR, wd=rig.wd(""))
    rig.watcher.process_due()  # the walk of n finds a's directory there
    rig.renamed("a", "n", is_dir=True)
    c = next(_cookies)
    rig.backend.emit(rig.wd(""), IN_MOVED_FROM | IN_ISDIR, b"n", c)
    rig.backend.emit(rig.wd(""), IN_MOVED_TO | IN_ISDIR, b"z", c)
    time.sleep(0.15)  # past a disputed walk's recheck (tree.RECHECK_S)
    rig.watcher.flush()
    rig.assert_exact()
    assert (ChangeKind.DIR_MOVED, b"z", b"n") in rig.kinds()
    for rel in ("z/new.jpg", "z/s/new.jpg"):
        write(rig.p(rel), rel)
        rig.created(rel)
    rig.watcher.flush()
    rig.assert_exact()


def test_rename_inside_a_directory_renamed_again_in_the_same_batch(rig: Rig) -> None:
    write(rig.p("c/x/y/f.jpg"), "f")
    write(rig.p("c/x/g.jpg"), "g")
    rig.start()
    os.rename(rig.p("c/x"), rig.p("c/z"))  # M1: its target is renamed again by M3
    rig.renamed("c/x", "c/z", is_dir=True)
    os.rename(rig.p("c/z/y"), rig.p("out"))  # M2: out of M1's target
    rig.renamed("c/z/y", "out", is_dir=True)
    os.rename(rig.p("c"), rig.p("k"))  # M3: M1's target is now k/z
    rig.renamed("c", "k", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()


def test_a_file_record_where_a_directory_arrived(rig: Rig) -> None:
    write(rig.p("d/c2"), "a file")
    rig.start()
    os.rename(rig.p("d/c2"), rig.p("d/.hidden"))
    rig.emit("d/c2", IN_MOVED_FROM, next(_cookies))  # its TO is an ignored name
    write(rig.outside / "src/in.jpg", "in")
    os.rename(rig.outside / "src", rig.p("d/c2"))
    rig.emit("d/c2", IN_MOVED_TO | IN_ISDIR, next(_cookies))
    rig.watcher.flush()
    # The scan of the directory covers what is below d/c2, not a record at d/c2 itself.
    rig.assert_exact()


def test_directory_rename_after_a_reconciliation_already_moved_its_records(rig: Rig) -> None:
    for i in range(5):
        write(rig.p(f"A/f{i}.jpg"), str(i))
    repo = rig.start()
    os.rename(rig.p("A"), rig.p("B"))
    # A reconciliation runs before the watcher has written the rename: it moves the
    # records itself (inode match); the rename then must not wipe them.
    rig.ledger.reconciler.reconcile(rig.ledger.writer(repo))
    rig.renamed("A", "B", is_dir=True)
    rig.watcher.flush()
    rig.assert_exact()


def test_events_inside_a_directory_moving_out_wait_for_its_pair(rig: Rig) -> None:
    write(rig.p("A/X/a.jpg"), "a")
    write(rig.p("A/b.jpg"), "b")
    write(rig.p("keep.jpg"), "keep")
    rig.start()
    x_wd = rig.wd("A/X")
    # A/X goes to an ignored name (out of the ledger); its watch still reports events until
    # the move expires unpaired, such as A itself being moved into it: read with X's stale
    # path, that would be A renamed into its own subtree.
    c1, c2 = next(_cookies), next(_cookies)
    os.rename(rig.p("A/X"), rig.p(".trash"))
    rig.emit("A/X", IN_MOVED_FROM | IN_ISDIR, c1)
    rig.emit(".trash", IN_MOVED_TO | IN_ISDIR, c1)
    os.rename(rig.p("A"), rig.p(".trash/c3"))
    rig.emit("A", IN_MOVED_FROM | IN_ISDIR, c2)
    rig.backend.emit(x_wd, IN_MOVED_TO | IN_ISDIR, b"c3", c2)
    rig.watcher.flush()
    rig.assert_exact()
    assert set(rig.state()) == {b"keep.jpg"}
    assert rig.watcher.metrics.watched_directories == 1
    # The watcher still follows the tree it watches.
    write(rig.p("new/n.jpg"), "n")
    rig.emit("new", IN_CREATE | IN_ISDIR)
    rig.watcher.flush()
    rig.assert_exact()


def test_an_event_between_the_halves_of_a_directory_rename(rig: Rig) -> None:
    write(rig.p("X/a.jpg"), "a")
    rig.start()
    x_wd = rig.wd("X")
    cookie = next(_cookies)
    os.rename(rig.p("X"), rig.p("Z"))
    write(rig.p("Z/new.jpg"), "written between the two halves")
    rig.emit("X", IN_MOVED_FROM | IN_ISDIR, cookie)
    rig.backend.emit(x_wd, IN_CLOSE_WRITE, b"new.jpg")
    rig.emit("Z", IN_MOVED_TO | IN_ISDIR, cookie)
    rig.watcher.flush()
    rig.assert_exact()
    assert (ChangeKind.DIR_MOVED, b"Z", b"X") in rig.kinds()


def test_a_rename_cycle_read_in_two_parts_keeps_every_identity(rig: Rig) -> None:
    """Watchman's rename cycle a -> t, c -> a, b -> c, t -> b with the reader behind: a pass
    takes the first two renames while the last two are still in the kernel queue. ``a -> t``
    finds ``t`` gone (moved on to ``b``) and waits for its next hop; ``c -> a``, which would
    replace the record ``a -> t`` still has to carry, must wait with it (it was written alone
    once: ``dir1/a.jpg`` then reached ``b`` as a file created anew)."""
    write(rig.p("dir1/a.jpg"), b"a" * 100)
    write(rig.p("dir1/b.jpg"), b"b" * 200)
    write(rig.p("dir2/c.jpg"), b"c" * 300)
    rig.start()
    before = rig.state()
    os.rename(rig.p("dir1/a.jpg"), rig.p("dir1/t"))
    os.rename(rig.p("dir2/c.jpg"), rig.p("dir1/a.jpg"))
    os.rename(rig.p("dir1/b.jpg"), rig.p("dir2/c.jpg"))
    os.rename(rig.p("dir1/t"), rig.p("dir1/b.jpg"))
    rig.renamed("dir1/a.jpg", "dir1/t")
    rig.renamed("dir2/c.jpg", "dir1/a.jpg")
    rig.watcher._drain(expire=False)  # the reader has read these two
    rig.renamed("dir1/b.jpg", "dir2/c.jpg")  # queued, not read yet
    rig.renamed("dir1/t", "dir1/b.jpg")
    rig.watcher._process(force=False)  # the file renames are due at once
    rig.watcher.flush()
    rig.assert_exact()
    assert {k for k, _, _ in rig.kinds()} == {ChangeKind.MOVED}, rig.kinds()
    paths = [b"dir1/a.jpg", b"dir1/b.jpg", b"dir2/c.jpg"]
    assert follow_identities({p: p for p in paths}, rig.feed()) == {
        b"dir1/b.jpg": b"dir1/a.jpg",
        b"dir1/a.jpg": b"dir2/c.jpg",
        b"dir2/c.jpg": b"dir1/b.jpg",
    }
    after = rig.state()
    assert after[b"dir1/b.jpg"] == before[b"dir1/a.jpg"]
    assert after[b"dir1/a.jpg"] == before[b"dir2/c.jpg"]
    assert after[b"dir2/c.jpg"] == before[b"dir1/b.jpg"]


def test_a_put_back_rename_whose_file_was_deleted_lets_the_rest_through(rig: Rig) -> None:
    """The file of a rename that waits for its next hop was deleted instead: the rename is
    dropped on the next pass, and the renames that waited with it are written."""
    write(rig.p("a.jpg"), b"a" * 10)
    write(rig.p("c.jpg"), b"c" * 30)
    rig.start()
    os.rename(rig.p("a.jpg"), rig.p("t"))
    os.rename(rig.p("c.jpg"), rig.p("a.jpg"))
    os.unlink(rig.p("t"))
    rig.renamed("a.jpg", "t")
    rig.renamed("c.jpg", "a.jpg")
    rig.watcher._drain(expire=False)
    rig.emit("t", IN_DELETE)
    rig.watcher._process(force=False)
    rig.watcher.flush()
    rig.assert_exact()
    assert (ChangeKind.MOVED, b"a.jpg", b"c.jpg") in rig.kinds()


def test_a_rename_onto_a_name_whose_move_is_held_back_waits_with_it(rig: Rig) -> None:
    """``mv x dirA/y`` is read, then dirA's IN_MOVED_FROM (its pair not read yet: the move
    into it is held back, its path unknown), then ``mv z x``. ``z -> x`` would replace the
    record ``x -> dirA/y`` still has to carry: it waits with it, and so does the look at
    ``x``; both identities reach the feed once dirA's rename pairs."""
    write(rig.p("x.jpg"), b"x" * 10)
    write(rig.p("z.jpg"), b"z" * 20)
    rig.p("dirA").mkdir()
    rig.start()
    wd_a = rig.wd("dirA")
    os.rename(rig.p("x.jpg"), rig.p("dirA/y.jpg"))
    os.rename(rig.p("dirA"), rig.p("dirB"))
    os.rename(rig.p("z.jpg"), rig.p("x.jpg"))
    cookie = next(_cookies)
    rig.emit("x.jpg", IN_MOVED_FROM, cookie)
    rig.backend.emit(wd_a, IN_MOVED_TO, b"y.jpg", cookie)
    dir_cookie = next(_cookies)
    rig.emit("dirA", IN_MOVED_FROM | IN_ISDIR, dir_cookie)
    rig.renamed("z.jpg", "x.jpg")
    rig.watcher.process_due()  # dirA's pair is not read yet
    rig.emit("dirB", IN_MOVED_TO | IN_ISDIR, dir_cookie)
    rig.watcher.flush()
    rig.assert_exact()
    assert not any(k in (ChangeKind.CREATED, ChangeKind.DELETED) for k, _, _ in rig.kinds())
    assert follow_identities({b"x.jpg": b"x.jpg", b"z.jpg": b"z.jpg"}, rig.feed()) == {
        b"dirB/y.jpg": b"x.jpg",
        b"x.jpg": b"z.jpg",
    }


def test_a_linked_names_inode_is_not_read_through_a_symlinked_directory(tmp_path: Path) -> None:
    """The inode a new multi-link name carries (``Dirty.inode``) is read below the root's
    descriptor: with ``a`` swapped for a symlink to a directory outside the tree, ``a/f``
    is not in the tree, and the outside file's inode must not lead a look at records."""
    from types import SimpleNamespace

    from fsledger.watch.events import _linked_inode

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "f").write_bytes(b"inside")
    os.link(root / "a" / "f", root / "a" / "g")
    state: Any = SimpleNamespace(repo=SimpleNamespace(root=os.fsencode(root)))
    assert _linked_inode(state, b"a/f") == (root / "a" / "f").stat().st_ino

    (outside / "f").write_bytes(b"outside")
    os.link(outside / "f", outside / "h")
    (root / "a").rename(root / "a-aside")
    (root / "a").symlink_to(outside)
    assert os.stat(root / "a" / "f").st_nlink == 2  # a path string would follow the link
    assert _linked_inode(state, b"a/f") is None


def test_a_walk_ahead_of_the_events_leaves_the_watches_to_them(rig: Rig) -> None:
    """A directory's check walks the disk as it is now, which may be ahead of the events
    read so far (found by the model-based test: a deep chain's listing ran while
    ``renameat2(RENAME_EXCHANGE)`` of one of its levels and another directory was still
    in the kernel queue). The walk finds the other directory's watch where the chain's
    level was: taking the disk's word there removed the level's watch as if it were gone
    (it had only moved) and made the exchange, read next, swap the wrong watches. The
    watches follow the events; every directory stays watched under its own path."""
    write(rig.p("f/n/m/k/bottom.jpg"), "bottom")
    write(rig.p("d/e/c.jpg"), "c")
    rig.start()
    n_wd, d_wd = rig.wd("f/n"), rig.wd("d")
    rig.watcher.check(rig.repo.id if rig.repo else UUID(int=0), b"f/n")
    exchange(rig.p("f/n/m"), rig.p("d/e"))  # its events are read after the check's walk
    rig.watcher.process_due()
    c1, c2 = next(_cookies), next(_cookies)
    rig.backend.emit(n_wd, IN_MOVED_FROM | IN_ISDIR, b"m", c1)
    rig.backend.emit(d_wd, IN_MOVED_TO | IN_ISDIR, b"e", c1)
    rig.backend.emit(d_wd, IN_MOVED_FROM | IN_ISDIR, b"e", c2)
    rig.backend.emit(n_wd, IN_MOVED_TO | IN_ISDIR, b"m", c2)
    rig.watcher.flush()
    rig.assert_exact()
    # Every directory is still watched, under its own path: new files in each are seen.
    for rel in ("d/e/k/new.jpg", "d/e/new.jpg", "f/n/m/new.jpg"):
        write(rig.p(rel), rel)
        rig.created(rel)
    rig.watcher.flush()
    rig.assert_exact()


def test_a_link_a_subtree_scan_left_to_settle_is_looked_at_with_its_peer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A subtree reconciliation leaves a file it finds still settling in the pending state
    (``ln a/f.jpg b/link.jpg``: its IN_CREATE, a write not closed yet as far as inotify
    says). Written in the same pass through its other name, the file's pending names are
    taken into the pass as its peers (found by the model-based test: ``f/photo with
    space.jpg`` linked into a directory that was scanned); such a name is not covered by
    the reconciliation that held it back, and must be looked at, not dropped."""
    rig = make_rig(tmp_path, request, debounce_s=5.0)
    write(rig.p("a/f.jpg"), "first")
    write(rig.p("b/old.jpg"), "old")
    rig.start()
    assert rig.repo is not None
    os.link(rig.p("a/f.jpg"), rig.p("b/link.jpg"))
    rig.emit("b/link.jpg", IN_CREATE)  # read while the link exists: its inode is known
    rig.watcher.process_due()
    with open(rig.p("a/f.jpg"), "ab") as fh:
        fh.write(b" and more")
    rig.emit("a/f.jpg", IN_MODIFY)
    rig.emit("a/f.jpg", IN_CLOSE_WRITE)
    rig.watcher.process_due()  # read: a/f.jpg is due once settled
    rig.watcher.check(rig.repo.id, b"b")  # b is scanned in the pass that looks at a/f.jpg
    time.sleep(0.05)
    rig.watcher.process_due()  # b/link.jpg's debounce is not over: the scan holds it back
    rig.watcher.flush()
    rig.assert_exact()


def test_a_directory_moved_into_a_new_one_before_its_watch_stays_watched(rig: Rig) -> None:
    """``mkdir n && mv a n/``: the walk of ``n`` finds ``a``'s watch there before the
    IN_MOVED_FROM of ``a`` is read (its IN_MOVED_TO went nowhere: ``n`` was not watched
    yet). The walk leaves the watch tree to the events for a moment; the move out of
    ``a`` expires, and ``n/a`` is walked again: it stays watched."""
    write(rig.p("a/s/x.jpg"), "x")
    rig.start()
    rig.p("n").mkdir()
    os.rename(rig.p("a"), rig.p("n/a"))
    rig.emit("n", IN_CREATE | IN_ISDIR)
    rig.watcher.process_due()  # n watched and walked: n/a is a's watch, not known there yet
    rig.emit("a", IN_MOVED_FROM | IN_ISDIR, next(_cookies))
    # Read; then the move out expires (its pair wait) and n/a is walked again.
    wait_for(
        "n/a/s/x.jpg recorded",
        lambda: (rig.watcher.process_due(), rig.state())[1].get(b"n/a/s/x.jpg") is not None,
    )
    time.sleep(0.3)
    rig.watcher.process_due()
    rig.watcher.flush()
    rig.assert_exact()
    write(rig.p("n/a/s/new.jpg"), "new")
    rig.created("n/a/s/new.jpg")  # on the watch n/a/s has now (the kernel's, by inode)
    rig.watcher.flush()
    rig.assert_exact()


def test_a_name_looked_at_before_a_write_through_its_other_link_is_looked_at_again(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two names of one file looked at in one pass, the second as the first one's peer, and
    a write through them landing between the two looks (found by the model-based test:
    ``d/e/c.jpg`` recorded empty, looked at while ``f/photo with space.jpg``, its new
    link, was being rewritten). The first name's record is behind what the pass recorded
    for the second: it is looked at again, not skipped as looked at already."""
    rig = make_rig(tmp_path, request, debounce_s=5.0)
    write(rig.p("a/f.jpg"), "first version")
    rig.p("b").mkdir()
    rig.start()
    os.link(rig.p("a/f.jpg"), rig.p("b/g.jpg"))
    rig.emit("b/g.jpg", IN_CREATE)  # a new link: looked at with a/f.jpg, as its peer
    rig.watcher.process_due()
    os.truncate(rig.p("a/f.jpg"), 0)  # a rewrite through a/f.jpg begins
    rig.emit("a/f.jpg", IN_MODIFY)
    rig.emit("a/f.jpg", IN_CLOSE_WRITE)
    applier = rig.watcher._applier  # the rest of the write lands between the two looks
    original = applier._look

    def look(repo: Any, tree: Any, path: bytes, *args: Any) -> Any:
        if path == b"b/g.jpg":
            with open(rig.p("a/f.jpg"), "r+b") as fh:
                fh.write(b"second version, longer")
        return original(repo, tree, path, *args)

    monkeypatch.setattr(applier, "_look", look)
    rig.watcher.process_due()  # read: a/f.jpg is due once settled, b/g.jpg is not
    time.sleep(0.05)
    rig.watcher.process_due()  # a/f.jpg looked at (empty), then b/g.jpg as its peer
    rig.watcher.flush()
    rig.assert_exact()
