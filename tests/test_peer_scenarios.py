"""Filesystem scenarios taken from the test suites of peers, replayed live and offline.

Each scenario names the test it comes from (watchdog's ``tests/test_emitter.py``,
Watchman's ``tests/integration``, notify-rs's inotify tests, Syncthing's
``lib/scanner/walk_test.go``); the operations are written here in Python. After them the
ledger must equal the descriptor-walking oracle and the feed replayed from seq 0 must equal
the ledger, live (the watcher alone) and offline (one scan), on both stores.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fsledger.errors import RootUnavailable
from fsledger.model import RepoState
from scenario_support import Scenario, exchange
from support import wait_for
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
    moves: tuple[tuple[bytes, bytes], ...] = ()
    """(old, new) of files that only moved: the feed must carry them as moves."""


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


def peer(
    source: str, setup: Op = base, moves: Iterable[tuple[str | bytes, str | bytes]] = ()
) -> Callable[[Op], Op]:
    """Register the decorated operations as a scenario from ``source``; ``moves`` are the
    (old, new) paths of files that only moved."""
    pairs = tuple((os.fsencode(a), os.fsencode(b)) for a, b in moves)

    def deco(ops: Op) -> Op:
        PEERS.append(Peer(ops.__name__, source, setup, ops, pairs))
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


@peer("watchdog test_emitter: test_move", moves=[("dir1/a.jpg", "dir2/moved.jpg")])
def move_file(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", root / "dir2" / "moved.jpg")


@peer(
    "watchdog test_emitter: test_case_change",
    moves=[("dir1/a.jpg", "dir1/A.jpg"), ("dir2/c.jpg", "DIR2/c.jpg")],
)
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


@peer(
    "watchdog test_emitter: test_separate_consecutive_moves",
    moves=[("dir1/a.jpg", "dir1/a2.jpg"), ("dir2/c.jpg", "dir2/c2.jpg")],
)
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


@peer(
    "watchman test_rename: rename a file, then its directory",
    moves=[("one/onefile", "uno/renamed"), ("one/two/twofile", "uno/two/twofile")],
)
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
@peer("notify-rs: rename_rename_file", moves=[("top.jpg", "top3.jpg")])
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


@peer(
    "notify-rs: rename_rename_directory",
    moves=[("dir1/a.jpg", "dir2/dirC/a.jpg"), ("dir1/b.jpg", "dir2/dirC/b.jpg")],
)
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


# === more scenarios: the peers' suites again, and the programs their tests model ===========
@peer(
    "notify-rs / rename(2): a directory renamed over an existing empty directory",
    moves=[
        ("dir1/a.jpg", "empty/a.jpg"),
        ("dir1/b.jpg", "empty/b.jpg"),
        ("dir2/c.jpg", "one/two/e/c.jpg"),
    ],
)
def dir_renamed_over_empty_dir(root: Path, outside: Path) -> None:
    (root / "empty").mkdir()
    (root / "one" / "two" / "e").mkdir()
    os.rename(root / "dir1", root / "empty")
    os.rename(root / "dir2", root / "one" / "two" / "e")


@peer(
    "watchdog test_move_nested_subdirectories: into a directory just made, written later",
    moves=[("dir1/a.jpg", "new/dir1/a.jpg"), ("one/two/twofile", "new2/twofile")],
)
def moved_into_new_dir_then_written(root: Path, outside: Path) -> None:
    (root / "new").mkdir()
    os.rename(root / "dir1", root / "new" / "dir1")
    (root / "new2").mkdir()
    os.rename(root / "one" / "two" / "twofile", root / "new2" / "twofile")
    time.sleep(0.3)  # the program goes on a little later, in the moved directory
    write(root / "new" / "dir1" / "later.jpg", b"written after the move")
    (root / "new" / "dir1" / "b.jpg").unlink()
    write(root / "new" / "dir1" / "sub" / "deeper.jpg", b"deeper")


@peer("watchdog test_emitter: test_move_to_full, then files created in its subdirectories")
def move_in_then_write_in_subdirs(root: Path, outside: Path) -> None:
    os.rename(outside / "tree", root / "in")
    write(root / "in" / "sub" / "new.jpg", b"written right after the move in")
    write(root / "in" / "sub" / "deeper" / "z.jpg", b"z" * 33)
    with open(root / "in" / "x.jpg", "ab") as fh:
        fh.write(b" appended")
    (root / "in" / "sub" / "y.jpg").unlink()


@peer("watchdog test_emitter: test_file_lifecyle (renamed while open for writing)")
def rename_while_open(root: Path, outside: Path) -> None:
    with open(root / "dir1" / "open.bin", "wb") as fh:
        fh.write(b"1" * 4096)
        fh.flush()
        os.rename(root / "dir1" / "open.bin", root / "dir2" / "renamed-open.bin")
        fh.write(b"2" * 4096)  # through the same descriptor, after the rename
        fh.flush()
        time.sleep(0.05)  # the program pauses with the file open
        fh.write(b"3" * 100)
    with open(root / "top.jpg", "ab") as fh:
        fh.write(b" before")
        fh.flush()
        os.rename(root / "top.jpg", root / "one" / "top-moved.jpg")
        fh.write(b" after")


@peer("mmap writers (LMDB-style): writes through a shared mapping, synced, unmapped")
def mmap_writes(root: Path, outside: Path) -> None:
    path = root / "dir1" / "b.jpg"
    with open(path, "r+b") as fh:
        mapped = mmap.mmap(fh.fileno(), 0)
    # The descriptor is closed; the mapping (a descriptor of its own) is written.
    mapped[0:6] = b"MAPPED"
    mapped[-6:] = b"mapped"
    mapped.flush()
    mapped.close()
    write(root / "dir2" / "grown.db", b"\0" * 8192)
    with open(root / "dir2" / "grown.db", "r+b") as fh, mmap.mmap(fh.fileno(), 0) as m:
        m[4096:4100] = b"page"
        m.flush()


@peer("notify-rs: create_write_overwrite (truncate to zero, rewrite the same size)")
def truncate_then_rewrite_same_size(root: Path, outside: Path) -> None:
    with open(root / "dir1" / "a.jpg", "wb") as fh:  # O_TRUNC, then the same 100 bytes' size
        fh.write(b"A" * 100)
    fd = os.open(root / "dir1" / "b.jpg", os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"B" * 200, 0)
    finally:
        os.close(fd)
    os.truncate(root / "dir2" / "c.jpg", 0)
    with open(root / "dir2" / "c.jpg", "r+b") as fh:
        fh.write(b"C" * 300)


@peer(
    "watchman moremoves / test_rename: a cycle of renames a -> b -> c -> a through a temp",
    moves=[
        ("dir1/a.jpg", "dir1/b.jpg"),
        ("dir2/c.jpg", "dir1/a.jpg"),
        ("dir1/b.jpg", "dir2/c.jpg"),
    ],
)
def rename_cycle(root: Path, outside: Path) -> None:
    os.rename(root / "dir1" / "a.jpg", root / "dir1" / "t")
    os.rename(root / "dir2" / "c.jpg", root / "dir1" / "a.jpg")
    os.rename(root / "dir1" / "b.jpg", root / "dir2" / "c.jpg")
    os.rename(root / "dir1" / "t", root / "dir1" / "b.jpg")


@peer(
    "watchman test_dir_move: two files and two directories swapped through a temp name",
    moves=[
        ("top.jpg", "one/onefile"),
        ("one/onefile", "top.jpg"),
        ("dir1/a.jpg", "dir2/a.jpg"),
        ("dir2/c.jpg", "dir1/c.jpg"),
    ],
)
def swap_through_temp(root: Path, outside: Path) -> None:
    os.rename(root / "top.jpg", root / "swap")
    os.rename(root / "one" / "onefile", root / "top.jpg")
    os.rename(root / "swap", root / "one" / "onefile")
    os.rename(root / "dir1", root / "dswap")
    os.rename(root / "dir2", root / "dir1")
    os.rename(root / "dswap", root / "dir2")


@peer("syncthing walk_test: TestWalkHardlinks (a link made live, then the original deleted)")
def hard_link_then_original_deleted(root: Path, outside: Path) -> None:
    os.link(root / "dir1" / "a.jpg", root / "dir2" / "a-link.jpg")
    (root / "dir1" / "a.jpg").unlink()
    with open(root / "dir2" / "a-link.jpg", "ab") as fh:
        fh.write(b" written through the surviving name")
    os.link(root / "dir1" / "b.jpg", root / "b-link.jpg")
    with open(root / "dir1" / "b.jpg", "r+b") as fh:  # in place: both names change
        fh.write(b"B")


@peer("cp -al (rsnapshot): a tree copied as hard links, then written in place")
def cp_al_tree(root: Path, outside: Path) -> None:
    subprocess.run(["cp", "-al", str(root / "one"), str(root / "snap")], check=True)
    with open(root / "one" / "two" / "twofile", "r+b") as fh:  # both names see it
        fh.write(b"TWO")
    (root / "snap" / "onefile").unlink()
    with open(root / "snap" / "two" / "twofile", "ab") as fh:
        fh.write(b"+")


@peer("notify-rs / watchdog: rapid create, delete, create of one name (file and directory)")
def rapid_create_delete_create(root: Path, outside: Path) -> None:
    for i in range(50):
        write(root / "flicker.jpg", b"v%d" % i * (i + 1))
        (root / "flicker.jpg").unlink()
        write(root / "flickdir" / "in.jpg", b"d%d" % i)
        shutil.rmtree(root / "flickdir")
    write(root / "flicker.jpg", b"the last one stays")
    write(root / "flickdir" / "in.jpg", b"and this one too")


@peer("watchman test_remove: a directory replaced by a file of the same name, and back")
def dir_file_dir_same_name(root: Path, outside: Path) -> None:
    shutil.rmtree(root / "one")
    write(root / "one", b"a file now")
    (root / "one").unlink()
    write(root / "one" / "again.jpg", b"a directory again")
    (root / "dir1" / "b.jpg").unlink()
    write(root / "dir1" / "b.jpg" / "inner.jpg", b"b.jpg is a directory")
    shutil.rmtree(root / "dir1" / "b.jpg")
    write(root / "dir1" / "b.jpg", b"and a file again")


@peer("watchdog test_emitter: test_move_nested_subdirectories (ancestor renamed mid-write)")
def deep_rename_while_writing(root: Path, outside: Path) -> None:
    deep = root / "one" / "two" / "three" / "four"
    deep.mkdir(parents=True)
    with open(deep / "w.bin", "wb") as fh:
        fh.write(os.urandom(64 * 1024))
        fh.flush()
        os.rename(root / "one", root / "uno")
        fh.write(os.urandom(64 * 1024))
        fh.flush()
        write(root / "uno" / "two" / "beside.jpg", b"written during the write")
        time.sleep(0.05)  # the writer pauses with the file open
        fh.write(b"end")


def big_subtree(root: Path, outside: Path) -> None:
    base(root, outside)
    for i in range(600):
        write(root / "big" / f"d{i % 20:02}" / f"f{i:04}.jpg", b"%d" % i)


@peer(
    "watchman test_big / test_bulkstat: rm -rf of a big subtree while one is created beside",
    big_subtree,
)
def rm_rf_while_creating(root: Path, outside: Path) -> None:
    def create() -> None:
        for i in range(400):
            write(root / "fresh" / f"d{i % 16:02}" / f"g{i:04}.jpg", b"g%d" % i)

    maker = threading.Thread(target=create)
    maker.start()
    shutil.rmtree(root / "big")
    maker.join()


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", "-c", "init.defaultBranch=main"]
        + list(args),
        cwd=root,
        check=True,
        capture_output=True,
    )


def git_repo(root: Path, outside: Path) -> None:
    base(root, outside)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "one")
    _git(root, "checkout", "-q", "-b", "other")
    _git(root, "mv", "dir1", "renamed-dir")
    _git(root, "mv", "top.jpg", "one/top-renamed.jpg")
    write(root / "dir2" / "c.jpg", b"c on the other branch")
    write(root / "added-on-other.jpg", b"new")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "two")
    _git(root, "checkout", "-q", "main")


@peer("watchman test_scm: git checkout between branches with renames", git_repo)
def git_checkout_with_renames(root: Path, outside: Path) -> None:
    _git(root, "checkout", "-q", "other")
    _git(root, "checkout", "-q", "main")
    _git(root, "checkout", "-q", "other")


def rsync_source(root: Path, outside: Path) -> None:
    base(root, outside)
    for i in range(30):
        write(outside / "src" / f"s{i % 3}" / f"p{i:02}.jpg", b"p%d" % i * 50)
    subprocess.run(
        ["rsync", "-a", "--delete", f"{outside / 'src'}/", f"{root / 'mirror'}/"], check=True
    )


@peer("syncthing / rsync -a --delete with renames and edits at the source", rsync_source)
def rsync_delete_with_renames(root: Path, outside: Path) -> None:
    src = outside / "src"
    os.rename(src / "s0", src / "s0-renamed")
    os.rename(src / "s1" / "p01.jpg", src / "s1" / "p01-renamed.jpg")
    (src / "s2" / "p02.jpg").unlink()
    write(src / "s2" / "p05.jpg", b"edited at the source")
    write(src / "s3" / "new.jpg", b"new at the source")
    subprocess.run(["rsync", "-a", "--delete", f"{src}/", f"{root / 'mirror'}/"], check=True)


@peer("watchman test_big / notify-rs: tar -x over an existing tree")
def tar_x_over_existing(root: Path, outside: Path) -> None:
    stage = outside / "stage"
    shutil.copytree(root, stage)
    write(stage / "dir1" / "a.jpg", b"x" * 100)  # same size, other content
    write(stage / "dir2" / "c.jpg", b"longer " * 80)
    write(stage / "extracted" / "e.jpg", b"only in the archive")
    os.utime(stage / "dir1" / "a.jpg", (1_000_000_000, 1_000_000_000))
    archive = outside / "t.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(stage), "."], check=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(root)], check=True)


@peer("unzip -o over an existing tree (DOS times, rewritten in place)")
def unzip_over_existing(root: Path, outside: Path) -> None:
    stage = outside / "zstage"
    write(stage / "dir1" / "a.jpg", b"z" * 100)
    write(stage / "dir1" / "b.jpg", b"shorter")
    write(stage / "zipped" / "n.jpg", b"new from the zip")
    archive = outside / "t.zip"
    subprocess.run(["zip", "-q", "-r", str(archive), "."], cwd=stage, check=True)
    subprocess.run(["unzip", "-q", "-o", str(archive), "-d", str(root)], check=True)


@peer("watchman test_age_file / syncthing: touch -d in the past and the future, touch -r")
def mtime_far_from_now(root: Path, outside: Path) -> None:
    os.utime(root / "dir1" / "a.jpg", (0, 0))  # 1970
    os.utime(root / "dir1" / "b.jpg", (4_102_444_800, 4_102_444_800))  # 2100
    before = os.stat(root / "dir2" / "c.jpg")
    write(root / "dir2" / "c.jpg", b"C" * 300)  # same size, other content
    os.utime(root / "dir2" / "c.jpg", ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r
    write(root / "old.jpg", b"born old")
    os.utime(root / "old.jpg", (86_400, 86_400))


def many_copies(root: Path, outside: Path) -> None:
    base(root, outside)
    for i in range(24):
        write(root / "dup" / f"d{i % 4}" / f"same-{i}.jpg", b"same" * 64)


@peer(
    "syncthing walk_test / watchman content.sha1hex: the same content in many places",
    many_copies,
    moves=[("dup/d0/same-0.jpg", "dup/moved/same-0.jpg"), ("dup/d1/same-1.jpg", "dup/s1.jpg")],
)
def same_content_many_places(root: Path, outside: Path) -> None:
    (root / "dup" / "moved").mkdir(parents=True)
    os.rename(root / "dup" / "d0" / "same-0.jpg", root / "dup" / "moved" / "same-0.jpg")
    os.rename(root / "dup" / "d1" / "same-1.jpg", root / "dup" / "s1.jpg")
    (root / "dup" / "d2" / "same-2.jpg").unlink()
    write(root / "dup" / "d2" / "same-2b.jpg", b"same" * 64)  # the same content, a new file
    write(root / "dup" / "d3" / "same-3.jpg", b"now different")


@peer("git racy-git / syncthing: same size, other content, mtime restored (same second)")
def racy_same_size(root: Path, outside: Path) -> None:
    for rel in ("dir1/a.jpg", "racy-new.jpg"):
        path = root / rel
        write(path, b"1" * 100)
        st = os.stat(path)
        write(path, b"2" * 100)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@peer("watchdog test_create, then test_modify: empty files written later")
def empty_then_written(root: Path, outside: Path) -> None:
    for i in range(5):
        write(root / "later" / f"e{i}.jpg", b"")
    time.sleep(0.7)  # the program fills them in later (past the watcher's debounce)
    for i in range(4):
        with open(root / "later" / f"e{i}.jpg", "ab") as fh:
            fh.write(b"filled %d" % i * (i + 1))
    os.truncate(root / "later" / "e3.jpg", 5000)  # grown sparse


@peer(
    "watchdog test_create_wrong_encoding: non-UTF-8 directories renamed",
    moves=[
        ("dir1/a.jpg", b"dir1-\xe9/a.jpg"),
        ("dir2/c.jpg", b"\xff\xfe/\xc3(/c.jpg"),
    ],
)
def non_utf8_dirs_renamed(root: Path, outside: Path) -> None:
    b = os.fsencode(root)
    os.rename(os.path.join(b, b"dir1"), os.path.join(b, b"dir1-\xe9"))
    os.mkdir(os.path.join(b, b"\xff\xfe"))
    os.rename(os.path.join(b, b"dir2"), os.path.join(b, b"\xff\xfe/\xc3("))
    os.mkdir(os.path.join(b, b"n-\x80"))
    with open(os.path.join(b, b"n-\x80/f\x81.jpg"), "wb") as fh:
        fh.write(b"below a non-UTF-8 directory")
    os.rename(os.path.join(b, b"n-\x80"), os.path.join(b, b"n-\x82"))


def like_wildcards(root: Path, outside: Path) -> None:
    base(root, outside)
    for d in ("d_1", "dX1", "d%1", "d_1x", "100%", "100x", "1000"):
        write(root / d / "f.jpg", d.encode())
    write(root / "100%" / "p.jpg", b"percent")


@peer(
    "watchman test_path_generator / syncthing: newlines, spaces, dashes, LIKE wildcards",
    like_wildcards,
    moves=[("d_1/f.jpg", "d_2/f.jpg"), ("100%/p.jpg", "100%-/p.jpg")],
)
def awkward_names(root: Path, outside: Path) -> None:
    names = [
        "new\nline.jpg",
        " lead.jpg",
        "trail.jpg ",
        "-rf",
        "--help.jpg",
        "back\\slash.jpg",
        "[x]*?.jpg",
        "tab\there.jpg",
        "%s%n.jpg",
        "'q\".jpg",
    ]
    for i, name in enumerate(names):
        write(root / "odd" / name, b"%d" % i * (i + 1))
    os.rename(root / "odd" / "-rf", root / "odd" / "--force")
    os.rename(root / "odd", root / "odd\ndir")
    os.rename(root / "d_1", root / "d_2")  # dX1 and d%1 must not follow
    os.rename(root / "100%", root / "100%-")


@peer("syncthing walk_test: special files created, replaced by regular files, removed")
def special_files_lifecycle(root: Path, outside: Path) -> None:
    os.mkfifo(root / "dir1" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fsdecode(root / "dir2" / "sock.jpg"))
    finally:
        sock.close()
    os.mkfifo(root / "tmpfifo")
    os.replace(root / "tmpfifo", root / "top.jpg")  # a regular file replaced by a FIFO
    (root / "dir1" / "pipe.jpg").unlink()
    write(root / "dir1" / "pipe.jpg", b"a regular file now")
    (root / "dir2" / "sock.jpg").unlink()


@peer("watchman test_symlink: files replaced by symlinks and symlinks by files")
def file_symlink_file(root: Path, outside: Path) -> None:
    os.symlink("dir1/b.jpg", root / "link.tmp-new")
    os.replace(root / "link.tmp-new", root / "top.jpg")  # ln -sf
    os.symlink("/etc/passwd", root / "dir1" / "pw")
    os.replace(root / "dir1" / "pw", root / "dir1" / "a.jpg")
    os.symlink("c.jpg", root / "dir2" / "was-link.jpg")
    (root / "dir2" / "was-link.jpg").unlink()
    write(root / "dir2" / "was-link.jpg", b"a file where a link was")


@pytest.mark.parametrize("order", ["child_first", "parent_first"])
def test_nested_directories_unreadable_then_readable(scenario: Scenario, order: str) -> None:
    """Watchman ``test_perms``: two nested directories made unreadable (``chmod 000``),
    changed meanwhile, and made readable again one at a time, in either order; the ledger
    catches up (live: without a reconciliation of the repository)."""
    sc = scenario
    sc.unprivileged_scans = True
    sc.start(base)
    outer, inner = sc.p("one"), sc.p("one/two")
    inner.chmod(0)
    outer.chmod(0)
    try:
        write(outer / "new-outer.jpg", b"outer")
        write(inner / "new-inner.jpg", b"inner")
        (inner / "twofile").unlink()
        write(outer / "onefile", b"one, rewritten")
        if not sc.live:
            errors = sc.scan()
            assert errors, "an unreadable directory was not reported"
            assert b"one/two/twofile" in sc.files(), "a record behind 000 was deleted"
    finally:
        first, second = (inner, outer) if order == "child_first" else (outer, inner)
        first.chmod(0o755)
        second.chmod(0o755)
    sc.check(f"chmod 755 {order}")


@pytest.mark.parametrize("how", ["rm_and_mkdir", "moved_away_and_back"])
def test_root_deleted_and_recreated(scenario: Scenario, how: str) -> None:
    """Watchman ``test_remove`` (the watched root removed) and notify-rs ``delete_self``,
    under the README's root guard: while the root is missing the records are kept (the
    repository goes offline; live, ``rm -rf`` may be seen deleting some files before the
    root itself, which are real deletions); once it is back the ledger is exact again,
    and a file written just after that is recorded too (live: the daemon watches the
    root again *before* the reconciliation that brings it online, so nothing written
    between that walk and the new watch is missed)."""
    sc = scenario
    sc.daemon = True
    sc.start(base)
    kept = sc.files()
    parked = sc.tmp_path / "parked-root"
    if how == "rm_and_mkdir":
        shutil.rmtree(sc.root)
    else:
        os.rename(sc.root, parked)
    if sc.live:
        assert sc.repo is not None
        repo_id = sc.repo.id

        def offline() -> bool:
            repo = sc.ledger.store.get_repository(repo_id)
            return repo is not None and repo.state is RepoState.OFFLINE

        wait_for("the repository to be marked offline", offline, 15.0)
    else:
        with pytest.raises(RootUnavailable):
            sc.scan()
    if sc.live and how == "rm_and_mkdir":
        # rm -rf deletes the files before the root: a deletion the watcher saw while the
        # root was still there is a real one. None other, and nothing new.
        assert set(sc.files()) <= set(kept), "records appeared while the root was missing"
    else:
        assert sc.files() == kept, "records were dropped while the root was missing"
    if how == "rm_and_mkdir":
        sc.root.mkdir()
        write(sc.root / "top.jpg", b"top")  # the same content again (a restore)
        write(sc.root / "dir1" / "a.jpg", b"a" * 100)
        write(sc.root / "dir1" / "restored.jpg", b"restored")
    else:
        write(parked / "dir1" / "while-away.jpg", b"written while the root was elsewhere")
        (parked / "dir2" / "c.jpg").unlink()
        os.rename(parked, sc.root)
    sc.check(f"root back ({how})")
    write(sc.root / "after.jpg", b"written once the root is back")
    sc.check("watched again")


@pytest.mark.parametrize("peer_case", PEERS, ids=[p.id for p in PEERS])
def test_peer_scenario(scenario: Scenario, peer_case: Peer) -> None:
    """One peer scenario (its source is in the failure message), live or offline."""
    scenario.start(peer_case.setup)
    peer_case.ops(scenario.root, scenario.outside)
    scenario.check(peer_case.source)
    scenario.check_moves(peer_case.moves, peer_case.source)


@pytest.mark.slow  # 3,000 files crawled around a chmod: 3-5 s
def test_directory_unreadable_mid_scan(scenario: Scenario) -> None:
    """Watchman ``test_perms`` during a crawl: a directory is made unreadable while a big
    tree is being walked (offline: one scan; live: the listing of a tree just moved in)
    and readable again afterwards. Nothing behind it is taken for deleted, and the ledger
    is exact once it can be read."""
    sc = scenario
    sc.unprivileged_scans = True

    def big(root: Path, outside: Path) -> None:
        base(root, outside)
        for i in range(1500):
            write(root / "crawl" / f"d{i % 30:02}" / f"f{i:04}.jpg", b"%d" % i)
            write(outside / "tree2" / f"d{i % 30:02}" / f"g{i:04}.jpg", b"g%d" % i)

    sc.start(big)
    if sc.live:
        os.rename(sc.outside / "tree2", sc.p("arrived"))
        target = sc.p("arrived/d17")
    else:
        write(sc.p("crawl/d17/new.jpg"), b"new behind the lock")
        target = sc.p("crawl/d17")
    errors: list[str] = []
    scan = threading.Thread(target=lambda: errors.extend(sc.scan())) if not sc.live else None
    if scan is not None:
        scan.start()
    time.sleep(0.05)  # the crawl is under way
    target.chmod(0)
    try:
        if scan is not None:
            scan.join()
            kept = {p for p in sc.files() if p.startswith(b"crawl/d17/")}
            assert len(kept) >= 50, f"records behind the unreadable directory went: {errors}"
        else:
            time.sleep(0.5)  # locked for a while
    finally:
        target.chmod(0o755)
    sc.check("readable again")
