"""Paths below a root are resolved without following any symlink, at any depth.

These are the primitives every look below a root goes through (the writer's re-check,
hashing, the watcher's look, watches); the scans and the watcher are tested on top of them
in test_reconcile.py, test_watch_inotify.py and test_scenarios.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

import fsledger.beneath
from fsledger.beneath import Beneath, resolve_dir
from fsledger.hashing import hash_below, hash_many


@pytest.fixture(params=["openat2", "per-component"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways of resolving: the kernel's openat2, and the fallback for kernels without."""
    if request.param == "per-component":
        monkeypatch.setattr(fsledger.beneath, "_have_openat2", False)
    yield request.param


@pytest.fixture
def layout(tmp_path: Path) -> tuple[bytes, bytes]:
    """A root with ``real/f`` and ``foo -> <outside>`` (a symlinked directory holding a
    secret), and the outside directory."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "f").write_bytes(b"inside")
    (outside / "shadow").write_bytes(b"secret outside the root")
    (root / "foo").symlink_to(outside)
    (root / "link.jpg").symlink_to(root / "real" / "f")
    return os.fsencode(root), os.fsencode(outside)


def test_a_symlinked_directory_in_the_middle_is_not_followed(
    layout: tuple[bytes, bytes], resolution: str
) -> None:
    root, _outside = layout
    with Beneath(root) as tree:
        assert stat.S_ISREG(tree.lstat(b"real/f").st_mode)
        with pytest.raises(NotADirectoryError):
            tree.lstat(b"foo/shadow")
        with pytest.raises(NotADirectoryError):
            tree.open(b"foo/shadow", os.O_RDONLY)
        with pytest.raises(NotADirectoryError):
            tree.dir_fd(b"foo")
        assert not tree.is_dir(b"foo")
        # The symlink itself is seen as what it is, never as its target.
        assert stat.S_ISLNK(tree.lstat(b"foo").st_mode)
        assert stat.S_ISLNK(tree.lstat(b"link.jpg").st_mode)
        with pytest.raises(OSError) as caught:
            tree.open(b"link.jpg", os.O_RDONLY)
        assert caught.value.errno == errno.ELOOP


def test_hashing_never_reads_through_a_symlinked_directory(layout: tuple[bytes, bytes]) -> None:
    root, outside = layout
    with Beneath(root) as tree:
        out = hash_below(tree, b"foo/shadow")
        assert out.hex is None and out.error is not None
        assert hash_below(tree, b"real/f").hex == blake3.blake3(b"inside").hexdigest()
    outs = hash_many(root, [b"foo/shadow", b"real/f", b"link.jpg"], "blake3")
    assert [o.hex is None for o in outs] == [True, False, True]
    secret = blake3.blake3(b"secret outside the root").hexdigest()
    assert all(o.hex != secret for o in outs)


def test_plain_paths_only(layout: tuple[bytes, bytes]) -> None:
    root, _outside = layout
    with Beneath(root) as tree:
        for bad in (b"../outside/shadow", b"real/../../outside/shadow", b"/etc/passwd", b"a//b"):
            with pytest.raises(OSError) as caught:
                tree.lstat(bad)
            assert caught.value.errno in (errno.EINVAL, errno.ENOENT)


def deep_tree(root: bytes, levels: int, name_len: int = 60) -> bytes:
    """Make ``levels`` nested directories with long names below ``root`` (built through
    descriptors: the whole path is longer than PATH_MAX) with a file at the bottom;
    returns the file's path relative to ``root``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for i in range(levels):
            name = (b"%03d-" % i) + b"d" * (name_len - 4)
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            parts.append(name)
        f = os.open(b"bottom.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"deep")
        os.close(f)
    finally:
        os.close(fd)
    return b"/".join([*parts, b"bottom.jpg"])


def test_depth_has_no_path_max_limit(tmp_path: Path, resolution: str) -> None:
    root = os.fsencode(tmp_path)
    rel = deep_tree(root, 100)
    assert len(rel) > 4096
    with Beneath(root) as tree:
        st = tree.lstat(rel)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 4
        assert hash_below(tree, rel).hex == blake3.blake3(b"deep").hexdigest()
    top = os.open(root, os.O_PATH)
    fd = resolve_dir(top, rel.rpartition(b"/")[0])
    listing = os.open(".", os.O_RDONLY, dir_fd=fd)
    try:
        assert os.listdir(listing) == ["bottom.jpg"]
    finally:
        for x in (listing, fd, top):
            os.close(x)
