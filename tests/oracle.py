"""An independent oracle of what the ledger must hold, walked with directory descriptors.

It imports nothing from fsledger. Every directory is opened relative to its parent's
descriptor with ``O_NOFOLLOW | O_DIRECTORY``, every entry is ``lstat``-ed relative to its
directory's descriptor and every file is hashed through ``openat(..., O_NOFOLLOW)``: no
symlink is ever followed (not even one that replaced a directory in the middle of a path),
and depth has no limit (no path string longer than one name is passed to a syscall, so
paths beyond ``PATH_MAX`` = 4096 bytes are reached). The ignore rules are treeutil's copy
of the seed's (hidden components and the seed's patterns).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import blake3

from treeutil import DEFAULT_IGNORES, _ignored

Files = dict[bytes, tuple[int, str | None]]
"""relative path -> (size, hex digest)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class OracleFile:
    """One regular file as the oracle saw it."""

    path: bytes
    size: int
    digest: str | None
    dev: int
    inode: int


def _hasher(algo: str) -> object:
    return blake3.blake3() if algo == "blake3" else hashlib.new(algo)


def digest_fd(fd: int, algo: str = "blake3") -> str:
    """The hex digest of everything readable from ``fd`` (read in 1 MiB blocks)."""
    h = _hasher(algo)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)  # type: ignore[attr-defined]
    return str(h.hexdigest())  # type: ignore[attr-defined]


def digest_at(dir_fd: int, name: bytes, algo: str = "blake3") -> tuple[str, os.stat_result]:
    """Hash ``name`` in the directory ``dir_fd`` without following a symlink; also returns
    the opened descriptor's fstat."""
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        return digest_fd(fd, algo), st
    finally:
        os.close(fd)


def oracle_walk(
    root: bytes | str | os.PathLike[str],
    rules: Iterable[str] = (),
    algo: str | None = "blake3",
) -> list[OracleFile]:
    """Every regular file below ``root`` the ledger must hold, in path byte order.

    Call it when the tree is quiet. A file or directory that vanishes during the walk is
    left out; a directory that cannot be opened raises (the oracle runs as root, and a
    tree it cannot read is a broken test, not a case to paper over).
    """
    patterns = DEFAULT_IGNORES + tuple(rules)
    out: list[OracleFile] = []
    top = os.open(os.fsencode(root), _DIR_FLAGS)
    try:
        _walk_fd(top, b"", patterns, algo, out)
    finally:
        os.close(top)
    out.sort(key=lambda f: f.path)
    return out


def _walk_fd(
    fd: int, rel: bytes, patterns: tuple[str, ...], algo: str | None, out: list[OracleFile]
) -> None:
    with os.scandir(fd) as it:
        names = sorted(os.fsencode(e.name) for e in it)
    for name in names:
        if _ignored(name, patterns):
            continue
        path = rel + b"/" + name if rel else name
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            try:
                _walk_fd(sub, path, patterns, algo, out)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            digest: str | None = None
            if algo is not None:
                try:
                    digest, st = digest_at(fd, name, algo)
                except FileNotFoundError:
                    continue
            out.append(OracleFile(path, st.st_size, digest, st.st_dev, st.st_ino))


def oracle_files(
    root: bytes | str | os.PathLike[str], rules: Iterable[str] = (), algo: str = "blake3"
) -> Files:
    """``oracle_walk`` as the shape the tests compare: path -> (size, digest)."""
    return {f.path: (f.size, f.digest) for f in oracle_walk(root, rules, algo)}


def replay_feed(
    entries: Iterable[object], start: Mapping[bytes, tuple[int, str | None]] | None = None
) -> Files:
    """What a consumer following the feed believes the files are, after ``entries``.

    ``entries`` are ``FeedEntry``-like objects (``kind``, ``path``, ``old_path``, ``size``,
    ``content_hash``), applied in order to ``start`` (empty: replaying from seq 0). The
    semantics are those documented for consumers: ``created``/``modified``/``moved`` carry
    the file's new size and hash, ``deleted`` removes one path, ``dir_moved`` moves every
    path below ``old_path/`` to below ``path/`` (replacing what was there).
    """
    state: Files = dict(start or {})
    for e in entries:
        kind = str(getattr(e, "kind"))  # noqa: B009 - duck-typed on purpose
        path: bytes = getattr(e, "path")  # noqa: B009
        old: bytes | None = getattr(e, "old_path")  # noqa: B009
        value = (getattr(e, "size"), getattr(e, "content_hash"))  # noqa: B009
        if kind in ("created", "modified"):
            state[path] = value
        elif kind == "deleted":
            state.pop(path, None)
        elif kind == "moved":
            assert old is not None
            state.pop(old, None)
            state[path] = value
        elif kind == "dir_moved":
            assert old is not None
            new_prefix, old_prefix = path + b"/", old + b"/"
            for p in [p for p in state if p.startswith(new_prefix)]:
                del state[p]
            for p in [p for p in state if p.startswith(old_prefix)]:
                state[new_prefix + p[len(old_prefix) :]] = state.pop(p)
        # repository_online / repository_offline carry no file
    return state
