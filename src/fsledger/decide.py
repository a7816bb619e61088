"""What fsledger decides about a file: pure functions, no I/O, one copy.

Both tiers (the watcher's look at a path, the reconciliation's merge of a walk with the
records) and every scan strategy (in-process, key ranges in worker processes, ranges
computed by other agents) ask these questions here and nowhere else:

- ``needs_look``: can a record be trusted as it is, or must the file be hashed?
  (``is_racy`` is git's "racy clean" rule: a record hashed within the mtime clock's
  granularity of its last write proves nothing about a later write.)
- ``classify``: what a look found, as a change kind (or nothing); ``corrupted`` says
  when a ``--verify`` rehash found content that changed behind the filesystem's back.
- ``is_move_of`` / ``pair_moves``: whether a new path is a record's file that moved
  (the record follows it and keeps its hash); ``order_moves``: in which order a set of
  moves is written, so that none lands on a record still to move away (a cycle of
  renames, ``a -> b -> c -> a``, goes through a parking name); ``after_move_away``: what
  the file now at a move's source path (another one: a swap, ``mv g c; echo > g``) is.
- ``count``: what a batch the writer wrote adds to a run's statistics.
- ``SettleRule``: when the watcher may look at a path an event named, or a file a listing
  found: not while a writer may still have it open (before its ``IN_CLOSE_WRITE``, or
  until it has been quiet for the debounce time); ``SettleRule.held``: a file written and
  not closed that a writer still holds open waits on, up to ``max_hold_s``.

The I/O (lstat, hashing, the database) stays with the callers; what they pass in is
plain data: ``FileStat`` keys, ``Digest``s, ``FileRecord``s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from fsledger.model import (
    NS_PER_S,
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    RecordRow,
    RelPath,
    ScanStats,
    datetime_to_ns,
)

__all__ = [
    "RACY_WINDOW_NS",
    "after_move_away",
    "LookRule",
    "SettleRule",
    "classify",
    "corrupted",
    "count",
    "is_move_of",
    "is_object_move_of",
    "is_racy",
    "needs_look",
    "order_moves",
    "pair_moves",
    "row_settled",
]

RACY_WINDOW_NS = 2 * NS_PER_S
"""A file hashed within this long of its last write may have been written again within
the mtime clock's granularity: its record proves nothing and it is hashed again."""


@dataclass(frozen=True, slots=True)
class LookRule:
    """How a run looks at files.

    Args:
        algo: the hash algorithm in use; a record hashed with another one is looked at.
        hashing: whether files are hashed at all (without, only the ``lstat`` key counts).
        verify: look at every file (a ``--verify`` scan rehashes everything).
        racy: apply the racy rule (local files); off for objects (see ``fsledger.s3``).
    """

    algo: str
    hashing: bool = True
    verify: bool = False
    racy: bool = True
    """Whether the key can miss a write (the mtime clock's granularity: git's racy rule).
    An object store's key cannot: its ETag changes with every write of other content."""


def is_racy(mtime_ns: int, scanned_ns: int) -> bool:
    """Whether a record's hash may predate a write that kept the same mtime.

    Racy: hashed within the mtime clock's granularity of its last write, so a later write
    could have kept the same mtime. An mtime far in the *future* (a camera with a wrong
    clock) is not racy: any later write sets mtime to now, which differs.
    """
    return abs(mtime_ns - scanned_ns) <= RACY_WINDOW_NS


def record_is_racy(record: FileRecord) -> bool:
    """``is_racy`` of a record: its mtime against the moment it was looked at."""
    return is_racy(record.stat.mtime_ns, datetime_to_ns(record.last_scanned))


def needs_look(
    old: FileRecord | None, stat: FileStat, rule: LookRule, *, content_hint: bool = True
) -> bool:
    """Whether the file now at ``stat`` must be looked at (hashed) against its record ``old``.

    ``content_hint``: whether anything suggests the content may have changed. A scan knows
    nothing, so it is true there; the watcher passes false for an event that only touched
    attributes, which spares hashing a racy record on ``chmod``.
    """
    if old is None or rule.verify or old.stat != stat:
        return True
    if not rule.hashing:
        return False
    if old.digest is None or old.digest.algo != rule.algo:
        return True
    return content_hint and rule.racy and record_is_racy(old)


def row_settled(
    row: RecordRow,
    stat: tuple[int, int, int, int],
    algo: str,
    hashing: bool,
    verify: bool,
    racy: bool = True,
) -> bool:
    """``not needs_look`` for a stored row and a walked file's flat ``lstat`` key: the merge's
    question, asked once for every file of a rescan, without building a ``FileRecord``.
    Property-tested to agree with ``needs_look``."""
    # Row fields: 0 path, 1-4 the lstat key, 5 hash, 6 algorithm, 7 scanned_ns.
    return (
        not verify
        and row[1:5] == stat
        and (
            not hashing
            or (
                row[5] is not None
                and row[6] == algo
                and (not racy or abs(row[2] - row[7]) > RACY_WINDOW_NS)
            )
        )
    )


def corrupted(old: FileRecord | None, stat: FileStat, digest: Digest, rule: LookRule) -> bool:
    """Whether a verifying rehash found silent corruption: the content changed while nothing
    the filesystem tracks did, not size, not mtime, not even ctime (any write or ``utime``
    through the kernel moves ctime, so a tool that restores mtime after an edit made a
    modification, not corruption). The stored hash is then kept and the file reported."""
    return (
        rule.verify
        and old is not None
        and old.digest is not None
        and old.digest.algo == digest.algo
        and old.digest != digest
        and old.stat == stat
    )


def classify(
    old: FileRecord | None, stat: FileStat, digest: Digest | None, rule: LookRule
) -> ChangeKind | None:
    """The change a look found: the file now has ``stat`` (and ``digest``, if it was hashed;
    ``None`` when hashing is off or failed) and its record was ``old``.

    - no record: ``CREATED``;
    - the content changed: ``MODIFIED``. A size change always is. With two hashes of one
      algorithm, the hashes decide. Without a hash of now (hashing off or failed), an mtime
      change counts as a content change. A record without a hash that gains one is
      ``MODIFIED`` too (the feed carries the first hash). A hash of *another* algorithm
      proves nothing about the content: after the operator switches algorithms only a size
      change is a modification, so the rehash refreshes records quietly instead of
      announcing every touched file as modified (both tiers alike);
    - only metadata changed (ctime, inode, mtime without content), the record gains a hash,
      or a racy record was confirmed: ``META`` (refreshes the record; not in the feed);
    - otherwise nothing.

    ``corrupted`` is asked first by a verifying scan.
    """
    if old is None:
        return ChangeKind.CREATED
    if old.stat.size != stat.size:
        return ChangeKind.MODIFIED
    if digest is not None and old.digest is not None:
        if old.digest.algo == digest.algo and old.digest != digest:
            return ChangeKind.MODIFIED
    elif digest is not None:
        # The record had no hash (hashing was off, or failed): the feed entry that carries
        # the first hash announces the content, as the one that created it could not.
        return ChangeKind.MODIFIED
    elif old.stat.mtime_ns != stat.mtime_ns:
        return ChangeKind.MODIFIED  # no hash of now: size and mtime decide
    if old.stat != stat or (digest is not None and old.digest != digest):
        return ChangeKind.META
    if digest is not None and rule.hashing and rule.racy and record_is_racy(old):
        return ChangeKind.META  # confirmed: record the later look, which is no longer racy
    return None


def is_move_of(record: FileRecord, path: RelPath, stat: FileStat, rule: LookRule) -> bool:
    """Whether the file at ``path`` with ``stat`` is ``record``'s file, moved there: the
    same inode, size and mtime, at another path, and a hash worth keeping (one of the
    algorithm in use, when hashing). The caller checks that the record's own path no
    longer holds that file."""
    return (
        record.path != path
        and record.stat.inode == stat.inode
        and record.stat.size == stat.size
        and record.stat.mtime_ns == stat.mtime_ns
        and (not rule.hashing or (record.digest is not None and record.digest.algo == rule.algo))
    )


def is_object_move_of(record: FileRecord, path: RelPath, stat: FileStat, rule: LookRule) -> bool:
    """``is_move_of`` for an object store, where a rename is a server-side copy (a new
    LastModified) and a delete: the same ETag (its fingerprint stands in the inode slot, see
    ``fsledger.s3.bucket.object_stat``) and size, at another key, and a hash worth keeping.
    The ETag of a single-part object is the MD5 of its content, so equal ETags and sizes
    mean the same content; the caller checks that the record's own key is gone."""
    return (
        record.path != path
        and record.stat.inode == stat.inode
        and record.stat.size == stat.size
        and (not rule.hashing or (record.digest is not None and record.digest.algo == rule.algo))
    )


MoveMatch = Callable[[FileRecord, RelPath, FileStat, LookRule], bool]
"""Whether a new path is a record's file moved there: ``is_move_of`` (local trees) or
``is_object_move_of`` (buckets)."""


def pair_moves(
    appeared: Sequence[tuple[RelPath, FileStat]],
    candidates: Iterable[FileRecord],
    rule: LookRule,
    gone: Callable[[FileRecord], bool],
    taken: set[RelPath] | None = None,
    match: MoveMatch = is_move_of,
) -> dict[RelPath, FileRecord]:
    """Pair new paths with the records they are moves of.

    Args:
        appeared: new paths (no record of their own) with their ``lstat`` keys, in order.
        candidates: records that may have moved (those sharing an inode with a new path).
        rule: the run's hashing choices.
        gone: whether a record's own path no longer holds its file (the caller's ``lstat``);
            asked only of records that match, at most once each.
        taken: record paths already claimed by an earlier pairing of the same run; those
            paired here are added.
        match: the move predicate (``is_move_of``; ``is_object_move_of`` for buckets).

    Returns:
        new path -> the record that moves there. Each record moves to one path at most
        (the first, in ``appeared`` order), so two hard links cannot both claim one record.
    """
    taken = set() if taken is None else taken
    by_inode: dict[int, list[FileRecord]] = {}
    for rec in candidates:
        by_inode.setdefault(rec.stat.inode, []).append(rec)
    verdict: dict[RelPath, bool] = {}
    out: dict[RelPath, FileRecord] = {}
    for path, stat in appeared:
        for rec in by_inode.get(stat.inode, ()):
            if rec.path in taken or not match(rec, path, stat, rule):
                continue
            if rec.path not in verdict:
                verdict[rec.path] = gone(rec)
            if verdict[rec.path]:
                taken.add(rec.path)
                out[path] = rec
                break
    return out


def after_move_away(kind: ChangeKind) -> ChangeKind:
    """The change a look found at a path whose record a move of the same run takes away
    (``pair_moves``: the record's file is elsewhere now, and the path holds another file,
    ``mv g c; echo new > g``). Looked at against that record, a content change or a refresh,
    but once the move is written the path has no record: for the store and every consumer
    of the feed, the file there is new. It is written *after* the move (a move replaces
    whatever record is at its source's path: written before, it would be carried away).
    Moves and deletions are what they are."""
    if kind is ChangeKind.MODIFIED or kind is ChangeKind.META:
        return ChangeKind.CREATED
    return kind


def order_moves(moves: Sequence[Change], park: Callable[[RelPath], RelPath]) -> list[Change]:
    """The order in which to write ``moves`` (``MOVED`` changes, each a record found at its
    new path, all as the records were before any of them is written): a move whose target
    holds a record that moves away itself comes after that record's move, since a move
    replaces what is at its target, for the store and for every consumer of the feed.

    A cycle (``mv a t; mv c a; mv b c; mv t b``, two files swapped through a temporary
    name) has no such order: one of its files is first moved to ``park(path)``, a name no
    record has, and from there to its target once that is free, as a consumer following
    the feed would have to.

    Returns the moves in order, parking hops included (recognisable by ``park``'s names).
    """
    waiting = [m for m in moves if m.old_path is not None and m.old_path != m.path]
    out: list[Change] = []
    while waiting:
        sources = {m.old_path for m in waiting}
        ready = [m for m in waiting if m.path not in sources]
        if not ready:
            first = waiting[0]
            assert first.record is not None and first.old_path is not None
            via = park(first.path)
            out.append(
                Change(ChangeKind.MOVED, via, replace(first.record, path=via), first.old_path)
            )
            waiting[0] = Change(ChangeKind.MOVED, first.path, first.record, via)
            continue
        out += ready
        taken = {id(m) for m in ready}
        waiting = [m for m in waiting if id(m) not in taken]
    return out


def count(stats: ScanStats, changes: Iterable[Change]) -> None:
    """Add what the writer wrote to a run's statistics (both tiers count the same way).
    A directory rename counts as one move."""
    for change in changes:
        kind = change.kind
        if kind is ChangeKind.CREATED:
            stats.files_added += 1
        elif kind is ChangeKind.MODIFIED:
            stats.files_updated += 1
        elif kind is ChangeKind.META:
            stats.metadata_updated += 1
        elif kind is ChangeKind.MOVED or kind is ChangeKind.DIR_MOVED:
            stats.files_moved += 1
        elif kind is ChangeKind.DELETED:
            stats.files_removed += 1


@dataclass(frozen=True, slots=True)
class SettleRule:
    """When a path is settled enough to be looked at (the watcher's tier; a scan looks at
    what is there, and its unsettled files are the ones that change while hashed).

    Args:
        settle_s: a short pause after an event that ends a write (a close, a delete, a
            rename), so that the events of one operation are taken together.
        debounce_s: how long a path must be quiet after an event that says a writer may
            still be at work (a create, a write, attributes during a write).
    """

    settle_s: float
    debounce_s: float
    max_hold_s: float = 0.0
    """How long a file written and not closed since (``IN_MODIFY`` without its
    ``IN_CLOSE_WRITE``) may wait past its debounce while a writer holds it open: a writer
    stalled between two writes (``cp`` under load) is not recorded at a partial size. A
    file held open for good (a log) is recorded once this is over, and again after its
    next writes: at most once per hold. Zero: no hold, the debounce decides."""

    def after_close(self) -> float:
        """Seconds to wait after ``IN_CLOSE_WRITE``, a delete or a rename."""
        return self.settle_s

    def after_write(self) -> float:
        """Seconds to wait after ``IN_CREATE`` or ``IN_MODIFY``: the file may still be open."""
        return self.debounce_s

    def after_attrib(self, writing: bool) -> float:
        """Seconds to wait after ``IN_ATTRIB`` (tar and ``cp -p`` set times after the
        close): it settles fast, unless a write is still in progress."""
        return self.debounce_s if writing else self.settle_s

    def after_unclosed_write(self, now: float, open_since: float) -> float:
        """When a file written at ``now``, and written without a close since
        ``open_since``, is due: after the debounce, but a file written on and on (a log
        kept open) no later than its hold allows (with a hold; without, the debounce
        alone decides, as for any write)."""
        due = now + self.debounce_s
        return min(due, self.hold_until(open_since)) if self.max_hold_s > 0 else due

    def hold_until(self, open_since: float) -> float:
        """Until when a file written since ``open_since`` (monotonic: its first write
        without a close since) is held back while a writer holds it open."""
        return open_since + self.max_hold_s

    def held(self, open_since: float | None, now: float, writer_open: bool) -> bool:
        """Whether a due file waits on: written without a close since ``open_since`` (None:
        closed, or no write), a writer holds it open, and its hold is not over."""
        return open_since is not None and writer_open and now < self.hold_until(open_since)

    def found_by_walk(self, ctime_ns: int, wall_ns: int) -> float:
        """Seconds until a file a listing found (with no event history from before its
        directory was watched) has been quiet for the debounce time: its ctime stands in
        for its last event. Zero or less: settled now."""
        return (ctime_ns - wall_ns) / 1e9 + self.debounce_s
