"""Filesystem scenarios taken from the test suites of peers, replayed live and offline.

Each scenario names the test it comes from (watchdog's ``tests/test_emitter.py``,
Watchman's ``tests/integration``, notify-rs's inotify tests, Syncthing's
``lib/scanner/walk_test.go``); the operations are written here in Python. After them the
ledger must equal the descriptor-walking oracle and the feed replayed from seq 0 must equal
the ledger, live (the watcher alone) and offline (one scan), on both stores.
"""

from __future__ import annotations

import os
import shutil
import socket
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from scenario_support import Scenario, exchange
from watch_support import write

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/sys/fs/inotify"), reason="inotify is Linux-only"
)

Op = Callable[[Path, Path], None]
"""(root, outside) -> None"""


@dataclass(frozen=True)
class Peer:
    """One scenario: where it comes from, the tree before, the operations."""

    id: str
    source: str
    setup: Op
    ops: Op


def base(root: Path, outside: Path) -> None:
    write(root / "top.jpg", b"top")
    write(root / "dir1" / "a.jpg", b"a" * 100)
    write(root / "dir1" / "b.jpg", b"b" * 200)
    write(root / "dir2" / "c.jpg", b"c" * 300)
    write(root / "one" / "onefile", b"one")
    write(root / "one" / "two" / "twofile", b"two")
    write(outside / "incoming.jpg", b"from outside")
    write(outside / "tree" / "x.jpg", b"x" * 10)
    write(outside / "tree" / "sub" / "y.jpg", b"y" * 20)


def empty(root: Path, outside: Path) -> None:
    root.mkdir(exist_ok=True)


PEERS: list[Peer] = []


def peer(source: str, setup: Op = base) -> Callable[[Op], Op]:
    """Register the decorated operations as a scenario from ``source``."""

    def deco(ops: Op) -> Op:
        PEERS.append(Peer(ops.__name__, source, setup, ops))
        return ops

    return deco


# === watchdog tests/test_emitter.py ======================================================
@peer("watchdog test_emitter: test_create")
def create(root: Path, outside: Path) -> None:
    write(root / "new.jpg", b"")
    write(root / "dir1" / "new.jpg", b"content")


@peer("watchdog test_emitter: test_create_wrong_encoding")
def non_utf8_names(root: Path, outside: Path) -> None:
    base_b = os.fsencode(root)
    for name in (b"caf\xe9.jpg", b"\xff\xfe.jpg", b"dir1/latin1-\xe0\xe8.jpg"):
        with open(os.path.join(base_b, name), "wb") as fh:
            fh.write(name)
    os.mkdir(os.path.join(base_b, b"dir-\xa0\xa1"))
    with open(os.path.join(base_b, b"dir-\xa0\xa1/in.jpg"), "wb") as fh:
        fh.write(b"inside a non-UTF-8 directory")
    os.rename(os.path.join(base_b, b"dir1/a.jpg"), os.path.join(base_b, b"dir1/\xc3(.jpg"))


@peer("watchdog test_emitter: test_delete")
def delete(root: Path, outside: Path) -> None:
    (root / "dir1" / "a.jpg").unlink()
    (root / "top.jpg").unlink()


@peer("watchdog test_emitter: test_modify")
def modify(root: Path, outside: Path) -> None:
    with open(root / "dir1" / "a.jpg", "ab") as fh:
        fh.write(b"more")
    write(root / "top.jpg", b"TOP")  # same size, other content


@peer("watchdog test_emitter: test_chmod")
def chmod_file(root: Path, outside: Path) -> None:
    os.chmod(root / "dir1" / "a.jpg", 0o600)
    os.chmod(root / "dir2", 0o700)


@peer("watchdog test_emitter: test_move")
def move_file(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", root / "dir2" / "moved.jpg")


@peer("watchdog test_emitter: test_case_change")
def case_change(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", root / "dir1" / "A.jpg")
    os.rename(root / "dir2", root / "DIR2")


@peer("watchdog test_emitter: test_move_to_full")
def move_into_root(root: Path, outside: Path) -> None:
    os.rename(outside / "incoming.jpg", root / "dir1" / "incoming.jpg")
    os.rename(outside / "tree", root / "moved-in")


@peer("watchdog test_emitter: test_move_from_full")
def move_out_of_root(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", outside / "a.jpg")
    os.rename(root / "one", outside / "one")


@peer("watchdog test_emitter: test_separate_consecutive_moves")
def separate_consecutive_moves(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", root / "dir1" / "a2.jpg")
    os.rename(root / "dir2" / "c.jpg", root / "dir2" / "c2.jpg")


@peer("watchdog test_emitter: test_fast_subdirectory_creation_deletion", empty)
def fast_subdirectory_creation_deletion(root: Path, outside: Path) -> None:
    for i in range(30):
        write(root / "sub" / "f.jpg", b"%d" % i)
        shutil.rmtree(root / "sub")
    write(root / "sub" / "last.jpg", b"survivor")


@peer("watchdog test_emitter: test_renaming_top_level_directory", empty)
def renaming_top_level_directory(root: Path, outside: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    os.rename(root / "a", root / "a2")
    write(root / "a2" / "b" / "c.jpg", b"c")


@peer("watchdog test_emitter: test_move_nested_subdirectories", empty)
def move_nested_subdirectories(root: Path, outside: Path) -> None:
    write(root / "dir1" / "dir2" / "dir3" / "fileA", b"A")
    write(root / "dir1" / "dir2" / "fileB", b"B")
    os.rename(root / "dir1" / "dir2", root / "dir2")
    write(root / "dir2" / "dir3" / "fileA", b"A modified after the move")


@peer("watchdog test_emitter: test_file_lifecyle")
def file_lifecycle(root: Path, outside: Path) -> None:
    write(root / "life.jpg", b"born")
    with open(root / "life.jpg", "ab") as fh:
        fh.write(b" and grown")
    os.rename(root / "life.jpg", root / "dir2" / "life2.jpg")
    (root / "dir2" / "life2.jpg").unlink()
    write(root / "after-life.jpg", b"next")


@peer("watchdog test_emitter: test_passing_unicode_path")
def unicode_names(root: Path, outside: Path) -> None:
    write(root / "фото" / "日本語.jpg", b"unicode")
    write(root / "emoji-📷.jpg", b"camera")
    os.rename(root / "dir1", root / "répertoire")


# === Watchman tests/integration ==========================================================
@peer("watchman test_remove: test_remove")
def remove_dir_then_file_of_same_name(root: Path, outside: Path) -> None:
    shutil.rmtree(root / "one")
    write(root / "one", b"")
    (root / "one").unlink()
    write(root / "one", b"a file where the directory was")


@peer("watchman test_dir_move: test_atomicMove", empty)
def atomic_directory_move(root: Path, outside: Path) -> None:
    write(root / "dir" / "a", b"dir's a")
    write(root / "alt" / "a", b"alt's a, longer")
    os.rename(root / "dir", root / "bye")
    os.rename(root / "alt", root / "dir")


@peer("watchman moremoves: testMoreMoves", empty)
def more_moves(root: Path, outside: Path) -> None:
    write(root / "a", b"a")
    (root / "d1").mkdir()
    (root / "d2").mkdir()
    os.rename(root / "d1", root / "d2" / "d1")
    os.rename(root / "d2" / "d1", root / "d1")
    os.rename(root / "a", root / "d1" / "a")


@peer("watchman moremoves: testEvenMoreMoves", empty)
def even_more_moves(root: Path, outside: Path) -> None:
    (root / "d1").mkdir()
    (root / "d2").mkdir()
    write(root / "d1" / "a", b"a")
    (root / "d3").mkdir()
    for _ in range(2):
        os.rename(root / "d1", root / "d3" / "d1")
        os.rename(root / "d2", root / "d3" / "d2")
        os.rename(root / "d3" / "d1", root / "d1")
        os.rename(root / "d3" / "d2", root / "d2")
    os.rename(root / "d1" / "a", root / "d2" / "a")


@peer("watchman test_rename: rename a file, then its directory")
def rename_file_then_directory(root: Path, outside: Path) -> None:
    os.rename(root / "one" / "onefile", root / "one" / "renamed")
    os.rename(root / "one", root / "uno")
    write(root / "uno" / "two" / "added", b"after")


@peer("watchman test_dir_move: a directory moved out of the root and back in")
def directory_out_and_back(root: Path, outside: Path) -> None:
    os.rename(root / "one", outside / "parked")
    write(outside / "parked" / "while-out.jpg", b"written while outside")
    (outside / "parked" / "onefile").unlink()
    os.rename(outside / "parked", root / "back")


@peer("watchman test_bulk_stat: many files in many directories", empty)
def bulk(root: Path, outside: Path) -> None:
    for i in range(400):
        write(root / f"bulk{i % 12}" / f"f{i:04}.jpg", b"%d" % i * (i % 7))


@peer("watchman test_big_file: a large file written in blocks", empty)
def big_file(root: Path, outside: Path) -> None:
    block = os.urandom(1 << 20)
    with open(root / "big.bin", "wb") as fh:
        for i in range(8):
            fh.write(block[:-1] + bytes([i]))


# === notify-rs inotify tests ==============================================================
@peer("notify-rs: rename_rename_file")
def rename_rename_file(root: Path, outside: Path) -> None:
    os.rename(root / "top.jpg", root / "top2.jpg")
    os.rename(root / "top2.jpg", root / "top3.jpg")


@peer("notify-rs: move_out_create_file")
def move_out_create_file(root: Path, outside: Path) -> None:
    os.rename(root / "dir2" / "c.jpg", outside / "c.jpg")
    write(root / "dir2" / "c.jpg", b"a new file with the old name")


@peer("notify-rs: create_rename_overwrite_file")
def create_rename_overwrite_file(root: Path, outside: Path) -> None:
    write(root / "dir1" / "fresh.jpg", b"fresh content")
    os.rename(root / "dir1" / "fresh.jpg", root / "dir1" / "b.jpg")


@peer("notify-rs: create_write_modify (truncate, append)")
def create_write_truncate_append(root: Path, outside: Path) -> None:
    write(root / "log.txt", b"first line\n")
    with open(root / "log.txt", "ab") as fh:
        fh.write(b"second line\n")
    os.truncate(root / "dir1" / "b.jpg", 0)
    os.truncate(root / "dir2" / "c.jpg", 5)


@peer("notify-rs: rename_rename_directory")
def rename_rename_directory(root: Path, outside: Path) -> None:
    os.rename(root / "dir1", root / "dirA")
    os.rename(root / "dirA", root / "dirB")
    os.rename(root / "dirB", root / "dir2" / "dirC")


@peer("notify-rs: delete and recreate with the same name")
def delete_recreate(root: Path, outside: Path) -> None:
    (root / "dir1" / "a.jpg").unlink()
    write(root / "dir1" / "a.jpg", b"recreated, another inode")
    shutil.rmtree(root / "dir2")
    write(root / "dir2" / "c.jpg", b"recreated directory")


# === Syncthing lib/scanner/walk_test.go ====================================================
@peer("syncthing walk_test: TestWalkSymlinkUnix (links are not followed)")
def symlinks_are_not_followed(root: Path, outside: Path) -> None:
    os.symlink(root / "dir1" / "a.jpg", root / "link-to-file.jpg")
    os.symlink("dir2", root / "link-to-dir")
    os.symlink(outside / "tree", root / "link-outside")
    os.symlink("nowhere", root / "dangling.jpg")
    os.symlink("loop", root / "loop")


@peer("syncthing walk_test: TestNormalization (NFC and NFD names side by side)", empty)
def unicode_normalization(root: Path, outside: Path) -> None:
    for form in ("NFC", "NFD"):
        name = unicodedata.normalize(form, "café-ñ.jpg")
        write(root / name, form.encode())
        write(root / unicodedata.normalize(form, "dïr") / "f.jpg", form.encode() * 3)


@peer("syncthing walk_test: TestIssue4799 (empty files, empty directories)", empty)
def empty_files_and_dirs(root: Path, outside: Path) -> None:
    (root / "e1" / "e2" / "e3").mkdir(parents=True)
    write(root / "e1" / "empty.jpg", b"")
    write(root / "e1" / "e2" / "e3" / "empty2.jpg", b"")


@peer("syncthing walk_test: TestWalkSub / ignores (hidden and patterns)")
def ignored_names(root: Path, outside: Path) -> None:
    write(root / ".hidden" / "x.jpg", b"hidden dir")
    write(root / "dir1" / ".dotfile", b"hidden file")
    for name in (".DS_Store", "Thumbs.db", "edit.swp", "x.tmp", "backup.jpg~"):
        write(root / "dir2" / name, b"junk")
    os.rename(root / "dir1", root / ".trash")  # out of view
    os.rename(root / ".trash", root / "restored")  # and back
    os.rename(root / "top.jpg", root / "top.jpg.tmp")  # renamed to an ignored name


@peer("syncthing walk_test: special files are skipped (FIFO, socket)")
def special_files(root: Path, outside: Path) -> None:
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.fsdecode(root / "dir1" / "sock"))
    finally:
        s.close()


# === common programs and replacements =======================================================
@peer("atomic save: write a temp file, then rename it over the original (editors, rsync)")
def atomic_save(root: Path, outside: Path) -> None:
    for i, temp in enumerate(("dir1/.a.jpg.swp", "dir1/a.jpg.tmp", "dir1/4913", "dir1/.~a")):
        write(root / temp, b"version %d " % i * (i + 3))
        os.replace(root / temp, root / "dir1" / "a.jpg")


@peer("replace a file by a directory and a directory by a file")
def replace_file_and_dir(root: Path, outside: Path) -> None:
    (root / "top.jpg").unlink()
    write(root / "top.jpg" / "inside.jpg", b"now a directory")
    shutil.rmtree(root / "dir2")
    write(root / "dir2", b"now a file")


@peer("rename exchange of two files and of a file with a directory")
def exchange_files(root: Path, outside: Path) -> None:
    exchange(root / "dir1" / "a.jpg", root / "dir1" / "b.jpg")
    exchange(root / "top.jpg", root / "dir2")


@peer("deep tree: mkdir -p of 40 levels with a file at several depths", empty)
def deep_tree(root: Path, outside: Path) -> None:
    path = root
    for i in range(40):
        path = path / f"level{i:02}"
        path.mkdir()
        if i % 10 == 9:
            write(path / f"at{i}.jpg", b"%d" % i)


@pytest.mark.parametrize("peer_case", PEERS, ids=[p.id for p in PEERS])
def test_peer_scenario(scenario: Scenario, peer_case: Peer) -> None:
    """One peer scenario (its source is in the failure message), live or offline."""
    scenario.start(peer_case.setup)
    peer_case.ops(scenario.root, scenario.outside)
    scenario.check(peer_case.source)
