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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fsledger.errors import LeaseLost
from fsledger.ignore import IgnoreRules
from fsledger.model import Change, ChangeKind, FileStat, RelPath, Repository
from fsledger.store.base import Store
from fsledger.store.lease import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Applied:
    """What a writer did with a batch."""

    changes: tuple[Change, ...]
    """The changes written (those still true on disk)."""
    dropped: tuple[Change, ...]
    """The changes the disk had already moved past."""
    last_seq: int | None
    """The change feed's last sequence number written, if any."""


Listener = Callable[[Repository, Applied], None]


class RepoWriter:
    """Serialises every write to one repository's records.

    Args:
        store: where records live.
        repo: the repository written.
        rules: the repository's ignore rules (a deletion of a now-ignored path is true
            even though the file is still on disk).
        verify: confirm each change against the disk before writing it.
    """

    def __init__(
        self, store: Store, repo: Repository, rules: IgnoreRules, verify: bool = True
    ) -> None:
        self.store = store
        self.repo = repo
        self.rules = rules
        self.verify = verify
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self.lease: Lease | None = None
        """Set by an agent that owns the repository among several: checked before each write."""

    def refresh(self, repo: Repository, rules: IgnoreRules) -> None:
        """Adopt the newest copy of the repository (settings, device, state) and its rules."""
        with self.lock:
            self.repo = repo
            self.rules = rules

    def _lstat_key(self, path: bytes) -> FileStat | None:
        try:
            st = os.lstat(self.repo.root + b"/" + path)
        except OSError:
            return None
        return FileStat.from_stat(st) if stat_mod.S_ISREG(st.st_mode) else None

    def still_true(self, change: Change) -> bool:
        """Whether the disk still shows what ``change`` says."""
        kind = change.kind
        if kind is ChangeKind.DELETED:
            if self.rules.ignores_path(change.path):
                return True
            try:
                st = os.lstat(self.repo.root + b"/" + change.path)
            except (FileNotFoundError, NotADirectoryError):
                return True
            except OSError:
                return False  # cannot know (EACCES, EIO, ESTALE): what cannot be seen is kept
            return not stat_mod.S_ISREG(st.st_mode)
        if kind is ChangeKind.DIR_MOVED:
            return os.path.isdir(self.repo.root + b"/" + change.path)
        assert change.record is not None
        return self._lstat_key(change.path) == change.record.stat

    def apply(
        self, changes: Sequence[Change], confirm: Callable[[Change], bool] | None = None
    ) -> Applied:
        """Confirm and write a batch of changes in one transaction.

        Args:
            changes: the batch, in order.
            confirm: vouches for a change the disk no longer shows but that is still to be
                written: a directory rename whose directory has since been renamed again
                (the watcher has read the later rename and writes it after this one; each
                hop is a pure path rewrite, and consumers of the feed need every hop).

        Raises:
            StoreError: the store failed; nothing of the batch was written.
        """
        with self.lock:
            self._check_lease()
            kept: list[Change] = []
            dropped: list[Change] = []
            for change in changes:
                ok = not self.verify or self.still_true(change)
                ok = ok or (confirm is not None and confirm(change))
                (kept if ok else dropped).append(change)
            last_seq = self.store.apply(self.repo.id, kept) if kept else None
            return self._tell(Applied(tuple(kept), tuple(dropped), last_seq))

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
            last_seq = self.store.apply(self.repo.id, changes)
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
