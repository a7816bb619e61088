"""The heart of a rescan: merge the walk with the stored records, keep only what differs.

Both streams are sorted by path bytes, so the merge is one pass over each and holds
nothing but the differences. A file whose ``lstat`` key, hash algorithm and age match its
record is settled here without building a single object; everything else comes out as a
``Look`` (a file the reconciler must hash or compare), an ``Absent`` (a record with no file)
or an ``Unreadable`` (a path whose state cannot be known; its records are kept).

The key space of a tree can be cut into disjoint ranges (``plan_ranges``) whose merges
run in separate worker processes (``merge_range``), each reading its own records over its
own connection. The reconciler consumes the results in range order, which is the order
a single merge would have produced, so one code path decides and writes either way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, cast
from uuid import UUID

from fsledger.beneath import Beneath
from fsledger.decide import RACY_WINDOW_NS, LookRule, is_racy, row_settled
from fsledger.hashing import HASH_THREADS, HashOutcome, hash_at
from fsledger.ignore import IgnoreRules
from fsledger.model import (
    Digest,
    FileRecord,
    FileStat,
    RecordRow,
    RelPath,
    datetime_to_ns,
    ns_to_datetime,
)
from fsledger.store.base import Store
from fsledger.walk import (
    DIR,
    FILE,
    NOT_DIR,
    FileEntry,
    FlatEntry,
    Listing,
    Special,
    Unreadable,
    WalkCursor,
    WalkItem,
    listed_kind,
    walk,
)

__all__ = [
    "RACY_WINDOW_NS",
    "Absent",
    "Look",
    "LookRule",
    "Merge",
    "MergeItem",
    "NewFile",
    "RangeResult",
    "RANGE_STALL_FACTOR",
    "RangeTask",
    "compute_range",
    "decode_result",
    "encode_result",
    "is_racy",
    "merge_range",
    "plan_ranges",
    "warm_store",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Look:
    """A file the merge could not rule out as changed: new, different, unhashed or racy."""

    entry: FileEntry
    old: FileRecord | None
    hashed: HashOutcome | None = None
    """Its hash, when the worker that merged its range hashed it too."""


@dataclass(frozen=True, slots=True)
class Absent:
    """A record whose path the walk did not find."""

    path: RelPath


MergeItem = Look | Absent | Unreadable


class Merge:
    """One merge of a walk with the records of the same key range; iterate for the items.

    Args:
        items: the walk, in path order (``walk(flat=True)``: see ``FlatEntry``).
        rows: the stored records of the same range, in path order.
        rule: when a matching record still needs a look.
        tick: called with the count of files scanned every ``TICK`` files.
    """

    TICK = 1000

    def __init__(
        self,
        items: Iterable[WalkItem | FlatEntry],
        rows: Iterable[RecordRow],
        rule: LookRule,
        tick: Callable[[int], None] | None = None,
    ) -> None:
        self._items = items
        self._rows = rows
        self.rule = rule
        self.tick = tick
        self.scanned = 0
        """Regular files seen by the walk."""
        self.specials = 0
        """FIFOs, sockets and device nodes skipped."""

    def __iter__(self) -> Iterator[MergeItem]:
        # The loop body runs once per file of the tree: tuple indexes rather than attribute
        # names, locals rather than attributes. Row fields: 0 path, 1-4 the lstat key, 5
        # hash, 6 algorithm, 7 scanned_ns (see RecordRow).
        rows = iter(self._rows)
        row = next(rows, None)
        rule = self.rule
        algo, hashing, verify, racy = rule.algo, rule.hashing, rule.verify, rule.racy
        tick, every = self.tick, self.TICK
        settled = row_settled
        scanned = 0
        for item in self._items:
            kind = type(item)
            if kind is not tuple and kind is not FileEntry:
                if isinstance(item, Special):
                    self.specials += 1
                    continue
                assert isinstance(item, Unreadable)
                key = item.path
                while row is not None and row[0] < key:
                    yield Absent(row[0])
                    row = next(rows, None)
                yield item
                # What cannot be seen is not gone: keep its records. A directory stands in
                # the walk's order at ``key/``, after siblings such as ``key.txt`` whose
                # records come first; the root (``b""``) holds every record.
                lo = key + b"/" if key else b""
                if item.is_dir:
                    while row is not None and row[0] < lo:
                        yield Absent(row[0])
                        row = next(rows, None)
                while row is not None and (
                    row[0] == key or (item.is_dir and row[0].startswith(lo))
                ):
                    row = next(rows, None)
                continue
            key, stat = cast("FlatEntry", item)
            while row is not None and row[0] < key:
                yield Absent(row[0])
                row = next(rows, None)
            scanned += 1
            self.scanned = scanned
            if tick is not None and scanned % every == 0:
                tick(scanned)
            if row is None or row[0] != key:
                yield Look(_entry(item), None)
                continue
            old, row = row, next(rows, None)
            # The common case, settled without building an object (fsledger.decide).
            if settled(old, stat, algo, hashing, verify, racy):
                continue
            yield Look(_entry(item), old.record())
        while row is not None:
            yield Absent(row[0])
            row = next(rows, None)


def _entry(item: WalkItem | FlatEntry) -> FileEntry:
    """A walked file as a ``FileEntry``, whether the walk was flat or not."""
    if type(item) is FileEntry:
        return item
    path, stat = cast("FlatEntry", item)
    return FileEntry(path, FileStat(*stat))


# --- ranges, for merging in worker processes -----------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeTask:
    """One key range of a repository's rescan, as a worker process receives it."""

    store_url: str
    repo_id: UUID
    root: bytes
    rules: IgnoreRules
    rule: LookRule
    lo: RelPath
    hi: RelPath | None
    unreadable: Mapping[RelPath, str] | None = None
    """Directories to walk as unreadable (see ``walk``)."""
    hash_looks: bool = False
    """Hash the files to look at here, in the worker, with ``rule.algo``."""
    listings: Mapping[RelPath, Listing] | None = None
    """The entries of the big folders this range cuts, as the planner listed them (see
    ``plan_ranges`` and ``walk``), so that the range does not list all of them again."""


NewFile = tuple[RelPath, str, int, int, int, int]
"""A file without a record that the range's worker hashed: ``(path, hex, size, mtime_ns,
ctime_ns, inode)``, the ``fstat`` key its hash belongs to. Every file of a first index comes
back so, as a plain tuple: a ``Look`` holding a ``FileEntry`` and a ``HashOutcome`` cost
the worker ~10 µs a file to pickle and the reconciler ~6 µs to unpickle."""


@dataclass(slots=True)
class RangeResult:
    """What the merge of one range found: its items in order, and its counts."""

    items: list[MergeItem | NewFile] = field(default_factory=list)
    scanned: int = 0
    specials: int = 0

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Results cross from the workers an item a file: flat tuples, not dataclasses (which
        # pickle field by field through Python code). ``_unflatten`` is the inverse.
        flat: list[Any] = []
        for item in self.items:
            kind = type(item)
            if kind is tuple:
                flat.append(item)
            elif kind is Look:
                assert isinstance(item, Look)
                h = item.hashed
                flat.append(
                    (
                        item.entry.path,
                        tuple(item.entry.stat),
                        item.old,
                        None
                        if h is None
                        else (h.hex, h.size, h.mtime_ns, h.ctime_ns, h.inode, h.error, h.unsettled),
                    )
                )
            elif kind is Absent:
                assert isinstance(item, Absent)
                flat.append(item.path)
            else:
                flat.append(item)
        return (_unflatten, (flat, self.scanned, self.specials))


def _unflatten(flat: list[Any], scanned: int, specials: int) -> RangeResult:
    items: list[MergeItem | NewFile] = []
    append = items.append
    for x in flat:
        kind = type(x)
        if kind is tuple:
            if len(x) == 6:
                append(x)
            else:
                path, st, old, h = x
                append(Look(FileEntry(path, FileStat(*st)), old, HashOutcome(*h) if h else None))
        elif kind is bytes:
            append(Absent(x))
        else:
            append(x)
    return RangeResult(items, scanned, specials)


RANGE_STALL_FACTOR = 5
"""A scan fails when it makes no progress for this many hash timeouts (a read stuck on a
dead network mount cannot be interrupted), whoever computes the range. A local scan's
progress is counted per file and directory in any worker (``fsledger.hashing.beat``), not
per range completed: a big range on a loaded machine is not a stall."""

FORMAT = 2
"""Version of ``RangeResult.encode``'s JSON (what a distributed scan's ``scan_work`` row
holds); an agent of another version does not read it."""


def _s(path: bytes) -> str:
    # latin-1 maps every byte to one character: any file name survives JSON, whatever the
    # locale of the agents.
    return path.decode("latin-1")


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def encode_result(result: RangeResult) -> bytes:
    """A range's result as compact JSON (never pickle: whoever can write the database must
    not be able to make an agent run code). ``decode_result`` is the inverse."""
    out: list[Any] = []
    for item in result.items:
        kind = type(item)
        if kind is tuple:
            path, *rest = cast("NewFile", item)
            out.append(["N", _s(path), *rest])
        elif kind is Look:
            assert isinstance(item, Look)
            path, st = item.entry
            old, h = item.old, item.hashed
            out.append(
                [
                    "L",
                    _s(path),
                    *st,
                    None
                    if old is None
                    else [
                        *old.stat,
                        old.content_hash,
                        old.hash_algo,
                        datetime_to_ns(old.last_scanned),
                    ],
                    None if h is None else list(h),
                ]
            )
        elif kind is Absent:
            assert isinstance(item, Absent)
            out.append(["A", _s(item.path)])
        else:
            assert isinstance(item, Unreadable)
            out.append(["U", _s(item.path), item.is_dir, item.error])
    doc = {"v": FORMAT, "scanned": result.scanned, "specials": result.specials, "items": out}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_result(data: bytes) -> RangeResult:
    """The inverse of ``encode_result``; ``ValueError`` for another format version."""
    d = json.loads(data)
    if d.get("v") != FORMAT:
        raise ValueError(f"scan result format {d.get('v')!r} is not {FORMAT}")
    res = RangeResult(scanned=int(d["scanned"]), specials=int(d["specials"]))
    append = res.items.append
    for row in d["items"]:
        tag = row[0]
        if tag == "N":
            append((_b(row[1]), str(row[2]), *(int(x) for x in row[3:7])))  # type: ignore[arg-type]
        elif tag == "L":
            path = _b(row[1])
            entry = FileEntry(path, FileStat(row[2], row[3], row[4], row[5]))
            old = None
            if (r := row[6]) is not None:
                digest = Digest(r[5], r[4]) if r[4] is not None else None
                old = FileRecord(
                    path, FileStat(r[0], r[1], r[2], r[3]), digest, ns_to_datetime(r[6])
                )
            h = row[7]
            append(Look(entry, old, HashOutcome(*h) if h is not None else None))
        elif tag == "A":
            append(Absent(_b(row[1])))
        else:
            append(Unreadable(_b(row[1]), bool(row[2]), str(row[3])))
    return res


FILES_PER_CUT = 5000
"""A directory met while planning that holds more files than this gets cut points between
its files too (about one every ``FILES_PER_CUT``): a phone's folder of 20k photos is several
ranges, not one that a single worker walks while the other waits. Not fewer files a cut:
every range that a cut point puts in a directory lists the whole directory again."""
PLAN_DEPTH = 6
"""Levels ``plan_ranges`` descends at most, stopping as soon as it has enough cut points."""
_SAMPLE = 10
"""One name in this many is kept to place the cut points of a big folder: listing order is
not name order, but every tenth name of it is a fair sample of the names."""
_SMALL_DIR_BYTES = 16 << 10
"""A directory without subdirectories that is smaller than this (ext4: ~500 entries) holds
too few files to cut: it is not listed at all."""


def plan_ranges(
    root: bytes,
    rules: IgnoreRules,
    parts: int,
    max_depth: int = PLAN_DEPTH,
    listings: dict[RelPath, Listing] | None = None,
) -> list[RelPath]:
    """Cut points that split a tree's key space into about ``parts`` ranges.

    The points are directory keys (``a/b/``) found by listing the top levels, down to
    ``max_depth`` until there are enough of them (or a level of more directories than
    ranges, which would cost the planning more than it gains), and the paths of about every
    ``FILES_PER_CUT``-th file of a directory met meanwhile that holds more (a flat folder).
    Every path falls in exactly one range whatever the tree holds, so a stale plan costs
    balance, never correctness. Returns the sorted cut points ``c1 < c2 < ...``: the ranges
    are ``[b"", c1), [c1, c2), ..., [cn, None)``.

    ``listings``, if given, receives the entries of each big folder listed here (one of
    more than ``FILES_PER_CUT`` files, or a big one with subfolders: up to ``LISTED_MAX``
    entries in all): ``listing_slices`` hands each range
    its share, and the walk of a range takes it instead of listing the whole folder again
    (a folder of 100k files cut in 20 ranges was listed 20 times).
    """
    level: list[RelPath] = [b""]
    dir_keys: list[RelPath] = []
    file_keys: list[RelPath] = []
    try:
        tree = Beneath(root)
    except OSError:
        return []  # the walk reports it
    with tree:
        for _depth in range(max_depth):
            below: list[RelPath] = []
            for rel in level:
                below += _subdirs(tree, rel, rules, file_keys, listings)
            if not below:
                break
            level = below
            dir_keys = [rel + b"/" for rel in level]
            if len(dir_keys) + len(file_keys) >= 4 * parts or len(level) > max(64, parts):
                break
    keys = sorted(dir_keys + file_keys)
    if len(keys) < 2:
        return []
    step = len(keys) / parts
    cuts = sorted({keys[int(i * step)] for i in range(1, parts)})
    return [c for c in cuts if c]


def _subdirs(
    tree: Beneath,
    rel: RelPath,
    rules: IgnoreRules,
    file_keys: list[RelPath],
    listings: dict[RelPath, Listing] | None = None,
) -> list[RelPath]:
    """The directories in ``rel`` that are not ignored; none if it cannot be listed (a cut
    point is only a hint: the walk reports what it cannot list). Cut points between its
    files are added to ``file_keys`` when it holds more than ``FILES_PER_CUT`` of them."""
    out: list[RelPath] = []
    sample: list[str] = []
    files = 0
    names: list[str] | None = None
    typed: list[tuple[str, int | None]] | None = None  # every entry, with its type
    keep = listings is not None and sum(map(len, listings.values())) < LISTED_MAX
    try:
        fd = tree.open_dir(rel)
    except OSError:
        return out
    try:
        st = os.fstat(fd)
        if st.st_nlink == 2:
            # No subdirectory (ext4, XFS and tmpfs count them in the link count; other
            # filesystems say 1 and are listed): only the names matter, if there are many.
            if st.st_size < _SMALL_DIR_BYTES:
                return out
            names = os.listdir(fd)
            files, sample = len(names), names[::_SAMPLE]
        else:
            typed = [] if keep and st.st_size >= _SMALL_DIR_BYTES else None
            with os.scandir(fd) as it:
                for entry in it:
                    kind = listed_kind(entry)
                    if typed is not None:
                        typed.append((entry.name, kind))
                    if kind == DIR:
                        name = os.fsencode(entry.name)
                        child = rel + b"/" + name if rel else name
                        if not rules.ignores_name(name, child):
                            out.append(child)
                    else:
                        if files % _SAMPLE == 0:
                            sample.append(entry.name)
                        files += 1
    except OSError:
        return []
    finally:
        os.close(fd)
    listing = None
    if keep and listings is not None and (typed is not None or files > FILES_PER_CUT):
        # A big folder: whatever cut points fall in it (its subfolders', or its files'),
        # every range they make lists it; the ranges take their slices of this listing.
        listing = listings[rel] = _listed(names, typed)
    if files > FILES_PER_CUT:
        # Sorted as the walk sorts them (by their bytes); an ignored name is as good a
        # boundary as any other.
        prefix = rel + b"/" if rel else b""
        if listing is not None:
            every = max(1, len(listing.keys) * FILES_PER_CUT // files)
            file_keys += [prefix + k for k in listing.keys[every::every] if k[-1:] != b"/"]
        else:
            names_b = sorted(os.fsencode(n) for n in sample)
            every = FILES_PER_CUT // _SAMPLE
            file_keys += [prefix + n for n in names_b[every::every]]
    return out


LISTED_MAX = 500_000
"""Entries ``plan_ranges`` keeps for the ranges' walks, at most (~60 bytes each)."""


def _listed(names: list[str] | None, typed: list[tuple[str, int | None]] | None) -> Listing:
    """A planner's listing as the walk takes it (``Listing``)."""
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    if typed is None:  # a folder without subdirectories, listed without types
        return Listing(sorted([n.encode(enc, errors) for n in names or ()]), {}, NOT_DIR)
    keys: list[bytes] = []
    kinds: dict[bytes, int] = {}
    for n, kind in typed:
        if kind is None:
            continue  # a symlink: never listed
        key = n.encode(enc, errors)
        if kind != FILE:
            if kind == DIR:
                key += b"/"
            kinds[key] = kind
        keys.append(key)
    keys.sort()
    return Listing(keys, kinds, FILE)


def listing_slices(
    listings: Mapping[RelPath, Listing], lo: RelPath, hi: RelPath | None
) -> dict[RelPath, Listing] | None:
    """The entries of the planner's listings that the range [lo, hi) needs: those of the
    folders its bounds cut (a bound cuts each folder above it), one entry more on each
    side of the range (the walk filters them exactly)."""
    out: dict[RelPath, Listing] = {}
    for bound in (lo, hi):
        if not bound:
            continue
        parts = bound.rstrip(b"/").split(b"/")
        for depth in range(len(parts)):
            folder = b"/".join(parts[:depth])
            entries = listings.get(folder)
            if entries is None or folder in out:
                continue
            prefix = folder + b"/" if folder else b""
            keys = entries.keys
            first, last = 0, len(keys)
            if lo.startswith(prefix):
                first = max(0, bisect_left(keys, _entry_key(lo, prefix)) - 1)
            if hi is not None and hi.startswith(prefix):
                last = bisect_left(keys, _entry_key(hi, prefix)) + 1
            part = keys[first:last]
            kinds = entries.kinds
            if kinds:
                # From the slice, not the whole folder: 255 ranges of 20k album folders
                # filtered 20k kinds each (0.4-0.8 s before the first range started).
                kinds = {k: kinds[k] for k in part if k in kinds}
            out[folder] = Listing(part, kinds, entries.usual)
    return out or None


def _entry_key(bound: RelPath, prefix: RelPath) -> bytes:
    """The key of the entry of the folder ``prefix`` that ``bound`` is at or below
    (``name``, or ``name/`` for a path below a directory of that folder)."""
    head, sep, _rest = bound[len(prefix) :].partition(b"/")
    return head + sep


_worker_stores: dict[str, Store] = {}


def _store_for(url: str) -> Store:
    """A worker process's own connection, kept for the next range of the same store (on
    PostgreSQL one plain connection: see ``open_worker_store``)."""
    store = _worker_stores.get(url)
    if store is None:
        from fsledger.store import open_worker_store

        store = _worker_stores[url] = open_worker_store(url)
    return store


def warm_store(url: str) -> None:
    """Open a worker process's connection ahead of its first range (see ``_store_for``).

    Called as a scan's workers start, while the process that started them still opens its
    own store and plans the ranges: the connection (and the server's new backend) costs the
    first range nothing then. PostgreSQL only: opening a SQLite store migrates it, which
    the starting process does at the same moment. A failure is left for the first range
    to meet and report.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        return
    try:
        _store_for(url)
    except Exception:
        log.debug("opening a worker's store ahead of its first range", exc_info=True)


def merge_range(task: RangeTask) -> RangeResult:
    """``compute_range`` in a scan's worker process, over the worker's own connection.

    A store failure drops the cached connection (the next range opens a new one) and is
    raised to the reconciler, which fails the scan as it would in-process.
    """
    store = _store_for(task.store_url)
    try:
        return compute_range(task, store)
    except Exception:
        _worker_stores.pop(task.store_url, None)
        try:
            store.close()
        except Exception:
            log.debug("closing a failed worker store", exc_info=True)
        raise


def compute_range(task: RangeTask, store: Store) -> RangeResult:
    """Merge one key range: walk it, read its records, return the differences, in order.

    The one computation of a range, whoever runs it: a local scan's worker processes
    (``merge_range``) and the agents of a distributed scan (``fsledger.distscan``).

    With ``task.hash_looks``, the files to look at are hashed as the walk meets them, by
    name relative to the descriptor of the directory the walk listed them in
    (``WalkCursor``), with the walk's ``lstat`` key as the identity the hash must belong to
    (``hash_at(expect=...)``): a file without a record comes back as a ``NewFile`` tuple,
    anything else as a ``Look`` carrying its ``HashOutcome``.
    """
    cursor = WalkCursor()
    items_walked = walk(
        task.root,
        task.rules,
        lo=task.lo,
        hi=task.hi,
        unreadable=task.unreadable,
        flat=True,
        cursor=cursor,
        listings=task.listings,
    )
    rows = iter(store.iter_record_rows(task.repo_id, task.lo, task.hi))
    first = next(rows, None)
    if first is None and task.hash_looks:
        return _hash_new_range(items_walked, cursor, task.rule.algo)
    merge = Merge(items_walked, rows if first is None else chain((first,), rows), task.rule)
    items: list[MergeItem | NewFile] = []
    append = items.append
    algo = task.rule.algo
    for item in merge:
        if type(item) is not Look or not task.hash_looks:
            append(item)
            continue
        assert isinstance(item, Look)
        # The walk stands at this file: the merge yields a Look as the walk yields it.
        entry = item.entry
        name = entry.path.rpartition(b"/")[2]
        out = hash_at(cursor.fd, name, algo, HASH_THREADS, expect=entry.stat)
        if item.old is None and out.hex is not None:
            append((entry.path, out.hex, out.size, out.mtime_ns, out.ctime_ns, out.inode))
        else:
            append(Look(entry, item.old, out))
    return RangeResult(items, merge.scanned, merge.specials)


def _hash_new_range(
    walked: Iterable[WalkItem | FlatEntry], cursor: WalkCursor, algo: str
) -> RangeResult:
    """``merge_range`` of a range without records (every range of a first index): what
    ``Merge`` would yield with no rows (every file a ``Look``, unreadable directories as
    they are), hashed, without building a ``Look`` for each file."""
    result = RangeResult()
    append = result.items.append
    scanned = specials = 0
    for item in walked:
        kind = type(item)
        if kind is tuple or kind is FileEntry:
            path, stat = cast("FlatEntry", item)
            scanned += 1
            out = hash_at(cursor.fd, path.rpartition(b"/")[2], algo, HASH_THREADS, expect=stat)
            if out.hex is not None:
                append((path, out.hex, out.size, out.mtime_ns, out.ctime_ns, out.inode))
            else:
                append(Look(_entry(item), None, out))
        elif isinstance(item, Special):
            specials += 1
        else:
            assert isinstance(item, Unreadable)
            append(item)
    result.scanned, result.specials = scanned, specials
    return result
