"""The directory walker: ``os.scandir`` + ``lstat``, bytes paths, no hashing, no database.

It yields regular files in the byte order of their relative paths, which is the
order both stores sort ``file_path`` in (SQLite compares BLOBs with memcmp,
PostgreSQL compares bytea bytewise), so reconciliation is a merge of two sorted
streams and memory stays bounded by the depth and width of the tree, not its size.

Why the sort key of a directory is ``name + b"/"``: every path below ``a`` starts
with ``a/``, and ``a.txt`` (``.`` is 0x2E) sorts before ``a/x`` (``/`` is 0x2F);
sorting siblings by that key makes a depth-first walk come out in full-path order.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fsledger.ignore import IgnoreRules
from fsledger.model import FileStat, RelPath

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A regular file found on disk."""

    path: RelPath
    stat: FileStat


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A path whose state cannot be known right now (EACCES, EIO, ESTALE, ENOTCONN, ...).

    Not an absence: records at ``path`` (and below it, for a directory) must be kept.
    """

    path: RelPath
    is_dir: bool
    error: str


@dataclass(frozen=True, slots=True)
class Special:
    """A FIFO, socket or device node: skipped, counted."""

    path: RelPath


WalkItem = FileEntry | Unreadable | Special

# A directory that vanished (ENOENT) or became a file (ENOTDIR) between listing and
# descending is truly gone; every other error means "cannot know".
_GONE = {errno.ENOENT, errno.ENOTDIR}


def _describe(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})"


def walk(
    root: bytes,
    rules: IgnoreRules,
    start: RelPath = b"",
    unreadable: Mapping[RelPath, str] | None = None,
) -> Iterator[WalkItem]:
    """Walk ``root`` (or its subdirectory ``start``) and yield what is found, in path byte order.

    Symlinks are never followed nor yielded; ignored names are pruned with their
    subtrees. Each file is ``lstat``-ed as it is yielded, not when its directory is
    listed, to keep the window between look and record short.

    ``unreadable`` maps directories to a reason they cannot be trusted (a filesystem that
    was mounted there and is not now: see ``fsledger.mounts``). Each is yielded as
    ``Unreadable`` in its place, whether or not it exists, and is not listed. The cost is
    one lookup per directory when the map is not empty, none otherwise.
    """
    # Stack of per-directory lists of (key, relpath, kind), reversed so pop() is the next.
    stack: list[list[tuple[bytes, RelPath, int]]] = []
    if unreadable and start in unreadable:
        yield Unreadable(start, True, unreadable[start])
        return
    listed = _list_dir(root, start, rules)
    if isinstance(listed, Unreadable):
        yield listed
        return
    # Unreadable directories by parent, to add those the listings lack.
    missing: dict[RelPath, list[RelPath]] = {}
    for path in unreadable or ():
        missing.setdefault(path.rpartition(b"/")[0], []).append(path)
    if start in missing:
        listed = _with_missing(listed, missing[start])
    stack.append(listed)
    while stack:
        top = stack[-1]
        if not top:
            stack.pop()
            continue
        _key, rel, kind = top.pop()
        if kind == _DIR:
            if unreadable and rel in unreadable:
                yield Unreadable(rel, True, unreadable[rel])
                continue
            listed = _list_dir(root, rel, rules)
            if isinstance(listed, Unreadable):
                yield listed
                continue
            if missing and rel in missing:
                listed = _with_missing(listed, missing[rel])
            if listed:
                stack.append(listed)
            continue
        if kind == _SPECIAL:
            yield Special(rel)
            continue
        try:
            st = os.lstat(root + b"/" + rel)
        except OSError as exc:
            if exc.errno not in _GONE:
                yield Unreadable(rel, False, _describe(exc))
            continue
        if stat_mod.S_ISREG(st.st_mode):
            yield FileEntry(rel, FileStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        # Anything else took the file's place since the listing: the file is gone, and what
        # replaced it is seen by the watcher or the next pass (walking a directory here would
        # break the sort order the merge relies on).


_DIR, _FILE, _SPECIAL = 0, 1, 2


def _with_missing(
    listed: list[tuple[bytes, RelPath, int]], paths: list[RelPath]
) -> list[tuple[bytes, RelPath, int]]:
    """Add the unreadable directories ``paths`` (children of the directory ``listed`` lists)
    that the listing lacks: a mount point removed along with its mount still has records
    below it to keep."""
    have = {child for _k, child, _kind in listed}
    extra = [(p.rpartition(b"/")[2] + b"/", p, _DIR) for p in paths if p not in have]
    if not extra:
        return listed
    return sorted([*listed, *extra], reverse=True)


def _list_dir(
    root: bytes, rel: RelPath, rules: IgnoreRules
) -> list[tuple[bytes, RelPath, int]] | Unreadable:
    """List one directory, sorted for the walk (reversed: pop() gives the smallest key)."""
    full = root + b"/" + rel if rel else root
    out: list[tuple[bytes, RelPath, int]] = []
    prefix = rel + b"/" if rel else b""
    ignores = rules.ignores_name
    try:
        with os.scandir(full) as it:
            for entry in it:
                name = entry.name
                child = prefix + name
                if ignores(name, child):
                    continue
                # DirEntry answers from d_type and falls back to lstat where d_type is unknown.
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        out.append((name + b"/", child, _DIR))
                    elif entry.is_file(follow_symlinks=False):
                        out.append((name, child, _FILE))
                    else:
                        out.append((name, child, _SPECIAL))
                except OSError:
                    # Kind unknown: let the walk's lstat of it decide (or report it).
                    out.append((name, child, _FILE))
    except OSError as exc:
        if exc.errno in _GONE and rel:
            return []
        return Unreadable(rel, True, _describe(exc))
    out.sort(reverse=True)
    return out
