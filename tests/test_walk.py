"""The walker: order, what it yields, what it skips, what it cannot read."""

from __future__ import annotations

import errno
import os
import random

import pytest

import fsledger.walk
from fsledger.ignore import IgnoreRules
from fsledger.model import FileStat
from fsledger.walk import FileEntry, Special, Unreadable, walk
from treeutil import OsWith, disk_snapshot, failing_open, make_tree

RULES = IgnoreRules.default()


def files(root: bytes, rules: IgnoreRules = RULES, start: bytes = b"") -> list[bytes]:
    out = []
    for item in walk(root, rules, start):
        assert isinstance(item, FileEntry), item
        out.append(item.path)
    return out


def test_yield_order_is_sorted_full_paths(tree: bytes) -> None:
    # Names around '/' (0x2F): '-' 0x2D, '.' 0x2E, '0' 0x30, plus a few more awkward ones.
    names = [
        "a/x",
        "a/y/z",
        "a/y.txt",
        "a/y-1/q",
        "a.txt",
        "a-b",
        "a0/inner",
        "ab/c",
        "A",
        "b",
        "\udcff\udcfe",  # the bytes ff fe
        "z/\x01/\x7f",
        "new\nline",
    ]
    make_tree(tree, {os.fsencode(n): b"" for n in names})
    got = files(tree)
    assert got == sorted(got)
    assert got == sorted(disk_snapshot(tree))
    assert b"a.txt" in got and b"a/x" in got and b"a-b" in got and b"a0/inner" in got


def test_order_on_a_random_tree(tree: bytes) -> None:
    rng = random.Random(1234)
    alphabet = [b"a", b"b", b"-", b".", b"0", b"_", b"\xff", b"A", b" "]
    spec: dict[bytes | str, bytes | None] = {}
    for _ in range(300):
        depth = rng.randint(1, 4)
        parts = [
            b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(depth)
        ]
        # Keep names visible (no leading '.') and file/dir names from colliding.
        parts = [b"n" + part for part in parts[:-1]] + [b"f" + parts[-1]]
        spec[b"/".join(parts)] = b""
    make_tree(tree, spec)
    got = files(tree)
    assert got == sorted(disk_snapshot(tree))


def test_stat_is_the_files_own(tree: bytes) -> None:
    make_tree(tree, {"d/f": b"12345"})
    (item,) = list(walk(tree, RULES))
    assert isinstance(item, FileEntry)
    st = os.lstat(os.path.join(tree, b"d/f"))
    assert (item.stat.size, item.stat.mtime_ns, item.stat.ctime_ns, item.stat.inode) == (
        5,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )


def test_a_flat_walk_yields_the_same_in_plain_tuples(tree: bytes) -> None:
    """``flat=True`` changes only the type of what a file is yielded as: the same files, the
    same stats and the same other items, in the same order, whole or in a key range."""
    make_tree(tree, {"a/x": b"1", "a/y/z": b"22", "a.txt": b"333", "b/c": b"", "d/e/f": b"4"})
    os.mkfifo(os.path.join(tree, b"a/fifo"))
    os.chmod(os.path.join(tree, b"d/e"), 0)  # unreadable (as root: listed all the same)
    try:
        for lo, hi in ((b"", None), (b"a/y", b"d/")):
            items = list(walk(tree, RULES, lo=lo, hi=hi))
            flat = list(walk(tree, RULES, lo=lo, hi=hi, flat=True))
            assert all(type(i) is tuple for i in flat if not isinstance(i, Special | Unreadable))
            assert [
                FileEntry(i[0], FileStat(*i[1])) if type(i) is tuple else i for i in flat
            ] == items
            assert any(isinstance(i, FileEntry) for i in items)
    finally:
        os.chmod(os.path.join(tree, b"d/e"), 0o755)


def test_symlinks_are_not_followed_nor_yielded(tree: bytes) -> None:
    make_tree(tree, {"d/f": b"x"})
    os.symlink("..", os.path.join(tree, b"d/up"))
    os.symlink("f", os.path.join(tree, b"d/to-file"))
    os.symlink("missing", os.path.join(tree, b"dangling"))
    assert files(tree) == [b"d/f"]


def test_special_files_are_reported(tree: bytes) -> None:
    make_tree(tree, {"a": b"a"})
    os.mkfifo(os.path.join(tree, b"fifo"))
    items = list(walk(tree, RULES))
    assert [type(i) for i in items] == [FileEntry, Special]
    assert items[1] == Special(b"fifo")


def test_ignored_names_are_pruned_with_their_subtree(tree: bytes) -> None:
    make_tree(
        tree,
        {
            "keep": b"",
            ".hidden/x": b"",
            "d/.DS_Store": b"",
            "d/x.tmp": b"",
            "d/cache.tmp/y": b"",
            "d/ok": b"",
            "sidecar.xmp": b"",
            "exports/a/b": b"",
        },
    )
    assert files(tree) == [b"d/ok", b"exports/a/b", b"keep", b"sidecar.xmp"]
    rules = IgnoreRules.default(["*.xmp", "exports/*"])
    assert files(tree, rules) == [b"d/ok", b"keep"]
    visible_too = IgnoreRules(patterns=(), hidden=False)
    assert b".hidden/x" in files(tree, visible_too)


def test_start_walks_one_subtree(tree: bytes) -> None:
    make_tree(tree, {"a/x": b"", "a/y/z": b"", "a.txt": b"", "b/c": b""})
    assert files(tree, start=b"a") == [b"a/x", b"a/y/z"]
    assert files(tree, start=b"a/y") == [b"a/y/z"]


def test_empty_tree_and_vanished_start(tree: bytes) -> None:
    assert list(walk(tree, RULES)) == []
    # A subtree that no longer exists is truly gone (ENOENT), not unreadable.
    assert list(walk(tree, RULES, b"gone")) == []


def test_unreadable_directory_is_reported_not_skipped(
    tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tree, {"a/x": b"", "bad/y": b"", "bad.txt": b"", "c": b""})
    target = os.path.join(tree, b"bad")
    error = OSError(errno.EIO, "Input/output error", target)
    monkeypatch.setattr(fsledger.walk, "os", OsWith(open=failing_open(target, error)))
    items = list(walk(tree, RULES))
    assert [i.path for i in items] == [b"a/x", b"bad.txt", b"bad", b"c"]
    bad = items[2]
    assert isinstance(bad, Unreadable)
    assert bad.is_dir and "errno 5" in bad.error


def test_vanished_directory_is_simply_gone(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tree, {"a/x": b"", "b/y": b""})
    target = os.path.join(tree, b"b")
    error = FileNotFoundError(errno.ENOENT, "No such file or directory", target)
    monkeypatch.setattr(fsledger.walk, "os", OsWith(open=failing_open(target, error)))
    assert files(tree) == [b"a/x"]


def test_unreadable_root(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tree, {"a": b""})
    error = PermissionError(errno.EACCES, "Permission denied", tree)
    monkeypatch.setattr(fsledger.walk, "os", OsWith(open=failing_open(tree, error)))
    (item,) = list(walk(tree, RULES))
    assert item == Unreadable(b"", True, "Permission denied (errno 13)")


def test_file_deleted_between_listing_and_stat(tree: bytes) -> None:
    make_tree(tree, {"a": b"", "b": b"", "c": b""})
    seen = []
    for item in walk(tree, RULES):
        seen.append(item.path)
        if item.path == b"a":
            os.unlink(os.path.join(tree, b"b"))
    assert seen == [b"a", b"c"]


def test_file_replaced_by_a_directory_during_the_walk(tree: bytes) -> None:
    make_tree(tree, {"a": b"", "b": b"", "c": b""})
    seen = []
    for item in walk(tree, RULES):
        seen.append(item.path)
        if item.path == b"a":
            os.unlink(os.path.join(tree, b"b"))
            make_tree(tree, {"b/inner": b""})
    # The walk keeps its order; the new directory is for the next pass.
    assert seen == [b"a", b"c"]
