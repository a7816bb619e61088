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
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

from fsledger.beneath import resolve_dir
from fsledger.ignore import IgnoreRules
from fsledger.model import FileStat, RelPath

log = logging.getLogger(__name__)


class FileEntry(NamedTuple):
    """A regular file found on disk.

    A named tuple, not a frozen dataclass: the walk builds one a file, and a rescan of a
    million files should not spend a second on constructors.
    """

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

FlatEntry = tuple[RelPath, tuple[int, int, int, int]]
"""A regular file as ``walk(flat=True)`` yields it: a ``FileEntry``'s fields in plain tuples,
which cost a third of its two named tuples to build. The merge of a rescan, which settles
almost every file with one comparison, makes a ``FileEntry`` only for those that differ."""

# A directory that vanished (ENOENT) or became a file (ENOTDIR) between listing and
# descending is truly gone; every other error means "cannot know".
_GONE = {errno.ENOENT, errno.ENOTDIR}


def _describe(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})"


@overload
def walk(
    root: bytes,
    rules: IgnoreRules,
    start: RelPath = b"",
    *,
    lo: RelPath = b"",
    hi: RelPath | None = None,
    unreadable: Mapping[RelPath, str] | None = None,
    flat: Literal[False] = False,
    cursor: WalkCursor | None = None,
) -> Iterator[WalkItem]: ...


@overload
def walk(
    root: bytes,
    rules: IgnoreRules,
    start: RelPath = b"",
    *,
    lo: RelPath = b"",
    hi: RelPath | None = None,
    unreadable: Mapping[RelPath, str] | None = None,
    flat: Literal[True],
    cursor: WalkCursor | None = None,
    listings: Mapping[RelPath, Listing] | None = None,
) -> Iterator[WalkItem | FlatEntry]: ...


def walk(
    root: bytes,
    rules: IgnoreRules,
    start: RelPath = b"",
    *,
    lo: RelPath = b"",
    hi: RelPath | None = None,
    unreadable: Mapping[RelPath, str] | None = None,
    flat: bool = False,
    cursor: WalkCursor | None = None,
    listings: Mapping[RelPath, Listing] | None = None,
) -> Iterator[WalkItem | FlatEntry]:
    """Walk ``root`` (or its subdirectory ``start``) and yield what is found, in path byte order.

    With ``lo``/``hi``, only paths with ``lo <= path < hi`` are yielded, and subtrees wholly
    outside that range are not entered: disjoint ranges of one tree can be walked by
    separate processes (see ``fsledger.merge``).

    Symlinks are never followed nor yielded; ignored names are pruned with their
    subtrees. Each file is ``lstat``-ed as it is yielded, not when its directory is
    listed, to keep the window between look and record short.

    Files are ``lstat``-ed relative to an open descriptor of their directory, as ``find``
    does: the kernel resolves one name instead of the whole path, which halves the cost of
    the system calls on a deep photo tree. Directories are opened with ``O_NOFOLLOW``, so a
    directory swapped for a symlink mid-walk is not followed either; ``start`` is resolved
    below the root without following symlinks (``fsledger.beneath``).

    ``unreadable`` maps directories to a reason they cannot be trusted (a filesystem that
    was mounted there and is not now: see ``fsledger.mounts``). Each is yielded as
    ``Unreadable`` in its place, whether or not it exists, and is not listed. The cost is
    one lookup per directory when the map is not empty, none otherwise.

    With ``flat``, regular files come as ``FlatEntry`` tuples instead of ``FileEntry``.
    With ``cursor``, the descriptor of each file's directory is left there (``WalkCursor``).

    ``listings`` gives the entries of some directories, as their listing would (the
    planner's: ``fsledger.merge.plan_ranges`` lists a big folder once, and each range that
    cuts it gets its own slice instead of listing all of it again); they are opened as any
    other, and each entry is ``lstat``-ed as it is yielded, so only which names there are
    comes from that earlier listing (a file created since is seen by the watcher or the
    next pass, as one created after any directory's listing is).
    """
    # Stack of [directory fd, its entries as (key, relpath, name, kind), its relpath], each
    # list reversed so pop() gives the next entry. Every directory is opened relative to its
    # parent's descriptor with O_NOFOLLOW, and every file lstat-ed relative to its
    # directory's: no path string below the root is ever resolved, so a symlink that
    # replaced a directory is never followed, and depth has no limit (PATH_MAX bounds a
    # path string, not a chain of descriptors). Past MAX_OPEN_DIRS levels a parent's
    # descriptor is closed while the walk is below it (fd -1) and resolved again from the
    # root, without symlinks, when the walk comes back to it.
    stack: list[list[Any]] = []
    if unreadable and start in unreadable:
        yield Unreadable(start, True, unreadable[start])
        return
    # Unreadable directories by parent, to add those the listings lack.
    missing: dict[RelPath, list[RelPath]] = {}
    for path in unreadable or ():
        missing.setdefault(path.rpartition(b"/")[0], []).append(path)
    try:
        root_fd = os.open(root, _ROOT_FLAGS)
    except OSError as exc:
        yield Unreadable(start, True, _describe(exc))
        return
    try:
        bounds = (lo, hi) if lo or hi is not None else None
        if start:
            parent, _sep, name = start.rpartition(b"/")
            try:
                parent_fd = resolve_dir(root_fd, parent) if parent else root_fd
            except OSError as exc:
                if exc.errno not in _GONE:
                    yield Unreadable(start, True, _describe(exc))
                return
            try:
                listed = _list_dir(start, rules, parent_fd, name, bounds, listings)
            finally:
                if parent_fd != root_fd:
                    os.close(parent_fd)
        else:
            listed = _list_dir(start, rules, root_fd, b".", bounds, listings)
        if isinstance(listed, Unreadable):
            yield listed
            return
        if start in missing:
            listed = _with_missing(listed, missing[start], bounds)
        stack.append([*listed, start])
        while stack:
            level = stack[-1]
            fd, top = level[0], level[1]
            if not top:
                stack.pop()
                if fd >= 0:
                    os.close(fd)
                continue
            if fd < 0:
                try:
                    fd = level[0] = resolve_dir(root_fd, level[2])
                except OSError as exc:
                    # It was renamed or removed while the walk was below it: what it still
                    # lists is no longer there (the watcher or the next pass sees where).
                    if exc.errno not in _GONE:
                        yield Unreadable(level[2], True, _describe(exc))
                    stack.pop()
                    continue
            _key, rel, name, kind = top.pop()
            if kind in (_FILE, _NOT_DIR):
                try:
                    st = os.lstat(name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in _GONE:
                        yield Unreadable(rel, False, _describe(exc))
                    continue
                if kind == _NOT_DIR and not stat_mod.S_ISREG(st.st_mode):
                    # Listed without its type: what its d_type would have said.
                    if not (stat_mod.S_ISLNK(st.st_mode) or stat_mod.S_ISDIR(st.st_mode)):
                        yield Special(rel)
                    continue
                if stat_mod.S_ISREG(st.st_mode):
                    if cursor is not None:
                        cursor.fd = fd
                    if flat:
                        yield (rel, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
                    else:
                        yield FileEntry(
                            rel, FileStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                        )
                # Anything else took the file's place since the listing: the file is gone, and
                # what replaced it is seen by the watcher or the next pass (walking a directory
                # here would break the sort order the merge relies on).
            elif kind == _DIR:
                if unreadable and rel in unreadable:
                    yield Unreadable(rel, True, unreadable[rel])
                    continue
                listed = _list_dir(rel, rules, fd, name, bounds, listings)
                if isinstance(listed, Unreadable):
                    yield listed
                    continue
                if missing and rel in missing:
                    listed = _with_missing(listed, missing[rel], bounds)
                if listed[1]:
                    if len(stack) >= MAX_OPEN_DIRS:
                        os.close(fd)
                        level[0] = -1
                    stack.append([*listed, rel])
                elif listed[0] >= 0:
                    os.close(listed[0])
            else:
                yield Special(rel)
    finally:
        # An abandoned walk (the consumer stopped early, or raised) closes what it opened.
        for level in stack:
            if level[0] >= 0:
                os.close(level[0])
        os.close(root_fd)


class WalkCursor:
    """Where a walk is: ``fd`` is the descriptor of the directory holding the file it
    yielded last, valid until the walk is resumed. A consumer that hashes each file as it
    comes (a scan's range worker) opens it by name relative to that descriptor: one
    component to resolve, and the directory the walk saw, not whatever a path now leads to.
    """

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = -1


_DIR, _FILE, _SPECIAL, _NOT_DIR = 0, 1, 2, 3
"""Kinds of listed entries; ``_NOT_DIR``: not a directory, its type unknown until its
``lstat`` (a planner's ``os.listdir`` of a folder without subdirectories)."""
DIR, FILE, NOT_DIR = _DIR, _FILE, _NOT_DIR


class Listing(NamedTuple):
    """A directory's entries as a planner listed them (see ``walk``)."""

    keys: list[bytes]
    """The entries' keys in the walk's order: the name, ``name + b"/"`` for a directory
    (symlinks are left out, as a listing leaves them)."""
    kinds: dict[bytes, int]
    """The kind of each key that is not ``usual``."""
    usual: int
    """``FILE``, or ``NOT_DIR`` when the entries were listed without their types."""


listed_hook: Callable[[], None] | None = None
"""Called after each directory is listed: in a scan's worker processes, the pool's progress
clock (``fsledger.hashing.beat``), so that a range of thousands of settled files counts as
progress while it is walked."""
MAX_OPEN_DIRS = 64
"""Directory descriptors a walk keeps open at once (one per level of depth); deeper levels
close their parent's while below it, so a pathological depth cannot exhaust the process's
descriptors."""

_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
"""What os.fsencode does, without its Python-level call per name."""
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
"""The root itself is the operator's: it may be a symlink (``/photos -> /mnt/nas``)."""
# ELOOP: O_NOFOLLOW met a symlink where the directory was; it is gone, as a directory.
_GONE_DIR = _GONE | {errno.ELOOP}


def _with_missing(
    listed: tuple[int, list[tuple[bytes, RelPath, bytes, int]]],
    paths: list[RelPath],
    bounds: tuple[RelPath, RelPath | None] | None,
) -> tuple[int, list[tuple[bytes, RelPath, bytes, int]]]:
    """Add the unreadable directories ``paths`` (children of the directory ``listed`` lists)
    that the listing lacks: a mount point removed along with its mount still has records
    below it to keep."""
    fd, entries = listed
    have = {child for _k, child, _n, _kind in entries}
    extra = []
    for p in paths:
        name = p.rpartition(b"/")[2]
        if p not in have and (bounds is None or _within(p, True, *bounds)):
            extra.append((name + b"/", p, name, _DIR))
    if not extra:
        return listed
    return (fd, sorted([*entries, *extra], reverse=True))


def _list_dir(
    rel: RelPath,
    rules: IgnoreRules,
    parent_fd: int,
    name: bytes,
    bounds: tuple[RelPath, RelPath | None] | None = None,
    listings: Mapping[RelPath, Listing] | None = None,
) -> tuple[int, list[tuple[bytes, RelPath, bytes, int]]] | Unreadable:
    """Open and list one directory, sorted for the walk (reversed: pop() gives the smallest
    key). ``name`` is one component relative to ``parent_fd`` (``.`` for the root). Its
    entries come from ``listings`` instead if it has them (see ``walk``).

    Returns the directory's open descriptor with the entries; a directory that is gone (or
    became a symlink) since its parent was listed lists as empty.
    """
    out: list[tuple[bytes, RelPath, bytes, int]] = []
    prefix = rel + b"/" if rel else b""
    ignores = rules.ignores_name
    # A directory a range boundary cuts (a big folder cut between its files): entries that
    # are out of the range as a file and as a directory alike are dropped before any other
    # work, since every range the cuts make in it lists it whole.
    cut = bounds is not None and not _holds_all_below(rel, *bounds)
    lo, hi = bounds if bounds is not None and cut else (b"", None)
    fd = -1
    given = listings.get(rel) if listings else None
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
        if given is not None:
            kinds, usual = given.kinds, given.usual
            for key in given.keys:
                kind = kinds.get(key, usual) if kinds else usual
                bname = key[:-1] if kind == _DIR else key
                child = prefix + bname
                if cut and (child + b"0" <= lo or (hi is not None and child >= hi)):
                    continue
                if not ignores(bname, child):
                    out.append((key, child, bname, kind))
        else:
            # scandir of a descriptor yields str names, decoded as os.fsdecode does, so encoding
            # them back the same way gives the exact bytes; d_type answers is_file/is_dir free.
            with os.scandir(fd) as it:
                for entry in it:
                    bname = entry.name.encode(_FS_ENCODING, _FS_ERRORS)
                    child = prefix + bname
                    if cut and (child + b"0" <= lo or (hi is not None and child >= hi)):
                        continue
                    if ignores(bname, child):
                        continue
                    what = listed_kind(entry)
                    if what is not None:
                        out.append((bname + b"/" if what == _DIR else bname, child, bname, what))
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        if exc.errno in _GONE_DIR and rel:
            return (-1, [])
        return Unreadable(rel, True, _describe(exc))
    if cut:
        out = [e for e in out if _within(e[1], e[3] == _DIR, lo, hi)]
    out.sort(reverse=True)
    if listed_hook is not None:
        listed_hook()
    return (fd, out)


def listed_kind(entry: os.DirEntry[str]) -> int | None:
    """How a walk takes a directory entry: ``_FILE``, ``_DIR``, ``_SPECIAL``, or None (a
    symlink: never followed nor yielded). ``DirEntry`` answers from d_type, and falls back
    to ``lstat`` where d_type is unknown; a kind it cannot tell is ``_FILE``, which the
    walk's own ``lstat`` of it settles (or reports)."""
    try:
        # Most entries are files: one question settles them (a symlink is neither a file
        # nor a directory without following it).
        if entry.is_file(follow_symlinks=False):
            return _FILE
        if entry.is_dir(follow_symlinks=False):
            return _DIR
        return None if entry.is_symlink() else _SPECIAL
    except OSError:
        return _FILE


def _holds_all_below(rel: RelPath, lo: RelPath, hi: RelPath | None) -> bool:
    """Whether [lo, hi) holds every path below directory ``rel`` (the root: ``b""``), so its
    entries need no filtering: true of all but the few directories a range boundary cuts."""
    if not rel:
        return not lo and hi is None
    return lo <= rel + b"/" and (hi is None or rel + b"0" <= hi)


def _within(rel: RelPath, is_dir: bool, lo: RelPath, hi: RelPath | None) -> bool:
    """Whether a file at ``rel``, or any path below a directory at ``rel``, is in [lo, hi)."""
    if not is_dir:
        return lo <= rel and (hi is None or rel < hi)
    # Every path below directory ``rel`` lies in [rel + "/", rel + "0"): "0" follows "/".
    return rel + b"0" > lo and (hi is None or rel + b"/" < hi)
