"""Test helpers for real trees on disk: build them, age them, and read them back.

``disk_snapshot`` is deliberately written without fsledger: it walks with ``os.walk``,
filters with its own copy of the ignore rules and hashes with ``blake3``/``hashlib``
directly, so "the ledger equals the disk" is checked against an independent oracle,
not against the code under test.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import blake3

Snapshot = dict[bytes, tuple[int, int, str | None]]
"""relative path -> (size, mtime_ns, content hash hex)."""

# Written out here on purpose (not imported from fsledger.ignore): the seed's patterns.
DEFAULT_IGNORES: tuple[str, ...] = (
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "*.tmp",
    "*.temp",
    "*.swp",
    "*.swo",
    "*~",
)

AGE_S = 10
"""How far in the past ``age_tree`` puts mtimes: well outside the 2 s racy window."""


def _ignored(name: bytes, patterns: Iterable[str]) -> bool:
    if name.startswith(b"."):
        return True
    text = name.decode("latin-1")
    return any(fnmatch.fnmatchcase(text, p) for p in patterns)


SEED_PATTERNS = DEFAULT_IGNORES


def skipped(name: bytes) -> bool:
    """Hidden names and the seed's patterns are never in the ledger."""
    return _ignored(name, DEFAULT_IGNORES)


def blake3_of_file(path: bytes) -> str:
    """The blake3 hex digest of a file, read in 1 MiB blocks, computed without fsledger."""
    h = blake3.blake3()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return str(h.hexdigest())


Files = dict[bytes, tuple[int, str | None]]
"""relative path -> (size, blake3 hex): what the live tests compare."""


def disk_files(root: bytes | str | os.PathLike[str]) -> Files:
    """Every regular file below ``root`` the ledger must hold: its size and blake3 digest.

    Call it when the tree is quiet (the workload is over): a file that vanishes during the
    walk is left out.
    """
    top = os.fsencode(root)
    out: Files = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if not skipped(d)]
        for name in filenames:
            if skipped(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    out[os.path.relpath(full, top)] = (st.st_size, blake3_of_file(full))
            except FileNotFoundError:
                continue
    return out


def describe_diff(want: Mapping[bytes, Any], got: Mapping[bytes, Any], limit: int = 8) -> str:
    """Missing, extra and wrong paths, for assertion messages."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    parts = []
    for label, paths in (("missing", missing), ("extra", extra), ("wrong", wrong)):
        if paths:
            shown = ", ".join(os.fsdecode(p) for p in paths[:limit])
            parts.append(f"{label} {len(paths)}: {shown}")
    return "; ".join(parts) or "equal"


def hash_bytes(data: bytes, algo: str = "blake3") -> str:
    """The hex digest of ``data``, computed without fsledger."""
    if algo == "blake3":
        return str(blake3.blake3(data).hexdigest())
    return hashlib.new(algo, data).hexdigest()


def hash_path(path: bytes, algo: str = "blake3") -> str:
    with open(path, "rb") as f:
        return hash_bytes(f.read(), algo)


def disk_snapshot(
    root: bytes | str,
    rules: Iterable[str] | None = None,
    algo: str | None = "blake3",
) -> Snapshot:
    """Every regular file below ``root`` that the ledger should hold.

    Args:
        root: the tree.
        rules: extra ignore patterns (a repository's own), on top of the defaults.
        algo: ``blake3``, ``sha256``, or ``None`` for "no hashes" (the hash is then None).
    """
    base = os.fsencode(root)
    patterns = DEFAULT_IGNORES + tuple(rules or ())
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _ignored(d, patterns)]
        for name in filenames:
            if _ignored(name, patterns):
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(full, base)
            out[rel] = (st.st_size, st.st_mtime_ns, hash_path(full, algo) if algo else None)
    return out


def ledger_snapshot(ledger: Any, repo: Any) -> Snapshot:
    """The same shape as ``disk_snapshot``, read from ``ledger.files(repo)``."""
    return {r.path: (r.size, r.stat.mtime_ns, r.content_hash) for r in ledger.files(repo)}


TreeSpec = (
    Mapping[str, bytes | None] | Mapping[bytes, bytes | None] | Mapping[str | bytes, bytes | None]
)


def make_tree(root: bytes | str, spec: TreeSpec) -> None:
    """Create files (``path: content``) and empty directories (``path: None``) below ``root``.

    Parent directories are created as needed; paths are ``/``-separated, relative.
    """
    base = os.fsencode(root)
    os.makedirs(base, exist_ok=True)
    for rel, content in spec.items():
        full = os.path.join(base, os.fsencode(rel))
        if content is None:
            os.makedirs(full, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(content)


def age_tree(root: bytes | str) -> None:
    """Put the mtime of every recent regular file at least ``AGE_S`` seconds in the past.

    Files already that old are left alone, so calling this does not touch (and change the
    ctime of) files an earlier scan recorded: a following no-change rescan stays no-change.
    """
    base = os.fsencode(root)
    limit = time.time_ns() - AGE_S * 1_000_000_000
    for dirpath, _dirnames, filenames in os.walk(base, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_mtime_ns > limit:
                os.utime(full, ns=(st.st_atime_ns, limit), follow_symlinks=False)


class OsWith:
    """The ``os`` module with some functions replaced: monkeypatch it over one module's
    ``os`` global (``fsledger.walk.os``) to inject a failure at one path, without touching
    the ``os`` every other module (and the test) uses."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def resolve(path: Any, dir_fd: int | None = None) -> bytes:
    """The full path an ``*at()`` call names (``path`` relative to ``dir_fd``), for fakes
    that fail at one path whichever way the walker names it."""
    path = os.fsencode(path)
    if dir_fd is None or path.startswith(b"/"):
        return path
    return os.path.join(os.fsencode(os.readlink(f"/proc/self/fd/{dir_fd}")), path)


def failing_open(target: bytes, error: OSError) -> Any:
    """An ``os.open`` that raises ``error`` for ``target`` (the walker opens each directory
    it lists), and opens anything else."""

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if resolve(path, dir_fd) == target:
            raise error
        return os.open(path, flags, mode, dir_fd=dir_fd)

    return open_


def mountinfo_escape(path: bytes) -> bytes:
    """Escape a path as the kernel does in ``mountinfo`` (octal for space, tab, newline, \\)."""
    for raw, esc in ((b"\\", b"\\134"), (b" ", b"\\040"), (b"\t", b"\\011"), (b"\n", b"\\012")):
        path = path.replace(raw, esc)
    return path


class FakeMounts:
    """A mount table file (the ``/proc/self/mountinfo`` format) listing mount points below
    ``root``: point ``fsledger.mounts.MOUNTINFO`` at ``path`` to make fsledger believe them."""

    def __init__(self, path: Path, root: bytes) -> None:
        self.path = path
        self.root = os.path.realpath(root)
        self.points: dict[bytes, tuple[str, str]] = {}
        self.write()

    def mount(self, rel: bytes, fs_type: str = "nfs4", source: str = "nas:/photos") -> None:
        self.points[rel] = (fs_type, source)
        self.write()

    def umount(self, rel: bytes) -> None:
        del self.points[rel]
        self.write()

    def write(self) -> None:
        lines = [b"22 1 8:1 / / rw - ext4 /dev/sda1 rw"]
        for n, (rel, (fs, src)) in enumerate(self.points.items()):
            point = mountinfo_escape(self.root + b"/" + rel)
            lines.append(
                b"%d 22 0:%d / %s rw - %s %s rw"
                % (70 + n, 70 + n, point, fs.encode(), src.encode())
            )
        self.path.write_bytes(b"\n".join(lines) + b"\n")
