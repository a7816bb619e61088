"""The one writer of a repository: both tiers hand it changes, it checks them against the
disk and writes them to the store in one transaction per batch.

Why it re-checks: a change is computed from a look at the disk (an lstat, a hash)
and written a little later. If the file changed in between, the other tier has
seen or will see that newer state; writing the older look would leave a stale row.
So under the writer's lock every change is confirmed against ``lstat`` first, and
one that no longer holds is dropped (and counted): the newer state wins.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat as stat_mod
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from fsledger import decide
from fsledger.beneath import Beneath
from fsledger.errors import LeaseLost
from fsledger.ignore import IgnoreRules
from fsledger.model import Change, ChangeKind, FileStat, RelPath, Repository, ScanStats
from fsledger.store.base import Store
from fsledger.store.lease import Lease

log = logging.getLogger(__name__)


def _shows(st: os.stat_result, key: FileStat) -> bool:
    """Whether ``lstat`` shows the regular file a record's key says."""
    # A plain tuple equals the record's FileStat (a named tuple): no FileStat a change.
    return (
        stat_mod.S_ISREG(st.st_mode)
        and (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )
        == key
    )


_FILE_KINDS = frozenset(ChangeKind) - {ChangeKind.DELETED, ChangeKind.DIR_MOVED}
"""Changes that say what a file is now (its record): true while ``lstat`` shows that."""

_SEEN_KINDS = frozenset({ChangeKind.CREATED, ChangeKind.MODIFIED, ChangeKind.META})


def _as_seen(change: Change) -> bool:
    """Whether ``change`` may be written as the run saw it when no other run has written
    since the run began (``check_ahead``): what one path is now, by a look that succeeded.
    Its record carries a hash: the hasher read the file after the walk listed it and vouches
    (by ``fstat``) that it was this regular file, with this key, when read. A record without
    one is of a file that could not be read (it may have gone since the walk) or of a run
    that does not hash; moves (two paths, paired against records) and deletions (what cannot
    be seen is kept) are always looked at again."""
    record = change.record
    return change.kind in _SEEN_KINDS and record is not None and record.digest is not None


@dataclass(frozen=True, slots=True)
class Applied:
    """What a writer did with a batch."""

    changes: tuple[Change, ...]
    """The changes written (those still true on disk)."""
    dropped: tuple[Change, ...]
    """The changes the disk had already moved past."""
    last_seq: int | None
    """The change feed's last sequence number written, if any."""


class Ticket:
    """One run's count of the writes others made through the same writer since it began
    (``RepoWriter.ticket``): a check made ahead of a write holds while it is unchanged."""

    __slots__ = ("others", "__weakref__")

    def __init__(self) -> None:
        self.others = 0


@dataclass(frozen=True, slots=True)
class Checked:
    """A batch confirmed against the disk ahead of its write (``RepoWriter.check_ahead``)."""

    changes: Sequence[Change]
    kept: list[Change]
    dropped: list[Change]
    ticket: Ticket
    others: int
    """``ticket.others`` when the check began."""


Listener = Callable[[Repository, Applied], None]
Hold = Callable[[list[Change]], list[Change]]
"""Given the created and modified changes of a batch, those that may be written now (see
``Batches``)."""

HELD_KINDS = frozenset({ChangeKind.CREATED, ChangeKind.MODIFIED})
"""What a ``Hold`` is asked about: records of content that may still be being written
(metadata, moves and deletions are written as they come)."""


class RepoWriter:
    """Serialises every write to one repository's records.

    Args:
        store: where records live.
        repo: the repository written.
        rules: the repository's ignore rules: what the walker and the watcher skip.
        verify: confirm each change against the disk before writing it.
        retire: the rules under which a deletion of a path still on disk is true (the
            operator's: see ``RepoSettings``); ``rules`` when omitted. A path ignored only
            by other rules (a root's own ``.fsledger.yaml``, not accepted) keeps its record
            while the file is there: an untrusted writer of the tree cannot turn records
            into deletions by adding a pattern.
    """

    def __init__(
        self,
        store: Store,
        repo: Repository,
        rules: IgnoreRules,
        verify: bool = True,
        retire: IgnoreRules | None = None,
    ) -> None:
        self.store = store
        self.repo = repo
        self.rules = rules
        self.retire = rules if retire is None else retire
        self.verify = verify
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self.lease: Lease | None = None
        """Set by an agent that owns the repository among several: checked before each write."""
        self._tickets: weakref.WeakSet[Ticket] = weakref.WeakSet()
        self._tickets_lock = threading.Lock()
        """Guards the tickets and ``_live``; taken last (under ``lock``, or under the watcher's
        own lock, which a listener called under ``lock`` takes: never ``lock`` itself)."""
        self._live = 0
        """Live runs attached (``attach_live``): while any, no check is made ahead."""

    def attach_live(self) -> None:
        """A live run (the watcher) now decides from this repository's records as well. It
        writes nothing for a change it finds the records already show, and that decision is
        counted on no ticket: a batch checked ahead could be overtaken by a change such a
        run saw and wrote nothing for (a file deleted after the check, before the batch's
        record of it is written). So while one is attached, batches are confirmed under the
        lock only, and checks made ahead before it came no longer hold."""
        with self._tickets_lock:
            self._live += 1
        self._wrote()  # after the count: a check ahead sees one or the other

    def detach_live(self) -> None:
        """The live run of ``attach_live`` has stopped deciding for this repository."""
        with self._tickets_lock:
            self._live = max(0, self._live - 1)

    def ticket(self) -> Ticket:
        """A ticket for a run that checks its batches ahead (``check_ahead``)."""
        ticket = Ticket()
        with self._tickets_lock:
            self._tickets.add(ticket)
        return ticket

    def _wrote(self, by: Ticket | None = None) -> None:
        """After a write (or a change of root or rules) by ``by``, or a live run attached:
        every other run's checks made ahead no longer hold."""
        with self._tickets_lock:
            for ticket in self._tickets:
                if ticket is not by:
                    ticket.others += 1

    def refresh(
        self, repo: Repository, rules: IgnoreRules, retire: IgnoreRules | None = None
    ) -> None:
        """Adopt the newest copy of the repository (settings, device, state) and its rules."""
        with self.lock:
            self.repo = repo
            self.rules = rules
            self.retire = rules if retire is None else retire
            self._wrote()

    def still_true(self, change: Change, tree: Beneath | None = None) -> bool:
        """Whether the disk still shows what ``change`` says, looked at below the root
        without following symlinks (``tree``: the root opened for a batch of checks)."""
        if tree is None:
            try:
                with Beneath(self.repo.root) as fresh:
                    return self.still_true(change, fresh)
            except OSError:
                # The root cannot be opened: only a deletion would be true, and deletions
                # with a missing root are the guard's to allow, which it did not.
                return False
        kind = change.kind
        if kind is ChangeKind.DELETED:
            if self.retire.ignores_path(change.path):
                return True
            try:
                st = tree.lstat(change.path)
            except (FileNotFoundError, NotADirectoryError):
                return True  # gone, or a symlink (or a file) stands where a directory was
            except OSError:
                return False  # cannot know (EACCES, EIO, ESTALE): what cannot be seen is kept
            return not stat_mod.S_ISREG(st.st_mode)
        if kind is ChangeKind.DIR_MOVED:
            return tree.is_dir(change.path)
        assert change.record is not None
        try:
            st = tree.lstat(change.path)
        except OSError:
            return False
        return _shows(st, change.record.stat)

    def check_ahead(self, changes: Sequence[Change], ticket: Ticket) -> Checked | None:
        """Confirm a batch against the disk before taking the lock, while the run's previous
        batch is still being written (``apply(checked=)``); ``None``: this writer confirms
        only under its lock (a live run is attached: see ``attach_live``).

        Why this is as good as a check under the lock when no live run is attached: the
        runs of this writer then are reconciliations, one at a time, and a write by any
        other run in between is counted on ``ticket`` (the batch is then confirmed again);
        a disk that changes after the check is found by the next look at it (the next
        scan, or the watcher once attached, against the records as this batch leaves them),
        as after a check under the lock.

        When, besides, no other run has written since this run began (``ticket.others`` is
        still 0: the ticket is taken before the run reads a record or lists a directory),
        a created, modified or metadata change whose record carries a hash is written as
        the run saw it, unlooked at (``_as_seen``): the run's look is then the newest any
        writer of the repository made, and a disk that changed after it is found by the
        next look just as one that changes after a check is. This is the whole first index
        of a repository no watcher follows; it saves an ``lstat`` a file on the thread that
        builds the batches.
        """
        # In this order: a watcher attaching after ``others`` is read bumps it (the batch is
        # then confirmed again under the lock); one attached before is seen in ``_live``.
        others = ticket.others
        if self._live:
            return None
        kept, dropped = self._confirmed(changes, seen_hold=others == 0)
        return Checked(changes, kept, dropped, ticket, others)

    def apply(
        self,
        changes: Sequence[Change],
        confirm: Callable[[Change], bool] | None = None,
        checked: Checked | None = None,
    ) -> Applied:
        """Confirm and write a batch of changes in one transaction.

        Args:
            changes: the batch, in order.
            confirm: vouches for a change the disk no longer shows but that is still to be
                written: a directory rename whose directory has since been renamed again
                (the watcher has read the later rename and writes it after this one; each
                hop is a pure path rewrite, and consumers of the feed need every hop).
            checked: ``check_ahead``'s verdict on ``changes``: taken if no other run wrote
                since it began, else the batch is confirmed again.

        Raises:
            StoreError: the store failed; nothing of the batch was written.
        """
        with self.lock:
            self._check_lease()
            if (
                checked is not None
                and confirm is None
                and checked.changes is changes
                and checked.ticket.others == checked.others
            ):
                kept, dropped = checked.kept, checked.dropped
            else:
                kept, dropped = self._confirmed(changes, confirm)
            last_seq = self._write(kept, checked.ticket if checked is not None else None)
            return self._tell(Applied(tuple(kept), tuple(dropped), last_seq))

    def _write(self, changes: Sequence[Change], by: Ticket | None = None) -> int | None:
        """Under the lock: write confirmed changes (``Store.apply``) and count the write."""
        if not changes:
            return None
        last_seq = self.store.apply(self.repo.id, changes)
        self._wrote(by)
        return last_seq

    def _confirmed(
        self,
        changes: Sequence[Change],
        confirm: Callable[[Change], bool] | None = None,
        seen_hold: bool = False,
    ) -> tuple[list[Change], list[Change]]:
        """The changes the disk still shows (or ``confirm`` vouches for), and the others;
        ``seen_hold``: the changes ``_as_seen`` hold as seen (see ``check_ahead``)."""
        if not self.verify:
            return list(changes), []
        if seen_hold and all(map(_as_seen, changes)):
            return list(changes), []  # a first index's batch: nothing to open the root for
        kept: list[Change] = []
        dropped: list[Change] = []
        try:
            tree: Beneath | None = Beneath(self.repo.root)
        except OSError:
            tree = None
        # Files first, in path order: a batch's files share few directories, so each
        # directory is resolved once and each file costs one lstat relative to it (what
        # still_true does, without its dispatch and lookups a file).
        parent: RelPath | None = None
        fd = -1
        try:
            for change in changes:
                record = change.record
                if seen_hold and _as_seen(change):
                    kept.append(change)
                    continue
                if tree is not None and record is not None and change.kind in _FILE_KINDS:
                    up, _sep, name = change.path.rpartition(b"/")
                    if up != parent:
                        parent = up
                        try:
                            fd = tree.dir_fd(up)
                        except OSError:
                            fd = -1
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False) if fd >= 0 else None
                    except OSError:
                        st = None
                    ok = st is not None and _shows(st, record.stat)
                else:
                    parent = None  # still_true may turn the cached descriptors over
                    ok = tree is not None and self.still_true(change, tree)
                ok = ok or (confirm is not None and confirm(change))
                (kept if ok else dropped).append(change)
        finally:
            if tree is not None:
                tree.close()
        return kept, dropped

    def apply_moves(self, moves: Sequence[Change]) -> Applied:
        """Confirm and write a set of file moves (``MOVED`` changes, each found against the
        records as they were before any of them is written) in one transaction, in an order
        in which none replaces a record that is still to move away: a cycle of renames
        (two files swapped through a temporary name) reaches the store and the feed as
        moves, one of them through a hidden parking name (``decide.order_moves``).

        Raises:
            StoreError: the store failed; nothing was written.
        """
        with self.lock:
            self._check_lease()
            kept, dropped = self._confirmed(moves)
            # Parking hops are confirmed by the moves they are part of, checked above.
            ordered = decide.order_moves(kept, self._unused_path)
            last_seq = self._write(ordered)
            return self._tell(Applied(tuple(ordered), tuple(dropped), last_seq))

    def exchange(self, a: RelPath, b: RelPath) -> Applied:
        """Directories ``a`` and ``b`` exchanged names (``renameat2(RENAME_EXCHANGE)``): swap
        their records in one transaction, or nothing when the disk shows no directory at
        one of them any more (then the caller makes both true from the disk).

        A store knows one kind of prefix rewrite, ``DIR_MOVED``, which replaces what is at
        its target; so the swap is three of them through a prefix no record has: ``a`` to
        it, ``b`` to ``a``, it to ``b``. The feed carries the three, and a consumer that
        applies them in order (as it applies any ``dir_moved``) ends with the swap.

        Raises:
            StoreError: the store failed; nothing was written.
        """
        with self.lock:
            self._check_lease()
            halves = (
                Change(ChangeKind.DIR_MOVED, b, old_path=a),
                Change(ChangeKind.DIR_MOVED, a, old_path=b),
            )
            if self.verify and not all(self.still_true(c) for c in halves):
                return Applied((), halves, None)
            via = self._unused_prefix(a)
            changes = (
                Change(ChangeKind.DIR_MOVED, via, old_path=a),
                Change(ChangeKind.DIR_MOVED, a, old_path=b),
                Change(ChangeKind.DIR_MOVED, b, old_path=via),
            )
            last_seq = self._write(changes)
            return self._tell(Applied(changes, (), last_seq))

    def _unused_prefix(self, near: RelPath) -> RelPath:
        """A directory path beside ``near`` with no record at or below it (a hidden name,
        which the ignore rules keep out of the ledger anyway)."""
        parent = near.rpartition(b"/")[0]
        for n in itertools.count():
            name = b".fsledger-exchange-%d" % n
            path = parent + b"/" + name if parent else name
            if not self.store.page_records(self.repo.id, None, 1, path) and not (
                self.store.get_records(self.repo.id, [path])
            ):
                return path
        raise AssertionError("unreachable")

    def _unused_path(self, near: RelPath) -> RelPath:
        """A file path beside ``near`` with no record (a hidden name, which the ignore rules
        keep out of the ledger anyway)."""
        parent = near.rpartition(b"/")[0]
        for n in itertools.count():
            name = b".fsledger-move-%d" % n
            path = parent + b"/" + name if parent else name
            if not self.store.get_records(self.repo.id, [path]):
                return path
        raise AssertionError("unreachable")

    def _check_lease(self) -> None:
        if self.lease is not None and not self.lease.held():
            raise LeaseLost(
                f"repository {self.repo.id}: this agent no longer owns it; nothing written"
            )

    def _tell(self, applied: Applied) -> Applied:
        """Hand what was written to the listeners (feed hub, the watcher's foreign log)."""
        for listener in self.listeners:
            try:
                listener(self.repo, applied)
            except Exception:
                log.exception("Change listener failed for repository %s", self.repo.id)
        return applied


GENTLE_PACE = 0.5
"""A gentle run rests half as long as each batch took to write (two thirds of full speed)."""
MAX_PACE_S = 0.5
"""The longest rest between two batches, whatever the last write cost."""


class Batches:
    """Changes handed to a ``RepoWriter`` a batch at a time, each batch written in a thread
    of its own while the next is built: the database's work on batch n (SQLite's and
    psycopg's C code, outside the GIL) overlaps the walk, the hashing, the building of
    batch n + 1 and its check against the disk (``RepoWriter.check_ahead``, in the thread
    that flushes). One batch in flight at most, so batches are written in order and a
    failure surfaces at the next flush (or ``wait``).

    Args:
        writer: the repository's writer.
        batch_size: changes per transaction.
        stats: where what was written is counted (``fsledger.decide.count``).
        defer_after: a first index that has written this many changes asks the store to
            defer the indexes only queries use (``Store.defer_indexes``); ``None``: never.
        hold: keeps back created/modified records of files not settled yet (the watcher's
            reconciliation of a new subtree: see ``fsledger.watch.settle``); what it holds
            is reported as dropped, so the run counts it unsettled.
        pace: a gentle (scheduled) run's duty cycle: before each batch, the scanning thread
            rests this fraction of the time the previous batch took to write, so the
            database and the GIL are left to the API and the watcher between batches.
    """

    def __init__(
        self,
        writer: RepoWriter,
        batch_size: int,
        stats: ScanStats,
        defer_after: int | None = None,
        hold: Hold | None = None,
        pace: float = 0.0,
    ) -> None:
        self.writer = writer
        self.hold = hold
        self.pace = pace
        self._write_s = 0.0
        self.batch_size = batch_size
        self.stats = stats
        self.defer_after = defer_after
        self.pending: list[Change] = []
        self._thread: threading.Thread | None = None
        self._written: Applied | None = None
        self._error: BaseException | None = None
        self._flushed = 0
        self._deferral: AbstractContextManager[None] | None = None
        self._ticket = writer.ticket()

    def emit(self, change: Change) -> None:
        self.pending.append(change)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Start writing the pending changes (after the batch in flight is written)."""
        batch, self.pending = self.pending, []
        if not batch:
            return
        # Confirmed against the disk here, while the batch in flight is written (its
        # thread waits on the database mostly): the writer thread only writes.
        checked = self.writer.check_ahead(batch, self._ticket) if self.hold is None else None
        self.wait()
        if self.pace and self._write_s:
            time.sleep(min(self._write_s * self.pace, MAX_PACE_S))
        if self.defer_after is not None and self._deferral is None:
            self._flushed += len(batch)
            if self._flushed >= self.defer_after:
                # A big first index: the store may build some indexes once, at the end.
                self._deferral = self.writer.store.defer_indexes()
                self._deferral.__enter__()
        self._thread = threading.Thread(
            target=self._write, args=(batch, checked), name="reconcile-writer", daemon=True
        )
        self._thread.start()

    def _write(self, batch: list[Change], checked: Checked | None) -> None:
        t0 = time.monotonic()
        try:
            self._written = self._apply(batch, checked)
        except BaseException as exc:
            self._error = exc
        self._write_s = time.monotonic() - t0

    def _apply(self, batch: list[Change], checked: Checked | None) -> Applied:
        if self.hold is None:
            return self.writer.apply(batch, checked=checked)
        candidates = [c for c in batch if c.kind in HELD_KINDS and c.record is not None]
        free = {id(c) for c in self.hold(candidates)} if candidates else set()
        held = tuple(c for c in candidates if id(c) not in free)
        if not held:
            return self.writer.apply(batch)
        ids = {id(c) for c in held}
        rest = [c for c in batch if id(c) not in ids]
        applied = self.writer.apply(rest) if rest else Applied((), (), None)
        return Applied(applied.changes, applied.dropped + held, applied.last_seq)

    def wait(self) -> None:
        """Wait for the batch in flight; count what it wrote, or raise what it raised."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        applied, self._written = self._written, None
        assert applied is not None
        self.stats.unsettled += len(applied.dropped)
        decide.count(self.stats, applied.changes)
        if log.isEnabledFor(logging.DEBUG):
            for change in applied.changes:
                if change.kind is ChangeKind.CREATED:
                    log.debug("File record created: %s", os.fsdecode(change.path))

    def drain(self) -> None:
        """After a failure: let the batch in flight finish, so nothing is written after the
        reconciliation has returned; its own error, if any, is logged, not raised."""
        try:
            self.wait()
        except Exception:
            log.exception(
                "Repository %s: a batch failed while the scan was failing", self.writer.repo.id
            )

    def end_deferral(self) -> None:
        """Rebuild the indexes a big first index deferred (if it did)."""
        if self._deferral is not None:
            deferral, self._deferral = self._deferral, None
            deferral.__exit__(None, None, None)
