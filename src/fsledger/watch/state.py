"""The watcher's bookkeeping per repository: its watched directories and what waits to be
looked at.

Events are hints. What they leave behind is a small amount of state per repository:

* ``Dirty`` entries, one per path (coalescing any number of events into one look at the
  disk), keyed by ``(wd of the parent directory, name)`` rather than by path: a watch
  descriptor follows its directory's inode, so an entry keeps pointing at the right file
  when an ancestor directory is renamed before the entry is processed;
* directory renames inside the repository (``DirMove``), applied in event order as pure
  path rewrites of the stored records;
* file renames (``FileMove``), checked at processing time (same inode, size and mtime as
  the old record: the record follows the file and keeps its hash);
* directory checks: a subtree to make true by a (prefix) reconciliation, for directories
  that were created, moved in, deleted or moved out, or whose watch was lost.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from uuid import UUID

from fsledger.ignore import IgnoreRules
from fsledger.model import Digest, FileStat, RelPath, Repository
from fsledger.writer import RepoWriter

Key = tuple[int, bytes]
"""``(wd of the parent directory, name)``: a path that survives renames of its ancestors."""


def join(parent: RelPath, name: bytes) -> RelPath:
    return parent + b"/" + name if parent else name


def parent_of(path: RelPath) -> RelPath:
    return path.rpartition(b"/")[0]


def under(path: RelPath, top: RelPath) -> bool:
    """Whether ``path`` is ``top`` or below it (``b""`` is the root: everything is below it)."""
    return not top or path == top or path.startswith(top + b"/")


def below(path: RelPath, top: RelPath) -> bool:
    """Whether ``path`` is strictly below directory ``top`` (what a prefix scan covers)."""
    return not top or path.startswith(top + b"/")


def moved(path: RelPath, old: RelPath, new: RelPath) -> RelPath:
    """``path`` after directory ``old`` was renamed to ``new``."""
    return new + path[len(old) :] if old and under(path, old) else path


def swapped(path: RelPath, a: RelPath, b: RelPath) -> RelPath:
    """``path`` after directories ``a`` and ``b`` exchanged names."""
    if under(path, a):
        return b + path[len(a) :]
    if under(path, b):
        return a + path[len(b) :]
    return path


def related(a: RelPath, b: RelPath) -> bool:
    """Whether one path is the other or an ancestor of it."""
    return under(a, b) or under(b, a)


class DirIndex:
    """The watched directories of one repository: path -> wd, with a children index so that
    a subtree (to unwatch, or to rewrite after a rename) costs its own size, not the
    repository's.

    Every ancestor of an indexed path is linked into ``children``, watched or not, so a
    subtree whose top could not be watched (it vanished mid-walk) is still found.
    """

    def __init__(self) -> None:
        self.by_path: dict[RelPath, int] = {}
        self.children: dict[RelPath, set[RelPath]] = {}

    def __len__(self) -> int:
        return len(self.by_path)

    def add(self, path: RelPath, wd: int) -> None:
        self.by_path[path] = wd
        child = path
        while child:
            parent = parent_of(child)
            kids = self.children.setdefault(parent, set())
            if child in kids:
                break
            kids.add(child)
            child = parent

    def subtree(self, top: RelPath) -> list[RelPath]:
        """``top`` and every indexed path below it."""
        out: list[RelPath] = []
        stack = [top]
        while stack:
            path = stack.pop()
            out.append(path)
            stack.extend(self.children.get(path, ()))
        return out

    def subtree_wds(self, top: RelPath) -> list[tuple[RelPath, int]]:
        return [(p, self.by_path[p]) for p in self.subtree(top) if p in self.by_path]

    def remove_subtree(self, top: RelPath) -> list[tuple[RelPath, int]]:
        """Forget ``top`` and everything below it; returns the watched ``(path, wd)`` pairs."""
        removed: list[tuple[RelPath, int]] = []
        for path in self.subtree(top):
            self.children.pop(path, None)
            wd = self.by_path.pop(path, None)
            if wd is not None:
                removed.append((path, wd))
        child = top
        while child:
            parent = parent_of(child)
            kids = self.children.get(parent)
            if kids is None:
                break
            kids.discard(child)
            if kids:
                break
            del self.children[parent]
            if parent in self.by_path:
                break  # still watched: it stays linked to its own parent
            child = parent
        return removed

    def discard(self, path: RelPath, wd: int) -> None:
        """Forget one watch (not its subtree), if ``path`` still maps to ``wd``."""
        if self.by_path.get(path) == wd:
            del self.by_path[path]


@dataclass(slots=True)
class Dirty:
    """A path some event touched: look at it once it is due.

    ``due`` is when the path is considered settled: a few ms after ``IN_CLOSE_WRITE``,
    a move or a delete, the debounce after anything that may be a write in progress.
    """

    due: float
    content: bool = False
    """An event said the content may have changed (IN_MODIFY, IN_CLOSE_WRITE)."""
    writing: bool = False
    """Seen IN_CREATE or IN_MODIFY without an IN_CLOSE_WRITE since."""
    closed_at: float | None = None
    """When the earliest IN_CLOSE_WRITE not yet written was read (monotonic): latency."""
    open_since: float | None = None
    """When the first IN_MODIFY not followed by an IN_CLOSE_WRITE (or a delete) was read
    (monotonic): a writer may still hold the file open (``SettleRule.held``)."""
    inode: int | None = None
    """The inode of the file this name was when its first event (IN_CREATE, IN_MODIFY) was
    read, if it had other links then: a write through one name changes every other, and
    inotify names only the one written. The records with this inode (the other names) are
    looked at with this one, even when the name is gone or replaced by then (a short-lived
    link written through), which leaves no record to find them by."""


@dataclass(frozen=True, slots=True)
class DirMove:
    """A directory renamed inside the repository, from ``old`` to ``new`` (as they were when
    the rename was read at ``read_at``); ``wd`` is the directory's watch, which follows it
    further."""

    wd: int | None
    old: RelPath
    new: RelPath
    read_at: float = 0.0
    exchange: bool = False
    """The second half of ``renameat2(RENAME_EXCHANGE)``: this directory took the place
    of the one the rename before it moved here (it is written with it, as one swap)."""


@dataclass(slots=True)
class FileMove:
    src: Key
    dst: Key
    retried: bool = False
    """Put back once already because its file had moved on again (see ``Applier``)."""


@dataclass(slots=True)
class Pending:
    """Everything one repository has waiting."""

    dirty: dict[Key, Dirty] = field(default_factory=dict)
    dir_moves: list[DirMove] = field(default_factory=list)
    file_moves: list[FileMove] = field(default_factory=list)
    check_wds: dict[int, float] = field(default_factory=dict)
    """Directories to reconcile, by watch (resolved to their path when processed)."""
    check_paths: dict[RelPath, float] = field(default_factory=dict)
    """Directories to reconcile or clear, by path (those no longer watched)."""
    links: dict[Key, Dirty] = field(default_factory=dict)
    """Ignored names an event touched: never recorded themselves, but one may be another
    name (a hard link) of a recorded file, whose content or ctime the event changed while
    inotify names only the ignored name. Looked up by inode when due."""

    def __bool__(self) -> bool:
        return bool(
            self.dirty
            or self.dir_moves
            or self.file_moves
            or self.check_wds
            or self.check_paths
            or self.links
        )

    def link(self, key: Key, due: float, *, content: bool, writing: bool | None) -> None:
        """Record an event on an ignored name (see ``links``); the last event decides when."""
        entry = self.links.get(key)
        if entry is None:
            self.links[key] = Dirty(due, content, bool(writing))
            return
        entry.due = due
        entry.content |= content
        if writing is not None:
            entry.writing = writing

    def mark(
        self,
        key: Key,
        due: float,
        *,
        content: bool = False,
        writing: bool | None = None,
        closed_at: float | None = None,
        open_since: float | None = None,
        inode: int | None = None,
    ) -> None:
        """Record an event for ``key``: the last event decides when the path is due.
        ``open_since``: a write (kept from the first since the last close); ``writing``
        False (a close, a delete) clears it. ``inode``: see ``Dirty.inode``."""
        entry = self.dirty.get(key)
        if entry is None:
            self.dirty[key] = Dirty(due, content, bool(writing), closed_at, open_since, inode)
            return
        if inode is not None:
            entry.inode = inode
        entry.due = due
        entry.content |= content
        if writing is not None:
            entry.writing = writing
            if not writing:
                entry.open_since = None
        if open_since is not None and entry.open_since is None:
            entry.open_since = open_since
        if closed_at is not None and entry.closed_at is None:
            entry.closed_at = closed_at

    def requeue(self, key: Key, due: float, old: Dirty | None = None) -> None:
        """Put a path back for another look; a newer event already pending keeps its due."""
        entry = self.dirty.get(key)
        closed_at = old.closed_at if old is not None else None
        content = old.content if old is not None else False
        open_since = old.open_since if old is not None else None
        inode = old.inode if old is not None else None
        if entry is None:
            self.dirty[key] = Dirty(due, content, False, closed_at, open_since, inode)
            return
        entry.content |= content
        if entry.inode is None:
            entry.inode = inode
        if open_since is not None and entry.writing:
            entry.open_since = min(open_since, entry.open_since or open_since)
        if closed_at is not None and (entry.closed_at is None or closed_at < entry.closed_at):
            entry.closed_at = closed_at

    def check_wd(self, wd: int, due: float) -> None:
        self.check_wds[wd] = min(due, self.check_wds.get(wd, due))

    def check_path(self, path: RelPath, due: float) -> None:
        self.check_paths[path] = min(due, self.check_paths.get(path, due))

    def renamed(self, old: RelPath, new: RelPath) -> None:
        """Directory ``old`` was renamed to ``new``: checks queued by path before the rename
        name what is now below ``new`` (the rename rewrites the stored records likewise)."""
        if any(under(p, old) for p in self.check_paths):
            self.check_paths = {moved(p, old, new): d for p, d in self.check_paths.items()}

    def next_due(self) -> float | None:
        if self.dir_moves or self.file_moves:
            return 0.0
        dues = [d.due for d in self.dirty.values()]
        dues += self.check_wds.values()
        dues += self.check_paths.values()
        dues += [d.due for d in self.links.values()]
        return min(dues) if dues else None


# --- a batch taken for processing ------------------------------------------------------
@dataclass(slots=True)
class Check:
    path: RelPath
    wd: int | None


@dataclass(slots=True)
class MoveJob:
    move: FileMove
    src: RelPath | None
    dst: RelPath | None


@dataclass(slots=True)
class DirtyJob:
    key: Key | None
    path: RelPath
    dirty: Dirty


@dataclass(slots=True)
class Work:
    """One repository's share of a processing pass. Steps consume their lists as they commit,
    so a retry after a database error resumes where the failure was."""

    dir_moves: list[DirMove]
    moves: list[MoveJob]
    checks: list[Check]
    dirty: list[DirtyJob]
    links: list[DirtyJob] = field(default_factory=list)
    """Ignored names to look up by inode (``Pending.links``)."""
    linked: set[int] = field(default_factory=set)
    """Inodes of other names to look at (``Dirty.inode``) whose own name is not watched
    any more (its directory was removed or moved out): nothing else to look at."""
    covered: list[RelPath] = field(default_factory=list)
    """Subtrees reconciled in this pass: their dirty paths need no separate look."""
    held: set[RelPath] = field(default_factory=set)
    """Files those reconciliations found but left pending to settle (``Applier._hold``):
    not covered by them, whichever way they come back into this pass (as the other
    names of a file just written, ``Applier._pending_peers``)."""
    hashed: dict[RelPath, tuple[FileStat, Digest]] = field(default_factory=dict)
    """Hashes computed in this pass, reused by a retry when the file has not changed."""
    taken_moves: list[MoveJob] = field(default_factory=list)
    seen_checks: list[Check] = field(default_factory=list)
    """Every check this pass acted on (taken, or added while it ran)."""
    seen_dirty: list[DirtyJob] = field(default_factory=list)
    """Every path this pass looked at."""
    frozen_wds: set[int] = field(default_factory=set)
    frozen_paths: list[RelPath] = field(default_factory=list)
    """What the pass holds back: below a directory whose IN_MOVED_FROM is unpaired."""

    def __post_init__(self) -> None:
        self.taken_moves = list(self.moves)

    def __len__(self) -> int:
        return (
            len(self.dir_moves)
            + len(self.moves)
            + len(self.checks)
            + len(self.dirty)
            + len(self.links)
            + len(self.linked)
        )


class RepoWatch:
    """Everything the watcher knows about one repository."""

    def __init__(self, repo: Repository, writer: RepoWriter, rules: IgnoreRules) -> None:
        self.repo = repo
        self.writer = writer
        """The repository's one writer (shared with reconciliation)."""
        self.rules = rules
        self.index = DirIndex()
        self.pending = Pending()
        self.degraded = False
        """The watch limit was hit: some directories are not watched."""
        self.lost = False
        """The root went away: nothing is watched until the repository is added again."""
        self.move_log: list[tuple[RelPath, RelPath, int | None]] = []
        """Directory renames (old, new, wd) read since the current pass took its work."""
        self.foreign: collections.deque[tuple[float, RelPath]] = collections.deque()
        """Paths other writers (a reconciliation) changed lately, with when (monotonic)."""
        self.disputed: dict[RelPath, float] = {}
        """Directories a walk found otherwise than the watch tree has them, with since
        when (monotonic): walked again shortly (``WatchTree._place``)."""
        self.unplaced: set[Key] = set()
        """Directories that arrived (created, moved in) but that the walk watching them
        did not place, by name (``Key``: it follows renames of its parent): the disk was
        ahead of the events (another directory's watch is at that name already, the
        rename explaining it not read yet), or no watch could be added. By the events a
        directory is there, its watch unknown, and a rename onto it displaces it as it
        does a watched one (``EventInterpreter._unwatched_dir``); it follows its own
        renames, and is forgotten when deleted, moved out or placed."""
        self.failed: set[RelPath] = set()
        """Directories that could not be watched, listed or looked into (EACCES, EIO...):
        an attribute change on one of them or an ancestor (``chmod 755``) has the subtree
        watched and reconciled again, as nothing else would tell what changed meanwhile."""

    def renamed(self, old: RelPath, new: RelPath) -> None:
        """Directory ``old`` was renamed to ``new`` (over whatever was at ``new``): the
        directories that failed below it are below ``new`` now. A directory closed
        (``chmod 000``) and renamed is scanned again when it is opened under its new
        name (``had_failed``)."""
        if any(under(f, old) or under(f, new) for f in self.failed):
            self.failed = {moved(f, old, new) for f in self.failed if not under(f, new)}

    def had_failed(self, top: RelPath) -> bool:
        """Whether a directory at or below ``top`` failed (see ``failed``)."""
        return any(under(f, top) for f in self.failed)

    @property
    def id(self) -> UUID:
        return self.repo.id


def show(path: RelPath) -> str:
    """A relative path for log messages."""
    return os.fsdecode(path) or "."
