"""Filesystems mounted below a root (``fsledger.mounts``): the mount table, the memory of
mount points, and scans (both stores) that keep the records of one that is not mounted.

Mounting needs root; these tests stand in a mount table of their own (a file in the
``mountinfo`` format, ``fsledger.mounts.MOUNTINFO`` pointed at it) and "unmount" by moving
the files away, which is what a walk sees of an unmounted share: an empty directory. The
real thing, in a private mount namespace under the daemon, is
``tests/test_faults.py::test_a_filesystem_mounted_below_the_root_unmounted``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fsledger.mounts
import fsledger.reconcile
import fsledger.walk
from fsledger.ignore import IgnoreRules
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, MountPoint, Repository
from fsledger.mounts import (
    MountEntry,
    MountGuard,
    changed_mounts,
    mounts_below,
    parse_mountinfo,
    unescape,
    unmounted,
)
from fsledger.store import Store
from fsledger.walk import FileEntry, Unreadable, walk
from treeutil import FakeMounts, age_tree, disk_snapshot, ledger_snapshot, make_tree

# A real mountinfo excerpt: optional fields vary in number (none, one, two), a mount point
# with a space, a tab and a backslash in it (escaped by the kernel), a bind mount (its
# ROOT field is a subdirectory), a stacked mount.
SAMPLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    b"60 22 0:52 / /srv/photos rw,relatime - nfs4 nas:/export/photos rw,vers=4.2\n"
    b"61 60 0:53 /2019 /srv/photos/my\\040nas rw shared:7 master:2 - tmpfs tmpfs rw\n"
    b"62 60 0:54 / /srv/photos/odd\\011tab\\134slash\\012nl rw - fuse.sshfs me@h:/p\\040q rw\n"
    b"63 60 8:17 / /srv/photos/usb rw - vfat /dev/sdb1 rw\n"
    b"64 63 8:33 / /srv/photos/usb rw - ext4 /dev/sdc1 rw\n"
    b"65 22 0:55 / /srv/photos2 rw - ext4 /dev/sdd1 rw\n"
    b"66 60 0:56 / /srv/photos/.snapshots rw - btrfs /dev/sde rw\n"
    b"this line is not a mount\n"
)


def test_unescape_octal() -> None:
    assert unescape(b"my\\040nas") == b"my nas"
    assert unescape(b"a\\011b\\012c\\134d") == b"a\tb\nc\\d"
    assert unescape(b"plain\\xyz") == b"plain\\xyz"
    assert unescape(b"\\377") == b"\xff"


def test_parse_mountinfo() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert len(entries) == 8  # the malformed line is skipped
    assert entries[1] == MountEntry(b"/srv/photos", "nfs4", "nas:/export/photos")
    assert entries[2] == MountEntry(b"/srv/photos/my nas", "tmpfs", "tmpfs")
    assert entries[3] == MountEntry(b"/srv/photos/odd\ttab\\slash\nnl", "fuse.sshfs", "me@h:/p q")


def test_mounts_below_a_root() -> None:
    entries = parse_mountinfo(SAMPLE)
    below = mounts_below(b"/srv/photos", entries, IgnoreRules())
    # Not the root itself, not /srv/photos2 (a string prefix only), not a hidden name; the
    # topmost of two stacked mounts.
    assert sorted(below) == [b"my nas", b"odd\ttab\\slash\nnl", b"usb"]
    assert below[b"usb"].source == "/dev/sdc1"
    assert mounts_below(b"/srv/photos/", entries, IgnoreRules()).keys() == below.keys()
    assert mounts_below(b"/", entries, None)[b"srv/photos2"].fs_type == "ext4"


def test_mounts_below_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "nas").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    entries = [MountEntry(os.fsencode(real / "nas"), "nfs", "s:/x")]
    assert list(mounts_below(os.fsencode(link), entries)) == [b"nas"]


def test_the_real_mount_table_parses() -> None:
    entries = fsledger.mounts.read_mountinfo()
    assert entries is not None and any(e.mount_point == b"/" for e in entries)
    assert fsledger.mounts.read_mountinfo("/nonexistent/mountinfo") is None


# --- a mount table of our own -------------------------------------------------------------


@pytest.fixture
def mounts(tmp_path: Path, tree: bytes, monkeypatch: pytest.MonkeyPatch) -> FakeMounts:
    fake = FakeMounts(tmp_path / "mountinfo", tree)
    monkeypatch.setattr(fsledger.mounts, "MOUNTINFO", str(fake.path))
    return fake


def test_guard_memory_and_unreadable(tree: bytes, mounts: FakeMounts) -> None:
    repo = Repository(id=uuid.uuid4(), name="r", root=tree)
    rules = IgnoreRules()
    mounts.mount(b"nas")
    mounts.mount(b"a/usb", "vfat", "/dev/sdb1")
    first = MountGuard(repo, rules, [])
    assert first.unreadable == {}
    assert first.memory() == [
        MountPoint(b"a/usb", "vfat", "/dev/sdb1"),
        MountPoint(b"nas", "nfs4", "nas:/photos"),
    ]
    remembered = first.memory()

    mounts.umount(b"nas")
    guard = MountGuard(repo, rules, remembered)
    assert list(guard.unreadable) == [b"nas"]
    assert "is not now" in guard.unreadable[b"nas"] and "--force" in guard.unreadable[b"nas"]
    assert guard.memory() == [remembered[0], MountPoint(b"nas", "nfs4", "nas:/photos", False)]
    # A walk of a subtree: inside the vanished mount it stops at its start; elsewhere nothing.
    assert list(MountGuard(repo, rules, remembered, b"nas/2019/x").unreadable) == [b"nas/2019/x"]
    assert MountGuard(repo, rules, remembered, b"a").unreadable == {}
    # Forced: forgotten, not kept.
    forced = MountGuard(repo, rules, remembered, force=True)
    assert forced.unreadable == {} and forced.forgotten == [remembered[1]]
    assert forced.memory() == [remembered[0]]


def test_without_a_mount_table_remembered_points_are_checked_by_device(
    tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsledger.mounts, "MOUNTINFO", "/nonexistent/mountinfo")
    os.mkdir(tree + b"/nas")
    repo = Repository(id=uuid.uuid4(), name="r", root=tree)
    # Same device as its parent: not mounted.
    guard = MountGuard(repo, IgnoreRules(), [MountPoint(b"nas", "nfs", "s:/x")])
    assert list(guard.unreadable) == [b"nas"]
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat("/dev").st_dev:
        assert fsledger.mounts.mounted_by_dev(b"/dev", b"shm")


def test_walk_reports_unreadable_directories_present_or_not(tree: bytes) -> None:
    make_tree(tree, {"a/x.jpg": b"x", "nas/1.jpg": b"1", "nas/d/2.jpg": b"2", "z.jpg": b"z"})
    keep = {b"nas": "not mounted", b"a/gone": "not mounted either"}
    items = list(walk(tree, IgnoreRules(), b"", unreadable=keep))
    assert [(type(i).__name__, i.path) for i in items] == [
        ("Unreadable", b"a/gone"),
        ("FileEntry", b"a/x.jpg"),
        ("Unreadable", b"nas"),
        ("FileEntry", b"z.jpg"),
    ]
    assert all(i.is_dir for i in items if isinstance(i, Unreadable))
    # The start itself.
    assert [i.path for i in walk(tree, IgnoreRules(), b"nas", unreadable=keep)] == [b"nas"]
    # Nothing to keep: the plain walk.
    assert [
        i.path for i in walk(tree, IgnoreRules(), b"", unreadable={}) if isinstance(i, FileEntry)
    ] == [
        b"a/x.jpg",
        b"nas/1.jpg",
        b"nas/d/2.jpg",
        b"z.jpg",
    ]


# --- scans, on both stores ----------------------------------------------------------------

SPEC: dict[str, bytes | None] = {
    "a.jpg": b"alpha",
    "albums/one.jpg": b"one",
    "my nas/2019/1.jpg": b"1" * 100,
    "my nas/2019/2.jpg": b"2" * 200,
    "my nas/3.jpg": b"3",
    "my nas.txt": b"a sibling that sorts before the mount point's files",
    "z.jpg": b"zulu",
}
NAS = b"my nas"


def nas_files(snapshot: dict[bytes, Any]) -> set[bytes]:
    return {p for p in snapshot if p.startswith(NAS + b"/")}


@pytest.fixture
def aside(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "aside"
    yield where
    shutil.rmtree(where, ignore_errors=True)


def unmount(tree: bytes, mounts: FakeMounts, aside: Path, remove_point: bool = False) -> None:
    """What a walk sees of an unmounted share: the mount point empty (or gone)."""
    shutil.move(os.fsdecode(tree + b"/" + NAS), aside)
    if not remove_point:
        os.mkdir(tree + b"/" + NAS)
    mounts.umount(NAS)


def mount(tree: bytes, mounts: FakeMounts, aside: Path) -> None:
    shutil.rmtree(tree + b"/" + NAS, ignore_errors=True)
    shutil.move(aside, os.fsdecode(tree + b"/" + NAS))
    mounts.mount(NAS)


def indexed_with_share(ledger: Ledger, tree: bytes, mounts: FakeMounts) -> Repository:
    """SPEC in ``tree`` with the share mounted at NAS, added and scanned without errors."""
    make_tree(tree, SPEC)
    age_tree(tree)
    mounts.mount(NAS)
    repo = ledger.add_repository(tree)
    assert ledger.scan(repo).errors == []
    return repo


def feed_paths(store: Store, repo: Repository, after: int, kind: ChangeKind) -> set[bytes]:
    return {e.path for e in store.changes_since(after, 10_000, repo.id) if e.kind is kind}


@pytest.mark.parametrize("ranged", [False, True], ids=["in-process", "in-workers"])
def test_a_share_unmounted_below_the_root_keeps_its_records(
    ledger: Ledger,
    store: Store,
    tree: bytes,
    mounts: FakeMounts,
    aside: Path,
    monkeypatch: pytest.MonkeyPatch,
    ranged: bool,
) -> None:
    # Either way of merging (see fsledger.merge) walks the share as unreadable.
    monkeypatch.setattr(fsledger.reconcile, "PARALLEL_MIN_RECORDS", 1 if ranged else 10**9)
    repo = indexed_with_share(ledger, tree, mounts)
    assert store.mount_points(repo.id) == [MountPoint(NAS, "nfs4", "nas:/photos", True)]
    full = ledger_snapshot(ledger, repo)
    kept = nas_files(full)
    assert len(kept) == 3
    seq0 = store.latest_seq()

    # Unmounted; a change elsewhere is still recorded.
    unmount(tree, mounts, aside)
    os.unlink(tree + b"/a.jpg")
    stats = ledger.scan(repo)
    assert stats.files_removed == 1
    assert len(stats.errors) == 1 and stats.errors[0].startswith("my nas/: a filesystem")
    assert nas_files(ledger_snapshot(ledger, repo)) == kept
    assert store.mount_points(repo.id) == [MountPoint(NAS, "nfs4", "nas:/photos", False)]
    # The operation says so too.
    op = store.recent_operations(repo.id, 1)[0]
    assert op.status.value == "completed"

    # The mount point itself removed (an automounter does that): still kept; and a scan of
    # a subtree inside it (the watcher's kind) too.
    os.rmdir(tree + b"/" + NAS)
    assert nas_files(ledger_snapshot(ledger, repo)) == kept
    stats = ledger.scan(repo)
    assert stats.files_removed == 0 and len(stats.errors) == 1
    stats = ledger.scan(repo, prefix=NAS + b"/2019")
    assert stats.files_removed == 0 and stats.errors[0].startswith("my nas/2019/:")
    assert nas_files(ledger_snapshot(ledger, repo)) == kept

    # Mounted again: nothing re-added, nothing to do, remembered as mounted.
    mount(tree, mounts, aside)
    stats = ledger.scan(repo)
    assert (stats.files_added, stats.files_removed, stats.files_hashed, stats.errors) == (
        0,
        0,
        0,
        [],
    )
    assert ledger_snapshot(ledger, repo) == disk_snapshot(tree)
    assert store.mount_points(repo.id) == [MountPoint(NAS, "nfs4", "nas:/photos", True)]
    assert not (feed_paths(store, repo, seq0, ChangeKind.DELETED) & kept)
    assert not (feed_paths(store, repo, seq0, ChangeKind.CREATED) & kept)


def test_the_memory_survives_a_new_ledger(
    ledger: Ledger, store: Store, settings: Any, tree: bytes, mounts: FakeMounts, aside: Path
) -> None:
    repo = indexed_with_share(ledger, tree, mounts)
    unmount(tree, mounts, aside)
    fresh = Ledger(settings, store)  # as after a restart: nothing held in memory
    try:
        stats = fresh.scan(repo)
    finally:
        fresh.reconciler.close()
    assert stats.files_removed == 0 and len(stats.errors) == 1
    assert unmounted(store, repo, None) == [NAS]
    assert changed_mounts(store, repo) == []  # the scan saw it unmounted already
    mount(tree, mounts, aside)
    assert changed_mounts(store, repo) == [(store.mount_points(repo.id)[0], True)]
    assert unmounted(store, repo, None) == []


def test_force_forgets_a_mount_removed_for_good(
    ledger: Ledger, store: Store, tree: bytes, mounts: FakeMounts, aside: Path
) -> None:
    repo = indexed_with_share(ledger, tree, mounts)
    unmount(tree, mounts, aside)
    assert ledger.scan(repo).files_removed == 0

    stats = ledger.scan(repo, force=True)
    assert stats.files_removed == 3
    assert len(stats.notes) == 1 and "--force forgot it" in stats.notes[0]
    assert "my nas/ (nfs4 nas:/photos)" in stats.notes[0]
    assert store.mount_points(repo.id) == []
    assert ledger_snapshot(ledger, repo) == disk_snapshot(tree)
    # Forgotten: the next scan is an ordinary one.
    again = ledger.scan(repo)
    assert again.errors == [] and again.notes == []


def test_a_share_unmounted_during_the_walk_keeps_its_records(
    ledger: Ledger,
    store: Store,
    tree: bytes,
    mounts: FakeMounts,
    aside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = indexed_with_share(ledger, tree, mounts)
    kept = nas_files(ledger_snapshot(ledger, repo))
    real_walk = fsledger.walk.walk

    def walk_then_unmount(root: bytes, *args: Any, **kw: Any) -> Iterator[Any]:
        for n, item in enumerate(real_walk(root, *args, **kw)):
            if n == 1:  # before the walk reaches the share
                unmount(tree, mounts, aside)
            yield item

    monkeypatch.setattr(fsledger.reconcile, "walk", walk_then_unmount)
    stats = ledger.scan(repo)
    assert stats.files_removed == 0
    assert any("unmounted during the scan" in e for e in stats.errors)
    assert nas_files(ledger_snapshot(ledger, repo)) == kept


def test_an_empty_filesystem_mounted_in_place_keeps_the_records(
    ledger: Ledger, store: Store, tree: bytes, mounts: FakeMounts, aside: Path
) -> None:
    """The root guard's rule per mount point: a remembered mount point that is mounted but
    empty while the ledger holds files below it (another, empty filesystem mounted there, or
    a placeholder left by a share that did not come up) is not believed; --force believes it."""
    repo = indexed_with_share(ledger, tree, mounts)
    kept = nas_files(ledger_snapshot(ledger, repo))
    assert len(kept) == 3

    # Another filesystem, empty, mounted where the share was (the table still says mounted).
    unmount(tree, mounts, aside)
    mounts.mount(NAS, fs_type="tmpfs", source="tmpfs")
    stats = ledger.scan(repo)
    assert stats.files_removed == 0
    assert len(stats.errors) == 1 and "empty while the ledger holds files" in stats.errors[0]
    assert nas_files(ledger_snapshot(ledger, repo)) == kept

    # A file in it makes it a filesystem like any other: then it is believed.
    make_tree(tree, {"my nas/fresh.jpg": b"fresh"})
    age_tree(tree)
    stats = ledger.scan(repo)
    assert stats.errors == [] and stats.files_added == 1 and stats.files_removed == 3
    assert ledger_snapshot(ledger, repo) == disk_snapshot(tree)


def test_force_believes_an_empty_mount(
    ledger: Ledger, store: Store, tree: bytes, mounts: FakeMounts, aside: Path
) -> None:
    repo = indexed_with_share(ledger, tree, mounts)
    unmount(tree, mounts, aside)
    mounts.mount(NAS, fs_type="tmpfs", source="tmpfs")
    stats = ledger.scan(repo, force=True)
    assert stats.errors == [] and stats.files_removed == 3
    assert ledger_snapshot(ledger, repo) == disk_snapshot(tree)
